"""Maildir delivery: written into tmp/ in blocks, fsynced, moved into new/.

Each message is written into a new file in tmp/ (the unique name stdlib
mailbox.Maildir gives, created with O_EXCL and O_NOFOLLOW) by a block
copy (_copy: the same bytes stdlib mailbox.Maildir.add writes, without
its Python loop per line), fsynced, and linked into new/ (then unlinked
from tmp/), so that new/ never holds a partial file. The link is durable
once new/ is fsynced, which a batch (the deliveries to one Maildir that
the worker pool combined) does once for all its messages, before any is
reported delivered.

Below the user's home the Maildir is reached as the user without
following a symbolic link (local_target.beneath_home), and made when
missing; its tmp, new and cur must not be symbolic links either (tmp/
and new/ are opened with O_NOFOLLOW and used through their descriptors).
Memory stays bounded by the block, whatever the length of a line.
"""

import errno
import os
import stat
import time

from . import safefile as _safefile
from .local_target import beneath_home, home_part, os_reply, prefix
from .status import MESSAGE_BLOCK, DeliveryError, Reply

FILE_MODE = 0o666          # as stdlib mailbox creates it; the worker's umask 077 makes it 0600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SUBDIRS = ("tmp", "new", "cur")
_counter = [0]             # the Q part of this process's file names


def _copy(head, df, out):
    """Write ``head`` and then the df to ``out`` in blocks of MESSAGE_BLOCK,
    converted as stdlib mailbox.Maildir.add converts the lines it reads:
    a CR LF line end becomes LF and a last line's final bare CR becomes LF;
    any other CR is kept. A message that does not end in a line end gets
    one (as Postfix writes every delivered message). A CR at the end of a
    block is held back until the next byte says whether it ends a line,
    so that memory stays bounded by the block, whatever the lines."""
    carry = b""
    last = b"\n"
    data = head
    while True:
        if carry:
            data = carry + data
        if data[-1:] == b"\r":
            carry, data = b"\r", data[:-1]
        else:
            carry = b""
        if data:
            out.write(data.replace(b"\r\n", b"\n"))
            last = data[-1:]
        data = df.read(MESSAGE_BLOCK)
        if not data:
            break
    if carry or last != b"\n":
        out.write(b"\n")


def _unique_name():
    """A new file name as stdlib mailbox.Maildir makes it: seconds,
    M microseconds, P pid, Q this process's count, host name ("/" and ":"
    escaped)."""
    now = time.time()
    host = os.uname().nodename.replace("/", r"\057").replace(":", r"\072")
    _counter[0] += 1
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{_counter[0]}.{host}"


def _unlink_quietly(name, dfd):
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _clash(text):
    """The unique name taken already (stdlib mailbox's ExternalClashError)."""
    return DeliveryError(Reply(451, "4.3.0", f"local delivery error: {text}"))


def _add(tmpfd, newfd, head, df):
    """One message into the Maildir whose tmp/ and new/ are open as
    ``tmpfd`` and ``newfd``: written into a new file in tmp/ (O_EXCL,
    O_NOFOLLOW), fsynced, closed, then linked into new/ and unlinked from
    tmp/ (renamed where the file system refuses the link), so that new/
    never holds a partial file. Returns its name in new/; on any error
    nothing is left behind in tmp/ or new/."""
    name = _unique_name()
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE, dir_fd=tmpfd)
    except FileExistsError:
        raise _clash(f"name clash prevented file creation: tmp/{name}") from None
    try:
        try:
            out = open(fd, "wb", buffering=MESSAGE_BLOCK)
        except BaseException:
            os.close(fd)
            raise
        with out:
            _copy(head, df, out)
            out.flush()
            os.fsync(fd)
    except BaseException:
        _unlink_quietly(name, tmpfd)
        raise
    try:
        os.link(name, name, src_dir_fd=tmpfd, dst_dir_fd=newfd, follow_symlinks=False)
    except PermissionError:
        pass            # a file system without hard links: renamed below
    except OSError as e:
        _unlink_quietly(name, tmpfd)
        if e.errno == errno.EEXIST:
            raise _clash(f"name clash with existing message: new/{name}") from None
        raise
    else:
        _unlink_quietly(name, tmpfd)   # in new/ already: a left-over in tmp/ is swept by readers
        return name
    try:
        os.rename(name, name, src_dir_fd=tmpfd, dst_dir_fd=newfd)
    except OSError:
        _unlink_quietly(name, tmpfd)
        raise
    return name


