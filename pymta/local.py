"""Local delivery: mbox, Maildir, |command and /file, as the recipient.

Every delivery runs in a process that has dropped to the target's uid and
gids before it opens the mailbox or runs the command (when pymta is root):
a long-lived worker per identity for mailboxes, files and Maildirs
(pymta.workers), a fresh child for each |command. mbox delivery follows dma and
Postfix: dot-lock plus fcntl lock, remember the size, append, fsync, and on
any error truncate back so that no partial message is ever left behind.
"""

from dataclasses import dataclass
import errno
import fcntl
import gc
import json
import logging
import mailbox
import os
import pwd
import select
import signal
import stat
import subprocess
import threading
import time

from . import address as _address
from . import safefile as _safefile
from .queue_dir import Spool
from . import workers as _workers
from .status import Reply, EX_TEMPFAIL


@dataclass
class Target:
    """Where a local delivery goes.

    kind: "mailbox" (mbox file ``path``), "maildir" (directory ``path``),
    "file" (append to ``path``) or "command" (``command`` via /bin/sh -c).
    ``uid``/``gid``/``user``/``home`` are whose privileges it runs with.
    """

    kind: str
    user: str = ""
    uid: int = -1
    gid: int = -1
    home: str = "/"
    path: str = ""
    command: str = ""
    shell: str = "/bin/sh"


def target_key(target):
    """What makes two local targets one delivery: the same mailbox, Maildir
    or file (by path), or the same command run as the same user."""
    if target.kind == "command":
        return ("command", target.command, target.uid)
    if target.kind == "file":
        return ("file", target.path, target.uid)
    return (target.kind, target.path)


LOCK_TIMEOUT = 60          # seconds to wait for a dot-lock or fcntl lock
STALE_LOCK_AGE = 500       # a dot-lock older than this is broken (stale_lock_time's default)
LINE_CHUNK = 64 * 1024     # the most of one message line held at once
OUTPUT_LINES = 5           # lines of a failed command's output kept for the bounce
OUTPUT_BYTES = 4096
_noted_unprivileged = []


class _DeliveryError(Exception):
    """A delivery that ends with ``reply`` (4xx or 5xx), raised where it is decided."""

    def __init__(self, reply):
        super().__init__(str(reply))
        self.reply = reply


def _os_reply(e, what):
    """An OSError during delivery as a Reply: storage and quota problems defer."""
    text = f"{what}: {e.strerror or e}"
    if e.errno == errno.EFBIG:
        return Reply(552, "5.2.2", f"Mailbox full: {text}")
    if e.errno == errno.EDQUOT:
        return Reply(452, "4.2.2", f"Mailbox full: {text}")
    if e.errno == errno.ENOSPC:
        return Reply(452, "4.3.1", f"Insufficient system storage: {text}")
    return Reply(451, "4.3.0", f"Cannot deliver: {text}")


def _recipient(rcpt):
    """The address a delivery is for: a |cmd's or /file's is the address whose
    alias, .forward or include named it (Postfix's RECIPIENT, Delivered-To)."""
    to = rcpt.address
    if to[:1] in ("|", "/"):
        to = rcpt.via or rcpt.parent or to
    return to


def _prefix(env, rcpt):
    """The Return-Path: and Delivered-To: lines final delivery adds."""
    to = _recipient(rcpt)
    return (f"Return-Path: <{env.sender}>\nDelivered-To: {to}\n"
            .encode("utf-8", "surrogateescape"))


def _from_line(env):
    """The mbox From_ line as Postfix's local(8) writes it: the envelope sender
    (MAILER-DAEMON for <>), two spaces, the local time in asctime() form."""
    sender = env.sender or "MAILER-DAEMON"
    return f"From {sender}  {time.asctime()}\n".encode("utf-8", "surrogateescape")


def _quoted(line, style):
    """Whether body ``line`` gets a ">" in an mbox: mboxo quotes lines that
    start with "From " (what Postfix, mail.local and procmail write and what
    readers expect); mboxrd also quotes ">From ", ">>From ", ... ."""
    if style == "mboxrd":
        return line.lstrip(b">").startswith(b"From ")
    return line.startswith(b"From ")


