"""The commit: the only way a message enters the queue.

A :class:`MessageWriter` streams a new message into df<ID> of a Spool
(pymta.queue_dir) and commits it with its first control file
(pymta.queue_file), whether it came by SMTP, sendmail, the maildrop or is
a bounce. The ordered commit, in this order and no other::

    step                                 crash here leaves     what happens
    0 data arrives, held in memory       nothing               (no file until 256 KB or commit)
    1 create df<ID> O_EXCL, flock it     df only               swept after queue_sweep_age
    2 write the rest of df               df only               swept
    3 write tf<ID> whole                 df + tf               both swept
    4 fsync df                           df + tf               both swept
    5 rename tf<ID> -> qf<ID>, fsync qf  df + qf, or a torn qf queued (a torn qf is quarantined)
    6 fsync queue/                       df + qf, durable      reply 250 / exit 0

The writer has these steps as plain methods: :meth:`MessageWriter.prepare`
(steps 1 to 3), :meth:`~MessageWriter.publish` (the rename of step 5) and
:meth:`~MessageWriter.done`; the fsyncs between them are the caller's.
:meth:`MessageWriter.commit` is the blocking commit, the steps in a row,
for sendmail, the maildrop pickup, bounces and the blocking SMTP pump
(the sessions of the ``threads`` model share step 6 through the spool's
``dir_sync``: :mod:`pymta.queue_groupsync`).

The control file is renamed before its fsync, not after: nobody ever reads
a partial one (it is written whole under the tf name), the df is durable
before the qf name exists, and one fsync makes both the qf's content and,
with step 6, its name durable. A crash before step 6 leaves a message that
was never acknowledged: at worst it is delivered and the client sends it
again.

:class:`Committer` commits for the SMTP server's event loop, which must
not block: it owns the syncer processes that do the fsyncs
(:mod:`pymta.syncer`) and shares one fsync of the queue directory among the
commits ready for it (group commit). Its writers (``check``) compute the
df's CRC-32 as the data goes by, and the control file records it with the
df's length and the kernel's boot id (its D line, pymta.queue_file), so
that the fsyncs need one round, all three at once (the disk's time for
one round against two, and one wait for the syncers instead of two)::

    step                                 crash here leaves     what happens
    0 to 3 as above                      as above
    4 rename tf<ID> -> qf<ID>            df + qf               see below
    5 fsync df, qf and queue/ at once    df + qf               see below
    6 all three done                     df + qf, durable      reply 250

A process crash during steps 4 and 5 cannot tear a file (the data is in
the page cache): the message, never acknowledged, is delivered (at worst
twice, when the client sends it again). A crash of the system there may
leave, besides the states of the ordered commit, a whole qf with a df
that is short, empty or wrong. Its D line tells: the first delivery
attempt after a restart of the system (another boot id) checks the df's
length and CRC-32 (Spool.verify_data); a mismatch means the commit never
finished, so its 250 was never sent, and the message is quarantined (qf
-> Qf, as a torn qf is), never delivered. A match is recorded (the boot
id of the attempt's rewrite): a message is checked at most once per
restart. Without a boot id (not Linux) the Committer makes the ordered
commit, the fsyncs of steps 5 and 6 at once. No df is ever written to
after its commit, so the D line stays true; a rewrite of the qf keeps it.

The blocking commit stays ordered: its fsyncs one after another cost
about the same in either order, and sendmail needs neither zlib nor a
boot id.

A rewrite, removal, and the message's lock are pymta.queue_dir's.
"""

import os
import time
import fcntl

from .queue_id import new_id
from .queue_dir import MessageLock, boot_id
from .status import MESSAGE_BLOCK, SpoolError


