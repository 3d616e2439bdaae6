"""Opening files that someone else controls: .forward and :include: files.

A file named by a user (a .forward, an included list) is read only when it
is a regular file, without blocking (a FIFO or device is refused before it
is opened, and opened with O_NONBLOCK in case it was swapped meanwhile), up
to a size cap and within a deadline. ``open_beneath`` walks a path below a
trusted directory one component at a time (``dir_fd`` and O_NOFOLLOW, as
openat(2) does), so that no symbolic link below it is followed.

Errors are :class:`Refused` (an OSError) whose text says why and never
holds a byte of the file.
"""

import errno
import os
import stat
import time

from . import forkserver
from .status import READ_SIZE


class Refused(OSError):
    """A file not used; ``str()`` is the reason, fit for a log line."""

    def __init__(self, reason, err=0):
        super().__init__(err, reason)
        self.reason = reason

    def __str__(self):
        return self.reason


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _why(e):
    if e.errno == errno.ELOOP:
        return "is a symbolic link"
    if e.errno == errno.ENOTDIR:
        return "has a component that is not a directory"
    return e.strerror or str(e)


def _symlink_is_eloop(e, name, dfd):
    """Linux says ENOTDIR, not ELOOP, for a symbolic link opened with
    O_DIRECTORY|O_NOFOLLOW: raise ELOOP when ``name`` is one."""
    if e.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "is a symbolic link", name) from None


def open_dir_beneath(base, rel):
    """The directory ``rel`` below directory ``base`` (``base`` itself is
    trusted and may be reached through symbolic links), each component of
    ``rel`` opened relative to the previous one with O_NOFOLLOW, as
    openat(2) does. Returns an O_DIRECTORY fd; raises OSError, Refused for a
    symbolic link on the way."""
    parts = [p for p in rel.split("/") if p and p != "."]
    if ".." in parts:
        raise OSError(errno.EINVAL, f"bad relative path {rel!r}")
    dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dfd)
            except OSError as e:
                try:
                    _symlink_is_eloop(e, part, dfd)
                except OSError:
                    raise Refused(f"is reached through a symbolic link ({part})",
                                  errno.ELOOP) from None
                raise
            os.close(dfd)
            dfd = nfd
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def open_beneath(base, rel, flags=_READ_FLAGS, mode=0o600):
    """Open ``rel`` below directory ``base`` without following a symbolic
    link below ``base`` (see open_dir_beneath; the last component is opened
    with O_NOFOLLOW too). Returns the fd; raises OSError (ELOOP for a
    symbolic link)."""
    parent, _, name = rel.strip("/").rpartition("/")
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"bad relative path {rel!r}")
    dfd = open_dir_beneath(base, parent)
    try:
        try:
            return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dfd)
        except OSError as e:
            _symlink_is_eloop(e, name, dfd)
            raise
    finally:
        os.close(dfd)


def open_regular(path, beneath=None, follow=True):
    """Open ``path`` for reading when it is a regular file, never blocking:
    its type is looked at before it is opened (a FIFO or a device is not
    opened at all) and checked again on the open descriptor. ``beneath``: a
    trusted directory that ``path`` lies below, walked without symbolic
    links from there (see open_beneath). ``follow=False``: the last
    component must not be a symbolic link either. Returns (fd, stat)."""
    try:
        if beneath and path.startswith(beneath.rstrip("/") + "/"):
            rel = path[len(beneath.rstrip("/")) + 1:]
            parent, _, name = rel.rpartition("/")
            dfd = open_dir_beneath(beneath, parent)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise Refused("is a symbolic link", errno.ELOOP)
                if not stat.S_ISREG(st.st_mode):
                    raise Refused("is not a regular file")
                fd = os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:
            st = os.stat(path, follow_symlinks=follow)
            if stat.S_ISLNK(st.st_mode):
                raise Refused("is a symbolic link", errno.ELOOP)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("is not a regular file")
            fd = os.open(path, _READ_FLAGS | (0 if follow else os.O_NOFOLLOW))
    except Refused:
        raise
    except OSError as e:
        raise Refused(_why(e), e.errno) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd, limit, deadline):
    """At most ``limit`` bytes of the open regular file ``fd``, read by
    ``deadline`` (time.monotonic()); a larger file is refused, not cut."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise Refused("not read in time")
        try:
            chunk = os.read(fd, min(READ_SIZE, limit + 1 - size))
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError as e:
            raise Refused(_why(e), e.errno) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise Refused(f"is larger than {limit} bytes")


def read_file(path, limit, seconds, beneath=None, follow=True):
    """(stat, bytes) of regular file ``path``; see open_regular, read_fd."""
    fd, st = open_regular(path, beneath, follow)
    try:
        return st, read_fd(fd, limit, time.monotonic() + seconds)
    finally:
        os.close(fd)


def _read_child(fds, path, limit, seconds, uid, gid, groups):
    """read_file_as's child: the file's stat and bytes, or why not, to ``fds[0]``."""
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)
    try:
        st, data = read_file(path, limit, seconds)
        head = {"mode": st.st_mode, "uid": st.st_uid}
    except Refused as e:
        head, data = {"error": e.reason, "errno": e.errno or 0}, b""
    forkserver.put_result(fds[0], head, data)


def read_file_as(path, limit, seconds, uid, gid, groups):
    """read_file in a child process with ``uid``, ``gid`` and ``groups`` (a
    file that user cannot read is refused); the child is killed at the
    deadline. Returns (st_mode, st_uid, bytes); raises Refused. ``groups``
    must be looked up before (NSS is not safe in a forked child)."""
    deadline = time.monotonic() + seconds
    rfd, wfd = os.pipe()
    try:
        try:
            child = forkserver.spawn(_read_child, (path, limit, seconds, uid, gid, groups), [wfd])
        finally:
            os.close(wfd)
        try:
            info, data = forkserver.get_result(rfd, limit, deadline)
        except forkserver.ResultError as e:
            late = e.errno in (errno.ETIMEDOUT, errno.EMSGSIZE)
            if late:
                child.kill()
            raise Refused("not read in time" if late
                          else "could not be read (reading process failed)") from None
        finally:
            child.wait()
            child.close()
    finally:
        os.close(rfd)
    if not isinstance(info, dict):
        raise Refused("could not be read (reading process failed)")
    if "error" in info:
        raise Refused(str(info["error"]), int(info.get("errno") or 0))
    return info["mode"], info["uid"], data
