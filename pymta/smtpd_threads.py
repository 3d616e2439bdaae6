"""The ``threads`` process model: a thread per SMTP session (socketserver's
ThreadingMixIn), each running the blocking pump of :mod:`pymta.smtpd_pump`
(its :class:`~pymta.smtpd_pump.Handler`, as the ``fork`` model's children
do, and ``sendmail -bs`` runs the same pump).

The listener's main thread accepts (:func:`serve`): it watches every
listening socket, admits each connection or answers 421 (the limits and
shares of every model: ``smtpd_session_limit``, which so bounds the
session threads, and ``smtpd_client_connection_count_limit``), starts the
session's thread, and runs the daemon's tick (reload, is the master alive)
at least four times a second. Once ``stop()`` is true (SIGTERM) it stops
accepting, closes the listening sockets and waits for the session threads:
an idle session gets 421 within a second, a DATA in progress finishes its
commit first (the pump's rules).

A session commits in its own thread, blocking (MessageWriter.commit):
df fsync, rename, qf fsync, then the fsync of the queue directory, which
the sessions share through one :class:`pymta.queue_groupsync.GroupSync`
(group commit: one fsync serves every rename made before it began), set
as the spool's ``dir_sync`` whenever the server is given its services (at
start and at each reload).

Against the event loop (``loop``): no syncer processes and no hand-off of
TLS sessions, each session a straight-line program; but each session
costs a thread that wakes once a second, and all of them share Python's
global lock. Against ``fork``: no process per session. pymta(8) says when
to choose which, with figures.
"""

import selectors
import socket
import socketserver
import time

from . import smtpd_common as common
from .queue_groupsync import GroupSync
from .smtpd_pump import Handler

_TICK = 0.25          # the daemon's tick and the stop check, at least this often
_ACCEPT_PAUSE = 1.0   # no accept for this long after accept() ran out of descriptors
_STRESS_HOLD = 1.5    # a stress seen counts this long: more than the pump's poll (a second)


class Server(common.Admission, socketserver.ThreadingMixIn, socketserver.BaseServer):
    """The sessions of one listening socket, a thread each."""

    daemon_threads = False
    block_on_close = True      # server_close() waits for the session threads

    def __init__(self, sock, services, submission=False):
        socketserver.BaseServer.__init__(self, sock.getsockname(), Handler)
        self.socket = sock
        common.Admission.__init__(self, services, submission)
        self._stress_seen = float("-inf")
        sock.setblocking(False)

    @property
    def services(self):
        return self._services

    @services.setter
    def services(self, services):
        spool = services.spool
        if spool.dir_sync is None:
            spool.dir_sync = GroupSync().sync
        self._services = services

    def session_stressed(self, idle_since):
        """Whether a session idle since ``idle_since`` gets
        smtpd_stress_timeout: the listener is under stress (every slot of
        its share taken); or it was less than _STRESS_HOLD seconds ago, when
        that session's stress timeout had run out already. Each session
        thread looks when its poll wakes it, once a second, and the first to
        leave ends the stress: so every session idle too long when the
        stress was seen goes, as in the event loop, not only the first to
        look; and none that came later is judged by a stress gone by."""
        now = time.monotonic()
        if self.stressed:
            self._stress_seen = now
            return True
        seen = self._stress_seen
        return now - seen < _STRESS_HOLD and \
            idle_since + common.timeout_of(self.services.cfg, True) <= seen

    def get_request(self):
        return self.socket.accept()

    def process_request(self, request, client_address):
        ip = common.client_ip(client_address)
        if self.turned_away(request, ip):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as e:      # no thread could be started
            self.leave(ip)
            self.services.log.warning(f"warning: {ip}: cannot start a session thread: {e}")
            self.shutdown_request(request)

    def finish_request(self, request, client_address):
        # The slot is free before the client sees its connection close.
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
        finally:
            self.leave(common.client_ip(client_address))
        if handler.request is not request:      # the TLS socket after STARTTLS
            self.shutdown_request(handler.request)

    def shutdown_request(self, request):
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

    def server_close(self):
        self.socket.close()
        super().server_close()      # ThreadingMixIn's: waits for the session threads

    def handle_error(self, request, client_address):
        self.services.log.exception(f"error in session with {client_address}")


def serve(servers, stop=None, tick=None):
    """Accept on every server until ``stop()`` (default: STOPPING) is true,
    a thread per session; then set STOPPING for the sessions, close the
    listening sockets and wait for the sessions in progress. ``tick()``
    runs at every turn (at least four times a second)."""
    stop = stop or common.STOPPING.is_set
    paused = {}         # server -> when to accept again
    try:
        with selectors.DefaultSelector() as sel:
            for srv in servers:
                sel.register(srv.socket, selectors.EVENT_READ, srv)
            while not stop():
                for key, _ in sel.select(_TICK):
                    if not _accept(key.data):
                        sel.unregister(key.fileobj)
                        paused[key.data] = time.monotonic() + _ACCEPT_PAUSE
                now = time.monotonic()
                for srv, until in list(paused.items()):
                    if now >= until:
                        del paused[srv]
                        sel.register(srv.socket, selectors.EVENT_READ, srv)
                if tick:
                    tick()
    finally:
        common.STOPPING.set()
        for srv in servers:         # no more connections, on any address
            srv.socket.close()
        for srv in servers:
            srv.server_close()


def _accept(srv):
    """Take the connections waiting on ``srv`` (a few at a time, so that
    the others get their turn); False if accept() ran out of descriptors
    or memory (the connection stays queued: accept again a second later
    instead of spinning and logging until something is freed)."""
    for _ in range(64):
        try:
            request, addr = srv.get_request()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            srv.services.log.warning(f"warning: accept: {e.strerror or e}; not accepting for a second")
            return False
        request.setblocking(True)
        srv.process_request(request, addr)
    return True
