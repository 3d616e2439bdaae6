"""Deliveries to one mailbox or file combined into batches (workers.Pool,
local_mbox.deliver_batch): one lock, every message appended all or nothing,
one fsync, each message's own outcome; and a bounded number of workers
however many deliveries wait. Real worker processes, real files, a real
daemon."""

import fcntl
import mailbox
import os
import pwd
import resource
import shutil
import smtplib
import tempfile
import threading

import pytest

from conftest import Instance
from helpers import daemon, wait_for
from pymta import envelope as E
from pymta import forkserver, local, local_target, route, workers
from pymta.queue_dir import Spool

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (workers per identity)")


@pytest.fixture
def open_dir():
    """A directory default_privs can reach, removed afterwards."""
    path = tempfile.mkdtemp(prefix="pymta-batch-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pool():
    """The module's pool, its workers forked by a fork server (as in the
    daemon: the test's threads forbid a direct fork), none left after."""
    workers.POOL.close_all()
    forkserver.start()
    yield workers.POOL
    workers.POOL.close_all()
    forkserver.stop()


def _queue(inst, body, rcpt):
    cfg = inst.cfg
    env = E.Envelope(sender="alice@remote.test")
    r = env.add_recipient(rcpt.address, flags=rcpt.flags)
    r.parent = rcpt.parent
    with Spool.from_config(cfg).new_message() as w:
        w.write(body)
        w.commit(env)
    return env


def _file_target(cfg, path):
    rcpt = E.Recipient(path, flags="a", parent="archive@mx.example.test")
    r = route.Router(cfg).route(rcpt)
    assert r.kind == "local" and r.target.kind == "file"
    return rcpt, r.target


def _waiting(pool):
    with pool._lock:
        return sum(len(v) for v in pool._batches.values())


def _deliver_held(inst, pool, path, bodies):
    """Deliver ``bodies`` to file ``path`` from a thread each while the test
    holds the file's fcntl lock: the first goes alone and waits for the lock
    in its worker, the others queue behind it; once all wait, the lock is
    let go. Returns the replies, in the order of ``bodies``."""
    cfg = inst.cfg
    rcpt, target = _file_target(cfg, path)
    envs = [_queue(inst, b, rcpt) for b in bodies]
    replies = [None] * len(bodies)

    def one(i):
        replies[i] = local.deliver(cfg, envs[i], rcpt, target)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchown(fd, *_nobody())
    fcntl.lockf(fd, fcntl.LOCK_EX)
    threads = []
    try:
        threads.append(threading.Thread(target=one, args=(0,)))
        threads[0].start()
        assert wait_for(lambda: _busy(pool) == 1)     # the first, alone, in its worker
        for i in range(1, len(bodies)):
            threads.append(threading.Thread(target=one, args=(i,)))
            threads[-1].start()
        assert wait_for(lambda: _waiting(pool) == len(bodies) - 1)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
        for t in threads:
            t.join(60)
    return replies


def _busy(pool):
    """Workers alive and not idle."""
    with pool._lock:
        return sum(pool._alive.values()) - sum(len(v) for v in pool._idle.values())


def _nobody():
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _body(n, extra=b""):
    return (b"Subject: m%d\nMessage-ID: <m%d@test>\n\nline one\nFrom the start\n" % (n, n)
            + extra + b"end of m%d\n" % n)


@needs_root
def test_waiting_deliveries_to_one_file_go_as_one_batch(tmp_path, open_dir, pool):
    inst = Instance(tmp_path / "inst")
    path = os.path.join(open_dir, "log")
    before = (pool.batches, pool.spawned)
    replies = _deliver_held(inst, pool, path, [_body(n) for n in range(8)])
    assert [r.code for r in replies] == [250] * 8, replies
    # One batch for the first, one for the seven that waited meanwhile, in
    # one worker (as default_privs).
    assert (pool.batches - before[0], pool.spawned - before[1]) == (2, 1)
    msgs = list(mailbox.mbox(path))
    assert sorted(m["Subject"] for m in msgs) == [f"m{n}" for n in range(8)]
    for m in msgs:
        assert m.get_from().startswith("alice@remote.test  ")
        assert m["Delivered-To"] == "archive@mx.example.test"
        assert m.get_payload() == f"line one\n>From the start\nend of {m['Subject']}\n"
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"From alice@remote.test  ") and data.endswith(b"\n\n")
    assert data.count(b"\n\nFrom alice@remote.test  ") == 7
    assert os.stat(path).st_uid == _nobody()[0]


