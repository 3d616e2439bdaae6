"""mbox delivery: to a mailbox (mail_spool_directory, home_mailbox) or a /file.

As dma and Postfix do: a USER.lock dot-lock plus an fcntl lock, remember
the size, append the From_ line, the Return-Path: and Delivered-To: lines
and the message (body lines quoted in mailbox_from_quoting's style), fsync,
and on any error truncate back, so that no partial message is ever left
behind. A batch (deliver_batch: the deliveries to one mailbox that the
worker pool combined, see workers.py) takes the locks once, appends each
message so (one that fails is cut off alone, the others stay) and fsyncs
once for all; only then is any of them reported delivered, and when that
fsync fails the whole batch is cut off and deferred. The file is opened with O_NOFOLLOW, must be a regular file with one
link, and (for root's deliveries to mailboxes) be owned by the recipient;
below the home it is reached through the openat walk of local_target.
Root's part (the dot-lock and a new mailbox in a directory only root may
write) is decided by local.py, which passes the ids to switch between.
"""

import errno
import fcntl
import os
import re
import stat
import time

from .local_target import LINE_CHUNK, beneath_home, from_line, os_reply, prefix
from .status import MESSAGE_BLOCK, DeliveryError, Reply

LOCK_TIMEOUT = 60          # seconds to wait for a dot-lock or fcntl lock
STALE_LOCK_AGE = 500       # a dot-lock older than this is broken (stale_lock_time's default)


def _quoted(line, style):
    """Whether body ``line`` gets a ">" in an mbox: mboxo quotes lines that
    start with "From " (what Postfix, mail.local and procmail write and what
    readers expect); mboxrd also quotes ">From ", ">>From ", ... ."""
    if style == "mboxrd":
        return line.lstrip(b">").startswith(b"From ")
    return line.startswith(b"From ")


_RD_FROM = {}    # LINE_CHUNK -> the mboxrd pattern


def _quote_block(data, bol, style):
    """``data`` (whole lines, or a piece of one long line) with its lines
    quoted as _quoted says; ``bol``: it starts at a line's start."""
    if style == "mboxrd":
        if b"From " in data:
            # As a reader of lines judges: the ">"s and "From " within a
            # line's first LINE_CHUNK bytes.
            pattern = _RD_FROM.get(LINE_CHUNK)
            if pattern is None:
                pattern = _RD_FROM[LINE_CHUNK] = re.compile(rb"\n(?=>{0,%d}From )" % (LINE_CHUNK - 5))
            data = pattern.sub(b"\n>", data)
    elif b"\nFrom " in data:
        data = data.replace(b"\nFrom ", b"\n>From ")
    if bol and _quoted(data[:LINE_CHUNK], style):
        data = b">" + data
    return data


def _copy_quoted(df, out, style):
    """Copy the df to ``out`` in blocks, body lines quoted (see _quoted);
    returns the last byte written. A block goes out up to its last
    newline, so that no line start is split between two; a line longer
    than LINE_CHUNK goes out in pieces, only its first piece looked at for
    quoting, as a reader of lines would."""
    carry = b""
    bol = True      # carry starts at the start of a line
    last = b"\n"
    while True:
        block = df.read(MESSAGE_BLOCK)
        if not block:
            break
        data = carry + block if carry else block
        cut = data.rfind(b"\n") + 1
        if not cut:
            if len(data) < LINE_CHUNK:
                carry = data
                continue
            cut = len(data)
        piece, carry = (data[:cut], data[cut:]) if cut < len(data) else (data, b"")
        out.write(_quote_block(piece, bol, style))
        bol = piece.endswith(b"\n")
        last = piece[-1:]
    if carry:
        out.write(_quote_block(carry, bol, style))
        last = carry[-1:]
    return last


def _append_one(fd, env, rcpt, df, style):
    """Append one message to the open, locked mbox ``fd``, body lines quoted
    in ``style`` (see _quoted), a blank line after it, not yet fsynced; on
    any error the file is truncated back to where the message began (an
    OSError comes out as DeliveryError). Raises _RollbackFailed when even
    that fails."""
    start = os.lseek(fd, 0, os.SEEK_END)
    out = open(fd, "wb", buffering=MESSAGE_BLOCK, closefd=False)
    try:
        out.write(from_line(env))
        out.write(prefix(env, rcpt))
        last = _copy_quoted(df, out, style)
        if not last.endswith(b"\n"):
            out.write(b"\n")
        out.write(b"\n")
        out.flush()
    except BaseException as e:
        try:
            out.close()
        except OSError:
            pass
        try:
            os.ftruncate(fd, start)
        except OSError as t:
            raise _RollbackFailed(os_reply(t, "truncate")) from None
        if isinstance(e, OSError):
            raise DeliveryError(os_reply(e, "write")) from None
        raise
    else:
        out.close()


class _RollbackFailed(DeliveryError):
    """A failed message could not be cut off again: nothing more is appended."""


