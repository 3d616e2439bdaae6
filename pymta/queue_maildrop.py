"""The maildrop: submissions by users who cannot write queue/, and their pickup.

sendmail run by a user other than root and mail_owner cannot write
queue/ (mode 0700). It writes the whole submission instead into
``maildrop/`` (mode 1733: anyone may create a file there, nobody may list
it or touch another's file) with drop(): one file holding the control text
(pymta.queue_file) and then the message. The file is created 0600,
written, fsync'd, and only then marked complete by its owner-execute bit
(0700); exit 0 follows. A crash before the mark leaves an incomplete file,
which pickup ignores and removes after a day.

pickup(), run by root in the daemon and at every queue run, commits each
complete file to queue/ through the one commit (pymta.queue_commit) and then
unlinks it: a crash between leaves the file, picked up again (the message
may be queued twice, never lost). It trusts nothing in the file but its
owner (fstat): recipients lose every flag but DSN NOTIFY and n, states
restart, client fields are cleared, program, file and :include:
recipients are dropped; the Received: line and, for a sender that is not
the owner's own address, sendmail's X-Authentication-Warning: are
written here, from the owner. A symbolic link, a hard link or a file that
does not parse is removed and logged (the user has their own copy of a
message they typed).
"""

import errno
import os
import stat
import time
import fcntl

from . import envelope as E
from . import headers
from .queue_dir import unlink_quiet
from .queue_file import format_control, parse_control
from .status import MESSAGE_BLOCK, SpoolCorrupt, SpoolError

HEAD_MAX = 16 << 20           # the most control text a maildrop file may start with


def drop(spool, env, chunks):
    """Write a complete submission into ``spool``'s maildrop/ as this
    (unprivileged) user; ``chunks`` is the message. Returns the file's name."""
    name = os.urandom(16).hex()
    path = os.path.join(spool.maildrop, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise SpoolError.writing(e, f"create {path}") from None
    try:
        with open(fd, "wb", buffering=MESSAGE_BLOCK, closefd=False) as f:
            env.id = env.id or "0" * 15
            f.write(format_control(env).encode("utf-8", "surrogateescape"))
            for chunk in chunks:
                f.write(chunk)
        if spool.fsync:
            os.fsync(fd)
        os.fchmod(fd, 0o700)
    except BaseException as e:
        os.close(fd)
        unlink_quiet(path)
        if isinstance(e, OSError):
            raise SpoolError.writing(e, f"write {path}") from None
        raise
    os.close(fd)
    return name


def pickup(spool, cfg=None, log=None):
    """Commit every complete maildrop file to queue/; returns the new ids.

    ``cfg`` gives myhostname and mail_name for the Received: line, and
    trusted_users and myorigin for the X-Authentication-Warning: (without
    it: the host's name, and no warning). Must run as root to read the
    files."""
    try:
        names = os.listdir(spool.maildrop)
    except FileNotFoundError:
        return []
    ids = []
    for name in sorted(names):
        path = os.path.join(spool.maildrop, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:      # a symbolic link planted there
                if log:
                    log(f"maildrop/{name}: not a plain file, removed")
                unlink_quiet(path)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                    continue    # another pickup took it
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                if log:
                    log(f"maildrop/{name}: not a plain file, removed")
                unlink_quiet(path)
                continue
            if not st.st_mode & stat.S_IXUSR:
                if time.time() - st.st_mtime > 86400:
                    unlink_quiet(path)
                continue
            qid = _pickup_one(spool, cfg, fd, st, log, name)
            unlink_quiet(path)
            if qid:
                ids.append(qid)
        finally:
            os.close(fd)
    return ids


def _pickup_one(spool, cfg, fd, st, log, name):
    f = open(fd, "rb", closefd=False)
    head, size = [], 0
    while True:
        line = f.readline(1 << 20)
        size += len(line)
        if not line or size > HEAD_MAX:
            if log:
                log(f"maildrop/{name}: torn submission from uid {st.st_uid}, removed")
            return None
        head.append(line)
        if line == b".\n":
            break
    try:
        env = parse_control(b"".join(head).decode("utf-8", "surrogateescape"))
    except SpoolCorrupt as e:
        if log:
            log(f"maildrop/{name}: bad submission from uid {st.st_uid}: {e}")
        return None
    env.uid = st.st_uid
    env.protocol = "local"
    env.client_addr = env.client_name = env.auth_user = ""
    env.attempts = env.last_attempt = env.next_try = 0
    env.created = int(time.time())
    env.extra = []
    env.held = env.warned = False
    refused = [r.address for r in env.recipients
               if r.address.startswith(("|", "/", '"|', '"/'))
               or r.address.lower().lstrip('"').startswith(":include:")]
    env.recipients = [r for r in env.recipients if r.address not in refused]
    if refused and log:
        log(f"maildrop/{name}: uid {st.st_uid}: refused recipients {refused!r}")
    if not env.recipients:
        return None
    for r in env.recipients:
        r.flags = "".join(c for c in r.flags if c in "SFDNn") + E.PRIMARY
        r.state = E.QUEUED
        r.dsn = r.text = r.relay = r.parent = r.via = ""
        r.uid = -1
        r.extra = {}
    env.status = ""
    hostname, mail_name = (cfg.myhostname, cfg.mail_name) if cfg is not None \
        else (os.uname().nodename, "pymta")
    login = _login(st.st_uid)
    with spool.new_message() as w:
        w.write(headers.received(w.id, hostname, mail_name,
                                 f"(from {login}@localhost uid {st.st_uid})"))
        if cfg is not None:
            w.write(_auth_warning(cfg, login, env.sender))
        eight_bit = False
        while True:
            chunk = f.read(MESSAGE_BLOCK)
            if not chunk:
                break
            eight_bit = eight_bit or not chunk.isascii()
            w.write(chunk)
        if eight_bit and not env.body_type:
            env.body_type = "8BITMIME"
        env.priority = 0
        qid = w.commit(env)
    if log:
        log(f"{qid}: uid={st.st_uid} from=<{env.sender}>, size={w.size}, "
            f"nrcpts={len(env.recipients)} (maildrop)")
    return qid


def _login(uid):
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _auth_warning(cfg, login, sender):
    """sendmail's X-Authentication-Warning: for a maildrop file whose
    envelope sender is not its owner's own address, when the owner is
    not trusted: written here, at pickup, from the file's owner (the
    only thing a maildrop file cannot forge). b"" when none is due."""
    from . import address as _address
    if login in cfg.trusted_users:
        return b""
    if sender in (login, _address.qualify(login, cfg.myorigin)):
        return b""
    return headers.auth_warning(cfg.myhostname, login, sender)