class _Prefixed:
    """A readline()-able stream: some bytes, then the df's lines (streamed),
    ending with a newline even when the message does not (as Postfix writes
    every delivered message)."""

    def __init__(self, head, df):
        self.head, self.df = head, df
        self.last = b"\n"

    def _tail(self, data):
        if data:
            # stdlib mailbox makes a last line's bare CR its newline
            self.last = b"\n" if data[-1:] == b"\r" else data[-1:]
            return data
        if self.last != b"\n":
            self.last = b"\n"
            return b"\n"
        return b""

    def readline(self, size=-1):
        if self.head:
            i = self.head.find(b"\n")
            line, self.head = self.head[: i + 1], self.head[i + 1:]
            return line
        # At most LINE_CHUNK bytes at a time: a 200 MB line streams through
        # in bounded memory. A piece never ends in a CR that a newline
        # follows (stdlib mailbox takes a final CR for a line end).
        line = self.df.readline(LINE_CHUNK)
        if line.endswith(b"\r"):
            line += self.df.read(1)
        return self._tail(line)

    def read(self, size=-1):
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.df.read(), b""
                return self._tail(data)
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self._tail(self.df.read(size))


def _write_mbox(fd, env, rcpt, df, limit, style="mboxo"):
    """Append one message to the open, locked mbox ``fd``, body lines quoted
    in ``style`` (see _quoted), a blank line after it; all or nothing."""
    start = os.lseek(fd, 0, os.SEEK_END)
    st = os.fstat(df.fileno())
    if limit and start + st.st_size + 200 > limit:
        raise _DeliveryError(Reply(552, "5.2.2", f"Mailbox full (mailbox_size_limit {limit} bytes)"))
    out = open(fd, "wb", buffering=256 * 1024, closefd=False)
    try:
        out.write(_from_line(env))
        out.write(_prefix(env, rcpt))
        last = b"\n"
        while True:
            # In pieces of LINE_CHUNK bytes at most (a 200 MB line streams
            # through in bounded memory); only a line's first piece is looked
            # at for quoting.
            line = df.readline(LINE_CHUNK)
            if not line:
                break
            if last.endswith(b"\n") and _quoted(line, style):
                out.write(b">")
            out.write(line)
            last = line
        if not last.endswith(b"\n"):
            out.write(b"\n")
        out.write(b"\n")
        out.flush()
        os.fsync(fd)
    except BaseException as e:
        try:
            out.close()
        except OSError:
            pass
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _DeliveryError(_os_reply(e, "write")) from None
        raise
    else:
        out.close()


_NO_DOT_LOCK = {}     # directory -> until when its dot-locks are not tried again
NO_DOT_LOCK_RETRY = 60


class _DotLock:
    """A USER.lock dot-lock made as Postfix's dot_lockfile makes it: the lock
    file itself created with O_CREAT|O_EXCL (and O_NOFOLLOW), holding the
    pid, removed on release. No temporary file is made beside it, so a
    process killed while holding it leaves only the lock, which goes once it
    is stale_lock_time old."""

    def __init__(self, lock_path):
        self.lock_path = lock_path

    def try_acquire(self):
        """True when taken, False when someone holds it; raises OSError when
        it cannot be made here (no right to write the directory)."""
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, b"%d\n" % os.getpid())
        finally:
            os.close(fd)
        return True

    def release(self):
        os.unlink(self.lock_path)


