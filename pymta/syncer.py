"""fsync without blocking the SMTP server's event loop (whose
:class:`pymta.queue_commit.Committer` owns what does it).

The loop must not block on the disk, and threads that fsync for it cost a
hand-off of Python's global lock at every system call they make.

:class:`KernelSyncer` hands each fsync to the kernel: Linux's native
asynchronous I/O has done fsync as a request (``IOCB_CMD_FSYNC``) since
4.18. ``io_submit`` queues it, a kernel worker runs ``vfs_fsync`` on the
very file (write-back errors reported as for fsync(2)), and its completion
makes an eventfd readable, which the loop watches. No process of ours is
woken and no descriptor travels: this is the default. :meth:`KernelSyncer.open`
probes the kernel with an anonymous memory file and returns None where it
cannot (an older kernel, a seccomp filter, ``fs.aio-max-nr`` reached, an
architecture whose system call numbers are not known here).

Otherwise (or with ``smtpd_loop_fsync = processes``) the listener forks a
few *syncer* processes when it starts (while it has no
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
import platform
import select
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


# -- Linux native AIO -----------------------------------------------------------

# io_setup, io_destroy, io_getevents, io_submit: the architectures whose
# numbers are known here (the generic table is aarch64's and riscv64's).
_AIO_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
    "ppc64le": (227, 228, 229, 230),
    "s390x": (243, 244, 245, 246),
}
_IOCB_CMD_FSYNC = 2
_IOCB_FLAG_RESFD = 1
_RING = 256             # requests in flight at most; more wait in a queue


def _aio_types():
    import ctypes

    class Iocb(ctypes.Structure):
        # struct iocb (linux/aio_abi.h); aio_key and aio_rw_flags swap
        # places on big-endian machines, but both stay 0 here.
        _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                    ("rw_flags", ctypes.c_uint32), ("opcode", ctypes.c_uint16),
                    ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                    ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                    ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                    ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]

    class Event(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                    ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]
    return ctypes, Iocb, Event


class KernelSyncer:
    """The interface of :class:`Syncers` (``submit``, ``ready``, ``socks``,
    ``close``) over Linux native AIO: ``socks`` holds one eventfd."""

    def __init__(self, ctypes, Iocb, Event, numbers, syscall, ctx, efd, log):
        self._ct = ctypes
        # syscall(2) reads every argument as a long: pass longs, not ints.
        L = ctypes.c_long
        self._setup, self._destroy, self._getevents, self._submit = (L(n) for n in numbers)
        self._0, self._1, self._64 = L(0), L(1), L(64)
        self._syscall = syscall
        self._ctx = ctx
        self.efd = efd
        self.log = log
        self.on_lost = None
        self.pids = []
        self.socks = [efd]
        self._iocb = Iocb()
        self._iocb.opcode = _IOCB_CMD_FSYNC
        self._iocb.flags = _IOCB_FLAG_RESFD
        self._iocb.resfd = efd
        self._ptr = (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (Event * 64)()
        self._zero = (ctypes.c_long * 2)(0, 0)        # struct timespec: do not wait
        self._next = 1
        self.busy = {}          # request number -> (fd, callback)
        self.waiting = collections.deque()

    @classmethod
    def open(cls, log=None):
        """A KernelSyncer; OSError says why the kernel cannot fsync this way."""
        numbers = _AIO_SYSCALLS.get(platform.machine())
        if numbers is None or not hasattr(os, "eventfd") or not hasattr(os, "memfd_create"):
            raise OSError(errno.ENOSYS, f"not known on {platform.machine() or 'this machine'}")
        try:
            ctypes, Iocb, Event = _aio_types()
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (ImportError, OSError, AttributeError) as e:
            raise OSError(errno.ENOSYS, f"no system call interface: {e}") from None
        syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(_RING), ctypes.byref(ctx)) != 0:
            code = ctypes.get_errno() or errno.ENOSYS
            raise OSError(code, f"io_setup: {os.strerror(code)}")
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self = cls(ctypes, Iocb, Event, numbers, syscall, ctx, efd, log)
        # The probe: an fsync of an anonymous memory file, which a kernel
        # older than 4.18 refuses (EINVAL) at submission.
        probe = os.memfd_create("pymta-fsync-probe", os.MFD_CLOEXEC)
        results = []
        try:
            code = self._start(probe, results.append)
            for _ in range(50):     # at most 5 s: a kernel worker runs it
                if code or results:
                    break
                select.select([efd], [], [], 0.1)
                self.ready(efd)
        finally:
            if code or results != [None]:
                self.close()
            os.close(probe)
        if code:
            raise OSError(code, f"io_submit of an fsync: {os.strerror(code)}")
        if results != [None]:
            raise OSError(errno.ETIMEDOUT, f"an fsync submitted did not complete: {results}")
        return self

    def _start(self, fd, callback):
        """Submit one fsync: 0, or the errno io_submit failed with."""
        n = self._next
        self._next += 1
        cb = self._iocb
        cb.data = n
        cb.fildes = fd
        if self._syscall(self._submit, self._ctx, self._1, self._ptr) == 1:
            self.busy[n] = (fd, callback)
            return 0
        return self._ct.get_errno() or errno.EIO

    def submit(self, fd, callback):
        if len(self.busy) >= _RING:
            self.waiting.append((fd, callback))
            return
        code = self._start(fd, callback)
        if code == errno.EAGAIN and self.busy:
            self.waiting.append((fd, callback))   # again at the next completion
        elif code:
            self._here(fd, callback)

    def _here(self, fd, callback):
        """An fsync the kernel refused to queue (a file system without
        fsync for it, say, or no room with nothing in flight): here, now."""
        try:
            os.fsync(fd)
        except OSError as e:
            return callback(e)
        callback(None)

    def _submit_waiting(self):
        while self.waiting and len(self.busy) < _RING:
            fd, callback = self.waiting.popleft()
            code = self._start(fd, callback)
            if code == errno.EAGAIN and self.busy:
                self.waiting.appendleft((fd, callback))
                return
            if code:
                self._here(fd, callback)

    def ready(self, sock=None):
        """The eventfd is readable: collect what completed."""
        try:
            os.eventfd_read(self.efd)
        except (BlockingIOError, InterruptedError):
            pass
        done = []
        while True:
            n = self._syscall(self._getevents, self._ctx, self._0, self._64, self._events, self._zero)
            if n <= 0:
                break
            for i in range(n):
                ev = self._events[i]
                done.append((ev.data, ev.res))
            if n < 64:
                break
        callbacks = [(self.busy.pop(key, (None, None))[1], res) for key, res in done]
        self._submit_waiting()
        for callback, res in callbacks:
            if callback is not None:
                callback(OSError(-res, os.strerror(-res)) if res < 0 else None)

    def close(self):
        """Wait for what is in flight (io_destroy does), then free it all."""
        if self._ctx is not None:
            self._syscall(self._destroy, self._ctx)
            self._ctx = None
        if self.efd is not None:
            os.close(self.efd)
            self.efd = None
        self.socks = []
