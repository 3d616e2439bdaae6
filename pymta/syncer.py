"""fsync in helper processes, for the SMTP server's event loop (whose
:class:`pymta.queue_commit.Committer` owns them).

The loop must not block on the disk, and threads that fsync for it cost a
hand-off of Python's global lock at every system call they make. So the
listener forks a few *syncer* processes when it starts (while it has no
other thread: a loop started beside threads, as tests do, fsyncs in its
own thread, see below): each waits on a socketpair for a file descriptor, fsyncs
it, closes it and answers with the errno (0 for success). The descriptor
itself travels (SCM_RIGHTS), not a path: an fsync through it reports the
write-back errors of that very file.

A syncer exits when the listener's end of its socketpair closes. If one
dies (killed, say) with a descriptor in hand, that fsync is submitted
again, to another syncer or in the caller's thread: the caller's own
descriptor is still open, and fsync may be repeated. If none is left, or
none could be forked, :meth:`Syncers.submit` fsyncs in the caller's
thread.

:class:`DirSync` shares one fsync of the queue directory among all the
commits that renamed a control file before it started (group commit).
"""

import collections
import errno
import os
import signal
import socket

from . import forkserver


def _serve(sock):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
        except InterruptedError:
            continue
        except OSError:
            return
        if not msg and not fds:
            return
        code = 0
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as e:
                code = code or e.errno or errno.EIO
            finally:
                os.close(fd)
        try:
            sock.send(b"%d" % code)
        except OSError:
            return


class Syncers:
    """``n`` syncer processes; ``submit(fd, callback)`` fsyncs ``fd`` (the
    caller keeps its own descriptor) and later calls ``callback(None)`` or
    ``callback(OSError)`` from :meth:`ready`, which the owner runs when
    one of :attr:`socks` is readable."""

    def __init__(self, n, log=None):
        self.log = log
        self.on_lost = None             # called with a socket before it is closed
        self.idle = []                  # sockets of idle syncers
        self.busy = {}                  # socket -> (fd, callback)
        self.waiting = collections.deque()
        self.pids = []
        self.socks = []
        for _ in range(n):
            try:
                self._spawn()
            except (OSError, forkserver.ForkWithThreads) as e:
                if log:
                    log.warning(f"warning: cannot start a syncer process: {getattr(e, 'strerror', None) or e}")
                break

    def _spawn(self):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:    # the syncer: nothing but its socket
            pid = forkserver.fork_child(lambda: _serve(theirs), keep={theirs.fileno()})
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        self.pids.append(pid)
        self.socks.append(mine)
        self.idle.append(mine)

    def submit(self, fd, callback):
        if self.idle:
            sock = self.idle.pop()
            try:
                socket.send_fds(sock, [b"s"], [fd])
            except OSError as e:
                self._lost(sock, e)
                return self.submit(fd, callback)
            self.busy[sock] = (fd, callback)
        elif self.busy:
            self.waiting.append((fd, callback))
        else:     # no syncer left: in this thread
            try:
                os.fsync(fd)
            except OSError as e:
                return callback(e)
            callback(None)

    def ready(self, sock):
        """``sock`` is readable: its syncer answered (or died)."""
        try:
            answer = sock.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            answer, err = b"", e
        else:
            err = None
        fd, callback = self.busy.pop(sock, (None, None))
        if not answer:
            # It died, perhaps before it read our request: ask again
            # (another syncer, or this thread once none is left).
            self._lost(sock, err or OSError(errno.EPIPE, "syncer process gone"))
            if callback is not None:
                self.submit(fd, callback)
            return
        code = int(answer)
        result = OSError(code, os.strerror(code)) if code else None
        self.idle.append(sock)
        if self.waiting:
            self.submit(*self.waiting.popleft())
        if callback is not None:
            callback(result)

    def _lost(self, sock, e):
        if self.log:
            self.log.warning(f"warning: a syncer process is gone ({e}); {len(self.socks) - 1} left")
        if sock in self.socks:
            self.socks.remove(sock)
        if sock in self.idle:
            self.idle.remove(sock)
        self.busy.pop(sock, None)
        if self.on_lost is not None:
            try:
                self.on_lost(sock)
            except (KeyError, ValueError):
                pass
        sock.close()
        for pid in list(self.pids):     # reap what has exited already
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.pids.remove(pid)
            except ChildProcessError:
                self.pids.remove(pid)
        if not self.socks:      # run what waits in this thread
            while self.waiting:
                self.submit(*self.waiting.popleft())

    def close(self):
        for sock in self.socks:
            sock.close()
        self.socks, self.idle = [], []
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.pids = []


class DirSync:
    """One fsync of a directory for every request made before it started."""

    def __init__(self, syncers, dirfd):
        self.syncers, self.dirfd = syncers, dirfd
        self.inflight = None
        self.waiting = []

    def request(self, callback):
        self.waiting.append(callback)
        if self.inflight is None:
            self._start()

    def _start(self):
        self.inflight, self.waiting = self.waiting, []
        self.syncers.submit(self.dirfd, self._done)

    def _done(self, err):
        callbacks, self.inflight = self.inflight, None
        if self.waiting:
            self._start()
        for cb in callbacks:
            cb(err)
