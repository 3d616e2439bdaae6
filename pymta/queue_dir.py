"""The spool directory: where a message's files are, who works on it, how its
state changes.

Layout of ``queue_directory``::

    queue/      mode 0700, mail_owner: the messages
        df<ID>  the message: headers and body, LF line ends, as delivered
                (less Return-Path:, which final delivery adds)
        qf<ID>  the control file: envelope and per-recipient state
        tf<ID>  a control file being written; renamed over qf<ID>
        hf<ID>  the control file of a message on hold (delivery skips it)
        Qf<ID>  a control file that could not be parsed: kept, never used
    maildrop/   mode 1733: unprivileged users' submissions, picked up by
                root or mail_owner and committed to queue/ (pymta.queue_maildrop)
    sched/      mode 0700: per-destination connection slots and dead marks
                shared by every delivering process (see pymta.sched)

The files' names are built from valid ids only (pymta.queue_id); the
control file's format is pymta.queue_file's, the commit that makes a new
message pymta.queue_commit's, the maildrop's pymta.queue_maildrop's.

A rewrite (after a delivery attempt, hold, release) is tf, fsync, rename,
never an edit in place; a crash leaves the old or the new qf, both whole.
Removal unlinks qf (or hf) first, then df: a crash between leaves an orphan
df, which is swept. At worst a recipient is tried twice; a message is never
lost once its commit is done.

Locking: whoever works on a message holds flock(LOCK_EX) on its df, which no
rewrite replaces. A queue runner skips a locked message; mailq marks it *.
After the lock is taken, the qf is checked again (it may have just gone).
mailq and pymta show probe the lock with a shared flock (is_locked()),
which never makes a queue runner's lock fail for longer than the probe.

A df is never written to after its commit. The event loop's one-round
commit records its length and CRC-32 in the qf (D line, with the boot id);
verify_data() checks them once after a restart of the system, before the
first delivery attempt (see pymta.queue_commit).

queue/notify is a FIFO on which sendmail and the -bs server write the ids
of messages they have just queued, so that a running daemon delivers them
at once (as Postfix's pickup service is told).
"""

import errno
import os
import stat
import time
import _thread   # threading's Lock without its import (sendmail's start-up is its latency)
import fcntl

from .queue_file import format_control, parse_control
from .queue_id import valid_id
from .status import MESSAGE_BLOCK, SpoolCorrupt, SpoolError

QUEUE_SUBDIR = "queue"
MAILDROP_SUBDIR = "maildrop"


