"""The ``threads`` process model: one thread runs every SMTP session through
a selector, and what would block it runs beside it.

A thread per connection costs a thread start per message and, under load,
a storm of GIL hand-offs (every send, recv and fsync releases the lock to
one of twenty runnable threads). Here the loop thread owns the sockets: it
reads what a client sent, feeds it to the connection's
:class:`~pymta.smtp_session.Session` (a pure state machine) and writes the
replies without blocking. Three things leave the loop:

- the fsyncs of the commit at the end of DATA: the session is created with
  ``defer_commit``; the loop runs the writer's ``commit_steps`` generator
  and hands each descriptor it yields to one of the syncer processes
  (:mod:`pymta.syncer`: processes, as threads would take the GIL back at
  each of their system calls); many commits then wait on the disk
  together, one fsync of the queue directory serves all that are ready
  for it, and a session reads nothing more until its 250 (or 4xx) is out.
  A writer without ``commit_steps`` commits in a pool thread;
- the reverse lookup of the client (``smtpd_peername_lookup``), in a pool
  of lookup threads, before the greeting;
- a session that starts TLS: after the 220 to STARTTLS it moves to a
  thread of its own, which runs the blocking :func:`pymta.server.pump`.

Thread results come back to the loop through a queue and a wake-up pipe,
syncer answers on their sockets. The
timeouts (``smtpd_timeout``, ``smtpd_min_data_rate``, ``smtpd_greet_pause``)
and the shutdown (idle sessions get 421, a DATA in progress finishes) are
checked by a scan of the sessions four times a second.
"""

import collections
import os
import queue
import selectors
import socket
import threading
import time

from . import server as S
from .spool import SYNC_DIR
from .status import PymtaError
from .syncer import DirSync, Syncers

_SCAN = 0.25
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
COMMIT_THREADS = 16
LOOKUP_THREADS = 16
SYNCERS = 8


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


class LoopServer(S._Admission):
    """A listening socket whose sessions the :class:`Loop` runs."""

    forking = False

    def __init__(self, sock, services, submission=False):
        self.socket = sock
        self.services = services
        self.submission = submission
        self._admit_init()
        sock.setblocking(False)

    def server_close(self):
        self.socket.close()

    def service_actions(self):
        pass


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
        self.state = "lookup"
        self.idle_since = time.monotonic()
        self.data_start = None
        self.pause_until = 0.0
        self.held = b""            # replies held back while the session's hold runs
        self.partial = 0           # bytes of the line in progress (smtpd_per_record_deadline)


