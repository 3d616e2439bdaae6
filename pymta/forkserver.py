"""Forking without threads: the fork server, the one fork-child helper and
the one framing of a child's result.

fork() copies a process as it is at that instant, with every lock held by
some other thread held for ever in the child (the logging package's, the
mail log's, malloc's, the import lock), and Python 3.12 warns about it.
The daemon's master has threads (hand-offs, queue runs, showq, the log
pump, the worker reaper) and must start listeners, delivery workers,
|command children and the children that read a .forward as its owner. So
it never forks them itself: at start, before its first thread, it forks a
*fork server*, a small process with one thread that forks on request.

Why a fork server and not another design: exec'ing a fresh interpreter
(subprocess, multiprocessing's "spawn" and "forkserver") removes the hazard
too, but a delivery worker or a |command child would then import pymta
again, some 50 ms instead of the 1-2 ms of a fork, and multiprocessing adds
its pickled-everything machinery and a resource tracker besides. A server
forked from the master once, before any thread, holds the master's modules
already imported, so its children start as fast as the master's own did, and
smaller (its heap is a start-up one). It runs as root, as the master does:
root-only work stays in the master's children, and each child drops to its
identity itself (a worker to its user's, a command to the recipient's or
default_privs, never root; a listener to mail_owner).

The protocol. A request is one SOCK_SEQPACKET message on the server's
socket: the pickled (entry, args, close_fds), from the master only (the
socketpair was made before the fork; the server runs as root), with
descriptors attached (SCM_RIGHTS): first the *reply socket*, one end of a
socketpair the caller made for this child, then the descriptors handed to
``entry(fds, *args)``. On the reply socket the server answers ``p<pid>``
(or ``e<errno>`` if fork failed) and, once it has reaped the child,
``x<wait status>``. The caller may send ``k<signal>`` on it: the server
signals the child only while it has not reaped it, so a pid reused by
another process is never hit. The server closes the passed descriptors
as soon as it has forked, so the caller's copies are the only ones left:
an end-of-file on a pipe the child writes means that the child is done.
The server exits when the master's end of its socket closes (the master
exited or stopped it); children it leaves carry on (listeners notice that
their parent went, workers see their socket's end-of-file).

A process without a fork server (``sendmail -q`` before its threads,
``-odb``, ``-odi``) forks directly, with :func:`fork_child`. In the
daemon's processes (:func:`strict`, which the master calls at its start and
its children inherit) fork_child refuses to fork while the process has
other threads (:class:`ForkWithThreads`): the hazard cannot come back
unnoticed. A process that delivers with threads as root starts a fork
server first (:class:`scope`) when it has no thread yet; one that embeds
pymta beside threads of its own (the test suite's SMTP sinks) cannot, and
forks as it always did.

:func:`fork_child` is every child's start: signals back to their default,
descriptors closed, the body's return value as exit code (EX_SOFTWARE on
any exception), ``os._exit`` whatever happens. :func:`put_result` and
:func:`get_result` are the one framing of what a child reports: a
length-prefixed JSON value, then a length-prefixed byte string (empty but
for a .forward's contents).

This module is imported by the sendmail path (-odb): it imports no
threading, socket, signal (enum), json (re) or pickle at start-up.
"""

import errno
import os
import struct
import sys
import time

from .status import EX_OK, EX_SOFTWARE, READ_SIZE, PymtaError

_HDR = struct.Struct("!I")
_SIGKILL = 9
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGCHLD", "SIGQUIT", "SIGUSR1", "SIGUSR2")
STOP_GRACE = 0.5            # at its end, the server reaps what exits within this (short:
                            # after a kill -9 of the master, its listeners wait for it to go)
_REQUEST_MAX = 1 << 18      # a request (pickled configuration, envelope) fits in this


class ForkWithThreads(PymtaError):
    """A fork was asked for in a process that has other threads."""


_strict = False


def strict():
    """From now on, in this process and its children, fork_child refuses to
    fork beside other threads."""
    global _strict
    _strict = True


def _threads():
    th = sys.modules.get("threading")     # not imported: no thread was started
    return th.active_count() if th is not None else 1


