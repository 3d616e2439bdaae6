"""The SMTP service: a socketserver TCP server whose handler pumps a socket
through an :class:`~pymta.smtp_session.Session`, and ``sendmail -bs``.

Sessions run in one event loop with threads beside it for what blocks
(``smtpd_process_model = threads``, :mod:`pymta.eventloop`) or in a child
process each (``fork``, the blocking :func:`pump`). The server admits at most ``smtpd_session_limit``
sessions and ``smtpd_client_connection_count_limit`` per client address;
the rest get 421 at once. STARTTLS is done here with the stdlib ``ssl``
module. ``STOPPING`` is set by the daemon on SIGTERM: idle sessions get 421
within a second, a DATA in progress finishes its commit first.
"""

import ipaddress
import logging
import os
import pwd
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time

from . import address as A
from .smtp_session import Session, in_networks
from . import queue_maildrop
from .queue_dir import Spool
from .status import Reply, SpoolError

STOPPING = threading.Event()
_POLL = 1.0


def client_ip(addr):
    ip = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        mapped = ipaddress.ip_address(ip.split("%")[0])
        if getattr(mapped, "ipv4_mapped", None):
            return str(mapped.ipv4_mapped)
    except ValueError:
        pass
    return ip


def peername(ip, resolver=None):
    """The client's verified host name: PTR, then A/AAAA of that name must
    give ``ip`` back; else 'unknown'. ``resolver`` is a dnspython resolver
    (dns_nameservers, dns_timeout); None uses the system's (getnameinfo's
    order of sources: /etc/hosts, then DNS, as nsswitch.conf says)."""
    if resolver is None:
        try:
            name = socket.gethostbyaddr(ip)[0]
            addrs = {a[4][0] for a in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError):
            return "unknown"
        return name if ip in addrs else "unknown"
    import dns.exception
    try:
        names = [str(r.target).rstrip(".") for r in resolver.resolve_address(ip)]
    except dns.exception.DNSException:
        return "unknown"
    want = ipaddress.ip_address(ip)
    for name in names[:5]:
        for rdtype in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, rdtype)
            except dns.exception.DNSException:
                continue
            if any(ipaddress.ip_address(r.address) == want for r in answer):
                return name
    return "unknown"


TLS_PEM_MAX = 1 << 20


def tls_pem(cfg):
    """The certificate chain and key files' contents in one PEM text, read
    by the privileged master at a reload to hand to the listeners (which
    cannot read a root-only key); None when STARTTLS is off. Raises OSError."""
    if cfg.smtpd_tls_security_level == "none" or not cfg.smtpd_tls_cert_file:
        return None
    parts = []
    for path in dict.fromkeys(p for p in (cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file) if p):
        with open(path, "rb") as f:
            parts.append(f.read(TLS_PEM_MAX))
    return b"\n".join(parts)


