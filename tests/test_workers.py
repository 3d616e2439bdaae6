"""Long-lived delivery workers: reused per identity, replaced when they die,
and a death during a delivery is reported, never taken for success; forked
by this process or by its fork server (as in the daemon)."""

import os
import pwd
import signal
import tempfile

import pytest

from pymta import forkserver, workers


@pytest.fixture(params=["direct", "fork server"])
def mode(request):
    """Each test twice: the workers forked here, then by a fork server."""
    if request.param == "fork server":
        forkserver.start()
        yield request.param
        forkserver.stop()
    else:
        yield request.param


def _noop():
    pass


def _whoami(payloads, fds):
    out = []
    for payload, fd in zip(payloads, fds):
        data = os.read(fd, 100).decode() if fd >= 0 else ""
        if payload == "die":
            os._exit(3)
        out.append({"pid": os.getpid(), "uid": os.geteuid(), "data": data, "echo": payload,
                    "batch": len(payloads)})
    return out


def _call(pool, key, payload="x", setup=_noop, content=b"message"):
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.seek(0)
        return pool.call(key, setup, _whoami, payload, f.fileno())


def test_same_identity_reuses_one_process_and_reads_the_passed_descriptor(mode):
    pool = workers.Pool()
    try:
        a = _call(pool, "k1", content=b"first")
        b = _call(pool, "k1", content=b"second")
        c = _call(pool, "k2")
        assert a["pid"] == b["pid"] != os.getpid()
        assert c["pid"] != a["pid"]
        assert (a["data"], b["data"]) == ("first", "second")
        assert b["echo"] == "x"
    finally:
        pool.close_all()


def test_a_worker_killed_while_idle_is_replaced_transparently(mode):
    pool = workers.Pool()
    try:
        a = _call(pool, "k")
        os.kill(a["pid"], signal.SIGKILL)
        try:
            os.waitpid(a["pid"], 0)
        except ChildProcessError:    # the fork server's child: it reaps it
            assert _gone(a["pid"], 5)
        b = _call(pool, "k")
        assert b["pid"] != a["pid"]
    finally:
        pool.close_all()


def test_a_worker_dying_during_a_delivery_is_an_error_not_a_success(mode):
    pool = workers.Pool()
    try:
        with pytest.raises(workers.WorkerGone):
            _call(pool, "k", payload="die")
        assert _call(pool, "k")["echo"] == "x"     # the next one works
    finally:
        pool.close_all()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_setup_drops_privileges_once_for_every_request():
    # Forked here: the setup is a closure, which a fork server could not take.
    nobody = pwd.getpwnam("nobody")

    def setup():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    pool = workers.Pool()
    try:
        a = _call(pool, "nobody", setup=setup)
        b = _call(pool, "nobody", setup=setup)
        assert a["uid"] == b["uid"] == nobody.pw_uid
        assert a["pid"] == b["pid"]
    finally:
        pool.close_all()


def _gone(pid, seconds):
    """Whether process ``pid`` is gone, zombie included, within ``seconds``."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def test_idle_worker_is_retired_on_time_and_reaped_at_once(monkeypatch):
    monkeypatch.setattr(workers, "REUSE_WINDOW", 0.5)
    monkeypatch.setattr(workers, "REAP_TICK", 0.1)
    forkserver.start()       # the reaper thread runs where a fork server forks
    pool = workers.Pool()
    try:
        pid = _call(pool, "k")["pid"]
        assert os.path.exists(f"/proc/{pid}")
        assert _gone(pid, 5), open(f"/proc/{pid}/stat").read()
        assert pool._idle == {}
        assert _call(pool, "k")["pid"] != pid      # a new one when work comes
    finally:
        pool.close_all()
        forkserver.stop()


def test_worker_that_exits_by_itself_is_no_zombie(monkeypatch):
    monkeypatch.setattr(workers, "IDLE_EXIT", 0.3)      # read by the worker
    forkserver.start()       # after the patch: its workers inherit it
    pool = workers.Pool()
    try:
        pid = _call(pool, "k")["pid"]
        assert _gone(pid, 5), open(f"/proc/{pid}/stat").read()
    finally:
        pool.close_all()
        forkserver.stop()


def test_without_a_fork_server_an_exited_worker_is_reaped_at_the_next_call(monkeypatch):
    monkeypatch.setattr(workers, "IDLE_EXIT", 0.3)
    pool = workers.Pool()
    try:
        pid = _call(pool, "k")["pid"]
        assert _zombie_or_gone(pid, 5)
        assert _call(pool, "k2")["pid"] != pid
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        pool.close_all()
    import threading
    assert threading.active_count() == 1       # no reaper thread: the next fork may be direct


def _zombie_or_gone(pid, seconds):
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
