"""The production path: `make install` into a prefix with the oldest
dependency versions pymta declares (TESTPY: Debian 12's dnspython 2.3.0,
python-daemon 2.3.2, lockfile 0.12.2 on /usr/bin/python3), then the
installed launchers run as an administrator would run them."""

import contextlib
import os
import signal
import smtplib
import subprocess
import sys
import time

import pytest

from conftest import TOP, Instance
from dnsserver import DNSServer
from users import TESTPY


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=15, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def need_testpy():
    if os.geteuid() != 0:
        pytest.skip("needs root (the daemon drops to mail_owner)")
    if not os.access(os.path.join(TESTPY, "bin", "python"), os.X_OK):
        pytest.skip(f"no {TESTPY} (run `make testpy`)")


def make_install(prefix, sysconfdir, *more, python=None):
    """`make install` as the README says it, into ``prefix``."""
    args = ["make", "-s", "-C", TOP, "install", f"PREFIX={prefix}", f"SYSCONFDIR={sysconfdir}",
            f"PYTHON={sys.executable}", *more]
    if python:
        args.append(f"INSTALL_PYTHON={python}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@contextlib.contextmanager
def detached_daemon(sendmail, inst, *args):
    """`sendmail -bd` (it detaches); yields the daemon's pid; stops it by pid."""
    r = subprocess.run([sendmail, "-C", inst.conf_path, "-bd", *args], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid_file = inst.params["pid_file"]
    pid = int(wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read().split()[0]))
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_installed_launchers_on_the_minimum_versions_greet_and_deliver(shared_dir):
    need_testpy()
    prefix = os.path.join(shared_dir, "usr")
    port = free_port()
    with DNSServer() as dns:
        # mail_owner is the real "mail" user: the listener drops to it, and
        # the peer name lookup makes a dnspython resolver in the listener.
        inst = Instance(shared_dir, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail",
                        smtpd_peername_lookup="yes", dns_nameservers=dns.address)
        make_install(prefix, shared_dir, python=os.path.join(TESTPY, "bin", "python"))
        sendmail = os.path.join(prefix, "sbin", "sendmail")
        with open(sendmail) as f:
            assert f.readline() == f"#!{TESTPY}/bin/python -S\n"
        probe = subprocess.run([os.path.join(TESTPY, "bin", "python"), "-c",
                                "import dns.version; print(dns.version.version)"],
                               capture_output=True, text=True)
        assert probe.stdout.strip() == "2.3.0"
        with detached_daemon(sendmail, inst):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                code, banner = c.docmd("NOOP")
                assert code == 250
                assert c.sendmail("a@b.example", ["root@example.test"],
                                  b"Subject: over smtp\r\n\r\nhi\r\n") == {}
            assert wait_for(lambda: b"Subject: over smtp" in inst.mailbox(), 20), inst.maillog()
            r = subprocess.run([sendmail, "-C", inst.conf_path, "-bs"], capture_output=True,
                               timeout=30, input=b"HELO me\r\nMAIL FROM:<me@example.test>\r\n"
                               b"RCPT TO:<root@example.test>\r\nDATA\r\nSubject: over -bs\r\n"
                               b"\r\nhello\r\n.\r\nQUIT\r\n")
            assert r.returncode == 0, r.stderr
            assert b"250 2.0.0 Ok: queued as" in r.stdout, r.stdout
            assert wait_for(lambda: b"Subject: over -bs" in inst.mailbox(), 40), inst.maillog()
        assert "Traceback" not in inst.maillog()


def test_declared_minimums_are_the_tested_ones():
    sys.path.insert(0, TOP)
    from pymta import deps
    setup = subprocess.run([sys.executable, "-c", "import runpy, setuptools\n"
                            "seen = {}\nsetuptools.setup = lambda **kw: seen.update(kw)\n"
                            "runpy.run_path('setup.py')\nprint(seen['install_requires'])"],
                           cwd=TOP, capture_output=True, text=True)
    assert setup.stdout.strip() == str(["dnspython>=2.3.0", "python-daemon>=2.3.2",
                                        "lockfile>=0.12.2", "dkimpy>=1.1.4"]), setup.stderr
    assert deps.pinned() == ["dnspython==2.3.0", "python-daemon==2.3.2", "lockfile==0.12.2",
                             "dkimpy==1.1.4"]
    reqs = subprocess.run(["make", "-s", "-C", TOP, "-pn", "testpy"], capture_output=True,
                          text=True).stdout
    assert ("TESTPY_REQS := dnspython==2.3.0 python-daemon==2.3.2 lockfile==0.12.2 "
            "dkimpy==1.1.4") in reqs
    # No module of a later version than the minimum is imported anywhere.
    for name in os.listdir(os.path.join(TOP, "pymta")):
        if name.endswith(".py"):
            with open(os.path.join(TOP, "pymta", name)) as f:
                assert "import dns.nameserver" not in f.read(), name
