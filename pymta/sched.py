"""Per-destination state shared by every delivering process: connection
slots and dead-destination marks, in ``<queue_directory>/sched/``.

The daemon's hand-offs and queue runs and any number of cron ``sendmail -q``
runs deliver at once; they agree on two things through files:

- **Slots.** A destination (the next hop: relayhost, a transport_maps
  nexthop or the recipient domain, with its port) has numbered slot files
  ``<hop>.<n>``; an SMTP connection to it holds an exclusive flock() on one
  for as long as it is open (idle in a connection cache too). The number of
  slots is ``default_destination_concurrency_limit``; a destination that has
  not delivered anything within ``smtp_dead_host_time`` (``<hop>.ok`` is
  older, or absent) gets at most ``initial_destination_concurrency`` of them
  (slow start, as Postfix's qmgr): a tarpit or a blackhole holds that many
  delivery threads, never all of them. The kernel drops a lock when its
  process dies, so a crash leaks nothing.
- **Caps.** A server that greets with 421 while others of our connections
  to it are open is at its own connection limit, not dead: ``<hop>.cap``
  holds that number of connections for CAP_TIME seconds, and the message
  waits for a slot (Postfix's concurrency feedback, in one step).
- **Wants.** A delivery that finds every slot of a destination held
  touches ``<hop>.want``. A delivery process keeps its idle connections for
  the next message (they hold their slots) until such a want is newer than
  the moment a connection went idle, or until IDLE_TIME without work: a
  connection is given up when someone waits for its slot, not merely
  because the queue run's hand-out was a moment late on a busy machine.
- **Dead marks.** ``<hop>.dead`` holds an expiry time and the reply of the
  failure that made every server of the destination unusable (refused,
  timed out, 421 greeting); until it expires, messages for it are deferred
  with that reply without a connection or a slot.

A process that cannot use the directory (not its own) delivers without
limits, as before, and says so once.
"""

import fcntl
import os
import threading
import time
import zlib

from .status import Reply

SUBDIR = "sched"
_PROVEN_REFRESH = 10.0      # <hop>.ok is touched at most this often per process
CAP_TIME = 60.0             # how long a server's connection limit, learnt from a 421, holds
IDLE_TIME = 2.0             # an idle connection nobody waits for is kept this long (Postfix's
                            # smtp_connection_cache_time_limit)
_CLOCK_SLACK = 0.02         # file times come from a coarse clock: a want this much older counts


def _file_name(hop):
    clean = "".join(c if c.isalnum() or c in ".-_[]:" else "_" for c in hop.lower())
    if clean != hop.lower() or len(clean) > 120:
        clean = f"{clean[:100]}-{zlib.crc32(hop.encode('utf-8', 'replace')):08x}"
    return clean


