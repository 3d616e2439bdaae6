"""The blocking pump: one SMTP session over a blocking socket, and the
``fork`` process model and ``sendmail -bs`` that run it.

:func:`pump` reads what the client sends, feeds it to the
:class:`~pymta.smtpd_session.Session`, writes the replies and does what
:meth:`~pymta.smtpd_session.Session.next_step` asks: a commit right there
(the fsyncs block this session only), the TLS handshake, the end. It
serves a child process per session (``smtpd_process_model = fork``: the
socketserver :class:`Server` with ForkingMixIn, run by :func:`serve`), the
event loop's TLS sessions (:mod:`pymta.smtpd_loop` hands each to a thread
of its own), a thread per session (``threads``, :mod:`pymta.smtpd_threads`,
with the same :class:`Handler`) and, over stdin and stdout,
``sendmail -bs`` (:func:`serve_stdio`).
"""

import logging
import os
import pwd
import select
import selectors
import signal
import socket
import socketserver
import ssl
import sys
import time

from . import smtpd_common as common
from .smtpd_session import CLOSE, COMMIT, STARTTLS
from . import queue_maildrop
from .status import MESSAGE_BLOCK, READ_SIZE, SpoolError

_POLL = 1.0     # how often a blocked session looks at STOPPING
_SCAN = 0.25    # how often the fork server reaps its children and ticks


class Handler(socketserver.BaseRequestHandler):
    """One connection in a process of its own."""

    def handle(self):
        srv = self.server
        services = srv.services
        cfg, log = services.cfg, services.log
        sock = self.request
        ip = common.client_ip(self.client_address)
        name = services.peer_lookup(ip) if services.peer_lookup else "unknown"
        peer = f"{name}[{ip}]"
        log.info(f"connect from {peer}")
        if srv.implicit_tls:
            session = services.session(ip, name, submission=True, tls_available=True)
            try:
                sock = implicit_tls(sock, session, services, peer)
                if sock is not None:
                    self.request = sock
                    pump(sock, session, services, peer, first=session.greeting(),
                         stressed=srv.session_stressed)
            finally:
                session.close()
            log.info(f"disconnect from {peer}")
            return
        if cfg.smtpd_greet_pause and _early_talker(sock, cfg.smtpd_greet_pause):
            log.info(common.early_line(peer))
            _send(sock, common.R_EARLY.lines(), cfg)
            log.info(f"disconnect from {peer}")
            return
        session = services.session(ip, name, submission=srv.submission,
                                   tls_available=services.ssl_ctx is not None)
        try:
            sock = pump(sock, session, services, peer, first=session.greeting(),
                        stressed=srv.session_stressed)
            if sock is not None:
                self.request = sock
        finally:
            session.close()
        log.info(f"disconnect from {peer}")


def _early_talker(sock, pause):
    try:
        ready, _, _ = select.select([sock], [], [], pause)
    except (OSError, ValueError):
        return False
    return bool(ready)


def _send(sock, data, cfg):
    if data:
        sock.settimeout(cfg.smtpd_timeout)
        sock.sendall(data)


def pump(sock, session, services, peer, first=b"", stressed=None):
    """Run a session over a blocking socket until it ends, after sending
    ``first``; returns the socket last used (a TLS one after STARTTLS), or
    None if a TLS handshake failed. Network errors are logged.
    ``stressed(idle_since)``, if given, says whether the session, idle
    since then, is under its listener's stress (smtpd_stress_timeout)."""
    try:
        _send(sock, first, services.cfg)
        return _pump(sock, session, services, peer, stressed)
    except OSError as e:
        services.log.info(common.lost_line(session.last_command, peer, e))
        return sock


def _pump(sock, session, services, peer, stressed):
    cfg, log = services.cfg, services.log
    idle_since = time.monotonic()
    data_start = None
    partial = 0
    while True:
        step = session.next_step()
        if step is CLOSE:
            return sock
        if step is STARTTLS:
            sock = starttls(sock, session, services, peer)
            if sock is None:
                return None
            continue
        now = time.monotonic()
        data_start = (now if data_start is None else data_start) if session.in_data else None
        stress = stressed is not None and stressed(idle_since)
        limit = common.deadline(cfg, session, idle_since, data_start, stress)
        if now >= limit:
            _send(sock, common.expire(cfg, log, session, peer, now, idle_since, stress), cfg)
            return sock
        if common.STOPPING.is_set() and not session.in_data:
            _send(sock, session.shutdown_reply(), cfg)
            return sock
        sock.settimeout(min(_POLL, limit - now))
        try:
            data = sock.recv(READ_SIZE)
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        if not data:
            if session.last_command != "QUIT":
                log.info(common.lost_line(session.last_command, peer))
            return sock
        out = session.feed(data)
        again, partial = common.record_clock(cfg, session, data, partial)
        while True:
            if session.next_step() is COMMIT:
                out += session.commit()
                again = True
            elif session.hold:                  # a failed AUTH: its reply waits
                time.sleep(session.hold)
                _send(sock, out, cfg)
                out = session.release()
                again = True
            else:
                break
        if again:
            idle_since = time.monotonic()
        _send(sock, out, cfg)


def starttls(sock, session, services, peer):
    """The TLS handshake after STARTTLS's 220; None (session closed) if it fails."""
    sock.settimeout(services.cfg.smtpd_timeout)
    try:
        tls = services.ssl_ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as e:
        services.log.info(f"SSL_accept error from {peer}: {e}")
        session.close()
        return None
    cipher = tls.cipher()
    session.tls_started(f"{tls.version()} with cipher {cipher[0] if cipher else '?'}")
    return tls


