"""Long-lived delivery processes, one set per identity (uid, gids, mode).

A delivery as another user needs a process with that user's ids. Forking one
per message costs 2-3 ms of CPU in a daemon-sized parent (page tables, then
copy-on-write faults in the child); a worker forked once per identity and
kept while there is work costs one round trip on a socket pair.

A worker is started by pymta.forkserver.spawn: in the daemon by its fork
server (the master has threads and never forks), elsewhere by the calling
process itself. The parent sends a request (pickled: the worker runs the
parent's own code) with the message's df descriptor attached (SCM_RIGHTS);
the worker answers in JSON (forkserver.put_result), because the parent,
often root, must never unpickle what a lower-privileged process wrote. A
worker exits when it has been idle for IDLE_EXIT seconds or when its parent
goes away (EOF); the parent stops using a worker well before that (it
closes the workers idle for REUSE_WINDOW: a reaper thread does, with a fork
server; without one, where a thread would forbid the next fork, each call
does), so an EOF while waiting for an answer means the worker died during
the delivery, and the caller defers the message. Whoever forked a worker
reaps it: the fork server as soon as it exits, a process without one when
it closes the worker or finds it gone, so none stays a zombie.
"""

import os
import pickle
import select
import socket
import struct
import threading
import time

from . import forkserver
from .status import TempFail

IDLE_EXIT = 60.0          # a worker with no request for this long exits
REUSE_WINDOW = 45.0       # the parent retires workers idle for longer
REAP_TICK = 5.0           # how often the parent's reaper looks at idle workers
MAX_IDLE_PER_KEY = 4
MAX_REQUESTS = 5000       # then the worker is retired (bounded growth)
_HDR = struct.Struct("!I")


class WorkerGone(TempFail):
    """The worker died or broke the protocol; the delivery's fate is unknown."""


def _serve(sock, handle):
    """The worker's loop: one request at a time until idle or EOF."""
    while True:
        ready, _, _ = select.select([sock], [], [], IDLE_EXIT)
        if not ready:
            return
        msg, fds, _, _ = socket.recv_fds(sock, _HDR.size, 4)
        if not msg:
            return
        try:
            if len(msg) < _HDR.size:
                msg += _recv_exact(sock, _HDR.size - len(msg))
            (n,) = _HDR.unpack(msg)
            payload = pickle.loads(_recv_exact(sock, n))
            result = handle(payload, fds[0] if fds else -1)
        finally:
            for fd in fds:
                os.close(fd)
        forkserver.put_result(sock.fileno(), result)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def _worker_main(fds, setup, handle):
    """A worker's life, in the child (forkserver.spawn)."""
    sock = socket.socket(fileno=fds[0])
    setup()
    _serve(sock, handle)


class Worker:
    """One forked worker. ``setup()`` runs once in the child (drop privileges);
    ``handle(payload, fd)`` runs per request and returns something JSON can
    hold. With a fork server, both are pickled (module-level functions or
    partials of them)."""

    def __init__(self, setup, handle):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = forkserver.spawn(_worker_main, (setup, handle), [child.fileno()])
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.pid, self.sock = self.proc.pid, parent
        self.requests = 0
        self.last_used = time.monotonic()

    def call(self, payload, fd):
        data = pickle.dumps(payload)
        try:
            socket.send_fds(self.sock, [_HDR.pack(len(data))], [fd])
            self.sock.sendall(data)
        except OSError as e:
            raise BrokenPipeError(str(e)) from None   # nothing was done: retry elsewhere
        try:
            result, _ = forkserver.get_result(self.sock.fileno())
        except (OSError, forkserver.ResultError) as e:
            raise WorkerGone(f"delivery process {self.pid} failed: {e.strerror or e}") from None
        self.requests += 1
        self.last_used = time.monotonic()
        return result

    def exited(self):
        """Whether the worker has exited (it is then reaped)."""
        return self.proc.poll() is not None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        # It sees EOF and exits at once; reap it without blocking the caller long.
        if self.proc.wait(0.5) is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.close()


class Pool:
    """Idle workers by key; a busy key simply gets another worker."""

    def __init__(self):
        self._idle = {}
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._reaper = None       # (pid, thread, stop event) of this process's reaper

    def _start_reaper(self):
        """With a fork server, a daemon thread that retires idle workers on time: every
        REAP_TICK seconds, a worker idle for REUSE_WINDOW is closed (it sees
        EOF, exits at once and is waited for), and one that exited by itself
        is waited for at once, so none outlives its time or stays a zombie
        until the next delivery for its user."""
        with self._lock:
            if self._reaper is not None and self._reaper[0] == os.getpid():
                return
            stop = threading.Event()
            t = threading.Thread(target=self._reap_loop, args=(stop,), name="pymta-worker-reaper",
                                 daemon=True)
            self._reaper = (os.getpid(), t, stop)
        t.start()

    def _reap_loop(self, stop):
        me = os.getpid()
        while not stop.wait(REAP_TICK):
            if os.getpid() != me:
                return
            self.reap()

    def reap(self):
        """Close the idle workers past REUSE_WINDOW and forget (and wait
        for) those that have exited."""
        retire = []
        with self._lock:
            if self._owner != os.getpid():
                return
            now = time.monotonic()
            for key, lst in list(self._idle.items()):
                keep = []
                for w in lst:
                    if now - w.last_used >= REUSE_WINDOW or w.exited():
                        retire.append(w)
                    else:
                        keep.append(w)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for w in retire:
            w.close()

    def _take(self, key):
        with self._lock:
            if self._owner != os.getpid():     # we were forked: not our workers
                self._idle, self._owner = {}, os.getpid()
            now = time.monotonic()
            lst = self._idle.get(key) or []
            fresh = [w for w in lst if now - w.last_used < REUSE_WINDOW and w.requests < MAX_REQUESTS]
            stale = [w for w in lst if w not in fresh]
            worker = fresh.pop() if fresh else None
            self._idle[key] = fresh
            return worker, stale

    def _give(self, key, worker):
        with self._lock:
            lst = self._idle.setdefault(key, [])
            if len(lst) < MAX_IDLE_PER_KEY:
                lst.append(worker)
                return
        worker.close()

    def call(self, key, setup, handle, payload, fd):
        """Run ``handle(payload, fd)`` in a worker for ``key``; raises WorkerGone."""
        if forkserver.server() is None:
            self.reap()     # no reaper thread here: it would forbid the next fork
        for attempt in (1, 2):
            worker, stale = self._take(key)
            for w in stale:
                w.close()
            if worker is None:
                worker = Worker(setup, handle)
                if forkserver.server() is not None:
                    self._start_reaper()
            try:
                result = worker.call(payload, fd)
            except BrokenPipeError:
                worker.close()
                if attempt == 2:
                    raise WorkerGone("delivery process unavailable") from None
                continue
            except WorkerGone:
                worker.close()
                raise
            self._give(key, worker)
            return result
        raise AssertionError("unreachable")

    def close_all(self):
        """Close every idle worker and stop the reaper thread."""
        with self._lock:
            workers = [w for lst in self._idle.values() for w in lst]
            self._idle.clear()
            reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper[0] == os.getpid():
            reaper[2].set()
            if reaper[1] is not threading.current_thread():
                reaper[1].join()
        for w in workers:
            w.close()


POOL = Pool()
