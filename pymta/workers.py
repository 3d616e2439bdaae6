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

Under load (the daemon's delivery threads, many messages to one mailbox)
a worker per concurrent delivery would mostly wait for the mailbox lock,
and a bounded idle list would fork and retire workers all the time. So a
key has at most MAX_WORKERS_PER_KEY workers, all kept while they have work
(a caller waits for one rather than fork another), and deliveries to one
target are combined (Pool.call with a batch_key): while a batch for the
target is in a worker, further requests wait in the parent; when it comes
back, the first of them leads the next batch, all of them (up to
MAX_BATCH) in one request, their descriptors in one SCM_RIGHTS message.
The worker's handle gets the batch and returns a result for each, so the
target module can take its lock and fsync once for all (local_mbox,
local_maildir). A worker that dies fails its whole batch (WorkerGone for
each: the outcome of every one is unknown, each is deferred).
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
MAX_WORKERS_PER_KEY = 4   # workers alive at once for one identity (busy or idle)
MAX_BATCH = 64            # most deliveries sent to a worker as one batch
MAX_REQUESTS = 5000       # batches; then the worker is retired (bounded growth)
_HDR = struct.Struct("!I")


class WorkerGone(TempFail):
    """The worker died or broke the protocol; the delivery's fate is unknown."""


def _serve(sock, handle):
    """The worker's loop: one batch at a time until idle or EOF."""
    while True:
        ready, _, _ = select.select([sock], [], [], IDLE_EXIT)
        if not ready:
            return
        msg, fds, _, _ = socket.recv_fds(sock, _HDR.size, MAX_BATCH + 1)
        if not msg:
            return
        try:
            if len(msg) < _HDR.size:
                msg += _recv_exact(sock, _HDR.size - len(msg))
            (n,) = _HDR.unpack(msg)
            payloads = pickle.loads(_recv_exact(sock, n))
            if len(fds) != len(payloads):
                return      # the parent broke the protocol: it sees EOF
            result = handle(payloads, fds)
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

    def call(self, payloads, fds):
        """One batch: a result for each payload, in order."""
        data = pickle.dumps(payloads)
        try:
            socket.send_fds(self.sock, [_HDR.pack(len(data))], fds)
            self.sock.sendall(data)
        except OSError as e:
            raise BrokenPipeError(str(e)) from None   # nothing was done: retry elsewhere
        try:
            results, _ = forkserver.get_result(self.sock.fileno(), limit=(1 << 20) * len(payloads))
        except (OSError, forkserver.ResultError) as e:
            raise WorkerGone(f"delivery process {self.pid} failed: {e.strerror or e}") from None
        if not isinstance(results, list) or len(results) != len(payloads):
            raise WorkerGone(f"delivery process {self.pid} failed: wrong answer")
        self.requests += 1
        self.last_used = time.monotonic()
        return results

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


class _Request:
    """One delivery waiting for its batch; ``done`` is held until it has its
    outcome (a result, or the exception to raise) or is told to lead."""

    __slots__ = ("payload", "fd", "result", "error", "lead", "done")

    def __init__(self, payload, fd):
        self.payload, self.fd = payload, fd
        self.result = self.error = None
        self.lead = False
        self.done = threading.Lock()
        self.done.acquire()


class Pool:
    """Workers by key (an identity), at most MAX_WORKERS_PER_KEY alive per
    key, kept while there is work (no fork per delivery under load).

    Deliveries to one target (``batch_key``) are combined: while one batch
    for it is in a worker, the requests that come meanwhile wait, then go
    together as the next batch (at most MAX_BATCH), led by the first of
    them: the target module locks the mailbox once, writes them all and
    fsyncs once, and each caller gets its own message's result."""

    def __init__(self):
        self._idle = {}          # key -> [Worker], the idle ones
        self._alive = {}         # key -> how many workers (idle or busy)
        self._batches = {}       # (key, batch_key) -> [_Request] waiting, while one is in flight
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._owner = os.getpid()
        self._reaper = None       # (pid, thread, stop event) of this process's reaper
        self.spawned = 0          # workers started, batches sent (for tests and measurement)
        self.batches = 0

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

    def _forget(self, key, n=1):
        """``n`` workers of ``key`` are gone (lock held)."""
        left = self._alive.get(key, 0) - n
        if left > 0:
            self._alive[key] = left
        else:
            self._alive.pop(key, None)
        self._freed.notify_all()

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
                        self._forget(key)
                    else:
                        keep.append(w)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for w in retire:
            w.close()

    def _check_owner(self):
        """In a forked child the parent's workers and waiters are not ours (lock held)."""
        if self._owner != os.getpid():
            self._idle, self._alive, self._batches = {}, {}, {}
            self._owner = os.getpid()

    def _take(self, key):
        """(an idle worker or None to start one, stale workers to close);
        waits while the key has MAX_WORKERS_PER_KEY workers, all busy."""
        with self._lock:
            self._check_owner()
            while True:
                now = time.monotonic()
                lst = self._idle.get(key) or []
                fresh = [w for w in lst if now - w.last_used < REUSE_WINDOW
                         and w.requests < MAX_REQUESTS]
                stale = [w for w in lst if w not in fresh]
                if stale:
                    self._forget(key, len(stale))
                if fresh:
                    self._idle[key] = fresh
                    return fresh.pop(), stale
                self._idle.pop(key, None)
                if self._alive.get(key, 0) < MAX_WORKERS_PER_KEY:
                    self._alive[key] = self._alive.get(key, 0) + 1
                    self.spawned += 1
                    return None, stale
                self._freed.wait()

    def _give(self, key, worker):
        with self._lock:
            if self._owner == os.getpid():
                self._idle.setdefault(key, []).append(worker)
                self._freed.notify()
                return
        worker.close()

    def _lost(self, key, worker):
        """A worker that failed, or one that could not be started (None)."""
        with self._lock:
            if self._owner == os.getpid():
                self._forget(key)
        if worker is not None:
            worker.close()

    def _run(self, key, setup, handle, payloads, fds):
        """One batch in a worker of ``key``; raises WorkerGone."""
        if forkserver.server() is None:
            self.reap()     # no reaper thread here: it would forbid the next fork
        for attempt in (1, 2):
            worker, stale = self._take(key)
            for w in stale:
                w.close()
            if worker is None:
                try:
                    worker = Worker(setup, handle)
                except BaseException:
                    self._lost(key, None)
                    raise
                if forkserver.server() is not None:
                    self._start_reaper()
            self.batches += 1
            try:
                results = worker.call(payloads, fds)
            except BrokenPipeError:
                self._lost(key, worker)
                if attempt == 2:
                    raise WorkerGone("delivery process unavailable") from None
                continue
            except BaseException:
                self._lost(key, worker)
                raise
            self._give(key, worker)
            return results
        raise AssertionError("unreachable")

    def call(self, key, setup, handle, payload, fd, batch_key=None):
        """The result of ``handle`` for ``payload`` (with descriptor ``fd``) in
        a worker for ``key``; raises WorkerGone. ``handle(payloads, fds)``
        gets a batch and returns a result for each; with ``batch_key``,
        concurrent calls with the same keys share batches, else it gets one."""
        if batch_key is None:
            return self._run(key, setup, handle, [payload], [fd])[0]
        req = _Request(payload, fd)
        bkey = (key, batch_key)
        with self._lock:
            self._check_owner()
            waiting = self._batches.get(bkey)
            if waiting is None:
                self._batches[bkey] = []       # in flight: the next ones wait
                req.lead = True
            else:
                waiting.append(req)
        if not req.lead:
            req.done.acquire()
            if not req.lead:
                if req.error is not None:
                    raise req.error
                return req.result
            with self._lock:
                batch = self._batches[bkey][:MAX_BATCH]
                del self._batches[bkey][:MAX_BATCH]
        else:
            batch = [req]
        try:
            results = self._run(key, setup, handle, [r.payload for r in batch],
                                [r.fd for r in batch])
        except BaseException as e:   # noqa: BLE001 - every waiter gets its outcome, then it is raised
            results, error = None, e
        else:
            error = None
        with self._lock:
            waiting = self._batches.get(bkey)
            following = waiting[0] if waiting else None
            if following is None:
                self._batches.pop(bkey, None)
        for i, r in enumerate(batch):
            if r is req:
                continue
            if error is not None:
                # each its own exception (a shared one would share its traceback)
                r.error = WorkerGone(str(error) if isinstance(error, WorkerGone) else
                                     f"delivery process failed: {type(error).__name__}: {error}")
            else:
                r.result = results[i]
            r.done.release()
        if following is not None:
            following.lead = True       # the next batch is its to send
            following.done.release()
        if error is not None:
            raise error
        return results[batch.index(req)]

    def close_all(self):
        """Close every idle worker and stop the reaper thread."""
        with self._lock:
            workers = [w for lst in self._idle.values() for w in lst]
            for key, lst in self._idle.items():
                self._forget(key, len(lst))
            self._idle.clear()
            reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper[0] == os.getpid():
            reaper[2].set()
            if reaper[1] is not threading.current_thread():
                reaper[1].join()
        for w in workers:
            w.close()


POOL = Pool()