def _load_pem(ctx, pem):
    """load_cert_chain() from memory: through an anonymous file (memfd)."""
    fd = os.memfd_create("pymta-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def make_ssl_context(cfg, log=None, previous=None, pem=None):
    """The server TLS context, or None when STARTTLS is not to be offered.

    At a reload (SIGHUP) the listener runs as mail_owner and may not be
    able to read a key only root can read: ``pem`` is then the certificate
    and key as the master read them (:func:`tls_pem`), and ``previous`` the
    context in use, kept (and the reason logged) when neither gives a new
    one, instead of silently no longer offering STARTTLS (and AUTH)."""
    if cfg.smtpd_tls_security_level == "none" or not cfg.smtpd_tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if pem is not None:
            _load_pem(ctx, pem)
        else:
            ctx.load_cert_chain(cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file or None)
    except (OSError, ssl.SSLError) as e:
        if previous is not None:
            if log:
                how = "as handed over by the master" if pem is not None else f"as uid {os.geteuid()}"
                log.warning(f"warning: reload: cannot load TLS certificate {cfg.smtpd_tls_cert_file} "
                            f"and key {cfg.smtpd_tls_key_file or cfg.smtpd_tls_cert_file} {how}: "
                            f"{e}; STARTTLS goes on with the certificate and key loaded before")
            return previous
        if log:
            log.error(f"warning: cannot load TLS certificate {cfg.smtpd_tls_cert_file}: {e}; "
                      "STARTTLS is not offered")
        return None
    return ctx


def passwd_recipient_check(cfg):
    """A recipient check from passwd alone, for when route.py is unavailable."""
    def check(addr):
        local = A.local_of(addr)
        names = [local]
        d = cfg.recipient_delimiter
        if d and d in local:
            names.append(local.split(d, 1)[0])
        for n in names:
            if n.lower() == "postmaster":
                return None
            for cand in dict.fromkeys((n, n.lower())):
                try:
                    pwd.getpwnam(cand)
                    return None
                except (KeyError, ValueError):
                    continue
        return Reply(550, "5.1.1", "Recipient address rejected: User unknown in local recipient table")
    return check


class Services:
    """What sessions share under one configuration; rebuilt on SIGHUP."""

    def __init__(self, cfg, log=None, notify=None, previous=None, pem=None):
        self.cfg = cfg
        self.log = log or logging.getLogger("pymta")
        self.spool = Spool.from_config(cfg)
        self.notify = notify
        self.ssl_ctx = make_ssl_context(cfg, self.log,
                                        previous.ssl_ctx if previous is not None else None, pem)
        try:
            from . import route
            router = route.Router(cfg, log=self.log)
            self.recipient_check = router.recipient_check
            self.expand = self._expander(route, router)
        except ImportError as e:
            self.log.warning(f"warning: routing unavailable ({e}); local recipients are "
                             "checked against passwd only")
            self.recipient_check = passwd_recipient_check(cfg)
            self.expand = None
        from . import auth
        self.auth = auth.PasswordFile(cfg.smtpd_sasl_password_file, self.log)
        # The client's name: with dns_nameservers, those DNS servers only;
        # else the system's resolver in its own order (nsswitch.conf: files,
        # then DNS), so a loopback client is "localhost" as /etc/hosts says.
        self.resolver = None
        self.peer_lookup = None
        if cfg.smtpd_peername_lookup:
            if cfg.dns_nameservers:
                from . import mx
                resolver = self.resolver = mx.make_resolver(cfg)
                self.peer_lookup = lambda ip: peername(ip, resolver)
            else:
                self.peer_lookup = peername

    @staticmethod
    def _expander(route, router):
        def expand(addr):
            from . import envelope as E
            try:
                rt = router.route(E.Recipient(addr))
            except Exception:   # noqa: BLE001 - a routing failure only means no expansion here
                return []
            if rt.kind == "expand":
                return [c.address for c in rt.children]
            return [addr] if rt.kind == "local" else []
        return expand

    def session(self, client_addr="", client_name="unknown", submission=False, **kw):
        return Session(
            self.cfg, begin_message=self.spool.new_message, client_addr=client_addr,
            client_name=client_name, recipient_check=self.recipient_check,
            auth_verify=self.auth if kw.pop("auth", True) else None,
            free_space=self.spool.free_space, log=self.log, submission=submission,
            draining=STOPPING.is_set, expand=self.expand, accepted=self.notify, **kw)


class SMTPHandler(socketserver.BaseRequestHandler):
    """One connection in a process of its own (``smtpd_process_model = fork``)."""

    def handle(self):
        srv = self.server
        services = srv.services
        cfg, log = services.cfg, services.log
        sock = self.request
        ip = client_ip(self.client_address)
        name = services.peer_lookup(ip) if services.peer_lookup else "unknown"
        peer = f"{name}[{ip}]"
        log.info(f"connect from {peer}")
        if srv.implicit_tls:
            session = services.session(ip, name, submission=True, tls_available=True)
            try:
                sock = implicit_tls(sock, session, services, peer)
                if sock is not None:
                    self.request = sock
                    pump(sock, session, services, peer, first=session.greeting())
            finally:
                session.close()
            log.info(f"disconnect from {peer}")
            return
        if cfg.smtpd_greet_pause and _early_talker(sock, cfg.smtpd_greet_pause):
            log.info(early_line(peer))
            _send(sock, R_EARLY.lines(), cfg)
            log.info(f"disconnect from {peer}")
            return
        session = services.session(ip, name, submission=srv.submission,
                                   tls_available=services.ssl_ctx is not None)
        try:
            sock = pump(sock, session, services, peer, first=session.greeting())
            if sock is not None:
                self.request = sock
        finally:
            session.close()
        log.info(f"disconnect from {peer}")


R_EARLY = Reply(554, "5.5.1", "Error: SMTP protocol synchronization")


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


def pump(sock, session, services, peer, first=b""):
    """Run a session over a blocking socket until it ends, after sending
    ``first``; returns the socket last used (a TLS one after STARTTLS), or
    None if a TLS handshake failed. Network errors are logged."""
    try:
        _send(sock, first, services.cfg)
        return _pump(sock, session, services, peer)
    except OSError as e:
        services.log.info(lost_line(session.last_command, peer, e))
        return sock


def _pump(sock, session, services, peer):
    cfg, log = services.cfg, services.log
    idle_since = time.monotonic()
    data_start = None
    partial = 0
    if session.starttls_wanted:
        sock = starttls(sock, session, services, peer)
        if sock is None:
            return None
    while not session.closed:
        now = time.monotonic()
        data_start = (now if data_start is None else data_start) if session.in_data else None
        limit = deadline(cfg, session, idle_since, data_start)
        if now >= limit:
            _send(sock, expire(cfg, log, session, peer, now, idle_since), cfg)
            return sock
        if STOPPING.is_set() and not session.in_data:
            _send(sock, session.shutdown_reply(), cfg)
            return sock
        sock.settimeout(min(_POLL, limit - now))
        try:
            data = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        if not data:
            if session.last_command != "QUIT":
                log.info(lost_line(session.last_command, peer))
            return sock
        out = session.feed(data)
        again, partial = record_clock(cfg, session, data, partial)
        while True:
            if session.pending is not None:     # a session moved from the event loop
                out += session.commit_done(session.run_commit())
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
        if session.starttls_wanted:
            sock = starttls(sock, session, services, peer)
            if sock is None:
                return None
    return sock


def record_clock(cfg, session, data, partial):
    """After ``data`` was read and fed to ``session``: (whether the client's
    smtpd_timeout starts again, bytes of the line now in progress). With
    smtpd_per_record_deadline the clock starts again only once a whole line
    (in DATA: a line, or line_length_limit bytes of a longer one) has come,
    as Postfix's smtpd_per_record_deadline does; without, at every read."""
    if not cfg.smtpd_per_record_deadline:
        return True, 0
    nl = data.rfind(b"\n")
    if nl >= 0:
        return True, len(data) - nl - 1
    partial += len(data)
    if session.in_data and partial >= cfg.line_length_limit:
        return True, 0
    return False, partial


def timeout_of(cfg, stressed=False):
    """smtpd_timeout, or smtpd_stress_timeout when the listener is under
    stress (as Postfix's smtpd_timeout = ${stress?{10}:{300}}s)."""
    if stressed and cfg.smtpd_stress_timeout:
        return min(cfg.smtpd_timeout, cfg.smtpd_stress_timeout)
    return cfg.smtpd_timeout


def deadline(cfg, session, idle_since, data_start, stressed=False):
    """When the session times out: ``smtpd_timeout`` (under stress
    ``smtpd_stress_timeout``) after the client's clock last started
    (``idle_since``: see record_clock), and during DATA (begun at
    ``data_start``) also when it is slower than ``smtpd_min_data_rate`` (0:
    no limit for the whole DATA)."""
    timeout = timeout_of(cfg, stressed)
    limit = idle_since + timeout
    if data_start is not None and cfg.smtpd_min_data_rate:
        slow = data_start + timeout + session.data_received / cfg.smtpd_min_data_rate
        limit = min(limit, slow)
    return limit


def expire(cfg, log, session, peer, now, idle_since, stressed=False):
    """Close a session past its deadline; the 421 to send, logged."""
    if session.in_data and now < idle_since + timeout_of(cfg, stressed):
        log.info(f"data rate too low after DATA from {peer}")
        session.close()
        return Reply(421, "4.4.2", f"{cfg.myhostname} Error: data rate too low, "
                     "closing connection").lines()
    log.info(f"timeout after {session.last_command} from {peer}")
    return session.timeout()


def lost_line(last_command, peer, e=None):
    """The log line for a connection that closed or failed under us."""
    return (f"lost connection after {last_command} from {peer}"
            + (f" ({e.strerror or e})" if e is not None and not isinstance(e, ConnectionResetError)
               else ""))


def early_line(peer):
    return (f"reject: CONNECT from {peer}: 554 5.5.1 Error: SMTP protocol "
            "synchronization (client talked before the greeting)")


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


class _Admission:
    """Counts sessions, in total and per client address, for the limits."""

    def _admit_init(self):
        self._count_lock = threading.Lock()
        self._total = 0
        self._per_client = {}
        self._pid_client = {}

    share = 1      # listener processes that divide the limits between them
    implicit_tls = False    # submissions (465): TLS before the greeting

    def _admit(self, ip):
        cfg = self.services.cfg
        n = self.share
        with self._count_lock:
            if self._total >= -(-cfg.smtpd_session_limit // n):
                return Reply(421, "4.7.0", f"{cfg.myhostname} Error: too many sessions, try again later")
            limit = cfg.smtpd_client_connection_count_limit
            if limit and self._per_client.get(ip, 0) >= -(-limit // n) \
                    and not in_networks(ip, cfg.smtpd_client_event_limit_exceptions):
                return Reply(421, "4.7.0", f"{cfg.myhostname} Error: too many connections from {ip}")
            self._total += 1
            self._per_client[ip] = self._per_client.get(ip, 0) + 1
        return None

    def _leave(self, ip):
        with self._count_lock:
            self._total -= 1
            n = self._per_client.get(ip, 1) - 1
            if n:
                self._per_client[ip] = n
            else:
                self._per_client.pop(ip, None)

    @property
    def sessions(self):
        return self._total

    @property
    def stressed(self):
        """Whether this listener has every slot of its share of
        smtpd_session_limit in use (new clients get 421), Postfix's stress:
        its sessions then get smtpd_stress_timeout."""
        return self._total >= -(-self.services.cfg.smtpd_session_limit // self.share)


class _Forking(_Admission):
    """socketserver's ForkingMixIn with the admission limits."""

    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, sock, services, submission=False):
        family = sock.family
        self.address_family = family
        socketserver.TCPServer.__init__(self, sock.getsockname(), SMTPHandler,
                                        bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.services = services
        self.submission = submission
        self.max_children = services.cfg.smtpd_session_limit + 16
        self._admit_init()

    def process_request(self, request, client_address):
        ip = client_ip(client_address)
        refusal = self._admit(ip)
        if refusal is not None:
            self.services.log.info(f"warning: {ip}: {refusal}")
            try:
                request.settimeout(2)
                request.sendall(refusal.lines())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        before = set(self.active_children or ())
        try:
            super().process_request(request, client_address)
        except OSError:
            self._leave(ip)
            raise
        for pid in set(self.active_children or ()) - before:
            self._pid_client[pid] = ip

    def collect_children(self, *, blocking=False):
        super().collect_children(blocking=blocking)
        for pid in list(self._pid_client):
            if pid not in (self.active_children or ()):
                self._leave(self._pid_client.pop(pid))

    def handle_error(self, request, client_address):
        self.services.log.exception(f"error in session with {client_address}")


class ForkingSMTPServer(_Forking, socketserver.ForkingMixIn, socketserver.TCPServer):
    block_on_close = True
    forking = True


def bind(spec, default_port=25):
    """A listening socket for 'addr:port' or '[v6]:port' (IPv6 only on v6)."""
    return bind_copies(spec, default_port, 1)[0]


def bind_copies(spec, default_port, copies):
    """``copies`` listening sockets on one address, one per listener
    process: with more than one, SO_REUSEPORT sockets (the kernel spreads
    connections among them), after a plain bind has shown that nobody else
    listens there."""
    from .config import parse_hostport
    host, port = parse_hostport(spec, default_port)
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]

    def one(reuseport, listen=True):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            if listen:
                sock.listen(256)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock
    if copies <= 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [one(False)] * max(1, copies)
    one(False, listen=False).close()     # EADDRINUSE if anyone listens there
    if addr[1] == 0:
        raise ValueError(f"{spec}: several listeners need a fixed port")
    socks = []
    try:
        for _ in range(copies):
            socks.append(one(True))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def make_server(sock, services, submission=False):
    """The server for a listening socket; ``submission`` True requires AUTH
    before MAIL, "tls" too after TLS from the first byte (port 465)."""
    if services.cfg.smtpd_process_model == "fork":
        srv = ForkingSMTPServer(sock, services, bool(submission))
    else:
        from .eventloop import LoopServer
        srv = LoopServer(sock, services, bool(submission))
    srv.implicit_tls = submission == "tls"
    return srv


def serve(servers, stop=None, tick=None):
    """Run the sessions of every server until ``stop()`` is true, then let
    those in progress end (see :mod:`pymta.eventloop`); ``tick()`` runs
    about twice a second (the daemon's reload check)."""
    from .eventloop import Loop
    Loop(servers, stop or STOPPING.is_set, tick).run()


def stop_children(srv):
    """Session processes of a forking server: each answers 421 at its next command."""
    for pid in list(srv.active_children or ()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


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
        name = queue_maildrop.drop(self.spool, env, iter(lambda: self.file.read(256 * 1024), b""))
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
    services = Services(cfg, log, notify=accepted)
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
        while not session.closed:
            ready, _, _ = select.select([infd], [], [], cfg.smtpd_timeout)
            if not ready:
                out.write(session.timeout())
                break
            data = os.read(infd, 65536)
            if not data:
                break
            reply = session.feed(data)
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
