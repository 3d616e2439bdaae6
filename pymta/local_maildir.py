"""Maildir delivery: streamed into tmp/, then new/, fsynced.

Each message's file is fsynced in tmp/ (stdlib mailbox does) before it is
linked into new/; the link is durable once new/ is fsynced, which a batch
(the deliveries to one Maildir that the worker pool combined) does once
for all its messages, before any is reported delivered.

Below the user's home the Maildir is reached as the user without
following a symbolic link (local_target.beneath_home), and made when
missing; its tmp, new and cur must not be symbolic links either.
"""

import mailbox
import os
import stat

from . import safefile as _safefile
from .local_target import LINE_CHUNK, beneath_home, home_part, os_reply, prefix
from .status import DeliveryError, Reply


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


def _maildir_beneath_home(target):
    """(fd, path) of a Maildir below the user's home, created when missing:
    reached as the user without a symbolic link (see beneath_home), its
    tmp, new and cur not symbolic links either. (None, path) elsewhere."""
    rel = home_part(target)
    if rel is None:
        return None, target.path
    pfd, _ = beneath_home(target)
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
                raise DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path} is a "
                                                         f"symbolic link")) from None
            raise
    except OSError as e:
        raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    finally:
        os.close(pfd)
    for sub in ("tmp", "new", "cur"):
        try:
            st = os.stat(sub, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as e:
            os.close(fd)
            raise DeliveryError(os_reply(e, f"maildir {target.path}/{sub}")) from None
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise DeliveryError(Reply(450, "4.2.0", f"Maildir {target.path}/{sub} is not "
                                                     f"a directory"))
    return fd, f"/proc/self/fd/{fd}"


def deliver(env, rcpt, target, df):
    """Maildir delivery of one message (deliver_batch)."""
    return deliver_batch([(env, rcpt, df)], target)[0]


def deliver_batch(msgs, target):
    """Maildir delivery of ``msgs`` ((env, rcpt, df) each) through stdlib
    mailbox: each streamed into tmp/, fsynced there and linked into new/;
    then one fsync of new/ for them all (of the Maildir too when it or its
    subdirectories were just made), before any is reported delivered. A
    Reply for each: one that fails leaves nothing behind (mailbox removes
    its tmp/ file); when an fsync fails, the batch's files are removed from
    new/ again and all are deferred. Raises DeliveryError when none can be
    delivered."""
    fd, path = _maildir_beneath_home(target)
    replies = [None] * len(msgs)
    added = []
    try:
        made = False
        for sub in ("tmp", "new", "cur") if fd is not None else ():
            try:
                os.mkdir(sub, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
        if fd is None:
            made = not os.path.isdir(os.path.join(path, "new"))
        box = mailbox.Maildir(path, factory=None, create=True)
        for i, (env, rcpt, df) in enumerate(msgs):
            try:
                added.append((i, box.add(_Prefixed(prefix(env, rcpt), df))))
            except OSError as e:
                replies[i] = os_reply(e, f"maildir {target.path}")
            except Exception as e:   # noqa: BLE001 - that message alone fails
                replies[i] = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
        if added:
            try:
                _fsync_dir(os.path.join(path, "new"))
                if made:
                    _fsync_dir(path)
                    if fd is None:
                        _fsync_dir(os.path.dirname(os.path.abspath(path)))
            except OSError:
                for _, key in added:
                    try:
                        box.discard(key)
                    except OSError:
                        pass
                raise
    except OSError as e:
        raise DeliveryError(os_reply(e, f"maildir {target.path}")) from None
    finally:
        if fd is not None:
            os.close(fd)
    done = Reply(250, "2.0.0", f"delivered to maildir {target.path}/")
    for i, _ in added:
        replies[i] = done
    return replies


def _fsync_dir(path):
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
