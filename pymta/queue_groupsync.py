"""Group commit of the queue directory's fsync among the threads of one process.

A message is acknowledged only after the queue directory was fsync'd
following the rename of its control file (the commit's step 6, see
:mod:`pymta.queue_commit`). When many sessions commit at once, as those of the
threaded listener (:mod:`pymta.smtpd_threads`) do, they need not fsync
the directory once each: one fsync makes durable every rename done before
it *started* (one already running may have begun before a rename, and
proves nothing about it). :class:`GroupSync` is that rule, as a
leader/follower protocol on a condition variable:

- a thread that needs the fsync takes the number of the next fsync to
  start (its *generation*);
- if no fsync runs, it becomes the leader: it starts that generation and
  fsyncs, without the lock, for itself and for every thread that took the
  same number meanwhile; then it records the result and wakes them all;
- else it waits (a follower). When the running fsync ends, its generation
  has not started yet: the first waiter to wake leads it.

So one directory fsync runs at a time, and a thread waits at most for the
one running and then its own, which serves all who came during the first.
A failed fsync is an error for every thread of its generation (each
raises an OSError: none of their messages is acknowledged); the next
generation tries again. With one thread at a time each call is one plain
fsync, so a lone session pays nothing for the sharing.

The callers of one GroupSync pass descriptors of one directory (the
spool's ``dir_fd()``: a GroupSync's ``sync`` is what the Spool's
``dir_sync`` is set to); the leader fsyncs its own. Threads only: it does
not span processes (the event loop's :class:`pymta.queue_commit.Committer`
applies the same rule to its syncer processes).
"""

import errno
import os
import threading


class GroupSync:
    """``sync(fd)`` returns once an fsync of the directory ``fd`` names,
    started after the call, has succeeded; raises OSError if it failed."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._started = 0       # the last generation started
        self._done = 0          # the last generation finished (they finish in order)
        self._running = False
        self._members = {}      # generation not finished -> threads it covers
        self._failed = {}       # finished generation -> [OSError, threads yet to see it]

    def sync(self, fd):
        with self._cond:
            gen = self._started + 1
            self._members[gen] = self._members.get(gen, 0) + 1
            while self._done < gen:
                if not self._running:       # nothing runs: _started == gen - 1
                    self._running = True
                    self._started = gen
                    break
                self._cond.wait()
            else:
                failed = self._failed.get(gen)
                if failed is None:
                    return
                failed[1] -= 1
                if not failed[1]:
                    del self._failed[gen]
                raise OSError(failed[0].errno, failed[0].strerror)
        err = None
        try:
            os.fsync(fd)
        except BaseException as e:
            err = e
            raise
        finally:
            with self._cond:
                self._running = False
                self._done = gen
                others = self._members.pop(gen) - 1
                if err is not None and others:
                    if not isinstance(err, OSError) or err.errno is None:
                        err = OSError(errno.EIO, f"fsync of the queue directory: {err!r}")
                    self._failed[gen] = [err, others]
                self._cond.notify_all()