def _write_atomically(path, text):
    """``path`` replaced whole by ``text`` (a temporary file renamed over
    it, so a reader in another process sees the old or the new); a failure
    only leaves the mark unwritten."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Slot:
    """A held connection slot; release() (or the process's end) frees it."""

    def __init__(self, fd):
        self.fd = fd

    def release(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)      # closing the descriptor drops the flock


class _NoSlot(Slot):
    def __init__(self):
        super().__init__(-1)


class Scheduler:
    def __init__(self, cfg, log=None):
        self.dir = os.path.join(cfg.queue_directory, SUBDIR)
        self.limit = cfg.default_destination_concurrency_limit
        self.initial = max(1, cfg.initial_destination_concurrency)
        self.dead_time = cfg.smtp_dead_host_time
        self.log = log
        self._proven = {}       # hop -> when this process last touched <hop>.ok
        self._lock = threading.Lock()
        self._broken = False

    def _path(self, hop, suffix):
        return os.path.join(self.dir, _file_name(hop) + suffix)

    def _usable(self):
        if self._broken:
            return False
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            self._give_up(e)
            return False
        return True

    def _give_up(self, e):
        if not self._broken:
            self._broken = True
            if self.log:
                self.log.warning(f"warning: {self.dir}: {e.strerror or e}: destination "
                                 "concurrency limits and dead marks are not shared")

    # -- slots
    def limit_for(self, hop):
        if self.limit <= 0:
            return 0
        limit = self.limit if self.proven(hop) else min(self.limit, self.initial)
        cap = self.capped(hop)
        return min(limit, cap) if cap else limit

    # -- a server's own connection limit
    def cap(self, hop, n):
        """The server greeted a connection with 421 while ``n`` others were
        open: it takes no more than ``n`` at once, for CAP_TIME seconds."""
        if n <= 0 or not self._usable():
            return
        _write_atomically(self._path(hop, ".cap"), f"{time.time() + CAP_TIME:.3f} {n}\n")

    def capped(self, hop):
        try:
            with open(self._path(hop, ".cap"), "rb") as f:
                expiry, n = f.read(100).split()
            return int(n) if float(expiry) > time.time() else 0
        except (OSError, ValueError):
            return 0

    def acquire(self, hop):
        """A Slot for a new connection to ``hop``, or None when all its slots
        are held (by this process or any other)."""
        limit = self.limit_for(hop)
        if limit <= 0 or not self._usable():
            return _NoSlot()
        base = self._path(hop, ".")
        for n in range(limit):
            try:
                fd = os.open(f"{base}{n}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
            except OSError as e:
                self._give_up(e)
                return _NoSlot()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return Slot(fd)
        return None

    def busy(self, hop):
        """How many of ``hop``'s slots are held now (for tests and the bench)."""
        n = 0
        base = self._path(hop, ".")
        for i in range(max(self.limit, 1)):
            try:
                fd = os.open(f"{base}{i}", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                n += 1
            finally:
                os.close(fd)
        return n

    # -- wants: someone waits for a slot of ``hop``
    def want(self, hop):
        """Every slot of ``hop`` was held when a delivery wanted one."""
        if not self._usable():
            return
        path = self._path(hop, ".want")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def wanted(self, hop, since):
        """Whether a delivery wanted a slot of ``hop`` since ``since`` (time.time())."""
        try:
            return os.stat(self._path(hop, ".want")).st_mtime >= since - _CLOCK_SLACK
        except OSError:
            return False

    # -- slow start
    def proven(self, hop):
        try:
            return os.stat(self._path(hop, ".ok")).st_mtime > time.time() - max(self.dead_time, 60)
        except OSError:
            return False

    def delivered(self, hop):
        """Something was delivered to ``hop``: it gets its full limit."""
        now = time.monotonic()
        with self._lock:
            if now - self._proven.get(hop, -1e9) < _PROVEN_REFRESH:
                return
            self._proven[hop] = now
        if not self._usable():
            return
        path = self._path(hop, ".ok")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.utime(path)
        except OSError:
            pass

    # -- dead marks
    def dead(self, hop):
        """The Reply a dead ``hop`` defers with, or None."""
        try:
            with open(self._path(hop, ".dead"), "rb") as f:
                data = f.read(4096)
        except OSError:
            return None
        try:
            expiry, code, enhanced, text = data.decode("utf-8", "replace").split(" ", 3)
            if float(expiry) <= time.time():
                return None
            return Reply(int(code), enhanced, text.rstrip("\n"))
        except ValueError:
            return None

    def mark_dead(self, hop, reply):
        if self.dead_time <= 0 or not self._usable():
            return
        with self._lock:
            self._proven.pop(hop, None)
        text = " ".join(str(reply.text).split())
        _write_atomically(self._path(hop, ".dead"),
                          f"{time.time() + self.dead_time:.3f} {reply.code} {reply.enhanced} {text}\n")
        try:
            os.unlink(self._path(hop, ".ok"))
        except OSError:
            pass

    def clear_all_dead(self):
        """Forget every dead mark (``pymta flush``)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name.endswith(".dead"):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def clear_dead(self, hop):
        try:
            os.unlink(self._path(hop, ".dead"))
        except OSError:
            pass


_schedulers = {}
_schedulers_lock = threading.Lock()


def for_config(cfg, log=None):
    """One Scheduler per configuration object in this process."""
    with _schedulers_lock:
        s = _schedulers.get(id(cfg))
        if s is None or s[0] is not cfg:
            s = _schedulers[id(cfg)] = (cfg, Scheduler(cfg, log))
        return s[1]