def _dot_lock(path, notes, shown=None, stale=None):
    """The USER.lock dot-lock of mbox ``path`` (_DotLock), or None when its
    directory is not writable (fcntl alone protects then). Such a directory
    is tried again, and logged, once a minute per process. A lock older
    than ``stale`` seconds (stale_lock_time) is broken. ``shown``: the
    mailbox's name for messages when ``path`` is reached through a directory
    descriptor (/proc/self/fd/N/name)."""
    shown = shown or path
    stale = STALE_LOCK_AGE if stale is None else stale
    folder = os.path.dirname(shown)
    if _NO_DOT_LOCK.get(folder, 0) > time.monotonic():
        return None
    lock_path = path + ".lock"
    lock = _DotLock(lock_path)
    deadline = time.time() + LOCK_TIMEOUT
    pause = 0.05
    while True:
        try:
            if lock.try_acquire():
                return lock
        except OSError as e:
            _NO_DOT_LOCK[folder] = time.monotonic() + NO_DOT_LOCK_RETRY
            notes.append(f"cannot create a dot-lock beside {shown} ({e.strerror}); using fcntl "
                         f"only (for a minute, in {folder})")
            return None
        try:
            age = time.time() - os.stat(lock_path, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        stuck = ""
        if age > stale:
            try:
                os.unlink(lock_path)
                notes.append(f"{shown}.lock: stale lock ({int(age)}s old) broken")
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                # Not ours to remove (another user's, in a sticky spool): wait
                # for it like a live lock, with back-off and the same bound,
                # never in a busy loop.
                stuck = f", stale lock cannot be removed: {e.strerror}"
        if time.time() >= deadline:
            raise _DeliveryError(Reply(450, "4.2.0", f"Mailbox {shown} is locked (dot-lock{stuck})"))
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _fcntl_lock(fd, path):
    deadline = time.time() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.time() >= deadline:
            raise _DeliveryError(Reply(450, "4.2.0", f"Mailbox {path} is locked (fcntl)"))
        time.sleep(0.1)


class _Ids:
    """Switch the effective uid between root and the target user (mailbox child)."""

    def __init__(self, target):
        self.target = target

    def root(self):
        os.seteuid(0)
        os.setegid(0)

    def user(self):
        os.setegid(self.target.gid)
        os.seteuid(self.target.uid)


def _root_only_dir(path):
    """Whether the directory of ``path`` is writable by root alone and reached
    without a symlink through directories only root can change (a sticky
    root-owned one like /tmp counts): no one else can have redirected it."""
    folder = os.path.abspath(os.path.dirname(path) or ".")
    parts = folder.split("/")
    for i in range(1, len(parts) + 1):
        step = "/".join(parts[:i]) or "/"
        try:
            st = os.lstat(step)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            return False
        if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and step != folder):
            return False
    return True


def _append(cfg, env, rcpt, target, df, notes, ids=None, create_gid=None, as_root=False):
    """mbox delivery to target.path (mailbox or /file), locked, all or nothing.

    ``ids`` (mailbox deliveries by root) lets the dot-lock be made and a new
    mailbox be created with root's rights where only root can write the
    directory; the mailbox itself is always opened and written as the user.
    """
    shown = path = target.path
    as_root = ids is not None and as_root
    dfd = None
    if target.kind == "mailbox" and not as_root:
        dfd, path = _beneath_home(target)
    try:
        return _append_at(cfg, env, rcpt, target, df, notes, ids, create_gid, as_root,
                          path, shown)
    finally:
        if dfd is not None:
            os.close(dfd)


def _home_part(target):
    """The mailbox path of ``target`` relative to its home, or None when it
    is not below the home."""
    home = (target.home or "").rstrip("/")
    if home and target.path.startswith(home + "/"):
        return target.path[len(home) + 1:]
    return None


def _beneath_home(target):
    """(dir fd, path) for a mailbox below the user's home (home_mailbox):
    the directories from the home down are opened one at a time as the user
    with O_NOFOLLOW (safefile.open_dir_beneath), and the mailbox is then
    reached through /proc/self/fd/N, its directory's descriptor, so that no
    symbolic link the user controls is followed. (None, path) elsewhere.
    Raises _DeliveryError (450 4.2.0) for a symbolic link on the way."""
    rel = _home_part(target)
    if rel is None:
        return None, target.path
    parent, _, name = rel.rpartition("/")
    try:
        dfd = _safefile.open_dir_beneath(target.home, parent)
    except _safefile.Refused as e:
        raise _DeliveryError(Reply(450, "4.2.0", f"Mailbox {target.path} {e}")) from None
    except OSError as e:
        raise _DeliveryError(_os_reply(e, f"open {os.path.dirname(target.path)}")) from None
    return dfd, f"/proc/self/fd/{dfd}/{name}"


