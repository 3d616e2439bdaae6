"""Real throwaway users for tests where rights matter, and a pymta they can run.

Fixtures (registered in conftest.py):

``make_user(**kw)``  -> pwd entry of a new user made with ``useradd -m`` (a
    unique name, its own home under /home, its own group). Every user made is
    removed with ``userdel -r`` after the test, pass or fail, once the
    processes running as it (started by the test) are killed by pid. Skips
    cleanly when not root or without useradd.
``shared_dir``       -> a 0755 directory under /var/tmp (pytest's basetemp is
    0700: other users cannot reach it), removed after the test. Put there an
    Instance (conftest.Instance(shared_dir)) whose config users must read.
``pymta_for_users``  -> an Installed: pymta put by ``python -m pymta.install``
    into a prefix under /var/tmp (once per test process), its launchers
    running TESTPY, so that any user can run ``sendmail``/``mailq``.

``run_as(pw, argv, ...)`` runs a program as that user (uid, gid, its groups,
a login-like environment, cwd its home) and returns the CompletedProcess.

TESTPY is the venv `make testpy` builds from Debian's /usr/bin/python3 at a
world-readable path (default /var/tmp/pymta-testpy, with the minimum
dependency versions pymta supports; `make test` passes it as PYMTA_TESTPY).
Tests needing it skip when it is absent (pytest run without make).
"""

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTPY = os.environ.get("PYMTA_TESTPY", "/var/tmp/pymta-testpy")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (throwaway users)")
    if not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("useradd/userdel not installed")


def _pids_of(uid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def _remove_user(pw):
    # Processes the test started as this user (a command delivery, say) would
    # make userdel refuse: kill them, each by pid, then wait for them to go.
    deadline = time.monotonic() + 5
    while True:
        pids = _pids_of(pw.pw_uid)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    subprocess.run(["userdel", "-r", pw.pw_name], capture_output=True)
    if os.path.isdir(pw.pw_dir) and pw.pw_dir.startswith("/home/pt"):
        shutil.rmtree(pw.pw_dir, ignore_errors=True)


@pytest.fixture
def make_user():
    """Factory: make_user(prefix="pt") -> pwd entry of a fresh user with a home."""
    _need_root()
    made = []

    def make(prefix="pt"):
        name = f"{prefix}{uuid.uuid4().hex[:10]}"[:31]
        r = subprocess.run(["useradd", "-m", "-U", "-s", "/bin/sh", name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"useradd {name}: {r.stderr.strip()}")
        pw = pwd.getpwnam(name)
        made.append(pw)
        return pw

    try:
        yield make
    finally:
        for pw in made:
            _remove_user(pw)


def user_env(pw, **more):
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
           "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(more)
    return env


def run_as(pw, argv, input=b"", env=None, timeout=60, **kw):
    """Run ``argv`` as the user ``pw`` (its uid, gid and groups)."""
    groups = [g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem]
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                          user=pw.pw_uid, group=pw.pw_gid, extra_groups=groups,
                          env=env or user_env(pw), cwd=pw.pw_dir, **kw)


@pytest.fixture
def shared_dir():
    """A directory every user can traverse (0755), removed after the test."""
    path = tempfile.mkdtemp(prefix="pymta-test-", dir="/var/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Installed:
    """pymta as `make install` puts it, under ``prefix``."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.sendmail = os.path.join(prefix, "sbin", "sendmail")
        self.pymta = os.path.join(prefix, "sbin", "pymta")
        self.mailq = os.path.join(prefix, "bin", "mailq")
        self.newaliases = os.path.join(prefix, "bin", "newaliases")


_INSTALLED = []


@pytest.fixture
def pymta_for_users():
    """pymta installed with TESTPY under a world-readable prefix (once per
    test process, removed at its exit)."""
    _need_root()
    if not os.access(os.path.join(TESTPY, "bin", "python"), os.X_OK):
        pytest.skip(f"no {TESTPY} (run `make testpy`)")
    if not _INSTALLED:
        prefix = tempfile.mkdtemp(prefix="pymta-inst-", dir="/var/tmp")
        os.chmod(prefix, 0o755)
        import atexit
        atexit.register(shutil.rmtree, prefix, True)
        etc = os.path.join(prefix, "etc")
        os.makedirs(etc)
        # The installer creates the queue its configuration names: keep it here.
        with open(os.path.join(etc, "pymta.conf"), "w") as f:
            f.write(f"queue_directory = {prefix}/spool\n"
                    f"alias_maps = hash:{etc}/aliases\nalias_database = hash:{etc}/aliases\n")
        r = subprocess.run([sys.executable, "-m", "pymta.install", "--prefix", prefix,
                            "--sysconfdir", etc, "--python", os.path.join(TESTPY, "bin", "python")],
                           cwd=TOP, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"pymta.install: {r.stdout}{r.stderr}")
        _INSTALLED.append(Installed(prefix))
    return _INSTALLED[0]
