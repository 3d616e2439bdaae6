"""The commit: the only way a message enters the queue.

A MessageWriter streams a new message into df<ID> of a Spool (pymta.queue_dir)
and commits it with its first control file (pymta.queue_file), whether it
came by SMTP, sendmail, the maildrop or is a bounce.

Its steps::

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

A rewrite, removal, and the message's lock are pymta.queue_dir's.
"""

import os
import time
import fcntl

from .queue_id import new_id
from .queue_dir import MessageLock
from .status import SpoolError

SYNC_DIR = "queue directory"     # MessageWriter.commit_steps: fsync the queue directory


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
        # The tf is written while the df's fsync runs; it gets its name only
        # once the df is durable.
        fd, final = self.spool.write_tf(env, new=True)
        tf = self._tf = self.spool.path("tf", self.id)
        try:
            if fsync:
                try:
                    yield self._lock_fd
                except OSError as e:
                    raise SpoolError.writing(e, f"write df{self.id}") from None
            try:
                # The control file is complete before it gets its name and
                # is fsync'd under it: nobody reads a partial one, and the
                # name is made durable with it (and with the directory).
                os.rename(tf, final)
                self._final = final
                if fsync:
                    yield (fd, SYNC_DIR)     # independent: may run at once
            except OSError as e:
                raise SpoolError.writing(e, f"write {final}") from None
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