class MessageLock:
    """An exclusive lock on one message (flock on its df)."""

    def __init__(self, spool, qid, fd):
        self.spool, self.id, self.fd = spool, qid, fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class Spool:
    """One queue directory. ``fsync=False`` is for benchmarks of the rest only."""

    def __init__(self, queue_directory, fsync=True):
        self.top = queue_directory
        self.dir = os.path.join(queue_directory, QUEUE_SUBDIR)
        self.maildrop = os.path.join(queue_directory, MAILDROP_SUBDIR)
        self.fsync = fsync
        self._dirfd = None
        self._dirfd_lock = _thread.allocate_lock()

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.queue_directory)

    _owner = None

    def own(self, fd):
        """A queue file root creates goes to the owner of queue/ (mail_owner),
        as the listener's own files are: every file of the queue is then
        readable by mail_owner (mailq, pymta show run as it)."""
        if os.geteuid() != 0:
            return
        owner = self._owner
        if owner is None:
            try:
                st = os.stat(self.dir)
                owner = self._owner = (st.st_uid, st.st_gid)
            except OSError:
                return
        if owner[0] != 0:
            try:
                os.fchown(fd, owner[0], owner[1])
            except OSError:
                pass

    # -- set-up
    def create(self, owner_uid=None, owner_gid=None):
        """Make the directories (idempotent). As root, queue/ goes to the owner."""
        os.makedirs(self.top, mode=0o755, exist_ok=True)
        for sub, mode in ((self.dir, 0o700), (self.maildrop, 0o1733)):
            try:
                os.mkdir(sub, mode)
            except FileExistsError:
                continue
            os.chmod(sub, mode)
            if sub == self.dir and owner_uid is not None and os.geteuid() == 0:
                os.chown(sub, owner_uid, owner_gid if owner_gid is not None else -1)

    def exists(self):
        return os.path.isdir(self.dir)

    def writable(self):
        """Whether this process may commit directly (else it uses the maildrop)."""
        return os.access(self.dir, os.W_OK | os.X_OK)

    def path(self, prefix, qid):
        return f"{self.dir}/{prefix}{qid}"     # os.path.join's result, for a fraction of it

    def dir_fd(self):
        """A descriptor of queue/, opened once, for its fsyncs."""
        with self._dirfd_lock:
            if self._dirfd is None:
                self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self._dirfd

    # How a blocking commit fsyncs dir_fd() (its last step): os.fsync, or
    # the sync of a pymta.queue_groupsync.GroupSync that the sessions of a
    # threaded listener share (pymta.smtpd_threads).
    dir_sync = None

    def sync_dir(self):
        (self.dir_sync or os.fsync)(self.dir_fd())

    def free_space(self):
        st = os.statvfs(self.dir if self.exists() else self.top)
        return st.f_bavail * st.f_frsize

    # -- writing
    def new_message(self, check=False):
        """A MessageWriter for a new message (creates and locks its df).
        ``check``: the control file records the df's length, CRC-32 and the
        boot id (what the event loop's one-round commit needs)."""
        from .queue_commit import MessageWriter     # the commit builds on this module
        return MessageWriter(self, check=check)

    def write_tf(self, env, new=False):
        """Write env's control file whole under its tf name, the one way a
        control file is written. Returns the open descriptor, not yet
        fsync'd, and the name to rename the tf to (qf, or hf when held).
        ``new``: the first control file of a message being committed
        (O_EXCL: a tf left there is someone else's)."""
        tf = self.path("tf", env.id)
        data = format_control(env).encode("utf-8", "surrogateescape")
        try:
            fd = os.open(tf, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                         | (os.O_EXCL if new else os.O_TRUNC), 0o600)
        except OSError as e:
            raise SpoolError.writing(e, f"write {tf}") from None
        try:
            self.own(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            os.close(fd)
            unlink_quiet(tf)
            raise SpoolError.writing(e, f"write {tf}") from None
        return fd, self.path("hf" if env.held else "qf", env.id)

    def rewrite(self, env):
        """Record a new state of a locked message: tf, fsync, rename over
        the qf (or hf if held). A new message's first control file is
        written by its commit (pymta.queue_commit)."""
        fd, final = self.write_tf(env)
        tf = self.path("tf", env.id)
        try:
            try:
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tf, final)
        except OSError as e:
            unlink_quiet(tf)
            raise SpoolError.writing(e, f"write {final}") from None

    # -- reading
    def ids(self, prefix="qf"):
        """Ids of messages with a control file of ``prefix``, oldest first."""
        n = len(prefix)
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(name[n:] for name in names if name.startswith(prefix) and valid_id(name[n:]))

    def read(self, qid, data_fd=None):
        """The Envelope of message ``qid`` (qf, or hf when held).
        ``data_fd``: the df already open (the lock's), for its size."""
        for prefix, held in (("qf", False), ("hf", True)):
            try:
                raw = read_file(self.path(prefix, qid))
            except FileNotFoundError:
                continue
            text = raw.decode("utf-8", "surrogateescape")     # never fails
            env = parse_control(text, qid)
            env.held = held
            if data_fd is not None:
                env.size = os.fstat(data_fd).st_size
                return env
            try:
                env.size = os.stat(self.path("df", qid)).st_size
            except FileNotFoundError:
                raise SpoolCorrupt("control file without data file") from None
            return env
        raise FileNotFoundError(errno.ENOENT, "no such message", qid)

    def open_data(self, qid):
        return open(self.path("df", qid), "rb")

    def verify_data(self, env):
        """Before a delivery attempt: if the control file records the df's
        length and CRC-32 (its D line) under another boot id than this
        system's, the system went down since the df was last known whole,
        so the df is checked, once. A mismatch raises SpoolCorrupt: the
        commit was cut short by that crash (its 250 waited for the df's
        fsync), and the message is never delivered. A match sets
        ``env.df_boot`` to the current boot id, which the attempt's rewrite
        records, and returns True. See pymta.queue_commit."""
        if env.df_length < 0:
            return False        # an older control file, or an ordered commit
        current = boot_id()
        if current and env.df_boot == current:
            return False
        from zlib import crc32      # not on sendmail's path
        crc, length = 0, 0
        try:
            with self.open_data(env.id) as f:
                while length <= env.df_length:
                    chunk = f.read(MESSAGE_BLOCK)
                    if not chunk:
                        break
                    length += len(chunk)
                    crc = crc32(chunk, crc)
        except FileNotFoundError:
            raise SpoolCorrupt("control file without data file") from None
        if length != env.df_length or crc != env.df_crc:
            raise SpoolCorrupt(
                f"data file torn by a system crash during its commit (length {length}, "
                f"CRC {crc:08x}; committed: length {env.df_length}, CRC {env.df_crc:08x}, "
                f"boot {env.df_boot or '-'}); the message was never acknowledged")
        if current:
            env.df_boot = current
        return True

    def lock(self, qid, wait=False, control=("qf", "hf")):
        """A MessageLock on ``qid``, or None if another process holds it or it
        has gone (no control file of the ``control`` prefixes once locked;
        ``()``: the df alone). ``wait`` blocks until the lock is free."""
        try:
            fd = os.open(self.path("df", qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if control and not any(os.path.exists(self.path(p, qid)) for p in control):
            os.close(fd)
            return None
        return MessageLock(self, qid, fd)

    def is_locked(self, qid):
        """Whether someone holds the message's lock: a shared-lock probe,
        which never takes the lock from a queue runner."""
        try:
            fd = os.open(self.path("df", qid), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return False

    # -- changing state (callers hold the lock)
    def remove(self, qid):
        """Delete a finished or deleted message: control file first, then data."""
        # A tf is only ever left by a crash; sweep() removes it, so the common
        # path costs two unlinks.
        try:
            os.unlink(self.path("qf", qid))
        except FileNotFoundError:
            unlink_quiet(self.path("hf", qid))
        try:
            os.unlink(self.path("df", qid))
        except FileNotFoundError:
            pass

    def hold(self, env, reason):
        """Put a message on hold (qf -> hf: delivery skips it) with
        ``reason`` as its status, which mailq shows."""
        if not env.held:
            os.rename(self.path("qf", env.id), self.path("hf", env.id))
            env.held = True
        env.status = reason
        self.rewrite(env)

    def release(self, env):
        """Take a message off hold (hf -> qf), due at once."""
        if env.held:
            os.rename(self.path("hf", env.id), self.path("qf", env.id))
            env.held = False
        env.status = ""
        env.next_try = 0
        self.rewrite(env)

    def quarantine(self, qid):
        """Rename an unreadable control file to Qf<ID>: kept, never delivered."""
        for prefix in ("qf", "hf"):
            try:
                os.rename(self.path(prefix, qid), self.path("Qf", qid))
                return True
            except FileNotFoundError:
                continue
        return False

    def sweep(self, max_age, now=None, log=None):
        """Remove orphans older than ``max_age``: tf and df with no qf/hf, and
        tf left beside a qf by a crashed rewrite. Locked files are left alone."""
        now = now if now is not None else time.time()
        try:
            names = set(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        removed = []
        for name in sorted(names):
            prefix, qid = name[:2], name[2:]
            if prefix not in ("tf", "df") or not valid_id(qid):
                continue
            # A quarantined Qf keeps its df: the message is kept for a human.
            has_control = any(p + qid in names for p in ("qf", "hf", "Qf"))
            if prefix == "df" and has_control:
                continue
            path = os.path.join(self.dir, name)
            try:
                age = now - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if age < max_age:
                continue
            if self.is_locked(qid):
                continue
            if prefix == "df" and any(os.path.exists(self.path(p, qid)) for p in ("qf", "hf", "Qf")):
                continue    # committed since the listing
            try:
                os.unlink(path)
                removed.append(name)
                if log:
                    log(f"{qid}: removed orphan {name} ({int(age)}s old)")
            except OSError:
                pass
        return removed

    # -- queue/notify: new messages handed to a running daemon
    @property
    def notify_path(self):
        return os.path.join(self.dir, "notify")

    def open_notify(self, owner_uid=None, owner_gid=None):
        """The daemon's end of queue/notify, a FIFO on which sendmail writes the
        ids of messages it has just queued, so that the daemon delivers them at
        once (as Postfix's pickup service is told). Returns (read_fd, write_fd):
        the daemon keeps a write end open so its reads never see end-of-file."""
        path = self.notify_path
        try:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                os.unlink(path)
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.mkfifo(path, 0o600)
            if owner_uid is not None and os.geteuid() == 0:
                os.chown(path, owner_uid, owner_gid if owner_gid is not None else -1)
        rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return rfd, wfd

    def notify_open(self):
        """A descriptor to tell a running daemon about a message, or None when
        no daemon reads queue/notify (then the caller delivers by itself)."""
        try:
            return os.open(self.notify_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:    # ENOENT: no daemon has run; ENXIO: none is reading
            return None

    @staticmethod
    def notify_send(fd, qid):
        """Write one id (an atomic write, under PIPE_BUF); False if it failed."""
        try:
            return os.write(fd, qid.encode("ascii") + b"\n") > 0
        except OSError:    # EAGAIN: the daemon is behind; EPIPE: it just died
            return False
        finally:
            os.close(fd)


_boot_id = None


def boot_id():
    """The kernel's boot id (Linux: a new one at every boot), read once
    per process; "" where there is none."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                _boot_id = f.read(100).strip().decode("ascii", "replace")
        except OSError:
            _boot_id = ""
        if not _boot_id.isprintable() or " " in _boot_id or "%" in _boot_id:
            _boot_id = ""
    return _boot_id


def read_file(path):
    """The bytes of the file at ``path`` (a control file: one read, then the
    end), with four system calls where open() and read() make seven."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass
