"""The queue: sendmail-style qf/df pairs, their format and their commit.

Layout of ``queue_directory``::

    queue/      mode 0700, mail_owner: the messages
        df<ID>  the message: headers and body, LF line ends, as delivered
                (less Return-Path:, which final delivery adds)
        qf<ID>  the control file: envelope and per-recipient state
        tf<ID>  a control file being written; renamed over qf<ID>
        hf<ID>  the control file of a message on hold (delivery skips it)
        Qf<ID>  a control file that could not be parsed: kept, never used
    maildrop/   mode 1733: unprivileged users' submissions, picked up by
                root or mail_owner and committed to queue/ (see pickup())
    sched/      mode 0700: per-destination connection slots and dead marks
                shared by every delivering process (see pymta.sched)

Queue ids are sendmail's shape: six characters of UTC time (year mod 60,
month, day, hour, minute, second, each one of 60 letters), three of a
per-process sequence, then the process id: ``6ASHBJ000012345``. They sort
by time and are unique across processes (pid) and threads (the sequence,
under a lock); creating the df with O_EXCL catches the rest.

The control file is UTF-8 text, one item a line, a letter then its value::

    V1                 format version, always first
    T<epoch>           arrival time
    K<epoch>           last delivery attempt (0: none)
    N<count>           delivery attempts
    Y<epoch>           next attempt not before this time
    P<priority>        lower is delivered first
    F<letters>         w: delay warning sent; u: SMTPUTF8; t: submitted by a
                       trusted client (mynetworks, AUTH) or made here (DKIM)
    B<body>            7BIT, 8BITMIME or BINARYMIME
    Z<envid>           DSN ENVID
    C<uid>             the submitting user's uid, local submissions only
    $r<proto>          SMTP, ESMTP[S][A], UTF8SMTP[S][A], or local
    $s<helo>           the client's HELO/EHLO name
    ${client_addr}...  the client's IP; ${client_name} its verified name;
    ${auth_authen}...  the SASL login; ${dsn_ret} DSN RET (FULL or HDRS)
    S<sender>          envelope sender; empty for the null sender <>
    R<flags> <state> <address> [key=value ...]
                       one line a recipient; flags S F D N (DSN NOTIFY),
                       p (named by the client), a (from an alias, .forward or
                       :include:), n (no further aliasing), v (a result
                       of virtual_alias_maps, not looked up again); state
                       Q queued, D deferred, S sent, F failed, B bounced,
                       X expanded; keys dsn, text, orcpt, parent, via (a
                       |cmd's or /file's naming address), uid, relay, time
    M<text>            last status, shown by mailq
    .                  end: a file without it is torn and never used

Values are percent-encoded where they hold '%', control characters or (in
R lines) spaces. Lines with unknown letters are kept on rewrite.

Commit (the only way a message enters the queue)::

    step                                 crash here leaves     what happens
    0 data arrives, held in memory       nothing               (no file until 256 KB or commit)
    1 create df<ID> O_EXCL, flock it     df only               swept after queue_sweep_age
    2 write df, fsync df                 df only               swept
    3 write tf<ID> whole                 df + tf               both swept
    4 rename tf<ID> -> qf<ID>, fsync qf  df + qf, or a torn qf queued (a torn qf is quarantined)
    5 fsync queue/                       df + qf, durable      reply 250 / exit 0

Step 3 is done while the fsync of step 2 runs; the fsyncs of steps 4 and 5
are independent and may run at once (the SMTP server's event loop does so).
The control file is renamed before its fsync, not after: nobody ever reads
a partial one (it is written whole under the tf name), the df is durable
before the qf name exists, and one fsync makes both the qf's content and,
with step 5, its name durable. A crash before step 5 leaves a message that
was never acknowledged: at worst it is delivered and the client sends it
again.

A rewrite (after a delivery attempt, hold, release) is tf, fsync, rename,
never an edit in place; a crash leaves the old or the new qf, both whole.
Removal unlinks qf (or hf) first, then df: a crash between leaves an orphan
df, which is swept. At worst a recipient is tried twice; a message is never
lost once step 5 is done.

Locking: whoever works on a message holds flock(LOCK_EX) on its df, which no
rewrite replaces. A queue runner skips a locked message; mailq marks it *.
After the lock is taken, the qf is checked again (it may have just gone).
"""