def _maildir_beneath_home(target):
    """(fd, missing) of a Maildir below the user's home, created when
    missing (and the home's entry for it fsynced): reached as the user
    without a symbolic link (see beneath_home), its tmp, new and cur not
    symbolic links either; ``missing``: those of them that are not there.
    (None, all three) elsewhere."""
    rel = home_part(target)
    if rel is None:
        return None, _SUBDIRS
    pfd, _ = beneath_home(target)
    name = rel.rpartition("/")[2]
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        else:
            os.fsync(pfd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            try:
                _safefile._symlink_is_eloop(e, name, pfd)
            except OSError:
                raise DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path} is a "
                                                         f"symbolic link")) from None
            raise
    except OSError as e:
        raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    finally:
        os.close(pfd)
    missing = []
    for sub in _SUBDIRS:
        try:
            st = os.stat(sub, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            missing.append(sub)
            continue
        except OSError as e:
            os.close(fd)
            raise DeliveryError(os_reply(e, f"maildir {target.path}/{sub}")) from None
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path}/{sub} is not "
                                                     f"a directory"))
    return fd, missing


def _open_maildir(target):
    """(fd, made) of the Maildir: below the home as _maildir_beneath_home
    says, elsewhere by its path (created when missing, its parent then
    fsynced); its tmp, new and cur created when missing, ``made`` saying
    whether any was."""
    fd, missing = _maildir_beneath_home(target)
    if fd is None:
        try:
            try:
                os.mkdir(target.path, 0o700)
            except FileExistsError:
                pass
            else:
                _fsync_dir(os.path.dirname(os.path.abspath(target.path)))
            fd = os.open(target.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    made = False
    try:
        for sub in missing:
            try:
                os.mkdir(sub, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
    except OSError as e:
        os.close(fd)
        raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    return fd, made


def deliver(env, rcpt, target, df):
    """Maildir delivery of one message (deliver_batch)."""
    return deliver_batch([(env, rcpt, df)], target)[0]


def deliver_batch(msgs, target):
    """Maildir delivery of ``msgs`` ((env, rcpt, df) each): each written
    into tmp/, fsynced there and moved into new/ (_add); then one fsync of
    new/ for them all (of the Maildir too when its subdirectories were
    just made), before any is reported delivered. A Reply for each: one
    that fails leaves nothing behind; when an fsync fails, the batch's
    files are removed again and all are deferred. Raises DeliveryError
    when none can be delivered."""
    fd, made = _open_maildir(target)
    replies = [None] * len(msgs)
    added = []
    tmpfd = newfd = None
    try:
        tmpfd = os.open("tmp", _DIR_FLAGS, dir_fd=fd)
        newfd = os.open("new", _DIR_FLAGS, dir_fd=fd)
        for i, (env, rcpt, df) in enumerate(msgs):
            try:
                added.append((i, _add(tmpfd, newfd, prefix(env, rcpt), df)))
            except OSError as e:
                replies[i] = os_reply(e, f"maildir {target.path}")
            except DeliveryError as e:
                replies[i] = e.reply
            except Exception as e:   # noqa: BLE001 - that message alone fails
                replies[i] = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
        if added:
            try:
                os.fsync(newfd)
                if made:
                    os.fsync(fd)
            except OSError:
                for _, name in added:
                    _remove_added(fd, newfd, name)
                raise
    except OSError as e:
        raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    finally:
        for f in (newfd, tmpfd, fd):
            if f is not None:
                os.close(f)
    done = Reply(250, "2.0.0", f"delivered to maildir {target.path}/")
    for i, _ in added:
        replies[i] = done
    return replies


def _remove_added(fd, newfd, name):
    """Remove a message this batch added, from new/ or, when a reader has
    already moved it, from cur/ (as stdlib mailbox's discard finds it)."""
    try:
        os.unlink(name, dir_fd=newfd)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        cfd = os.open("cur", _DIR_FLAGS, dir_fd=fd)
    except OSError:
        return
    try:
        for entry in os.listdir(cfd):
            if entry.split(":")[0] == name:
                _unlink_quietly(entry, cfd)
    except OSError:
        pass
    finally:
        os.close(cfd)


def _fsync_dir(path):
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
