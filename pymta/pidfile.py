"""The daemon's pid file, held by a lock for the daemon's whole life.

The daemon opens ``pid_file``, takes an exclusive lock on it (never
waiting; a POSIX record lock, which belongs to the process: the listeners
and delivery workers it forks do not hold it) and writes its pid. The lock
goes with the process, however it ends (kill -9 included), so a stale file
never stops a restart and a recycled pid is never taken for the daemon. ``running_pid(path)`` is the
test every other program uses (sendmail -bd, make uninstall, pymta check):
the pid in the file if the file is locked, else None.
"""

import errno
import fcntl
import os

from .status import EX_TEMPFAIL, PymtaError


class AlreadyRunning(PymtaError):
    exit_code = EX_TEMPFAIL

    def __init__(self, path, pid):
        super().__init__(f"daemon already running (pid {pid or '?'}, {path})")
        self.path, self.pid = path, pid


def _read_pid(fd):
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        return int(text[0]) if text and text[0].isdigit() else None
    except OSError:
        return None


def running_pid(path):
    """The pid of the daemon holding ``path``, or None when none holds it
    (no file, or a file left by a daemon that is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_pid(fd) or -1
            return None
        return None
    finally:
        os.close(fd)


class PidFile:
    """A context manager (python-daemon's ``pidfile``): enter takes the lock
    and writes this process's pid, exit removes the file."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        """Raises AlreadyRunning, or OSError when the file cannot be made."""
        d = os.path.dirname(self.path)
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(self.path, pid) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        try:
            if _read_pid(self.fd) == os.getpid():
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def fileno(self):
        return self.fd

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