class Loop:
    def __init__(self, servers, stop, tick=None, use_syncers=True):
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
        self.commits = Pool(COMMIT_THREADS, self._post, "commit")
        self.lookups = Pool(LOOKUP_THREADS, self._post, "lookup")
        # Forked now, while this process has no other thread.
        log = self.servers[0].services.log if self.servers else None
        use_syncers = use_syncers and any(not s.forking for s in self.servers)
        self.syncers = Syncers(SYNCERS if use_syncers else 0, log)
        self.syncers.on_lost = self.sel.unregister
        self.dirsyncs = {}
        self.paused = {}          # listening sockets not watched until then
        for sock in self.syncers.socks:
            self.sel.register(sock, _READ, self.syncers)
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
                elif obj is self.syncers:
                    obj.ready(key.fileobj)
                elif isinstance(obj, Conn):
                    if mask & _WRITE:
                        self._writable(obj)
                    if mask & _READ and obj in self.conns:
                        self._readable(obj)
                elif obj.forking:
                    obj._handle_request_noblock()
                else:
                    self._accept(obj)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + _SCAN
                self._scan(now, stopping or S.STOPPING.is_set())
                for s in self.servers:
                    s.service_actions()
            if self.tick and not stopping:
                self.tick()
        for t in self.handed:
            t.join()
        self.commits.close()
        self.lookups.close()
        for sock in self.syncers.socks:
            self.sel.unregister(sock)
        self.syncers.close()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _close_listeners(self):
        for s in self.servers:
            try:
                if s not in self.paused:
                    self.sel.unregister(s.socket)
            except (KeyError, ValueError):
                pass
            if s.forking:
                S.stop_children(s)
            s.server_close()

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
            ip = S.client_ip(addr)
            refusal = srv._admit(ip)
            if refusal is not None:
                srv.services.log.info(f"warning: {ip}: {refusal}")
                try:
                    sock.setblocking(False)
                    sock.send(refusal.lines())
                except OSError:
                    pass
                _close_socket(sock)
                continue
            sock.setblocking(False)
            c = Conn(self, srv, sock, ip)
            self.conns.add(c)
            lookup = c.services.peer_lookup
            if lookup is not None:
                self._interest(c, 0)
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
            c.state = "pause"
            c.pause_until = time.monotonic() + pause
            self._interest(c, _READ)
        else:
            self._open(c)

    def _open(self, c):
        services = c.services
        session = services.session(c.ip, c.name, submission=c.server.submission,
                                   tls_available=services.ssl_ctx is not None)
        session.defer_commit = True
        c.session = session
        c.state = "open"
        c.idle_since = time.monotonic()
        if c.server.implicit_tls:     # the handshake and all after it in a thread
            return self._hand_off(c, implicit=True)
        self._emit(c, session.greeting())

    def _readable(self, c):
        if c.state == "pause":
            c.services.log.info(S.early_line(c.peer))
            c.state = "closing"
            self._emit(c, S.R_EARLY.lines())
            return
        if c.state != "open":
            return
        session = c.session
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._lost(c, e)
        if not data:
            if session.last_command != "QUIT":
                c.services.log.info(S.lost_line(session.last_command, c.peer))
            return self._close(c)
        now = time.monotonic()
        out = session.feed(data)
        again, c.partial = S.record_clock(c.services.cfg, session, data, c.partial)
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
            c.state = "hold"
            c.pause_until = time.monotonic() + c.session.hold
            self._update(c)
            return
        self._emit(c, out)

    def _after(self, c):
        """What the session wants next, once its replies are queued."""
        session = c.session
        if session.pending is not None:
            c.state = "commit"
            self._start_commit(c)
        elif session.starttls_wanted:
            self._hand_off(c)
            return
        elif session.closed:
            c.state = "closing"
        self._update(c)

    # -- commits: the fsyncs go to the syncer processes
    def _start_commit(self, c):
        session = c.session
        writer, env, _ = session.pending
        if not hasattr(writer, "commit_steps"):
            return self.commits.submit(session.run_commit, lambda r, c=c: self._committed(c, r))
        self._step(c, writer, writer.commit_steps(env), None)

    def _step(self, c, writer, steps, err):
        try:
            step = steps.send(None) if err is None else steps.throw(err)
        except StopIteration as done:
            return self._committed(c, done.value)
        except (PymtaError, OSError) as e:
            return self._committed(c, c.session.commit_error(e))
        except Exception as e:   # noqa: BLE001 - a bug: the client gets 451, the loop goes on
            c.services.log.exception(f"error: commit for {c.peer}")
            return self._committed(c, c.session.commit_error(e))

        def go_on(e, c=c, writer=writer, steps=steps):
            self._step(c, writer, steps, e)
        if not isinstance(step, tuple):
            return self._sync(writer.spool, step, go_on)
        # Several fsyncs at once: go on when the last one is done.
        left = [len(step), None]

        def one_done(e):
            left[0] -= 1
            left[1] = left[1] or e
            if left[0] == 0:
                go_on(left[1])
        for one in sorted(step, key=lambda one: one is not SYNC_DIR):   # the directory's first
            self._sync(writer.spool, one, one_done)

    def _sync(self, spool, what, callback):
        if what is SYNC_DIR:
            ds = self.dirsyncs.get(spool.dir)
            if ds is None or ds.spool is not spool:
                ds = self.dirsyncs[spool.dir] = DirSync(self.syncers, spool.dir_fd())
                ds.spool = spool
            ds.request(callback)
        else:
            self.syncers.submit(what, callback)

    def _committed(self, c, result):
        if isinstance(result, Exception):   # from run_commit in a pool thread: a bug
            c.services.log.error(f"error: commit for {c.peer}: {result!r}")
            result = c.session.commit_error(result)
        c.state = "open"
        c.idle_since = time.monotonic()
        self._reply(c, c.session.commit_done(result))

    def _emit(self, c, data):
        if data:
            c.out += data
        if c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                return self._lost(c, e)
            del c.out[:n]
        if c.state == "open":
            self._after(c)
        else:
            self._update(c)

    def _writable(self, c):
        self._emit(c, b"")

    def _update(self, c):
        if c.out:
            self._interest(c, _WRITE)
        elif c.state == "closing":
            self._close(c)
        elif c.state in ("open", "pause"):
            self._interest(c, _READ)
        else:
            self._interest(c, 0)

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

    def _lost(self, c, e):
        last = c.session.last_command if c.session else "CONNECT"
        c.services.log.info(S.lost_line(last, c.peer, e))
        self._close(c)

    def _close(self, c, log_disconnect=True):
        if c not in self.conns:
            return
        self.conns.discard(c)
        self._interest(c, 0)
        if c.session is not None and c.session.pending is None:
            c.session.close()
        _close_socket(c.sock)
        c.state = "closed"
        if log_disconnect:
            c.services.log.info(f"disconnect from {c.peer}")
        c.server._leave(c.ip)

    def _hand_off(self, c, implicit=False):
        """STARTTLS (or a submissions connection, ``implicit``): the session
        goes on, blocking, in a thread of its own."""
        self._interest(c, 0)
        self.conns.discard(c)
        c.state = "handed"
        t = threading.Thread(target=self._tls_session, args=(c, implicit), name="tls", daemon=True)
        self.handed = [h for h in self.handed if h.is_alive()]
        self.handed.append(t)
        t.start()

    @staticmethod
    def _tls_session(c, implicit=False):
        sock, session = c.sock, c.session
        try:
            sock.setblocking(True)
            if implicit:
                last = S.implicit_tls(sock, session, c.services, c.peer)
                if last is None:
                    return
                sock = last
            first = session.greeting() if implicit else bytes(c.out)
            last = S.pump(sock, session, c.services, c.peer, first=first)
            if last is not None:
                sock = last
        finally:
            session.close()
            _close_socket(sock)
            c.services.log.info(f"disconnect from {c.peer}")
            c.server._leave(c.ip)

    # -- timeouts and shutdown
    def _scan(self, now, stopping):
        for srv, until in list(self.paused.items()):
            if now >= until or stopping:
                del self.paused[srv]
                if not stopping:
                    self.sel.register(srv.socket, _READ, srv)
        stress = {}     # server -> under stress, looked at once a scan
        for c in list(self.conns):
            if c.state == "pause":
                if now >= c.pause_until:
                    self._open(c)
                continue
            if c.state == "hold":
                if now >= c.pause_until:
                    c.state, c.idle_since = "open", now
                    out, c.held = c.held, b""
                    self._reply(c, out + c.session.release())
                continue
            if c.state != "open":
                continue
            session = c.session
            cfg = c.services.cfg
            if session.in_data and c.data_start is None:
                c.data_start = now
            stressed = stress.get(c.server)
            if stressed is None:
                stressed = stress[c.server] = c.server.stressed
            if now >= S.deadline(cfg, session, c.idle_since, c.data_start, stressed):
                c.state = "closing"
                self._emit(c, S.expire(cfg, c.services.log, session, c.peer, now, c.idle_since,
                                       stressed))
                self._close_soon(c)
            elif stopping and not session.in_data:
                c.state = "closing"
                self._emit(c, session.shutdown_reply())
                self._close_soon(c)

    def _close_soon(self, c):
        """A session ended by the server: what it cannot send now is dropped."""
        if c in self.conns and c.out:
            self._close(c)


def _close_socket(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