@needs_root
def test_one_message_over_the_size_limit_fails_alone_in_its_batch(tmp_path, open_dir, pool):
    inst = Instance(tmp_path / "inst", mailbox_size_limit=20000)
    path = os.path.join(open_dir, "log")
    bodies = [_body(0), _body(1), _body(2, b"x" * 30000 + b"\n"), _body(3), _body(4)]
    before = pool.batches
    replies = _deliver_held(inst, pool, path, bodies)
    assert pool.batches - before == 2
    assert [r.code for r in replies] == [250, 250, 552, 250, 250], replies
    assert replies[2].enhanced == "5.2.2" and "mailbox_size_limit" in replies[2].text
    assert sorted(m["Subject"] for m in mailbox.mbox(path)) == ["m0", "m1", "m3", "m4"]


@needs_root
def test_a_write_error_cuts_off_only_that_message(tmp_path, open_dir):
    """A worker that cannot write past 64 KB (RLIMIT_FSIZE, inherited from
    its fork server): the big message fails half-written, is cut off again,
    and the messages before and after it in the batch are delivered."""
    inst = Instance(tmp_path / "inst")
    path = os.path.join(open_dir, "log")
    workers.POOL.close_all()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        forkserver.start()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        bodies = [_body(0), _body(1), _body(2, b"y" * 100 + b"\n" * 800 + b"z" * 70000 + b"\n"),
                  _body(3)]
        replies = _deliver_held(inst, workers.POOL, path, bodies)
    finally:
        workers.POOL.close_all()
        forkserver.stop()
    assert [r.code for r in replies] == [250, 250, 552, 250], replies
    assert "File too large" in replies[2].text
    with open(path, "rb") as f:
        data = f.read()
    assert b"yyy" not in data and b"zzz" not in data
    assert sorted(m["Subject"] for m in mailbox.mbox(path)) == ["m0", "m1", "m3"]


def _gate(payloads, fds):
    """A worker's handle for the pool tests: each request blocks until its
    descriptor (a pipe) has a byte, then says who it was and its batch's size."""
    out = []
    for payload, fd in zip(payloads, fds):
        os.read(fd, 1)
        out.append({"pid": os.getpid(), "echo": payload, "batch": len(payloads)})
    return out


def _noop():
    pass