def _write_mbox(fd, msgs, limit, style="mboxo"):
    """Append each of ``msgs`` ((env, rcpt, df)) to the open, locked mbox
    ``fd`` (_append_one), then fsync once. A Reply for each: a message that
    failed has been cut off again, alone; when the fsync fails, every message
    of the batch is cut off and none is reported delivered."""
    replies = [None] * len(msgs)
    batch_start = os.lseek(fd, 0, os.SEEK_END)
    written = []
    cut = False
    for i, (env, rcpt, df) in enumerate(msgs):
        if limit and os.lseek(fd, 0, os.SEEK_END) + os.fstat(df.fileno()).st_size + 200 > limit:
            replies[i] = Reply(552, "5.2.2", f"Mailbox full (mailbox_size_limit {limit} bytes)")
            continue
        cut = True      # tried: a cut-off of it must be made durable too
        try:
            _append_one(fd, env, rcpt, df, style)
        except _RollbackFailed as e:
            # A partial message stays behind: append nothing after it.
            for j in range(i, len(msgs)):
                replies[j] = e.reply
            break
        except DeliveryError as e:
            replies[i] = e.reply
        except Exception as e:   # noqa: BLE001 - that message alone fails
            replies[i] = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
        except BaseException:
            _cut(fd, batch_start)
            raise
        else:
            written.append(i)
    if written:
        try:
            os.fsync(fd)
        except OSError as e:
            _cut(fd, batch_start)
            for i in written:
                replies[i] = os_reply(e, "write")
            written = []
    elif cut:
        _cut(fd, batch_start)     # the cut-off messages' truncation made durable
    return replies, written


def _cut(fd, size):
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass


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
            raise DeliveryError(Reply(450, "4.2.0", f"Mailbox {shown} is locked (dot-lock{stuck})"))
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
            raise DeliveryError(Reply(450, "4.2.0", f"Mailbox {path} is locked (fcntl)"))
        time.sleep(0.1)


def spool_group(target):
    """The gid of the mailbox's directory when it is group-writable (mail), else None."""
    try:
        st = os.stat(os.path.dirname(target.path) or ".")
    except OSError:
        return None
    return st.st_gid if st.st_mode & stat.S_IWGRP and st.st_gid != 0 else None


def root_only_dir(path):
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


def deliver(cfg, env, rcpt, target, df, notes, ids=None, create_gid=None, as_root=False):
    """mbox delivery of one message to target.path (deliver_batch)."""
    return deliver_batch(cfg, [(env, rcpt, df)], target, notes, ids, create_gid, as_root)[0]


def deliver_batch(cfg, msgs, target, notes, ids=None, create_gid=None, as_root=False):
    """mbox delivery of ``msgs`` ((env, rcpt, df) each) to target.path
    (mailbox or /file): the mailbox locked and opened once, each message
    appended all or nothing, one fsync for them all; a Reply for each.
    Raises DeliveryError when none can be delivered (the lock, the open).

    ``ids`` (mailbox deliveries by root) lets the dot-lock be made and a new
    mailbox be created with root's rights where only root can write the
    directory; the mailbox itself is always opened and written as the user.
    """
    shown = path = target.path
    as_root = ids is not None and as_root
    dfd = None
    if target.kind == "mailbox" and not as_root:
        dfd, path = beneath_home(target)
    try:
        return _append_at(cfg, msgs, target, notes, ids, create_gid, as_root, path, shown)
    finally:
        if dfd is not None:
            os.close(dfd)


def _append_at(cfg, msgs, target, notes, ids, create_gid, as_root, path, shown):
    """append once the path to open is known (``shown`` is the one to report)."""
    if as_root:
        ids.root()
    try:
        lock = _dot_lock(path, notes, shown, cfg.stale_lock_time)
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
                raise DeliveryError(Reply(450, "4.2.0", f"{shown} is not a regular file")) from None
            if e.errno == errno.ELOOP:
                raise DeliveryError(Reply(450, "4.2.0", f"{shown} is a symbolic link")) from None
            raise DeliveryError(os_reply(e, f"open {shown}")) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DeliveryError(Reply(450, "4.2.0", f"{shown} is not a regular file"))
            if st.st_nlink != 1:
                raise DeliveryError(Reply(550, "5.2.0", f"{shown} is not a plain file with one link"))
            if ids is not None and st.st_uid != target.uid:
                # Postfix local(8): a mailbox in a shared spool that the
                # recipient does not own was made by someone else; never
                # deliver into it.
                raise DeliveryError(Reply(450, "4.2.0", f"{shown}: wrong owner (uid {st.st_uid})"))
            os.set_blocking(fd, True)
            if ids is not None and create_gid is not None and st.st_gid != create_gid \
                    and st.st_size == 0:
                try:
                    os.fchown(fd, -1, create_gid)   # a new mailbox in a mail-group spool
                except OSError:
                    pass
            _fcntl_lock(fd, shown)
            replies, written = _write_mbox(fd, msgs, cfg.mailbox_size_limit,
                                           cfg.mailbox_from_quoting)
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
    done = Reply(250, "2.0.0", f"delivered to {what} {shown}")
    for i in written:
        replies[i] = done
    return replies