def _append_at(cfg, env, rcpt, target, df, notes, ids, create_gid, as_root, path, shown):
    """_append once the path to open is known (``shown`` is the one to report)."""
    if as_root:
        ids.root()
    try:
        lock = _dot_lock(path, notes, shown, getattr(cfg, "stale_lock_time", None))
        # Root makes the new mailbox only in a directory root alone can write
        # (no one can have planted a symlink on the way); anywhere else (a
        # home, a shared spool) it is created by the user's own open below,
        # so a symlink the user controls leads nowhere the user cannot write.
        if as_root:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.fchown(fd, target.uid, target.gid if create_gid is None else create_gid)
                os.close(fd)
            except FileExistsError:
                pass
    finally:
        if ids is not None:
            ids.user()
    try:
        try:
            # O_NONBLOCK: a FIFO or device put in place of the mailbox must not
            # hang the worker; it is refused below once fstat has seen it.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ENXIO:      # a FIFO with no reader
                raise _DeliveryError(Reply(450, "4.2.0", f"{shown} is not a regular file")) from None
            if e.errno == errno.ELOOP:
                raise _DeliveryError(Reply(450, "4.2.0", f"{shown} is a symbolic link")) from None
            raise _DeliveryError(_os_reply(e, f"open {shown}")) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _DeliveryError(Reply(450, "4.2.0", f"{shown} is not a regular file"))
            if st.st_nlink != 1:
                raise _DeliveryError(Reply(550, "5.2.0", f"{shown} is not a plain file with one link"))
            if ids is not None and st.st_uid != target.uid:
                # Postfix local(8): a mailbox in a shared spool that the
                # recipient does not own was made by someone else; never
                # deliver into it.
                raise _DeliveryError(Reply(450, "4.2.0", f"{shown}: wrong owner (uid {st.st_uid})"))
            os.set_blocking(fd, True)
            if ids is not None and create_gid is not None and st.st_gid != create_gid \
                    and st.st_size == 0:
                try:
                    os.fchown(fd, -1, create_gid)   # a new mailbox in a mail-group spool
                except OSError:
                    pass
            _fcntl_lock(fd, shown)
            _write_mbox(fd, env, rcpt, df, cfg.mailbox_size_limit, cfg.mailbox_from_quoting)
        finally:
            os.close(fd)
    finally:
        if lock is not None:
            if as_root:
                ids.root()
            try:
                lock.release()
            except OSError:
                pass
            if as_root:
                ids.user()
    what = "file" if target.kind == "file" else "mailbox"
    return Reply(250, "2.0.0", f"delivered to {what} {shown}")


def _maildir_beneath_home(target):
    """(fd, path) of a Maildir below the user's home, created when missing:
    reached as the user without a symbolic link (see _beneath_home), its
    tmp, new and cur not symbolic links either. (None, path) elsewhere."""
    rel = _home_part(target)
    if rel is None:
        return None, target.path
    pfd, _ = _beneath_home(target)
    name = rel.rpartition("/")[2]
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
        except OSError as e:
            try:
                _safefile._symlink_is_eloop(e, name, pfd)
            except OSError:
                raise _DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path} is a "
                                                         f"symbolic link")) from None
            raise
    except OSError as e:
        raise _DeliveryError(_os_reply(e, f"maildir {target.path}")) from None
    finally:
        os.close(pfd)
    for sub in ("tmp", "new", "cur"):
        try:
            st = os.stat(sub, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as e:
            os.close(fd)
            raise _DeliveryError(_os_reply(e, f"maildir {target.path}/{sub}")) from None
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise _DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path}/{sub} is not "
                                                     f"a directory"))
    return fd, f"/proc/self/fd/{fd}"


