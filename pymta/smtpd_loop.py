"""The ``loop`` process model: one thread runs every SMTP session through
a selector, and what would block it runs beside it.

A thread per connection costs a thread start per message and, under load,
a storm of GIL hand-offs (every send, recv and fsync releases the lock to
one of twenty runnable threads). Here the loop thread owns the sockets: it
reads what a client sent, feeds it to the connection's
:class:`~pymta.smtpd_session.Session` (a pure state machine), writes the
replies without blocking and does what the session's ``next_step()``
asks. Three things leave the loop:

- the fsyncs of the commit at the end of DATA: the loop hands the message
  to its :class:`~pymta.queue_commit.Committer`, which submits them to
  the kernel (Linux AIO) or, where it cannot, to syncer processes (not
  threads, which would take the GIL back at each of their system calls);
  many commits then wait on the disk together, one fsync of
  the queue directory serves all that are ready for it, and a session
  reads nothing more until its 250 (or 4xx) is out;
- the reverse lookup of the client (``smtpd_peername_lookup``), in a pool
  of lookup threads, before the greeting;
- a session that starts TLS: after the 220 to STARTTLS it moves to a
  thread of its own, which runs the blocking :func:`pymta.smtpd_pump.pump`.

A connection is in one of the states below, and changes it only in
:meth:`Loop._enter`, which also says what the selector watches for it::

    LOOKUP  --name-->  PAUSE (smtpd_greet_pause) --pause over--> OPEN
       `----------------------------------------------------->  OPEN
    OPEN  --next_step() COMMIT-->  COMMITTING  --committed-->  OPEN
    OPEN  --a failed AUTH (session.hold)-->  HOLD  --hold over-->  OPEN
    OPEN  --next_step() STARTTLS, or submissions-->  HANDED (a TLS thread)
    OPEN, PAUSE  --CLOSE, timeout, shutdown, early talker-->  CLOSING
    any  --lost, or CLOSING with its replies out-->  CLOSED

Only OPEN and PAUSE connections are read; any with replies to send is
watched for writing. Thread results come back to the loop through a queue
and a wake-up pipe, fsyncs done through an eventfd (or syncer answers on
their sockets). The timeouts
(``smtpd_timeout``, ``smtpd_min_data_rate``, ``smtpd_greet_pause``) and the
shutdown (idle sessions get 421, a DATA in progress finishes) are checked
by a scan of the connections four times a second.
"""

import collections
import os
import queue
import selectors
import socket
import threading
import time

from . import smtpd_common as common
from .smtpd_pump import implicit_tls, pump
from .smtpd_session import CLOSE, COMMIT, STARTTLS
from .queue_commit import Committer
from .status import READ_SIZE

_SCAN = 0.25
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
LOOKUP_THREADS = 16
SYNCERS = 8

# Connection states (see the module docstring).
LOOKUP = "lookup"       # the client's name is being looked up
PAUSE = "pause"         # smtpd_greet_pause: a client that talks now is refused
OPEN = "open"           # the session reads and answers
HOLD = "hold"           # replies held back (a failed AUTH) until pause_until
COMMITTING = "committing"  # a message's commit is running
HANDED = "handed"       # moved to a thread of its own (TLS)
CLOSING = "closing"     # the last replies go out, then the connection closes
CLOSED = "closed"
_READING = (OPEN, PAUSE)


class Pool:
    """Up to ``size`` threads, started as work arrives, that run jobs in
    order; ``post(callback, result)`` returns each job's result (or
    exception) to the loop. Without ``post`` or a callback the result is
    dropped: the job handles its own errors (the daemon's handoffs)."""

    def __init__(self, size, post, name):
        self.size, self.post, self.name = size, post, name
        self.jobs = queue.SimpleQueue()
        self.threads = []
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, fn, callback=None):
        with self.lock:
            if self.idle == 0 and len(self.threads) < self.size:
                t = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}",
                                     daemon=True)
                self.threads.append(t)
                self.idle += 1
                t.start()
        self.jobs.put((fn, callback))

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.idle -= 1
            fn, callback = job
            try:
                result = fn()
            except Exception as e:   # noqa: BLE001 - handed to the callback
                result = e
            with self.lock:
                self.idle += 1
            if self.post is not None and callback is not None:
                self.post(callback, result)

    def waiting(self):
        """How many jobs wait for a thread."""
        return self.jobs.qsize()

    def busy(self):
        """Whether a job is running or waiting."""
        with self.lock:
            return self.idle < len(self.threads) or not self.jobs.empty()

    def close(self):
        """Run what is queued, then end the threads."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


class Server(common.Admission):
    """The loop model's sessions of one listening socket."""

    def __init__(self, sock, services, submission=False):
        super().__init__(services, submission)
        self.socket = sock
        sock.setblocking(False)