def close_other_fds(keep):
    """In a fresh child: close every descriptor but stdio and ``keep``."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def fork_child(body, keep=None):
    """Fork; the child resets its signals, closes every descriptor but stdio
    and ``keep`` (all are kept when ``keep`` is None), runs ``body()`` and
    exits with its return value (None: EX_OK; an exception: EX_SOFTWARE),
    never returning. The parent gets the child's pid. Raises
    ForkWithThreads in a process with other threads, once strict()."""
    n = _threads()
    if n > 1 and _strict:
        raise ForkWithThreads(f"fork refused: this process has {n} threads "
                              "(the fork server forks for it)")
    pid = os.fork()
    if pid:
        return pid
    code = EX_SOFTWARE
    try:
        import signal
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for name in _SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        # What came meanwhile (the fork server blocks the signals it ignores
        # around a fork) is delivered now, to the defaults.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if keep is not None:
            close_other_fds(keep)
        result = body()
        code = EX_OK if result is None else result
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EX_SOFTWARE
    except BaseException:   # noqa: BLE001 - the child must never return
        code = EX_SOFTWARE
    finally:
        os._exit(code)


# -- a child's result: one framing

def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def put_result(fd, value, data=b""):
    """Write ``value`` (JSON) and ``data`` (bytes), each length-prefixed."""
    import json
    body = json.dumps(value).encode()
    _write_all(fd, _HDR.pack(len(body)) + body + _HDR.pack(len(data)) + data)


class ResultError(PymtaError):
    """No whole result: the child died, broke the framing or was late
    (``errno``: ETIMEDOUT, EMSGSIZE, EPIPE, ECHILD or EPROTO)."""

    def __init__(self, err, text):
        super().__init__(text)
        self.errno, self.strerror = err, text


def get_result(fd, limit=1 << 20, deadline=None, child=None):
    """(value, data) that put_result wrote to ``fd``. Stops at end-of-file,
    at ``deadline`` (time.monotonic()), past ``limit`` bytes, or, with
    ``child`` (a Child), once the child has exited and nothing more comes.
    Raises ResultError then."""
    import select
    buf = bytearray()
    exited = False
    while True:
        value = _parse(buf)
        if value is not None:
            return value
        if len(buf) > limit + 4096:
            raise ResultError(errno.EMSGSIZE, "result too large")
        wait = 0.5 if child is not None else None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultError(errno.ETIMEDOUT, "no result in time")
            wait = left if wait is None else min(wait, left)
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            chunk = os.read(fd, READ_SIZE)
            if not chunk:
                raise ResultError(errno.EPIPE, "no result (end of file)")
            buf += chunk
        elif child is not None:
            if exited:
                raise ResultError(errno.ECHILD, "no result (the process exited)")
            exited = child.poll() is not None   # one more look after it exited


def _parse(buf):
    if len(buf) < _HDR.size:
        return None
    (n,) = _HDR.unpack_from(buf)
    end = _HDR.size + n
    if len(buf) < end + _HDR.size:
        return None
    (m,) = _HDR.unpack_from(buf, end)
    if len(buf) < end + _HDR.size + m:
        return None
    import json
    try:
        value = json.loads(bytes(buf[_HDR.size:end]))
    except ValueError:
        raise ResultError(errno.EPROTO, "malformed result") from None
    return value, bytes(buf[end + _HDR.size:end + _HDR.size + m])


# -- children

class Child:
    """A child forked by this process (fork_child)."""

    def __init__(self, pid):
        self.pid = pid
        self.status = None

    def poll(self):
        """The wait status once the child has exited (it is then reaped), else None."""
        if self.status is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = self.pid, 0
            if done:
                self.status = status
        return self.status

    def wait(self, timeout=None):
        """poll() until ``timeout`` seconds have passed (None: for ever)."""
        if timeout is None and self.status is None:
            try:
                self.status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:
                self.status = 0
        end = time.monotonic() + (timeout or 0)
        while self.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        return self.status

    def kill(self, sig=_SIGKILL):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self):
        """Forget the child; with a fork server, it reaps it."""


class ServedChild:
    """A child forked by the fork server: its pid, exit status and signals
    go through the reply socket."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.status = None

    def _read(self, timeout):
        import select
        if self.sock is None:
            return
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            msg = self.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if msg[:1] == b"x":
            self.status = int(msg[1:])
        elif not msg:       # the fork server is gone: so is our knowledge
            self.status = -1
        self.close()

    def poll(self):
        if self.status is None:
            self._read(0)
        return self.status

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.status is None and self.sock is not None:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            self._read(left)
        return self.status

    def kill(self, sig=_SIGKILL):
        if self.status is None and self.sock is not None:
            try:
                self.sock.send(b"k%d" % sig)
            except OSError:
                pass

    def close(self):
        """Stop listening: the server reaps the child all the same."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else -1


class Server:
    """The caller's side of a fork server (thread-safe: one message a
    request, one reply socket a child)."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.owner = os.getpid()
        self.child = Child(pid)

    def spawn(self, entry, args=(), fds=(), close_fds=True):
        import pickle
        import socket
        request = pickle.dumps((entry, tuple(args), close_fds))
        if len(request) > _REQUEST_MAX:
            raise OSError(errno.EMSGSIZE, "fork request too large")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                socket.send_fds(self.sock, [request], [theirs.fileno(), *fds])
            finally:
                theirs.close()
            answer = mine.recv(64)
        except OSError as e:
            mine.close()
            raise OSError(e.errno or errno.EPIPE, f"fork server: {e.strerror or e}") from None
        if answer[:1] == b"p":
            return ServedChild(int(answer[1:]), mine)
        mine.close()
        code = int(answer[1:]) if answer[:1] == b"e" else errno.EPIPE
        raise OSError(code, f"fork server: {os.strerror(code)}")

    def gone(self):
        """Whether the server has exited (it is then reaped)."""
        return self.child.poll() is not None

    def stop(self):
        """Close its socket (it exits) and reap it."""
        self.sock.close()
        self.child.wait()