def implicit_tls(sock, session, services, peer):
    """The TLS handshake of a submissions (port 465) connection, before the
    greeting; the TLS socket, or None (logged, session closed)."""
    if services.ssl_ctx is None:
        services.log.info(f"warning: {peer}: no TLS certificate for implicit TLS "
                          "(smtpd_tls_cert_file); connection closed")
        session.close()
        return None
    session.starttls_wanted = True
    return starttls(sock, session, services, peer)


class Server(common.Admission, socketserver.ForkingMixIn, socketserver.TCPServer):
    """The fork model's sessions of one listening socket: socketserver's
    ForkingMixIn, with the admission limits."""

    allow_reuse_address = True
    request_queue_size = 256
    block_on_close = True
    timeout = 0     # handle_request(): the socket is known to be readable
    session_stressed = None     # a child's counts are a copy: no stress timeout

    def __init__(self, sock, services, submission=False):
        self.address_family = sock.family
        socketserver.TCPServer.__init__(self, sock.getsockname(), Handler,
                                        bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        common.Admission.__init__(self, services, submission)
        self.max_children = services.cfg.smtpd_session_limit + 16
        self._pid_client = {}

    def process_request(self, request, client_address):
        ip = common.client_ip(client_address)
        if self.turned_away(request, ip):
            self.shutdown_request(request)
            return
        before = set(self.active_children or ())
        try:
            super().process_request(request, client_address)
        except OSError:
            self.leave(ip)
            raise
        for pid in set(self.active_children or ()) - before:
            self._pid_client[pid] = ip

    def collect_children(self, *, blocking=False):
        super().collect_children(blocking=blocking)
        for pid in list(self._pid_client):
            if pid not in (self.active_children or ()):
                self.leave(self._pid_client.pop(pid))

    def handle_error(self, request, client_address):
        self.services.log.exception(f"error in session with {client_address}")

    def stop_children(self):
        """Each session process answers 421 at its next command."""
        for pid in list(self.active_children or ()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def serve(servers, stop=None, tick=None):
    """Accept on every server until ``stop()`` (default: STOPPING) is true,
    a child process per session; then close the sockets and wait for the
    sessions in progress. ``tick()`` runs at every turn (about four times a
    second)."""
    stop = stop or common.STOPPING.is_set
    with selectors.DefaultSelector() as sel:
        for srv in servers:
            sel.register(srv.socket, selectors.EVENT_READ, srv)
        while not stop():
            try:
                events = sel.select(_SCAN)
            except InterruptedError:
                events = []
            for key, _ in events:
                key.data.handle_request()
            for srv in servers:
                srv.service_actions()
            if tick:
                tick()
    for srv in servers:
        srv.stop_children()
        srv.server_close()


class _MaildropWriter:
    """-bs for a user who cannot write the queue: the message goes into the
    maildrop (picked up by the daemon) instead of straight into queue/."""

    id = "(maildrop)"

    def __init__(self, spool):
        import tempfile
        self.spool, self.size = spool, 0
        self.file = tempfile.TemporaryFile()

    def write(self, data):
        try:
            self.file.write(data)
        except OSError as e:
            raise SpoolError(str(e)) from None
        self.size += len(data)

    def commit(self, env):
        self.file.seek(0)
        name = queue_maildrop.drop(self.spool, env, iter(lambda: self.file.read(MESSAGE_BLOCK), b""))
        return f"maildrop/{name}"

    def abort(self):
        self.file.close()


def serve_stdio(cfg, opts, stdin=None, stdout=None):
    """``sendmail -bs``: one SMTP session on stdin/stdout for the calling user."""
    log = logging.getLogger("pymta")
    left = []                  # accepted, and no daemon was told: delivered at the end

    def accepted(qid):
        # As the command line does: a running daemon delivers it at once.
        # (A maildrop submission is picked up by the daemon within a second.)
        if not services.spool.writable():
            return
        nfd = services.spool.notify_open()
        if nfd is None or not services.spool.notify_send(nfd, qid):
            left.append(qid)
    services = common.Services(cfg, log, notify=accepted)
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    session = services.session(local_uid=uid, local_user=user, auth=False)
    if not services.spool.writable():
        session.begin_message = lambda: _MaildropWriter(services.spool)
    infd = (stdin or sys.stdin).fileno()
    out = stdout or sys.stdout.buffer
    out.write(session.greeting())
    out.flush()
    try:
        while session.next_step() is not CLOSE:
            ready, _, _ = select.select([infd], [], [], cfg.smtpd_timeout)
            if not ready:
                out.write(session.timeout())
                break
            data = os.read(infd, READ_SIZE)
            if not data:
                break
            reply = session.feed(data)
            while session.next_step() is COMMIT:
                reply += session.commit()
            if reply:
                out.write(reply)
                out.flush()
        out.flush()
    except BrokenPipeError:
        pass
    finally:
        session.close()
    _deliver_left(cfg, services.spool, left)
    return 0


def _deliver_left(cfg, spool, qids):
    """-bs without a daemon: each message queued here is delivered by a
    background process, as sendmail's -odb (delivery_mode=queue: the next
    queue run)."""
    if not qids or cfg.delivery_mode == "queue":
        return
    from . import inject
    for qid in qids:
        lock = spool.lock(qid)
        if lock is not None:
            inject._deliver_background(cfg, lock)