class MessageWriter:
    """Streams one new message into df<ID> and commits it.

    The df is created when the first 256 KB have arrived, or at commit: a
    small message costs one create, one write and one fsync, all in the
    commit. The id is chosen at once (the Received: header names it);
    should its df exist by then, the commit takes a fresh id.

    Use as a context manager: leaving it without a commit removes the df.
    After the commit the writer still holds the message's lock;
    ``handoff()`` passes that lock to the caller (to deliver at once),
    ``close()`` drops it.
    """

    SPILL = MESSAGE_BLOCK

    def __init__(self, spool, check=False):
        self.spool = spool
        self.size = 0
        # The df's CRC-32, as the data goes by, when the control file is to
        # record it (check): the one-round commit's (Committer).
        self._crc = self._crc32 = None
        if check and boot_id():
            from zlib import crc32      # not on sendmail's path
            self._crc, self._crc32 = 0, crc32
        self.committed = False
        self._lock_fd = None       # the df, open and locked
        self._tf_fd = None         # the control file, from prepare() to done()
        self._buf = []
        self._buffered = 0
        self._tf = self._final = None
        self._published = False
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
                raise SpoolError.writing(e, f"create {path}") from None
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
                raise SpoolError.writing(e, f"write df{self.id}") from None

    def write(self, data):
        if not isinstance(data, bytes):
            data = bytes(data)
        self._buf.append(data)
        self._buffered += len(data)
        if self._crc is not None:
            self._crc = self._crc32(data, self._crc)
        self.size += len(data)
        if self._buffered >= self.SPILL:
            self._spill()

    # -- the commit, step by step
    def prepare(self, env):
        """Steps 1 to 3: the rest of the data into the df (created now if
        it was not), ``env`` completed (id, size, arrival, priority), the
        control file written whole under its tf name. Next: fsync
        :attr:`data_fd`, then :meth:`publish`."""
        self._spill()
        env.id = self.id
        env.size = self.size
        if not env.created:
            env.created = int(time.time())
        if not env.priority:
            env.priority = self.size
        # The D line: set here or cleared (a maildrop file may carry one).
        if self._crc is not None:
            env.df_length, env.df_crc, env.df_boot = self.size, self._crc, boot_id()
        else:
            env.df_length, env.df_crc, env.df_boot = -1, 0, ""
        self._tf_fd, self._final = self.spool.write_tf(env, new=True)
        self._tf = self.spool.path("tf", self.id)

    @property
    def checked(self):
        """Whether the control file records the df's length, CRC-32 and boot
        id: then the df's fsync may run with the control file's."""
        return self._crc is not None

    @property
    def data_fd(self):
        """The df's descriptor, to fsync after prepare()."""
        return self._lock_fd

    @property
    def control_fd(self):
        """The control file's descriptor, to fsync after publish()."""
        return self._tf_fd

    def publish(self):
        """The rename of step 5, once the df is durable: the control file
        gets its name (qf, or hf when held). Next: fsync :attr:`control_fd`
        and the queue directory (in either order, or at once), then
        :meth:`done`."""
        try:
            os.rename(self._tf, self._final)
        except OSError as e:
            raise SpoolError.writing(e, f"write {self._final}") from None
        self._published = True

    def done(self):
        """Step 6 is over: the message is in the queue. Returns its id."""
        os.close(self._tf_fd)
        self._tf_fd = None
        self.committed = True
        return self.id

    def data_error(self, e):
        """The SpoolError for a failed fsync of the df (an OSError)."""
        return SpoolError.writing(e, f"write df{self.id}")

    def control_error(self, e):
        """The SpoolError for a failed fsync of the control file or the
        queue directory (an OSError)."""
        return SpoolError.writing(e, f"write {self._final}")

    def commit(self, env):
        """The blocking commit (steps 1 to 6 above); returns the id."""
        self.prepare(env)
        if self.spool.fsync:
            try:
                os.fsync(self.data_fd)
            except OSError as e:
                raise self.data_error(e) from None
        self.publish()
        if self.spool.fsync:
            try:
                os.fsync(self.control_fd)
                self.spool.sync_dir()
            except OSError as e:
                raise self.control_error(e) from None
        return self.done()

    # -- after the commit, or instead of it
    def abort(self):
        """Remove what the commit made so far: the control file first (a
        df without one is never delivered), then the df."""
        if not self.committed and self._lock_fd is not None:
            for path in (self._final if self._published else None, self._tf,
                         self.spool.path("df", self.id)):
                if not path:
                    continue
                try:
                    os.unlink(path)
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
            # Unlocked before it is closed: a close drops the flock only with
            # the last reference to the open file, and an fsync the kernel
            # did for the loop (pymta.syncer.KernelSyncer) may hold one for a
            # moment after its completion, long enough for the master to
            # find the message locked and leave it to the next queue run.
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        for name in ("_tf_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.committed:
            self.close()
        else:
            self.abort()


class Committer:
    """The commits of the SMTP server's event loop, none of which blocks
    it: ``commit(writer, envelope, done)`` runs the steps above and calls
    ``done(result)``, the queue id or the exception the commit failed with
    (the caller then aborts the writer).

    With ``aio`` (and ``n`` > 0) the kernel does the fsyncs
    (:class:`pymta.syncer.KernelSyncer`); otherwise, or where the kernel
    cannot, it owns ``n`` syncer processes (forked here: make it while the
    process has no other thread). The loop watches :attr:`socks` and calls
    :meth:`ready` for each that is readable, which is where the steps go
    on. With ``n`` = 0, or no syncer (none could be forked, or all died),
    the fsyncs are done in the caller's thread. ``on_lost(sock)`` is called
    for a syncer's socket before it is closed."""

    def __init__(self, n, log=None, on_lost=None, aio=False):
        from .syncer import DirSync, KernelSyncer, Syncers   # not on sendmail's path
        self.log = log
        self.syncers = None
        if n and aio:
            try:
                self.syncers = KernelSyncer.open(log)
            except OSError as e:
                if log:
                    log.warning(f"warning: no asynchronous fsync in this kernel ({e.strerror or e}): "
                                "fsyncs in syncer processes")
        if self.syncers is None:
            self.syncers = Syncers(n, log)
        self.syncers.on_lost = on_lost
        self._dirsync = DirSync
        self._dirsyncs = {}     # queue directory -> its DirSync

    @property
    def socks(self):
        return self.syncers.socks

    def ready(self, sock):
        self.syncers.ready(sock)

    def close(self):
        self.syncers.close()

    def commit(self, writer, env, done):
        try:
            writer.prepare(env)
        except Exception as e:   # noqa: BLE001 - every failure is the client's 4xx
            return self._failed(writer, done, e)
        if not writer.spool.fsync:
            return self._data_synced(writer, done, None)
        if writer.checked:
            return self._one_round(writer, done)
        self.syncers.submit(writer.data_fd, lambda err: self._data_synced(writer, done, err))

    def _one_round(self, writer, done):
        """The control file records the df's length and CRC-32: rename
        first, then the df, the control file and the directory at once."""
        try:
            writer.publish()
        except Exception as e:   # noqa: BLE001 - as in commit()
            return self._failed(writer, done, e)
        left = [3, None, None]      # fsyncs to go, the df's error, the control file's

        def data_done(err):
            left[1] = err
            one_done(None)

        def one_done(err):
            left[0] -= 1
            left[2] = left[2] or err
            if left[0] == 0:
                if left[1] is not None:
                    return done(writer.data_error(left[1]))
                self._finish(writer, done, left[2])
        self._sync_dir(writer.spool, one_done)   # the directory's first: others may share it
        self.syncers.submit(writer.data_fd, data_done)
        self.syncers.submit(writer.control_fd, one_done)

    def _data_synced(self, writer, done, err):
        if err is not None:
            return done(writer.data_error(err))
        try:
            writer.publish()
        except Exception as e:   # noqa: BLE001 - as in commit()
            return self._failed(writer, done, e)
        if not writer.spool.fsync:
            return self._finish(writer, done, None)
        # The control file and the directory at once: go on when both are done.
        left = [2, None]

        def one_done(err):
            left[0] -= 1
            left[1] = left[1] or err
            if left[0] == 0:
                self._finish(writer, done, left[1])
        self._sync_dir(writer.spool, one_done)   # the directory's first: others may share it
        self.syncers.submit(writer.control_fd, one_done)

    def _finish(self, writer, done, err):
        if err is not None:
            return done(writer.control_error(err))
        done(writer.done())

    def _failed(self, writer, done, e):
        if not isinstance(e, (SpoolError, OSError)) and self.log:
            self.log.exception(f"error: commit of {writer.id}")
        done(e)

    def _sync_dir(self, spool, callback):
        ds = self._dirsyncs.get(spool.dir)
        if ds is None or ds.spool is not spool:
            ds = self._dirsyncs[spool.dir] = self._dirsync(self.syncers, spool.dir_fd())
            ds.spool = spool
        ds.request(callback)


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
