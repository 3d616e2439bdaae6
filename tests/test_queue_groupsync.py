"""Group commit of the queue directory's fsync: real threads on a real
directory, with os.fsync wrapped to count the calls and to hold one at
will (what a slow disk does)."""

import errno
import os
import threading
import time

import pytest

from pymta import envelope as E
from pymta import queue_groupsync
from pymta.queue_dir import Spool
from pymta.queue_groupsync import GroupSync
from pymta.queue_commit import MessageWriter

pytestmark = pytest.mark.unit


class Disk:
    """os.fsync as seen by GroupSync: counted; the calls can be held (each
    waits for the gate) or made to fail."""

    def __init__(self, monkeypatch):
        self.real = os.fsync
        self.calls = 0
        self.started = threading.Semaphore(0)
        self.gate = None
        self.fail = None
        self.lock = threading.Lock()
        monkeypatch.setattr(queue_groupsync.os, "fsync", self.fsync)

    def fsync(self, fd):
        with self.lock:
            self.calls += 1
            fail, self.fail = self.fail, None
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.real(fd)
        if fail is not None:
            raise fail

    def wait_started(self):
        assert self.started.acquire(timeout=10)


@pytest.fixture
def dirfd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def call(group, fd):
    """sync() in a thread of its own; the thread, and its result (None or
    the exception) in ``t.result`` once done."""
    def run():
        try:
            group.sync(fd)
            t.result = None
        except BaseException as e:    # noqa: BLE001 - looked at by the test
            t.result = e
    t = threading.Thread(target=run)
    t.result = "running"
    t.start()
    return t


def wait_waiting(group, n):
    """Until ``n`` threads wait in ``group`` for a generation not begun."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with group._cond:
            if group._members.get(group._started + 1, 0) >= n:
                return
        time.sleep(0.005)
    raise AssertionError(f"{n} threads did not come to wait")


def test_alone_each_sync_is_one_fsync(monkeypatch, dirfd):
    disk = Disk(monkeypatch)
    group = GroupSync()
    for _ in range(5):
        group.sync(dirfd)
    assert disk.calls == 5


def test_a_sync_asked_during_an_fsync_waits_for_the_next_one(monkeypatch, dirfd):
    disk = Disk(monkeypatch)
    disk.gate = threading.Event()
    group = GroupSync()
    first = call(group, dirfd)
    disk.wait_started()                # the first fsync runs (held)
    second = call(group, dirfd)
    wait_waiting(group, 1)
    assert second.result == "running" and disk.calls == 1
    # The first fsync ends: it may have begun before the second's rename,
    # so the second gets an fsync of its own.
    disk.gate.set()
    first.join(10)
    second.join(10)
    assert (first.result, second.result) == (None, None)
    assert disk.calls == 2


def test_the_threads_that_come_during_an_fsync_share_the_next(monkeypatch, dirfd):
    disk = Disk(monkeypatch)
    disk.gate = threading.Event()
    group = GroupSync()
    leader = call(group, dirfd)
    disk.wait_started()
    followers = [call(group, dirfd) for _ in range(12)]
    wait_waiting(group, 12)
    assert all(t.result == "running" for t in followers)
    disk.gate.set()
    for t in [leader] + followers:
        t.join(10)
    assert [t.result for t in [leader] + followers] == [None] * 13
    assert disk.calls == 2              # the leader's, then one for all twelve


def test_a_failed_fsync_fails_every_thread_it_covered_and_the_next_tries_again(monkeypatch,
                                                                              dirfd):
    disk = Disk(monkeypatch)
    disk.gate = threading.Event()
    group = GroupSync()
    leader = call(group, dirfd)
    disk.wait_started()
    followers = [call(group, dirfd) for _ in range(5)]
    wait_waiting(group, 5)
    disk.fail = OSError(errno.EIO, "Input/output error")   # the second fsync
    disk.gate.set()
    for t in [leader] + followers:
        t.join(10)
    assert leader.result is None
    assert all(isinstance(t.result, OSError) and t.result.errno == errno.EIO for t in followers)
    assert group._failed == {}          # every thread of it has seen the error
    group.sync(dirfd)                   # the disk is well again
    assert disk.calls == 3


def test_concurrent_commits_share_directory_fsyncs_and_each_is_durable(monkeypatch, tmp_path):
    """Writers committing at once through a spool whose dir_sync is a
    GroupSync: every message is whole in the queue, and each commit
    returned only after a directory fsync that began after its rename."""
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    group = GroupSync()
    spool.dir_sync = group.sync
    events = []                 # (time, what, qid or None)
    lock = threading.Lock()
    real_rename, real_fsync = os.rename, os.fsync
    dirfd = spool.dir_fd()

    def rename(src, dst):
        real_rename(src, dst)
        with lock:
            events.append((time.monotonic(), "rename", os.path.basename(dst)[2:]))

    def fsync(fd):
        if fd != dirfd:
            return real_fsync(fd)
        t0 = time.monotonic()
        time.sleep(0.02)                # a disk that takes its time
        real_fsync(fd)
        with lock:
            events.append((t0, "dir fsync", time.monotonic()))
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    done = {}
    start = threading.Barrier(20)

    def commit(i):
        env = E.Envelope(sender="a@b.example", recipients=[E.Recipient("root@example.test")])
        with MessageWriter(spool) as w:
            w.write(b"Subject: %d\n\nbody\n" % i)
            start.wait(10)
            qid = w.commit(env)
        done[qid] = time.monotonic()
    threads = [threading.Thread(target=commit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(done) == 20
    renamed = {qid: t for t, what, qid in events if what == "rename"}
    syncs = [(t0, t1) for t0, what, t1 in events if what == "dir fsync"]
    for qid, acked in done.items():
        assert any(t0 >= renamed[qid] and t1 <= acked for t0, t1 in syncs), qid
        assert spool.read(qid).recipients[0].address == "root@example.test"
    assert len(syncs) < 20, "no directory fsync was shared"