import errno
import os
import stat
import time
import _thread   # threading's Lock without its import (sendmail's start-up is its latency)
import fcntl

from . import envelope as E
from .status import SpoolCorrupt, SpoolError, Reply

VERSION = "1"
QUEUE_SUBDIR = "queue"
MAILDROP_SUBDIR = "maildrop"

_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
_id_lock = _thread.allocate_lock()
# A child forked while another thread held the lock must not inherit it held.
os.register_at_fork(after_in_child=lambda: globals().update(_id_lock=_thread.allocate_lock()))
SYNC_DIR = "queue directory"     # MessageWriter.commit_steps: fsync the queue directory
_id_state = {"sec": 0, "seq": 0, "pid": 0}

# Percent-encoding of qf values (what urllib.parse.quote does with these safe
# sets): '%', controls, non-ASCII, and in R fields spaces. No regular
# expressions: sendmail imports this module, and re costs its start-up.
_HEX = frozenset("0123456789ABCDEFabcdef")


def new_id(now=None):
    """A fresh, time-ordered, process- and thread-unique queue id."""
    while True:
        with _id_lock:
            sec = int(now if now is not None else time.time())
            pid = os.getpid()
            if sec != _id_state["sec"] or pid != _id_state["pid"]:
                _id_state.update(sec=sec, seq=0, pid=pid)
                seq = 0
                break
            if _id_state["seq"] + 1 < 60 ** 3:
                _id_state["seq"] += 1
                seq = _id_state["seq"]
                break
        # 216,000 ids in one second in one process: wait for the next second.
        now = None
        time.sleep(1.0 - (time.time() % 1.0))
    t = time.gmtime(sec)
    c = _CHARS
    return (c[t.tm_year % 60] + c[t.tm_mon - 1] + c[t.tm_mday] + c[t.tm_hour]
            + c[t.tm_min] + c[min(t.tm_sec, 59)]
            + c[seq // 3600] + c[(seq // 60) % 60] + c[seq % 60] + "%06d" % pid)


def valid_id(qid):
    """[0-9A-Za-x]{9}[0-9]{6,10}"""
    if not qid or not 15 <= len(qid) <= 19 or not qid.isascii():
        return False
    head, pid = qid[:9], qid[9:]
    return head.isalnum() and pid.isdigit() and "y" not in head and "z" not in head


def id_time(qid):
    """The arrival time encoded in an id (UTC, to the second), or None."""
    import calendar   # only mailq and admin need it: not every sendmail run
    try:
        idx = [_CHARS.index(ch) for ch in qid[:6]]
    except ValueError:
        return None
    year_now = time.gmtime().tm_year
    year = year_now - ((year_now - idx[0]) % 60)
    try:
        return calendar.timegm((year, idx[1] + 1, idx[2], idx[3], idx[4], idx[5], 0, 0, 0))
    except (OverflowError, ValueError):
        return None


# -- the control file format -------------------------------------------------

def _enc(value, space=True):
    """Percent-encode what is not printable ASCII, '%', and spaces unless
    ``space``."""
    if value.isascii() and value.isprintable() and "%" not in value and (space or " " not in value):
        return value
    out = []
    for c in value:
        if "!" <= c <= "~" and c != "%" or c == " " and space:
            out.append(c)
        else:
            out.append("".join("%%%02X" % b for b in c.encode("utf-8", "surrogateescape")))
    return "".join(out)


def _dec(value):
    if "%" not in value:
        return value
    out, run, i, n = [], bytearray(), 0, len(value)
    while i < n:
        c = value[i]
        if c == "%" and i + 2 < n and value[i + 1] in _HEX and value[i + 2] in _HEX:
            run.append(int(value[i + 1:i + 3], 16))
            i += 3
            continue
        if run:     # a run of %XX is one UTF-8 sequence (or several)
            out.append(run.decode("utf-8", "surrogateescape"))
            run = bytearray()
        out.append(c)
        i += 1
    if run:
        out.append(run.decode("utf-8", "surrogateescape"))
    return "".join(out)


def format_control(env):
    """The qf text of an Envelope."""
    out = [f"V{VERSION}", f"T{env.created}", f"K{env.last_attempt}", f"N{env.attempts}",
           f"Y{env.next_try}", f"P{env.priority}"]
    flags = ("w" if env.warned else "") + ("u" if env.smtputf8 else "") + \
        ("t" if env.trusted else "")
    if flags:
        out.append(f"F{flags}")
    if env.body_type:
        out.append(f"B{env.body_type}")
    if env.envid:
        out.append(f"Z{_enc(env.envid)}")
    if env.uid >= 0:
        out.append(f"C{env.uid}")
    if env.protocol:
        out.append(f"$r{_enc(env.protocol)}")
    if env.helo:
        out.append(f"$s{_enc(env.helo)}")
    for key, val in (("client_addr", env.client_addr), ("client_name", env.client_name),
                     ("auth_authen", env.auth_user), ("dsn_ret", env.ret)):
        if val:
            out.append(f"${{{key}}}{_enc(val)}")
    out.extend(env.extra)
    out.append(f"S{_enc(env.sender)}")
    for r in env.recipients:
        fields = [f"R{r.flags or '-'}", r.state, _enc(r.address, space=False)]
        for key, val in (("dsn", r.dsn), ("text", r.text), ("orcpt", r.orcpt),
                         ("parent", r.parent), ("via", r.via), ("relay", r.relay)):
            if val:
                fields.append(f"{key}={_enc(val, space=False)}")
        if r.uid >= 0:
            fields.append(f"uid={r.uid}")
        if r.updated:
            fields.append(f"time={r.updated}")
        for key, val in r.extra.items():
            fields.append(f"{key}={_enc(val, space=False)}")
        out.append(" ".join(fields))
    if env.status:
        out.append(f"M{_enc(env.status)}")
    out.append(".")
    return "\n".join(out) + "\n"


TIME_MAX = 253402300799            # 9999-12-31 23:59:59 UTC: what time and date functions take
_RANGES = {"arrival time": (0, TIME_MAX), "attempt time": (0, TIME_MAX),
           "next try": (0, TIME_MAX), "recipient time": (0, TIME_MAX),
           "attempt count": (0, 10 ** 9), "priority": (-(2 ** 62), 2 ** 62),
           "uid": (-1, 2 ** 32 - 1), "recipient uid": (-1, 2 ** 32 - 1)}


def _int(value, what):
    """A decimal field of a qf, range-checked: a value out of range is a
    damaged file (SpoolCorrupt), never a crash of whoever reads it."""
    if not (value[1:] if value[:1] == "-" else value).isdigit() or not value.isascii() \
            or len(value) > 20:
        raise SpoolCorrupt(f"bad {what}: {value[:40]!r}")
    n = int(value)
    lo, hi = _RANGES.get(what, (-(2 ** 63), 2 ** 63 - 1))
    if not lo <= n <= hi:
        raise SpoolCorrupt(f"{what} out of range: {value[:40]}")
    return n


def parse_control(text, qid=""):
    """An Envelope from qf text; raises SpoolCorrupt if torn or malformed."""
    if not text.endswith("\n.\n"):
        raise SpoolCorrupt("control file has no final '.' line (torn)")
    lines = text[:-1].split("\n")
    if lines[0] != f"V{VERSION}":
        raise SpoolCorrupt(f"unknown control file version {lines[0][:20]!r}")
    env = E.Envelope(id=qid)
    seen_sender = False
    for line in lines[1:-1]:
        if not line:
            raise SpoolCorrupt("empty line in control file")
        k, v = line[0], line[1:]
        if k == "T":
            env.created = _int(v, "arrival time")
        elif k == "K":
            env.last_attempt = _int(v, "attempt time")
        elif k == "N":
            env.attempts = _int(v, "attempt count")
        elif k == "Y":
            env.next_try = _int(v, "next try")
        elif k == "P":
            env.priority = _int(v, "priority")
        elif k == "F":
            env.warned = "w" in v
            env.smtputf8 = "u" in v
            env.trusted = "t" in v
        elif k == "B":
            env.body_type = v
        elif k == "Z":
            env.envid = _dec(v)
        elif k == "C":
            env.uid = _int(v, "uid")
        elif k == "$":
            if v.startswith("{"):
                key, _, val = v[1:].partition("}")
                val = _dec(val)
                if key == "client_addr":
                    env.client_addr = val
                elif key == "client_name":
                    env.client_name = val
                elif key == "auth_authen":
                    env.auth_user = val
                elif key == "dsn_ret":
                    env.ret = val
                else:
                    env.extra.append(line)
            elif v[:1] == "r":
                env.protocol = _dec(v[1:])
            elif v[:1] == "s":
                env.helo = _dec(v[1:])
            else:
                env.extra.append(line)
        elif k == "S":
            env.sender = _dec(v)
            seen_sender = True
        elif k == "R":
            env.recipients.append(_parse_rcpt(v))
        elif k == "M":
            env.status = _dec(v)
        else:
            env.extra.append(line)
    if not seen_sender:
        raise SpoolCorrupt("control file has no sender (S) line")
    if not env.recipients:
        raise SpoolCorrupt("control file has no recipient (R) line")
    return env


def _parse_rcpt(v):
    parts = v.split(" ")
    if len(parts) < 3:
        raise SpoolCorrupt(f"bad recipient line R{v[:60]!r}")
    flags, state, addr = parts[0], parts[1], _dec(parts[2])
    if state not in "QDSFBX" or len(state) != 1:
        raise SpoolCorrupt(f"bad recipient state {state!r}")
    r = E.Recipient(addr, flags="" if flags == "-" else flags, state=state)
    for kv in parts[3:]:
        key, eq, val = kv.partition("=")
        if not eq:
            raise SpoolCorrupt(f"bad recipient field {kv[:40]!r}")
        val = _dec(val)
        if key in ("dsn", "text", "orcpt", "parent", "via", "relay"):
            setattr(r, key, val)
        elif key == "uid":
            r.uid = _int(val, "recipient uid")
        elif key == "time":
            r.updated = _int(val, "recipient time")
        else:
            r.extra[key] = val
    return r


# -- the queue directory ------------------------------------------------------

def _disk_error(e, what):
    """An OSError from the spool as a SpoolError with the right reply."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reply = Reply(452, "4.3.1", "Insufficient system storage")
    else:
        reply = Reply(451, "4.3.0", "Error writing message to the queue")
    return SpoolError(f"{what}: {e.strerror or e}", reply)


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


class MessageWriter:
    """Streams one new message into df<ID> and commits it.

    The df is created when the first 256 KB have arrived, or at commit: a
    small message costs one create, one write and one fsync, all in
    commit(), which an SMTP server runs away from its event loop. The id is
    chosen at once (the Received: header names it); should its df exist by
    then, commit() takes a fresh id.

    Use as a context manager: leaving it without commit() removes the df.
    After commit() the writer still holds the message's lock; ``handoff()``
    passes that lock to the caller (to deliver at once), ``close()`` drops it.
    """

    SPILL = 256 * 1024

    def __init__(self, spool):
        self.spool = spool
        self.size = 0
        self.committed = False
        self._lock_fd = None
        self._buf = []
        self._buffered = 0
        self._tf = self._final = None
        self.id = new_id()

    def _create(self):
        for _ in range(1000):
            path = self.spool.path("df", self.id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                self.id = new_id()
                continue
            except OSError as e:
                raise _disk_error(e, f"create {path}") from None
            break
        else:
            raise SpoolError("could not allocate a queue id")
        self._lock_fd = fd
        self.spool.own(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _spill(self):
        if self._lock_fd is None:
            self._create()
        if self._buf:
            chunks, self._buf, self._buffered = self._buf, [], 0
            try:
                _writev_all(self._lock_fd, chunks)
            except OSError as e:
                raise _disk_error(e, f"write df{self.id}") from None

    def write(self, data):
        if not isinstance(data, bytes):
            data = bytes(data)
        self._buf.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self.SPILL:
            self._spill()

    def commit(self, env):
        """Make the message durable (steps 1-5 above); returns its id."""
        steps = self.commit_steps(env)
        step = None
        try:
            while True:
                step = steps.send(None) if step is None else step
                try:
                    for one in step if isinstance(step, tuple) else (step,):
                        if one is SYNC_DIR:
                            self.spool._sync_dir()
                        else:
                            os.fsync(one)
                except OSError as e:
                    step = steps.throw(e)
                    continue
                step = None
        except StopIteration as done:
            return done.value

    def commit_steps(self, env):
        """The commit as a generator that yields each file descriptor to
        fsync (SYNC_DIR: the queue directory), or a tuple of them that may be
        fsync'd at once, and goes on once the caller has fsync'd them (or
        throws the first OSError in); it returns the id.
        commit() fsyncs in its own thread; the SMTP server's event loop
        hands the descriptors to its syncer processes."""
        self._spill()
        env.id = self.id
        env.size = self.size
        if not env.created:
            env.created = int(time.time())
        if not env.priority:
            env.priority = self.size
        fsync = self.spool.fsync
        tf = self.spool.path("tf", self.id)
        final = self.spool.path("hf" if env.held else "qf", self.id)
        data = format_control(env).encode("utf-8", "surrogateescape")
        # The tf is written while the df's fsync runs; it gets its name only
        # once the df is durable.
        try:
            fd = os.open(tf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _disk_error(e, f"write {tf}") from None
        self.spool.own(fd)
        self._tf = tf
        try:
            try:
                os.write(fd, data) if len(data) < 65536 else _write_all(fd, data)
            except OSError as e:
                raise _disk_error(e, f"write {tf}") from None
            if fsync:
                try:
                    yield self._lock_fd
                except OSError as e:
                    raise _disk_error(e, f"write df{self.id}") from None
            try:
                # The control file is complete before it gets its name and
                # is fsync'd under it: nobody reads a partial one, and the
                # name is made durable with it (and with the directory).
                os.rename(tf, final)
                self._final = final
                if fsync:
                    yield (fd, SYNC_DIR)     # independent: may run at once
            except OSError as e:
                raise _disk_error(e, f"write {final}") from None
        finally:
            os.close(fd)
        self.committed = True
        return self.id

    def abort(self):
        if not self.committed and self._lock_fd is not None:
            # The control file first: a df without one is never delivered.
            for path in (self._final, self._tf, self.spool.path("df", self.id)):
                if not path:
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    pass
        self.close()

    def handoff(self):
        """The committed message's lock, now owned by the caller."""
        assert self.committed
        lock = MessageLock(self.spool, self.id, self._lock_fd)
        self._lock_fd = None
        return lock

    def close(self):
        self._buf = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.committed:
            self.close()
        else:
            self.abort()


class Spool:
    """One queue directory. ``fsync=False`` is for benchmarks of the rest only."""

    def __init__(self, queue_directory, fsync=True):
        self.top = queue_directory
        self.dir = os.path.join(queue_directory, QUEUE_SUBDIR)
        self.maildrop = os.path.join(queue_directory, MAILDROP_SUBDIR)
        self.fsync = fsync
        self._dirfd = None
        self._dirfd_lock = _thread.allocate_lock()

    # Who may set another sender in a maildrop file without an
    # X-Authentication-Warning: (trusted_users), and whose addresses are
    # their own (@myorigin); set by from_config. None: pickup adds none.
    trusted_users = None
    origin = ""

    @classmethod
    def from_config(cls, cfg):
        spool = cls(cfg.queue_directory)
        spool.trusted_users = tuple(cfg.trusted_users)
        spool.origin = cfg.myorigin
        return spool

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
        return os.path.join(self.dir, prefix + qid)

    def dir_fd(self):
        """A descriptor of queue/, opened once, for its fsyncs."""
        with self._dirfd_lock:
            if self._dirfd is None:
                self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self._dirfd

    def _sync_dir(self):
        if self.fsync:
            os.fsync(self.dir_fd())

    def free_space(self):
        st = os.statvfs(self.dir if self.exists() else self.top)
        return st.f_bavail * st.f_frsize

    # -- writing
    def new_message(self):
        """A MessageWriter for a new message (creates and locks its df)."""
        return MessageWriter(self)

    def write_control(self, env):
        """Write env's control file: tf, fsync, rename over qf (or hf if held).
        (A new message's first one is written by MessageWriter.commit_steps.)"""
        tf = self.path("tf", env.id)
        final = self.path("hf" if env.held else "qf", env.id)
        data = format_control(env).encode("utf-8", "surrogateescape")
        try:
            fd = os.open(tf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                self.own(fd)
                os.write(fd, data) if len(data) < 65536 else _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tf, final)
        except OSError as e:
            try:
                os.unlink(tf)
            except OSError:
                pass
            raise _disk_error(e, f"write {final}") from None

    def rewrite(self, env):
        """Record a new state of a locked message."""
        self.write_control(env)

    # -- reading
    def ids(self, prefix="qf"):
        """Ids of messages with a control file of ``prefix``, oldest first."""
        n = len(prefix)
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(name[n:] for name in names if name.startswith(prefix) and valid_id(name[n:]))

    def read(self, qid):
        """The Envelope of message ``qid`` (qf, or hf when held)."""
        for prefix, held in (("qf", False), ("hf", True)):
            try:
                with open(self.path(prefix, qid), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            text = raw.decode("utf-8", "surrogateescape")     # never fails
            env = parse_control(text, qid)
            env.held = held
            try:
                env.size = os.stat(self.path("df", qid)).st_size
            except FileNotFoundError:
                raise SpoolCorrupt("control file without data file") from None
            return env
        raise FileNotFoundError(errno.ENOENT, "no such message", qid)

    def open_data(self, qid):
        return open(self.path("df", qid), "rb")

    def lock(self, qid, wait=False):
        """A MessageLock on ``qid``, or None if another process holds it or it
        has gone. ``wait`` blocks until the lock is free."""
        try:
            fd = os.open(self.path("df", qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if not (os.path.exists(self.path("qf", qid)) or os.path.exists(self.path("hf", qid))):
            os.close(fd)
            return None
        return MessageLock(self, qid, fd)

    def is_locked(self, qid):
        try:
            fd = os.open(self.path("df", qid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
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
            _unlink_quiet(self.path("hf", qid))
        try:
            os.unlink(self.path("df", qid))
        except FileNotFoundError:
            pass

    def hold(self, env):
        if not env.held:
            os.rename(self.path("qf", env.id), self.path("hf", env.id))
            env.held = True

    def release(self, env):
        if env.held:
            os.rename(self.path("hf", env.id), self.path("qf", env.id))
            env.held = False

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

    # -- the maildrop: submissions by users who cannot write queue/
    def drop(self, env, chunks):
        """Write a complete submission into maildrop/ as this (unprivileged) user.

        The file holds the control text, then the message. It is created 0600,
        written, fsync'd, and then marked complete by its owner-execute bit
        (0700); pickup() ignores files without it. Returns the file's name.
        """
        name = os.urandom(16).hex()
        path = os.path.join(self.maildrop, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise _disk_error(e, f"create {path}") from None
        try:
            with open(fd, "wb", buffering=256 * 1024, closefd=False) as f:
                env.id = env.id or "0" * 15
                f.write(format_control(env).encode("utf-8", "surrogateescape"))
                for chunk in chunks:
                    f.write(chunk)
            if self.fsync:
                os.fsync(fd)
            os.fchmod(fd, 0o700)
        except BaseException as e:
            os.close(fd)
            _unlink_quiet(path)
            if isinstance(e, OSError):
                raise _disk_error(e, f"write {path}") from None
            raise
        os.close(fd)
        return name

    def pickup(self, log=None, trusted_uids=(), hostname=None, mail_name="pymta"):
        """Commit every complete maildrop file to queue/; returns new ids.

        Trust nothing in the file but its owner: the uid comes from fstat,
        recipients lose every flag but DSN NOTIFY and n, states restart, and
        the client fields are cleared; program, file and :include: recipients
        are dropped. A file that fails to parse is removed and logged (the user
        has their own copy of a message they typed). The message gets its
        ``Received:`` line here, with its queue id and the owner's login
        (pass ``hostname=cfg.myhostname``). Must run as root to read the files.
        """
        try:
            names = os.listdir(self.maildrop)
        except FileNotFoundError:
            return []
        ids = []
        for name in sorted(names):
            path = os.path.join(self.maildrop, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                if e.errno == errno.ELOOP:      # a symbolic link planted there
                    if log:
                        log(f"maildrop/{name}: not a plain file, removed")
                    _unlink_quiet(path)
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
                    _unlink_quiet(path)
                    continue
                if not st.st_mode & stat.S_IXUSR:
                    if time.time() - st.st_mtime > 86400:
                        _unlink_quiet(path)
                    continue
                qid = self._pickup_one(fd, st, log, name, hostname, mail_name)
                _unlink_quiet(path)
                if qid:
                    ids.append(qid)
            finally:
                os.close(fd)
        return ids

    def _pickup_one(self, fd, st, log, name, hostname, mail_name):
        f = open(fd, "rb", closefd=False)
        head, size = [], 0
        while True:
            line = f.readline(1 << 20)
            size += len(line)
            if not line or size > MAILDROP_HEAD_MAX:
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
        with self.new_message() as w:
            w.write(_received(w.id, st.st_uid, hostname, mail_name))
            w.write(self._auth_warning(st.st_uid, env.sender, hostname))
            eight_bit = False
            while True:
                chunk = f.read(256 * 1024)
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


    def _auth_warning(self, uid, sender, hostname):
        """sendmail's X-Authentication-Warning: for a maildrop file whose
        envelope sender is not its owner's own address, when the owner is
        not trusted: written here, at pickup, from the file's owner (the
        only thing a maildrop file cannot forge). b"" when none is due."""
        if self.trusted_users is None:
            return b""
        import pwd
        from . import address as _address
        try:
            login = pwd.getpwuid(uid).pw_name
        except KeyError:
            login = f"uid{uid}"
        if login in self.trusted_users:
            return b""
        if sender in (login, _address.qualify(login, self.origin)):
            return b""
        shown = "".join(c if c.isprintable() and c not in "\r\n" else "?"
                        for c in sender) or "<>"
        host = hostname or os.uname().nodename
        return (f"X-Authentication-Warning: {host}: {login} set sender to {shown} "
                f"using -f\n").encode("utf-8", "surrogateescape")


MAILDROP_HEAD_MAX = 16 << 20


def _received(qid, uid, hostname, mail_name):
    """The Received: line of a message picked up from the maildrop."""
    import pwd
    import socket
    from email.utils import formatdate
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:
        login = f"uid{uid}"
    host = hostname or socket.gethostname()
    return (f"Received: (from {login}@localhost uid {uid})\n\tby {host} ({mail_name}) "
            f"id {qid};\n\t{formatdate(localtime=True)}\n").encode("utf-8", "surrogateescape")


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _writev_all(fd, chunks):
    """Write the byte strings of ``chunks`` in order, with as few calls as may be."""
    i = 0
    while i < len(chunks):
        n = os.writev(fd, chunks[i:i + 1024])
        while i < len(chunks) and n >= len(chunks[i]):
            n -= len(chunks[i])
            i += 1
        if n:
            chunks[i] = chunks[i][n:]


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