_server = None


def server():
    """This process's fork server, or None."""
    return _server if _server is not None and _server.owner == os.getpid() else None


def spawn(entry, args=(), fds=(), close_fds=True):
    """Run ``entry(fds, *args)`` in a new child: forked by this process's
    fork server when it has one (``entry`` and ``args`` are then pickled:
    module-level functions, partials of them, plain data), else by this
    process (which must have no other thread). With ``close_fds`` the child
    keeps stdio and ``fds`` only. Returns a Child or ServedChild; the
    caller closes its own copies of ``fds``."""
    srv = server()
    if srv is not None:
        return srv.spawn(entry, args, fds, close_fds)
    fds = list(fds)
    return Child(fork_child(lambda: entry(fds, *args), set(fds) if close_fds else None))


def start(close=()):
    """Fork this process's fork server (before any thread: fork_child
    refuses otherwise); it closes the descriptors ``close`` (the master's
    listening sockets, its pid file). Returns the Server."""
    global _server
    import socket
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _REQUEST_MAX)

    def body():
        mine.close()
        for fd in close:
            try:
                os.close(fd)
            except OSError:
                pass
        from .proctitle import set_name
        set_name("pymta: forkserv")    # ps shows 15 bytes
        return _serve(theirs)

    try:
        pid = fork_child(body)
    finally:
        theirs.close()
    _server = Server(pid, mine)
    return _server


def stop():
    """Stop this process's fork server, if it has one."""
    global _server
    srv = server()
    if srv is not None:
        _server = None
        srv.stop()


class scope:
    """``with forkserver.scope():`` a fork server for the threads started
    inside, when this process may need to fork (as root: deliveries as
    other users), has none, and no thread yet; stopped at the end."""

    def __enter__(self):
        self.started = server() is None and os.geteuid() == 0 and _threads() == 1
        if self.started:
            start()
        return self

    def __exit__(self, *exc):
        if self.started:
            stop()


def _serve(ctl):
    """The fork server's loop (one thread): requests from ``ctl``, exits
    reaped and reported, kill requests from reply sockets, until ``ctl``
    reaches end-of-file."""
    import pickle
    import select
    import signal
    import socket
    ignored = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in ignored:
        # The master stops the server by closing its socket; a terminal's
        # ^C or a signal to the process group is the master's business.
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = {}       # pid -> its reply socket (None once the caller closed it)
    listening = {}      # reply socket -> pid, while the caller listens

    def reap():
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            sock = children.pop(pid, None)
            if sock is not None:
                listening.pop(sock, None)
                try:
                    sock.send(b"x%d" % status)
                except OSError:
                    pass
                sock.close()

    def fork(entry, args, close_fds, reply, fds):
        def body():
            os.close(wake_r)
            os.close(wake_w)
            ctl.close()
            for s in listening:
                s.close()
            reply.close()
            if close_fds:
                close_other_fds(fds)
            return entry(fds, *args)
        # Blocked, not ignored, while the child is made: a signal sent to it
        # at once waits for its own dispositions instead of being lost.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
        try:
            return fork_child(body)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r, *listening], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        reap()
        for sock in ready:
            if sock is ctl or sock == wake_r:
                continue
            try:
                msg = sock.recv(64)
            except OSError:
                msg = b""
            pid = listening.get(sock)
            if msg[:1] == b"k" and pid is not None:
                try:
                    os.kill(pid, int(msg[1:]))
                except (ProcessLookupError, ValueError):
                    pass
            elif not msg and pid is not None:      # the caller stopped listening
                listening.pop(sock)
                children[pid] = None
                sock.close()
        if ctl not in ready:
            continue
        try:
            msg, fds, flags, _ = socket.recv_fds(ctl, _REQUEST_MAX, 64)
        except InterruptedError:
            continue
        except OSError:
            _reap_for(STOP_GRACE, children)
            return EX_OK
        if not msg and not fds:     # the master closed its end
            _reap_for(STOP_GRACE, children)
            return EX_OK
        if not fds:
            continue
        reply = socket.socket(fileno=fds[0])
        fds = fds[1:]
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise OSError(errno.EMSGSIZE, "request truncated")
            entry, args, close_fds = pickle.loads(msg)
            pid = fork(entry, args, close_fds, reply, fds)
        except OSError as e:
            _answer(reply, b"e%d" % (e.errno or errno.EIO))
            reply.close()
        except Exception:   # noqa: BLE001 - a bad request must not stop the server
            _answer(reply, b"e%d" % errno.EINVAL)
            reply.close()
        else:
            children[pid] = reply
            listening[reply] = pid
            _answer(reply, b"p%d" % pid)
        finally:
            for fd in fds:
                os.close(fd)


def _reap_for(seconds, children):
    """Reap the children that end within ``seconds`` (no zombie for an
    init that does not reap); the others are left to init."""
    end = time.monotonic() + seconds
    while children and time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.02)


def _answer(sock, data):
    try:
        sock.send(data)
    except OSError:
        pass
