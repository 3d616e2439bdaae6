"""The fork server and the fork-child helper: children get their
descriptors and default signals, are reaped (no zombie), can be signalled
and report their result in the one framing; nothing forks beside threads,
and the daemon's master forks nothing once it has threads."""

import os
import signal
import smtplib
import sys
import threading
import time

import pytest

from pymta import forkserver
from helpers import daemon, listener_pids, wait_for


@pytest.fixture
def server():
    srv = forkserver.start()
    yield srv
    forkserver.stop()


def _state(path):
    """What a child sees: its open descriptors, its SIGTERM and SIGHUP dispositions."""
    with open(path, "w") as f:
        f.write(" ".join(sorted(os.listdir("/proc/self/fd"), key=int)) + "\n")
        f.write(f"{signal.getsignal(signal.SIGTERM)} {signal.getsignal(signal.SIGHUP)}\n")


def _report(fds, path):
    _state(path)
    forkserver.put_result(fds[0], {"pid": os.getpid(), "uid": os.geteuid()}, b"payload")
    return 3


def _sleep(fds):
    time.sleep(60)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False


def _gone(pid):
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("served", [True, False], ids=["fork server", "direct"])
def test_child_gets_its_descriptors_default_signals_result_and_status(tmp_path, request, served):
    if served:
        request.getfixturevalue("server")
    signal.signal(signal.SIGHUP, lambda *a: None)
    stray_r, stray_w = os.pipe()          # not handed over: closed in the child
    rfd, wfd = os.pipe()
    try:
        child = forkserver.spawn(_report, (str(tmp_path / "state"),), [wfd])
        os.close(wfd)
        value, data = forkserver.get_result(rfd, child=child)
        assert data == b"payload" and value["pid"] == child.pid != os.getpid()
        assert os.WEXITSTATUS(child.wait(10)) == 3
        fds, sigs = (tmp_path / "state").read_text().splitlines()
        fds = [int(fd) for fd in fds.split()]
        assert stray_r not in fds and stray_w not in fds and wfd in fds
        assert len(fds) <= 6          # stdio, the pipe, the state file, the listdir
        assert sigs == f"{signal.SIG_DFL} {signal.SIG_DFL}"
        child.close()
        assert wait_for(lambda: _gone(child.pid), 5)      # reaped: no zombie
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        for fd in (stray_r, stray_w, rfd):
            os.close(fd)


def test_served_children_are_reaped_even_when_nobody_waits(server):
    pids = []
    for _ in range(3):
        child = forkserver.spawn(_report, ("/dev/null",), [os.open(os.devnull, os.O_WRONLY)])
        pids.append(child.pid)
        child.close()          # the caller stops listening at once
    assert wait_for(lambda: all(_gone(p) for p in pids), 10), [_zombie(p) for p in pids]


def test_kill_goes_through_the_server_and_the_status_comes_back(server):
    child = forkserver.spawn(_sleep)
    assert child.poll() is None
    child.kill(signal.SIGTERM)
    status = child.wait(10)
    assert status is not None and os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGTERM       # the server left SIG_DFL to it
    assert wait_for(lambda: _gone(child.pid), 5)


def test_the_server_runs_as_its_starter_and_is_reaped_at_stop():
    srv = forkserver.start()
    pid = srv.pid
    with open(f"/proc/{pid}/status") as f:
        uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
    assert int(uid) == os.geteuid()
    forkserver.stop()
    assert forkserver.server() is None and _gone(pid)


def test_no_result_from_a_child_that_dies_is_an_error_not_a_hang():
    rfd, wfd = os.pipe()
    try:
        child = forkserver.spawn(lambda fds: os._exit(9), (), [wfd])
        os.close(wfd)
        with pytest.raises(forkserver.ResultError):
            forkserver.get_result(rfd, child=child, deadline=time.monotonic() + 10)
        assert os.WEXITSTATUS(child.wait(10)) == 9
    finally:
        os.close(rfd)


def test_a_late_child_is_a_timeout():
    rfd, wfd = os.pipe()
    try:
        child = forkserver.spawn(_sleep, (), [wfd])
        os.close(wfd)
        with pytest.raises(forkserver.ResultError) as e:
            forkserver.get_result(rfd, deadline=time.monotonic() + 0.3)
        assert "in time" in str(e.value)
        child.kill()
        assert os.WIFSIGNALED(child.wait(10))
    finally:
        os.close(rfd)


def test_no_fork_beside_threads_in_strict_processes(monkeypatch):
    monkeypatch.setattr(forkserver, "_strict", True)      # as in the daemon's processes
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(forkserver.ForkWithThreads):
            forkserver.fork_child(lambda: 0)
    finally:
        stop.set()
        t.join()


def test_exit_codes_of_the_helper():
    def run(body):
        return os.waitpid(forkserver.fork_child(body), 0)[1]
    assert os.WEXITSTATUS(run(lambda: None)) == 0
    assert os.WEXITSTATUS(run(lambda: 5)) == 5
    assert os.WEXITSTATUS(run(lambda: 1 / 0)) == 70           # EX_SOFTWARE
    assert os.WEXITSTATUS(run(lambda: sys.exit(4))) == 4


# Loaded by every Python process of the daemon below (PYTHONPATH): each
# fork made while the process has another thread is written down.
_WATCH = '''
import os, sys, threading, traceback
def _before():
    if threading.active_count() > 1:
        with open(os.environ["PYMTA_FORK_LOG"], "a") as f:
            f.write(f"pid {os.getpid()} forked beside {[t.name for t in threading.enumerate()]}\\n"
                    + "".join(traceback.format_stack()) + "\\n")
os.register_at_fork(before=_before)
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="local delivery to a mailbox and a command as root")
def test_the_master_never_forks_beside_its_threads(inst, tmp_path):
    """Deliveries through workers and a |command child, a listener restart
    and a reload: every fork of the daemon's processes is made where no
    other thread runs (the fork server's), which a fork hook checks."""
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "sitecustomize.py").write_text(_WATCH)
    forks = tmp_path / "forks.log"
    forks.write_text("")
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write('pipe: "|cat >/dev/null"\n')
    inst.run("newaliases")
    env = {"PYTHONPATH": str(watch), "PYMTA_FORK_LOG": str(forks)}
    with daemon(inst, env=env) as (p, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            for rcpt in ("root", "pipe", "root"):
                c.sendmail("a@example.test", [f"{rcpt}@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        assert wait_for(lambda: inst.maillog().count("stat=Sent") >= 3, 30), \
            inst.maillog()
        (old,) = set(listener_pids(inst))
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: set(listener_pids(inst)) - {old}, 30), inst.maillog()
        assert wait_for(lambda: "restarting it" in inst.maillog(), 5)
        os.kill(p.pid, signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in inst.maillog(), 10)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@example.test", ["root@example.test"], b"Subject: y\r\n\r\nagain\r\n")
        assert wait_for(lambda: inst.maillog().count("stat=Sent") >= 4, 30)
        assert len(_children_of_fork_server(p.pid)) >= 2, "its listener and worker"
    assert forks.read_text() == ""
    assert "fork refused" not in inst.maillog()


def _children_of_fork_server(master):
    """Pids whose parent is the master's child named "pymta: forkserv"."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/comm", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        procs[int(pid)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    servers = [pid for pid, (ppid, cmd) in procs.items()
               if ppid == master and cmd.startswith(b"pymta: forkserv")]
    return [pid for pid, (ppid, _) in procs.items() if ppid in servers]
