"""What fsyncs for the SMTP event loop (the kernel's asynchronous I/O, or
syncer processes), and the Committer that runs the loop's commits on it,
with the real kernel, processes, sockets and files."""

import errno
import os
import select
import signal
import smtplib
import time

import pytest

from pymta import envelope as E
from pymta import syncer
from pymta.queue_commit import Committer
from pymta.queue_dir import Spool
from pymta.status import SpoolError
from helpers import daemon, listener_pids, wait_for


def _run_until(syncers, done, timeout=10):
    deadline = time.time() + timeout
    while not done() and time.time() < deadline:
        ready, _, _ = select.select(list(syncers.socks), [], [], 0.2)
        for sock in ready:
            syncers.ready(sock)
    assert done()


def test_syncers_fsync_descriptors_and_answer(tmp_path):
    s = syncer.Syncers(2)
    try:
        assert len(s.pids) == 2
        results = []
        fds = []
        for i in range(5):       # more than there are syncers: the rest wait their turn
            fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x" * 100)
            fds.append(fd)
            s.submit(fd, results.append)
        _run_until(s, lambda: len(results) == 5)
        assert results == [None] * 5
        for fd in fds:
            os.fstat(fd)        # the caller's descriptors stay open
            os.close(fd)
    finally:
        s.close()
    assert s.pids == []


def test_a_dead_syncer_is_dropped_and_fsync_goes_on_in_the_caller(tmp_path):
    s = syncer.Syncers(1)
    try:
        os.kill(s.pids[0], signal.SIGKILL)
        os.waitpid(s.pids[0], 0)
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        results = []
        s.submit(fd, results.append)     # EPIPE: dropped, and fsync'd here
        assert results == [None]
        assert s.socks == []
        later = []
        s.submit(fd, later.append)      # no syncer left: fsync'd at once, here
        assert later == [None]
        os.close(fd)
    finally:
        s.pids = []
        s.close()


def test_a_syncer_that_dies_holding_a_request_has_it_done_again(tmp_path):
    s = syncer.Syncers(2)
    try:
        victim = s.pids[-1]             # submit takes the last idle syncer
        os.kill(victim, signal.SIGSTOP)  # it will never read the request
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        results = []
        s.submit(fd, results.append)    # sent into the stopped syncer's socket
        assert results == []
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        _run_until(s, lambda: results)
        assert results == [None]        # done by the other syncer, not failed
        assert len(s.socks) == 1
        more = []
        s.submit(fd, more.append)
        _run_until(s, lambda: more)
        assert more == [None]
        os.close(fd)
    finally:
        s.close()


class CountingSyncers(syncer.Syncers):
    def __init__(self, n):
        super().__init__(n)
        self.submitted = 0

    def submit(self, fd, callback):
        self.submitted += 1
        super().submit(fd, callback)


def test_requests_made_during_a_directory_fsync_share_the_next_one(tmp_path):
    s = CountingSyncers(2)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ds = syncer.DirSync(s, dfd)
        results = []
        ds.request(results.append)          # starts a fsync at once
        for _ in range(10):                 # all wait for, and share, a second one
            ds.request(results.append)
        _run_until(s, lambda: len(results) == 11)
        assert results == [None] * 11
        assert s.submitted == 2
    finally:
        os.close(dfd)
        s.close()


def _kernel_syncer(log=None):
    try:
        return syncer.KernelSyncer.open(log)
    except OSError as e:
        pytest.skip(f"no asynchronous fsync in this kernel: {e}")


def test_the_kernel_fsyncs_descriptors_and_more_than_its_ring_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(syncer, "_RING", 4)
    k = _kernel_syncer()
    try:
        assert k.pids == [] and len(k.socks) == 1
        results, fds = [], []
        for i in range(10):
            fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x" * 100)
            fds.append(fd)
            k.submit(fd, lambda err, i=i: results.append((i, err)))
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        k.submit(dfd, lambda err: results.append(("dir", err)))
        assert len(k.busy) == 4 and len(k.waiting) == 7 and results == []
        _run_until(k, lambda: len(results) == 11)
        assert sorted(map(str, results)) == sorted(str((i, None)) for i in [*range(10), "dir"])
        assert not k.busy and not k.waiting
        for fd in fds + [dfd]:
            os.fstat(fd)        # the caller's descriptors stay open
            os.close(fd)
    finally:
        k.close()
    assert k.socks == []