def test_workers_per_identity_are_bounded_and_kept_under_a_burst(pool):
    """Twice as many concurrent deliveries (to different targets) as
    MAX_WORKERS_PER_KEY: the others wait for a worker rather than fork one;
    a second burst forks none."""
    n = workers.MAX_WORKERS_PER_KEY * 2
    spawned = pool.spawned
    for burst in (1, 2):
        pipes = [os.pipe() for _ in range(n)]
        results = [None] * n

        def one(i):
            results[i] = pool.call("k", _noop, _gate, i, pipes[i][0], batch_key=f"target{i}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: _busy(pool) == workers.MAX_WORKERS_PER_KEY)
            with pool._lock:
                assert pool._alive == {"k": workers.MAX_WORKERS_PER_KEY}
        finally:
            for _, w in pipes:
                os.write(w, b"x")
            for t in threads:
                t.join(30)
            for r, w in pipes:
                os.close(r)
                os.close(w)
        assert sorted(r["echo"] for r in results) == list(range(n))
        assert len({r["pid"] for r in results}) == workers.MAX_WORKERS_PER_KEY
        assert pool.spawned - spawned == workers.MAX_WORKERS_PER_KEY    # the second burst: none


def test_a_worker_dying_fails_its_whole_batch_and_the_next_one_works(pool):
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    results = {}

    def one(name, payload, fd):
        try:
            results[name] = pool.call("k", _noop, _die_on, payload, fd, batch_key="t")
        except workers.WorkerGone as e:
            results[name] = e

    first = threading.Thread(target=one, args=("first", "ok", r0))
    first.start()
    assert wait_for(lambda: _busy(pool) == 1)
    later = [threading.Thread(target=one, args=(f"l{i}", "die" if i == 1 else "ok", r1))
             for i in range(3)]
    for t in later:
        t.start()
    assert wait_for(lambda: _waiting(pool) == 3)
    os.write(w0, b"x")
    os.write(w1, b"xxx")
    for t in [first, *later]:
        t.join(30)
    assert results["first"] == "ok:1"
    assert all(isinstance(results[f"l{i}"], workers.WorkerGone) for i in range(3)), results
    os.write(w1, b"x")
    assert pool.call("k", _noop, _die_on, "ok", r1, batch_key="t") == "ok:1"
    for fd in (r0, w0, r1, w1):
        os.close(fd)


def _die_on(payloads, fds):
    out = []
    for payload, fd in zip(payloads, fds):
        os.read(fd, 1)
        if payload == "die":
            os._exit(3)
        out.append(f"{payload}:{len(payloads)}")
    return out


@needs_root
def test_daemon_combines_deliveries_to_one_file_in_one_worker(tmp_path, open_dir):
    """The daemon's delivery threads, a dozen messages to one file alias
    while the file is locked: one worker holds the first, the rest wait for
    it (no worker each); then every message is there once, well-formed."""
    catchall = os.path.join(open_dir, "catchall")
    inst = Instance(tmp_path / "inst")
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write(f"user: {catchall}\n")
    assert inst.sendmail("-bi").returncode == 0
    fd = os.open(catchall, os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchown(fd, *_nobody())
    n = 12
    with daemon(inst) as (p, port):
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                for i in range(n):
                    s.sendmail("alice@remote.test", ["user@example.test"], _body(i).decode())
            qids = list(inst.spool.ids())
            assert len(qids) == n
            # Every message's delivery under way (each holds its queue lock) ...
            assert wait_for(lambda: all(inst.spool.is_locked(q) for q in qids), timeout=30)
            # ... and one worker for them all.
            assert _local_workers(p.pid) == 1
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)
        assert wait_for(lambda: inst.maillog().count("stat=Sent") == n, timeout=60), \
            inst.maillog()
        assert _local_workers(p.pid) == 1
    msgs = list(mailbox.mbox(catchall))
    assert sorted(m["Subject"] for m in msgs) == sorted(f"m{i}" for i in range(n))
    for m in msgs:
        assert m.get_from().startswith("alice@remote.test  ")
        assert m.get_payload().startswith("line one\n>From the start\n")


def _local_workers(pgid):
    """The daemon's "pymta: local" processes."""
    found = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read()
            if comm == "pymta: local\n" and os.getpgid(int(pid)) == pgid:
                found += 1
        except (OSError, ProcessLookupError):
            pass
    return found


def test_maildir_batch_each_message_its_own_outcome(tmp_path, open_dir):
    """local_maildir.deliver_batch, as a worker runs it: a message whose
    copy cannot be read fails alone and leaves nothing in tmp/ or new/;
    the others are in new/, each once."""
    from pymta import local_maildir
    inst = Instance(tmp_path / "inst")
    cfg = inst.cfg
    box = os.path.join(open_dir, "Maildir")
    rcpt = E.Recipient("me@mx.example.test", flags="p")
    target = local_target.Target("maildir", user="me", uid=os.getuid(), gid=os.getgid(),
                          home="/nonexistent", path=box)
    envs = [_queue(inst, _body(n), rcpt) for n in range(3)]
    spool = Spool.from_config(cfg)
    dfs = [spool.open_data(e.id) for e in envs]
    bad = os.open(os.path.join(open_dir, "w"), os.O_WRONLY | os.O_CREAT)   # reading fails: EBADF
    try:
        dfs[1].close()
        dfs[1] = os.fdopen(bad, "rb")
        replies = local_maildir.deliver_batch([(e, rcpt, df) for e, df in zip(envs, dfs)],
                                              target)
    finally:
        for df in dfs:
            df.close()
    assert [r.code for r in replies] == [250, 451, 250], replies
    assert os.listdir(os.path.join(box, "tmp")) == []
    subjects = sorted(m["Subject"] for m in mailbox.Maildir(box, factory=None))
    assert subjects == ["m0", "m2"]