def _maildir(env, rcpt, target, df):
    """Maildir delivery through stdlib mailbox (streamed into tmp/, then new/)."""
    fd, path = _maildir_beneath_home(target)
    try:
        for sub in ("tmp", "new", "cur") if fd is not None else ():
            try:
                os.mkdir(sub, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
        box = mailbox.Maildir(path, factory=None, create=True)
        box.add(_Prefixed(_prefix(env, rcpt), df))
        dfd = os.open(os.path.join(path, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise _DeliveryError(_os_reply(e, f"maildir {target.path}")) from None
    finally:
        if fd is not None:
            os.close(fd)
    return Reply(250, "2.0.0", f"delivered to maildir {target.path}/")


def command_environment(cfg, env, rcpt, target):
    """The environment of a |command, as Postfix's local(8) gives it: who it
    runs as (USER, LOGNAME, HOME, SHELL), the envelope (SENDER, RECIPIENT and
    its LOCAL part, lower case, DOMAIN and address EXTENSION,
    ORIGINAL_RECIPIENT before aliasing), the client (CLIENT_*, SASL_USERNAME),
    PATH from command_path. Values that come from mail have every character
    outside command_expansion_filter replaced by "_"."""
    allowed = frozenset(cfg.command_expansion_filter)

    def censor(value):
        return "".join(c if c in allowed else "_" for c in value or "")

    to = _recipient(rcpt)
    local, domain = _address.split(to)
    local = _address.unquote_local(local).lower()     # "a b"@x: LOCAL is a b
    delim = cfg.recipient_delimiter
    extension = local.split(delim, 1)[1] if delim and delim in local else ""
    environ = {"HOME": target.home or "/", "USER": target.user, "LOGNAME": target.user,
               "SHELL": target.shell or "/bin/sh", "PATH": cfg.command_path,
               "SENDER": censor(env.sender), "RECIPIENT": censor(to),
               "LOCAL": censor(local), "DOMAIN": censor(domain.lower()),
               "EXTENSION": censor(extension),
               "ORIGINAL_RECIPIENT": censor(rcpt.parent or rcpt.address)}
    for name, value in (("CLIENT_ADDRESS", env.client_addr), ("CLIENT_HOSTNAME", env.client_name),
                        ("CLIENT_HELO", env.helo), ("CLIENT_PROTOCOL", env.protocol),
                        ("SASL_USERNAME", env.auth_user)):
        if value:
            environ[name] = censor(value)
    tz = os.environ.get("TZ")
    if tz:
        environ["TZ"] = tz
    return environ


def _command(cfg, env, rcpt, target, df):
    """|command delivery: /bin/sh -c, the message on stdin (after the From_
    line unless command_from_line is off, and with a final newline), a time
    limit, exit codes."""
    environ = command_environment(cfg, env, rcpt, target)
    cwd = target.home if target.home and os.path.isdir(target.home) else "/"
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", target.command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=environ, cwd=cwd, start_new_session=True, close_fds=True)
    except OSError as e:
        raise _DeliveryError(Reply(451, "4.3.0", f"cannot run /bin/sh: {e.strerror}")) from None
    output = bytearray()

    def reader():
        while True:
            chunk = proc.stdout.read(65536)
            if not chunk:
                return
            if len(output) < OUTPUT_BYTES:
                output.extend(chunk[: OUTPUT_BYTES - len(output)])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    timed_out = []

    def kill():
        timed_out.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(cfg.command_time_limit, kill)
    timer.start()
    try:
        try:
            head = _prefix(env, rcpt)
            if cfg.command_from_line:
                head = _from_line(env) + head
            proc.stdin.write(head)
            last = b"\n"
            while True:
                chunk = df.read(65536)
                if not chunk:
                    break
                proc.stdin.write(chunk)
                last = chunk[-1:]
            if last != b"\n":
                proc.stdin.write(b"\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass   # a command need not read all of its input
        rc = proc.wait()
        t.join(5)
    finally:
        timer.cancel()
    lines = [ln.strip() for ln in bytes(output).decode("utf-8", "replace").splitlines() if ln.strip()]
    said = "; ".join(lines[:OUTPUT_LINES])
    said = f": {said}" if said else ""
    if timed_out:
        return Reply(554, "5.3.0", f"command time limit exceeded ({cfg.command_time_limit}s): "
                                   f"{target.command}{said}")
    if rc == 0:
        return Reply(250, "2.0.0", f"delivered to command: {target.command}")
    if rc < 0:
        return Reply(554, "5.3.0", f"command died with signal {-rc}: {target.command}{said}")
    if rc == EX_TEMPFAIL:
        return Reply(451, "4.3.0", f"command exit status {rc} (temporary): {target.command}{said}")
    return Reply(554, "5.3.0", f"command exit status {rc}: {target.command}{said}")


def _spool_group(target):
    """The gid of the mailbox's directory when it is group-writable (mail), else None."""
    try:
        st = os.stat(os.path.dirname(target.path) or ".")
    except OSError:
        return None
    return st.st_gid if st.st_mode & stat.S_IWGRP and st.st_gid != 0 else None


def _groups(target):
    """The target user's group list, looked up before fork (NSS is not fork-safe
    in a threaded process)."""
    try:
        return os.getgrouplist(target.user, target.gid)
    except (OSError, KeyError):
        return [target.gid]


def _drop(target, groups, keep_root=False, extra_gid=None):
    """Become the target user (groups, gid, uid). ``keep_root`` only sets the
    effective ids, so the process can take back root to manage the dot-lock."""
    groups = list(groups)
    if extra_gid is not None and extra_gid not in groups:
        groups.append(extra_gid)
    os.setgroups(groups)
    if keep_root:
        os.setegid(target.gid)
        os.seteuid(target.uid)
    else:
        os.setgid(target.gid)
        os.setuid(target.uid)


def _run(cfg, env, rcpt, target, df, privileged, notes, groups=()):
    """The delivery itself, in the process that runs it (child or self)."""
    kind = target.kind
    if privileged:
        os.umask(0o077)
    if kind == "mailbox":
        if privileged:
            gid = _spool_group(target)
            as_root = _root_only_dir(target.path)
            _drop(target, groups, keep_root=True, extra_gid=gid)
            return _append(cfg, env, rcpt, target, df, notes, ids=_Ids(target), create_gid=gid,
                           as_root=as_root)
        return _append(cfg, env, rcpt, target, df, notes)
    if privileged:
        _drop(target, groups)
    if kind == "file":
        return _append(cfg, env, rcpt, target, df, notes)
    if kind == "maildir":
        return _maildir(env, rcpt, target, df)
    if kind == "command":
        return _command(cfg, env, rcpt, target, df)
    return Reply(550, "5.3.0", f"unknown local target kind {kind!r}")


def _safe_target(cfg, target):
    """Commands and files never run as root: map uid 0 to default_privs."""
    if target.kind in ("command", "file") and target.uid <= 0:
        try:
            pw = pwd.getpwnam(cfg.default_privs)
        except KeyError:
            return None
        return Target(target.kind, user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                      home=pw.pw_dir or "/", path=target.path, command=target.command,
                      shell=pw.pw_shell or "/bin/sh")
    if target.kind == "command" and target.uid > 0:
        # The login shell for SHELL, looked up here, before any fork.
        try:
            shell = pwd.getpwuid(target.uid).pw_shell or "/bin/sh"
        except KeyError:
            shell = "/bin/sh"
        if shell != target.shell:
            target = Target(target.kind, user=target.user, uid=target.uid, gid=target.gid,
                            home=target.home, path=target.path, command=target.command,
                            shell=shell)
    return target


def deliver(cfg, env, rcpt, target, log=None):
    """Deliver message ``env`` to one local ``target`` for ``rcpt``; returns a Reply.

    As root the work is done in a forked child with the target's privileges;
    otherwise in this process, as this user.
    """
    log = log or logging.getLogger("pymta")
    if target.kind in ("command", "file") and "a" not in rcpt.flags:
        return Reply(550, "5.7.1", "Mail to programs and files is only allowed "
                     "from aliases, included files and .forward")
    privileged = os.geteuid() == 0
    target = _safe_target(cfg, target)
    if target is None:
        return Reply(451, "4.3.0", f"default_privs user {cfg.default_privs!r} does not exist")
    try:
        df = Spool.from_config(cfg).open_data(env.id)
    except OSError as e:
        return Reply(451, "4.3.0", f"cannot open df{env.id}: {e.strerror}")
    with df:
        if not privileged:
            if not _noted_unprivileged:
                _noted_unprivileged.append(True)
                log.info(f"not running as root: local delivery as uid {os.getuid()}, "
                         "to mailboxes, files and commands this user may use")
            notes = []
            try:
                reply = _run(cfg, env, rcpt, target, df, False, notes)
            except _DeliveryError as e:
                reply = e.reply
            except OSError as e:
                reply = _os_reply(e, target.path or target.command)
            for n in notes:
                log.warning(f"{env.id}: {n}")
            return reply
        if target.kind in _POOLED_KINDS:
            return _deliver_pooled(cfg, env, rcpt, target, df, log)
        return _deliver_child(cfg, env, rcpt, target, df, log)


# Mailbox, file and Maildir deliveries go to a long-lived worker per identity
# (pymta.workers); a |command gets a fresh child each time, so that no program
# a user's .forward runs can linger in a process that later delivers for others.
_POOLED_KINDS = frozenset({"mailbox", "file", "maildir"})


def _pool_setup(target, groups, extra_gid):
    def setup():
        gc.collect()
        gc.freeze()     # the inherited heap stays shared with the parent
        os.umask(0o077)
        from .proctitle import set_name
        set_name("pymta: local")    # ps -o user,comm: whose deliveries it makes
        _drop(target, groups, keep_root=target.kind == "mailbox", extra_gid=extra_gid)
    return setup


def _pool_handle(cfg):
    def handle(payload, fd):
        env, rcpt, target, as_root, gid = payload
        notes = []
        try:
            with os.fdopen(os.dup(fd), "rb") as df:
                if target.kind == "mailbox":
                    reply = _append(cfg, env, rcpt, target, df, notes, ids=_Ids(target),
                                    create_gid=gid, as_root=as_root)
                elif target.kind == "file":
                    reply = _append(cfg, env, rcpt, target, df, notes)
                else:
                    reply = _maildir(env, rcpt, target, df)
        except _DeliveryError as e:
            reply = e.reply
        except OSError as e:
            reply = _os_reply(e, target.path)
        except Exception as e:   # noqa: BLE001 - report, never kill the worker's loop
            reply = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
        return [reply.code, reply.enhanced, reply.text, notes]
    return handle


def _deliver_pooled(cfg, env, rcpt, target, df, log):
    gid = _spool_group(target) if target.kind == "mailbox" else None
    as_root = target.kind == "mailbox" and _root_only_dir(target.path)
    groups = tuple(_groups(target))
    key = (cfg, target.kind, target.uid, target.gid, groups, gid)
    try:
        code, enhanced, text, notes = _workers.POOL.call(
            key, _pool_setup(target, groups, gid), _pool_handle(cfg),
            (env, rcpt, target, as_root, gid), df.fileno())
    except _workers.WorkerGone as e:
        return Reply(451, "4.3.0", f"local delivery process failed: {e}")
    for n in notes:
        log.warning(f"{env.id}: {n}")
    return Reply(code, enhanced, text)


def _read_reply(rfd, pid):
    """The child's length-prefixed reply; stops at the child's exit even if some
    other process still holds a copy of the pipe's write end."""
    buf = b""
    reaped = None
    while True:
        if b"\n" in buf:
            size, _, body = buf.partition(b"\n")
            if size.isdigit() and len(body) >= int(size):
                break
        ready, _, _ = select.select([rfd], [], [], 0.5)
        if ready:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
            continue
        if reaped is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = status
                continue      # one more look for what it wrote before exiting
        else:
            break
    if reaped is None:
        _, reaped = os.waitpid(pid, 0)
    return buf, reaped


def _deliver_child(cfg, env, rcpt, target, df, log):
    groups = _groups(target)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        code = 0
        try:
            gc.disable()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _workers.close_other_fds({wfd, df.fileno()})
            notes = []
            try:
                reply = _run(cfg, env, rcpt, target, df, True, notes, groups)
            except _DeliveryError as e:
                reply = e.reply
            except OSError as e:
                reply = _os_reply(e, target.path or target.command)
            except BaseException as e:   # noqa: BLE001 - report, never escape into the parent's code
                reply = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
            body = json.dumps([reply.code, reply.enhanced, reply.text, notes]).encode()
            view = memoryview(b"%d\n" % len(body) + body)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:   # noqa: BLE001 - the child must never return
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        buf, status = _read_reply(rfd, pid)
    finally:
        os.close(rfd)
    try:
        code, enhanced, text, notes = json.loads(buf.partition(b"\n")[2])
    except ValueError:
        return Reply(451, "4.3.0", f"local delivery process failed (wait status {status})")
    for n in notes:
        log.warning(f"{env.id}: {n}")
    return Reply(code, enhanced, text)