def test_requests_the_kernel_has_no_room_for_wait_then_are_done_here(tmp_path, monkeypatch):
    """io_submit's EAGAIN: the request waits for a completion, and is done
    in the caller's thread once nothing is in flight, never spun on."""
    monkeypatch.setattr(syncer, "_RING", 2)
    k = _kernel_syncer()
    fds = []
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("spun on EAGAIN"))
    signal.alarm(20)
    try:
        results = []
        for i in range(3):
            fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            fds.append(fd)
            k.submit(fd, results.append)
        assert len(k.busy) == 2 and len(k.waiting) == 1
        monkeypatch.setattr(k, "_start", lambda fd, callback: errno.EAGAIN)
        _run_until(k, lambda: len(results) == 3)
        assert results == [None] * 3 and not k.waiting and not k.busy
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for fd in fds:
            os.close(fd)
        k.close()


def test_an_fsync_the_kernel_refuses_is_done_by_the_caller_and_fails_as_fsync(tmp_path):
    k = _kernel_syncer()
    r, w = os.pipe()
    try:
        results = []
        k.submit(w, results.append)     # a pipe has no fsync: refused at submission
        err, = results
        assert isinstance(err, OSError) and err.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
        k.close()


def test_a_failed_fsync_is_reported_with_its_errno(tmp_path, monkeypatch):
    """The errno of a completion (a negative result) reaches the callback."""
    k = _kernel_syncer()
    try:
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        results = []
        k.submit(fd, results.append)
        real = k._syscall

        def getevents_failing(nr, *args):      # the completion as a failed write-back reports it
            n = real(nr, *args)
            if nr is k._getevents and n > 0:
                k._events[0].res = -errno.EIO
            return n
        monkeypatch.setattr(k, "_syscall", getevents_failing)
        _run_until(k, lambda: results)
        err, = results
        assert isinstance(err, OSError) and err.errno == errno.EIO
        os.close(fd)
    finally:
        k.close()