class Conn:
    """One client connection driven by the loop."""

    __slots__ = ("loop", "server", "services", "sock", "fd", "ip", "name", "peer", "session",
                 "out", "events", "state", "idle_since", "data_start", "pause_until", "held",
                 "partial")

    def __init__(self, loop, srv, sock, ip):
        self.loop, self.server, self.services = loop, srv, srv.services
        self.sock, self.fd, self.ip = sock, sock.fileno(), ip
        self.name = "unknown"
        self.peer = f"unknown[{ip}]"
        self.session = None
        self.out = bytearray()
        self.events = 0
        self.state = LOOKUP
        self.idle_since = time.monotonic()
        self.data_start = None
        self.pause_until = 0.0
        self.held = b""            # replies held back while the session's hold runs
        self.partial = 0           # bytes of the line in progress (smtpd_per_record_deadline)


def serve(servers, stop=None, tick=None):
    """Run the sessions of every server until ``stop()`` (default:
    STOPPING) is true, then let those in progress end; ``tick()`` runs at
    every turn, at least four times a second (the daemon's reload check)."""
    Loop(servers, stop or common.STOPPING.is_set, tick).run()


class Loop:
    def __init__(self, servers, stop, tick=None):
        self.servers = list(servers)
        self.stop, self.tick = stop, tick
        self.sel = selectors.DefaultSelector()
        self.conns = set()
        self.handed = []          # threads running TLS sessions
        self.done = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, _READ, None)
        self.lookups = Pool(LOOKUP_THREADS, self._post, "lookup")
        # Its syncers (if any) are forked now, while this process has no other thread.
        log = self.servers[0].services.log if self.servers else None
        aio = bool(self.servers) and self.servers[0].services.cfg.smtpd_loop_fsync == "aio"
        self.committer = Committer(SYNCERS if self.servers else 0, log,
                                   on_lost=self.sel.unregister, aio=aio)
        self.paused = {}          # listening sockets not watched until then
        for sock in self.committer.socks:
            self.sel.register(sock, _READ, self.committer)
        for s in self.servers:
            self.sel.register(s.socket, _READ, s)

    # -- results from other threads
    def _post(self, callback, result):
        self.done.append((callback, result))
        try:
            os.write(self.wake_w, b".")
        except BlockingIOError:
            pass      # the pipe is full: the loop is awake anyway

    def _drain_done(self):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.done:
            callback, result = self.done.popleft()
            callback(result)

    # -- the loop
    def run(self):
        stopping = False
        next_scan = 0.0
        while True:
            if not stopping and self.stop():
                stopping = True
                self._close_listeners()
            if stopping and not self.conns and not self.done:
                break
            try:
                events = self.sel.select(_SCAN)
            except InterruptedError:
                events = []
            for key, mask in events:
                obj = key.data
                if obj is None:
                    self._drain_done()
                elif obj is self.committer:
                    obj.ready(key.fileobj)
                elif isinstance(obj, Conn):
                    if obj.state is CLOSED:     # closed earlier in this turn
                        continue
                    if mask & _WRITE:
                        self._writable(obj)
                    if mask & _READ and obj.state in _READING:
                        self._readable(obj)
                else:
                    self._accept(obj)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + _SCAN
                self._scan(now, stopping or common.STOPPING.is_set())
            if self.tick and not stopping:
                self.tick()
        for t in self.handed:
            t.join()
        self.lookups.close()
        for sock in self.committer.socks:
            self.sel.unregister(sock)
        self.committer.close()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _close_listeners(self):
        for s in self.servers:
            if s not in self.paused:
                try:
                    self.sel.unregister(s.socket)
                except (KeyError, ValueError):
                    pass
            s.socket.close()

    # -- the one place a connection changes state
    def _enter(self, c, state, out=b""):
        """Move ``c`` to ``state``, after queueing ``out`` (replies) to send.
        Entering OPEN does what the session asks next: COMMITTING (the
        commit starts), HANDED (STARTTLS: the TLS thread sends ``out``),
        CLOSING, or OPEN to read on."""
        if state is OPEN:
            step = c.session.next_step()
            if step is COMMIT:
                state = COMMITTING
            elif step is STARTTLS:
                state = HANDED
            elif step is CLOSE:
                state = CLOSING
        was, c.state = c.state, state
        if out:
            c.out += out
        if state is CLOSED:
            return self._closed(c, was)
        if state is HANDED:
            return self._hand_off(c)
        self._flush(c)
        if c.state is not state:     # lost while sending
            return
        self._update(c)
        if state is COMMITTING:
            self._start_commit(c)

    def _update(self, c):
        """What the selector watches for ``c``: its replies while any wait
        to go out, else its input in a reading state; a CLOSING connection
        with nothing left to send is closed."""
        if c.out:
            self._interest(c, _WRITE)
        elif c.state is CLOSING:
            self._enter(c, CLOSED)
        elif c.state in _READING:
            self._interest(c, _READ)
        else:
            self._interest(c, 0)

    def _flush(self, c):
        """Send what the socket takes of ``c``'s queued replies."""
        if c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return self._lost(c, e)
            del c.out[:n]

    def _writable(self, c):
        self._flush(c)
        if c.state is not CLOSED:
            self._update(c)

    def _interest(self, c, events):
        if events == c.events:
            return
        if not events:
            self.sel.unregister(c.fd)
        elif not c.events:
            self.sel.register(c.fd, events, c)
        else:
            self.sel.modify(c.fd, events, c)
        c.events = events

    # -- connections
    def _accept(self, srv):
        for _ in range(64):
            try:
                sock, addr = srv.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors or memory: the connection stays queued and
                # the socket readable; stop watching it for a second instead
                # of spinning (and logging) until something is freed.
                srv.services.log.warning(f"warning: accept: {e.strerror or e}; "
                                         "not accepting for a second")
                self.sel.unregister(srv.socket)
                self.paused[srv] = time.monotonic() + 1.0
                return
            ip = common.client_ip(addr)
            if srv.turned_away(sock, ip, blocking=False):
                _close_socket(sock)
                continue
            sock.setblocking(False)
            c = Conn(self, srv, sock, ip)
            self.conns.add(c)
            lookup = c.services.peer_lookup
            if lookup is not None:
                self.lookups.submit(lambda ip=ip: lookup(ip),
                                    lambda name, c=c: self._named(c, name))
            else:
                self._named(c, "unknown")

    def _named(self, c, name):
        if isinstance(name, Exception):
            name = "unknown"
        c.name = name
        c.peer = f"{name}[{c.ip}]"
        c.services.log.info(f"connect from {c.peer}")
        pause = c.services.cfg.smtpd_greet_pause
        if pause and not c.server.implicit_tls:     # a TLS client speaks first
            c.pause_until = time.monotonic() + pause
            self._enter(c, PAUSE)
        else:
            self._open(c)

    def _open(self, c):
        services = c.services
        c.session = services.session(c.ip, c.name, submission=c.server.submission, check=True,
                                     tls_available=services.ssl_ctx is not None)
        c.idle_since = time.monotonic()
        if c.server.implicit_tls:     # the handshake and all after it in a thread
            return self._enter(c, HANDED)
        self._enter(c, OPEN, c.session.greeting())

    def _readable(self, c):
        if c.state is PAUSE:
            c.services.log.info(common.early_line(c.peer))
            return self._enter(c, CLOSING, common.R_EARLY.lines())
        session = c.session
        try:
            data = c.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._lost(c, e)
        if not data:
            if session.last_command != "QUIT":
                c.services.log.info(common.lost_line(session.last_command, c.peer))
            return self._enter(c, CLOSED)
        now = time.monotonic()
        out = session.feed(data)
        again, c.partial = common.record_clock(c.services.cfg, session, data, c.partial)
        if again:
            c.idle_since = now
        if session.in_data:
            if c.data_start is None:
                c.data_start = now
        else:
            c.data_start = None
        self._reply(c, out)

    def _reply(self, c, out):
        """Send ``out``, unless the session holds its replies (a failed
        AUTH): then they wait, and nothing is read, until the scan after
        the hold releases them."""
        if c.session.hold:
            c.held += out
            c.pause_until = time.monotonic() + c.session.hold
            return self._enter(c, HOLD)
        self._enter(c, OPEN, out)

    # -- commits: the fsyncs go to the Committer (the kernel, or its syncer processes)
    def _start_commit(self, c):
        writer, env = c.session.message()
        self.committer.commit(writer, env, lambda result, c=c: self._committed(c, result))

    def _committed(self, c, result):
        out = c.session.committed(result)
        if c.state is CLOSED:       # the client went while its commit ran
            c.session.close()
            return
        c.idle_since = time.monotonic()
        self._reply(c, out)

    def _lost(self, c, e):
        last = c.session.last_command if c.session else "CONNECT"
        c.services.log.info(common.lost_line(last, c.peer, e))
        self._enter(c, CLOSED)

    def _closed(self, c, was):
        if c not in self.conns:
            return
        self.conns.discard(c)
        self._interest(c, 0)
        if c.session is not None and was is not COMMITTING:
            c.session.close()
        _close_socket(c.sock)
        c.services.log.info(f"disconnect from {c.peer}")
        c.server.leave(c.ip)

    def _hand_off(self, c):
        """STARTTLS (or a submissions connection): the session goes on,
        blocking, in a thread of its own."""
        self._interest(c, 0)
        self.conns.discard(c)
        t = threading.Thread(target=self._tls_session, args=(c,), name="tls", daemon=True)
        self.handed = [h for h in self.handed if h.is_alive()]
        self.handed.append(t)
        t.start()

    @staticmethod
    def _tls_session(c):
        sock, session = c.sock, c.session
        implicit = c.server.implicit_tls
        try:
            sock.setblocking(True)
            if implicit:
                last = implicit_tls(sock, session, c.services, c.peer)
                if last is None:
                    return
                sock = last
            first = session.greeting() if implicit else bytes(c.out)
            last = pump(sock, session, c.services, c.peer, first=first)
            if last is not None:
                sock = last
        finally:
            session.close()
            _close_socket(sock)
            c.services.log.info(f"disconnect from {c.peer}")
            c.server.leave(c.ip)

    # -- timeouts and shutdown
    def _scan(self, now, stopping):
        for srv, until in list(self.paused.items()):
            if now >= until or stopping:
                del self.paused[srv]
                if not stopping:
                    self.sel.register(srv.socket, _READ, srv)
        stress = {}     # server -> under stress, looked at once a scan
        for c in list(self.conns):
            if c.state is PAUSE:
                if now >= c.pause_until:
                    self._open(c)
                continue
            if c.state is HOLD:
                if now >= c.pause_until:
                    c.idle_since = now
                    out, c.held = c.held, b""
                    self._reply(c, out + c.session.release())
                continue
            if c.state is not OPEN:
                continue
            session = c.session
            cfg = c.services.cfg
            if session.in_data and c.data_start is None:
                c.data_start = now
            stressed = stress.get(c.server)
            if stressed is None:
                stressed = stress[c.server] = c.server.stressed
            if now >= common.deadline(cfg, session, c.idle_since, c.data_start, stressed):
                self._enter(c, CLOSING, common.expire(cfg, c.services.log, session, c.peer,
                                                      now, c.idle_since, stressed))
                self._close_soon(c)
            elif stopping and not session.in_data:
                self._enter(c, CLOSING, session.shutdown_reply())
                self._close_soon(c)

    def _close_soon(self, c):
        """A session ended by the server: what it cannot send now is dropped."""
        if c in self.conns and c.out:
            self._enter(c, CLOSED)


def _close_socket(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