def test_a_committed_message_is_unlocked_once_closed_whoever_holds_its_file(tmp_path):
    """The kernel holds the df's open file for a moment after an fsync it
    did completes (its request drops the file after posting the event), and
    a close drops a flock only with the last reference: the message must be
    free for the master at once all the same (the master skips one it finds
    locked, which would then wait for the next queue run). A duplicate of
    the descriptor stands for the kernel's reference."""
    import fcntl
    spool = _spool(tmp_path)
    c = _committer(2, True)
    try:
        w, env = _writer(spool)
        results = []
        c.commit(w, env, results.append)
        _run_until(c, lambda: results)
        assert results == [w.id]
        kernels = os.dup(w.data_fd)
        w.close()
        fd = os.open(spool.path("df", w.id), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # not BlockingIOError
        finally:
            os.close(fd)
            os.close(kernels)
    finally:
        c.close()


def test_where_the_kernel_cannot_the_committer_says_so_and_forks_syncers(monkeypatch):
    def refused(log=None):
        raise OSError(errno.EPERM, "io_setup: Operation not permitted")
    monkeypatch.setattr(syncer.KernelSyncer, "open", refused)
    warned = []

    class Log:
        def warning(self, msg):
            warned.append(msg)
    c = Committer(2, Log(), aio=True)
    try:
        assert isinstance(c.syncers, syncer.Syncers) and len(c.syncers.pids) == 2
        assert warned == ["warning: no asynchronous fsync in this kernel (io_setup: Operation not "
                          "permitted): fsyncs in syncer processes"]
    finally:
        c.close()


def test_daemon_commits_through_the_kernel_with_no_syncer_process(inst):
    assert inst.cfg.smtpd_loop_fsync == "aio"      # the default
    _kernel_syncer().close()
    with daemon(inst) as (p, port):
        listener = wait_for(lambda: listener_pids(inst))[-1]
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                assert c.sendmail("a@b.example", ["root@example.test"],
                                  b"Subject: aio %d\r\n\r\nx\r\n" % n) == {}
        kids = open(f"/proc/{listener}/task/{listener}/children").read().split()
        assert kids == [], "a listener that fsyncs through the kernel forks no syncer"
        assert "no asynchronous fsync" not in inst.maillog()


def test_daemon_accepts_mail_after_its_syncers_are_killed(inst):
    inst.write_config(smtpd_loop_fsync="processes")
    with daemon(inst) as (p, port):
        listener = wait_for(lambda: listener_pids(inst))[-1]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: one\r\n\r\nx\r\n") == {}
        kids = [int(x) for x in open(f"/proc/{listener}/task/{listener}/children").read().split()]
        assert kids, "the listener has no syncer processes"
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                assert c.sendmail("a@b.example", ["root@example.test"],
                                  b"Subject: after %d\r\n\r\nx\r\n" % n) == {}
        assert wait_for(lambda: "a syncer process is gone" in inst.maillog())


def _spool(tmp_path):
    spool = Spool(str(tmp_path / "q"))
    spool.create()
    return spool


def _writer(spool, text=b"Subject: x\n\nbody\n"):
    w = spool.new_message()
    w.write(text)
    return w, E.Envelope(sender="a@b.example", recipients=[E.Recipient("u@example.test")])


def _committer(n, aio):
    c = Committer(n, aio=aio)
    if aio and not isinstance(c.syncers, syncer.KernelSyncer):
        c.close()
        pytest.skip("no asynchronous fsync in this kernel")
    assert isinstance(c.syncers, syncer.KernelSyncer if aio else syncer.Syncers)
    return c


@pytest.mark.parametrize("aio", [False, True], ids=["processes", "aio"])
def test_the_committer_commits_through_its_syncers(tmp_path, aio):
    spool = _spool(tmp_path)
    c = _committer(2, aio)
    try:
        assert len(c.socks) == (1 if aio else 2)
        results, writers = [], []
        for i in range(6):       # more than there are syncers
            w, env = _writer(spool, b"Subject: %d\n\nbody\n" % i)
            writers.append(w)
            c.commit(w, env, results.append)
        assert not any(w.committed for w in writers)     # nothing waited here
        _run_until(c, lambda: len(results) == 6)
        assert sorted(results) == sorted(w.id for w in writers)
        for w in writers:
            w.close()
            assert spool.read(w.id).sender == "a@b.example"
        assert sorted(n[:2] for n in os.listdir(spool.dir)) == ["df"] * 6 + ["qf"] * 6
    finally:
        c.close()


def _failing_fsync(monkeypatch, which):
    real = os.fsync

    def fsync(fd):
        if fd == which():
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_data_fsync_leaves_no_control_file(tmp_path, monkeypatch):
    spool = _spool(tmp_path)
    c = Committer(0)         # no syncer: the fsyncs are done here, through os.fsync
    w, env = _writer(spool)
    _failing_fsync(monkeypatch, lambda: w.data_fd)
    results = []
    c.commit(w, env, results.append)
    err, = results
    assert isinstance(err, SpoolError) and "Input/output error" in str(err)
    assert sorted(n[:2] for n in os.listdir(spool.dir)) == ["df", "tf"]     # never renamed
    w.abort()
    assert os.listdir(spool.dir) == []


def test_a_failed_directory_fsync_fails_the_commit(tmp_path, monkeypatch):
    spool = _spool(tmp_path)
    c = Committer(0)
    w, env = _writer(spool)
    _failing_fsync(monkeypatch, spool.dir_fd)
    results = []
    c.commit(w, env, results.append)
    err, = results
    assert isinstance(err, SpoolError) and not w.committed
    w.abort()                # the client got 4xx: the qf goes first, then the df
    assert os.listdir(spool.dir) == []


def test_one_round_a_failed_data_fsync_fails_the_commit_and_leaves_nothing(tmp_path, monkeypatch):
    spool = _spool(tmp_path)
    c = Committer(0)
    w = spool.new_message(check=True)
    if not w.checked:
        pytest.skip("no kernel boot id here: the ordered commit")
    w.write(b"Subject: x\n\nbody\n")
    env = E.Envelope(sender="a@b.example", recipients=[E.Recipient("u@example.test")])
    _failing_fsync(monkeypatch, lambda: w.data_fd)
    results = []
    c.commit(w, env, results.append)
    err, = results
    assert isinstance(err, SpoolError) and "Input/output error" in str(err) and not w.committed
    # One round: the control file was renamed before the fsyncs (its D
    # line makes a df torn by a system crash detectable).
    assert sorted(n[:2] for n in os.listdir(spool.dir)) == ["df", "qf"]
    w.abort()                # the client got 4xx: the qf goes first, then the df
    assert os.listdir(spool.dir) == []


@pytest.mark.parametrize("aio", [False, True], ids=["processes", "aio"])
def test_one_round_commits_through_the_syncers_at_once(tmp_path, aio):
    spool = _spool(tmp_path)
    c = _committer(3, aio)
    try:
        results, writers = [], []
        for i in range(5):
            w = spool.new_message(check=True)
            w.write(b"Subject: %d\n\nbody\n" % i)
            writers.append(w)
            c.commit(w, E.Envelope(sender="a@b.example", recipients=[E.Recipient("u@example.test")]),
                     results.append)
        assert not any(w.committed for w in writers)
        _run_until(c, lambda: len(results) == 5)
        assert sorted(results) == sorted(w.id for w in writers)
        for w in writers:
            w.close()
            env = spool.read(w.id)
            assert env.df_length == env.size and spool.verify_data(env) is False
    finally:
        c.close()
