"""The production path: `make install` into a prefix with the oldest
dependency versions pymta declares (TESTPY: Debian 12's dnspython 2.3.0,
python-daemon 2.3.2, lockfile 0.12.2 on /usr/bin/python3), then the
installed launchers run as an administrator would run them."""

import contextlib
import re
import os
import signal
import smtplib
import subprocess
import sys
import time

import pytest

from conftest import TOP, Instance
from dnsserver import DNSServer
from users import TESTPY, run_as
from helpers import free_port, wait_for


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
        if not wait_for(lambda: gone(pid), 20):
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


# -- pymta check, and the daemon's start

def sendmail_cmd(inst, *args):
    return [sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C", inst.conf_path, *args]


def pymta_cmd(inst, *args):
    return [sys.executable, os.path.join(TOP, "bin", "pymta"), "-C", inst.conf_path, *args]


def gone(pid):
    """Whether ``pid`` has exited (a zombie left for an init that does not reap counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: gone(pid), 20):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_bd_on_a_fresh_queue_directory_creates_it_and_serves(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import pwd
    import stat
    mail = pwd.getpwnam("mail")
    port = free_port()
    inst = Instance(shared_dir, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail")
    new = os.path.join(shared_dir, "new")
    inst.write_config(queue_directory=f"{new}/spool", mail_spool_directory=f"{new}/mail",
                      pid_file=f"{new}/run/pymta.pid")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    # -bd returned once the daemon serves: its pid is in the file already.
    with open(f"{new}/run/pymta.pid") as f:
        pid = int(f.read())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: fresh\r\n\r\nhi\r\n") == {}
        assert wait_for(lambda: os.path.exists(f"{new}/mail/root")
                        and b"Subject: fresh" in open(f"{new}/mail/root", "rb").read(), 20)
        st = os.stat(f"{new}/spool/queue")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (mail.pw_uid, 0o700)
        assert stat.S_IMODE(os.stat(f"{new}/spool/maildrop").st_mode) == 0o1733
    finally:
        stop(pid)
    assert "created" in inst.maillog()


def test_check_names_what_stops_the_daemon_and_bd_says_it_on_stderr(shared_dir, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    port = free_port()
    # The queue under a directory mail_owner cannot enter (pytest's 0700 basetemp).
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o700)
    inst = Instance(shared_dir, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail",
                    queue_directory=str(hidden / "spool"))
    r = subprocess.run(pymta_cmd(inst, "check"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 78
    assert f"error: mail_owner mail cannot reach the queue {hidden}/spool/queue" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 78
    assert "sendmail: fatal: mail_owner mail cannot reach the queue" in r.stderr
    assert not os.path.exists(inst.params["pid_file"])
    import socket
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0     # nothing was left listening
    inst.write_config(queue_directory=os.path.join(shared_dir, "spool"), mail_owner="nosuchuser9")
    r = subprocess.run(pymta_cmd(inst, "check", "-n"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "error: mail_owner = nosuchuser9: no such user" in r.stderr
    r = subprocess.run(sendmail_cmd(inst, "-bD"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 78 and "nosuchuser9: no such user" in r.stderr


def test_install_with_an_interpreter_lacking_the_dependencies_says_so(shared_dir):
    need_testpy()
    bare = os.path.join(shared_dir, "bare")
    subprocess.run([os.path.join(TESTPY, "bin", "python"), "-m", "venv", "--without-pip", bare],
                   check=True, timeout=120)
    inst = Instance(shared_dir, mail_owner="root")
    prefix = os.path.join(shared_dir, "usr")
    args = ["make", "-s", "-C", TOP, "install", f"PREFIX={prefix}", f"SYSCONFDIR={shared_dir}",
            f"PYTHON={sys.executable}", f"INSTALL_PYTHON={bare}/bin/python"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "cannot import dns.resolver" in r.stdout and "apt install python3-dnspython" in r.stdout
    r = subprocess.run([os.path.join(prefix, "sbin", "sendmail"), "-C", inst.conf_path, "-bd"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 69, r.stderr
    assert "sendmail: fatal: this interpreter cannot import" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_listener_that_keeps_dying_stops_the_master_with_a_fatal_error(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    p = subprocess.Popen(sendmail_cmd(inst, "-bD"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        # Once it serves: a listener killed before it is ready is the start
        # failing (reported on stderr), not a listener that keeps dying.
        def greets():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                    return c.noop()[0] == 250
            except (OSError, smtplib.SMTPException):
                return False
        assert wait_for(greets, 60), inst.maillog()
        killed = set()
        deadline = time.time() + 60
        while p.poll() is None and time.time() < deadline:
            pids = {int(x) for x in re.findall(r"listener pid (\d+)", inst.maillog())} - killed
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.1)
        assert p.wait(30) == 70
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
        p.stdout.close()
        p.stderr.close()
    log = inst.maillog()
    assert "fatal: listener pid" in log and "stopping the daemon" in log
    assert not os.path.exists(inst.params["pid_file"])


def test_pid_file_lock_restart_after_kill_9_and_a_second_daemon(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    new = None
    try:
        # A second daemon on the same address: 75, whoever holds the port.
        r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 75, r.stderr
        assert f"daemon already running (pid {pid}" in r.stderr
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                        open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10)
        # The file is still there, its pid dead or (later) someone else's:
        # the lock, not the pid, says whether a daemon runs.
        assert os.path.exists(inst.params["pid_file"])
        r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        new = int(open(inst.params["pid_file"]).read())
        assert new != pid
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.noop()[0] == 250
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if new:
            stop(new)


def test_init_script_finds_an_expanded_pid_file_and_reload_when_stopped_exits_7(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    inst.write_config(pid_file="$queue_directory/pymta.pid")
    pid_file = os.path.join(inst.params["queue_directory"], "pymta.pid")
    script = os.path.join(TOP, "etc", "init.d", "pymta")
    wrapper = tmp_path / "sendmail"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {TOP}/bin/sendmail "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, SENDMAIL=str(wrapper), PYMTA_CONFIG=inst.conf_path)

    def init(action):
        return subprocess.run(["/bin/sh", script, action], capture_output=True, text=True,
                              env=env, timeout=60, stdin=subprocess.DEVNULL)
    r = init("reload")
    assert r.returncode == 7 and "not running" in r.stderr
    assert init("status").returncode == 3
    # A pid file left by a killed daemon, naming a pid another program has
    # now (this test's own): not running.
    os.makedirs(os.path.dirname(pid_file), exist_ok=True)
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()}\n")
    assert init("status").returncode == 3 and init("reload").returncode == 7
    r = init("start")
    assert r.returncode == 0, r.stdout + r.stderr
    pid = int(open(pid_file).read())
    try:
        r = init("status")
        assert r.returncode == 0 and f"running (pid {pid})" in r.stdout
        assert init("reload").returncode == 0
        assert wait_for(lambda: "configuration reloaded" in inst.maillog(), 10)
        assert init("stop").returncode == 0
        assert gone(pid)
    finally:
        stop(pid)


# -- the mail log

def test_report_counts_mail_picked_up_from_the_maildrop(tmp_path):
    from pymta import envelope, queue_maildrop
    inst = Instance(tmp_path, mail_owner="root")
    for i in range(3):
        env = envelope.Envelope(sender=f"u{i}@example.test")
        env.add_recipient("root@example.test")
        queue_maildrop.drop(inst.spool, env, [f"Subject: dropped {i}\n\nx\n".encode()])
    for i in range(2):
        r = inst.sendmail("-odq", "root", input=f"Subject: direct {i}\n\nx\n".encode())
        assert r.returncode == 0, r.stderr
    r = inst.sendmail("-q")
    assert r.returncode == 0, r.stderr
    assert inst.mailbox().count(b"Subject: dropped") == 3
    assert inst.maillog().count("(maildrop)") == 3
    r = subprocess.run(pymta_cmd(inst, "report", inst.params["maillog_file"]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+5\s+received", r.stdout, re.M), r.stdout
    assert re.search(r"^\s+5\s+delivered", r.stdout, re.M), r.stdout


def test_smtp_mail_is_logged_with_its_msgid(tmp_path):
    port = free_port()
    # A client outside mynetworks: a missing Message-ID is not added for it.
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root",
                    mynetworks="192.0.2.0/24")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@b.example", ["root@example.test"],
                       b"Message-ID:\r\n <abc.123@b.example>\r\nSubject: m\r\n\r\nhi\r\n")
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: none\r\n\r\nhi\r\n")
    finally:
        stop(pid)
    lines = [x for x in inst.maillog().splitlines() if "from=<a@b.example>" in x]
    assert len(lines) == 2
    assert "nrcpts=1, msgid=<abc.123@b.example>, proto=ESMTP" in lines[0]
    assert "msgid=" not in lines[1]


def test_sighup_reopens_the_log_file_the_listener_writes_through_the_master(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import grp
    import stat
    port = free_port()
    inst = Instance(shared_dir, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail")
    logfile = inst.params["maillog_file"]
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        st = os.stat(logfile)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
        assert st.st_gid == grp.getgrnam("adm").gr_gid
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: one\r\n\r\nhi\r\n")
        assert wait_for(lambda: "stat=Sent" in inst.maillog())
        os.rename(logfile, logfile + ".1")           # what logrotate does
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: os.path.exists(logfile) and "mail log reopened" in inst.maillog())
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("b@b.example", ["root@example.test"], b"Subject: two\r\n\r\nhi\r\n")
        # The listener (mail_owner, which cannot open the root-owned log)
        # writes the from= line; the master the delivery.
        assert wait_for(lambda: "from=<b@b.example>" in inst.maillog()
                        and "stat=Sent" in inst.maillog())
        assert "b@b.example" not in open(logfile + ".1").read()
        assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o640
    finally:
        stop(pid)


def test_without_syslog_or_maillog_file_the_log_goes_to_the_default_file(tmp_path):
    """/dev/log is absent here (checked); /var/log is a tmpfs of a mount
    namespace of its own, so nothing touches the machine's."""
    if os.geteuid() != 0 or os.path.exists("/dev/log"):
        pytest.skip("needs root and no /dev/log")
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    inst.write_config(maillog_file="")
    cmd = " ".join(f"'{a}'" for a in sendmail_cmd(inst, "-bd"))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs tmpfs /var/log && exec {cmd}"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert ("sendmail: warning: no syslog socket (/dev/log) and maillog_file is not set: "
            "the mail log goes to /var/log/pymta.log") in r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        path = f"/proc/{pid}/root/var/log/pymta.log"
        assert wait_for(lambda: "stat=Sent" in open(path).read()), open(path).read()
        import stat
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        stop(pid)
    assert not os.path.exists("/var/log/pymta.log") or "a@b.example" not in open("/var/log/pymta.log").read()


def test_bD_logs_to_stderr_without_maillog_file(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    inst.write_config(maillog_file="")
    p = subprocess.Popen(sendmail_cmd(inst, "-bD"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_for(lambda: os.path.exists(inst.params["pid_file"]))
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.noop()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
        p.stdout.close()
    assert b"daemon started" in err and b"daemon stopped" in err


@pytest.mark.unit
def test_logrotate_snippet_rotates_the_default_log_and_signals_the_daemon():
    with open(os.path.join(TOP, "etc", "logrotate.pymta")) as f:
        text = f.read()
    assert "/var/log/pymta.log {" in text and "create 0640 root adm" in text
    assert "kill -HUP" in text
    from pymta import maillog
    assert maillog.DEFAULT_MAILLOG == "/var/log/pymta.log"


# -- submission paths

def test_bs_tells_the_running_daemon_and_qualifies_bare_names(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root",
                    queue_run_delay="1h", myorigin="example.test")
    # Queued before the start: its delivery shows the start-up queue run is
    # done, the next one being an hour away.
    r = inst.sendmail("-odq", "-i", "root", input=b"Subject: queued before\n\nhi\n")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        assert wait_for(lambda: b"Subject: queued before" in inst.mailbox(), 10), inst.maillog()
        r = inst.sendmail("-bs", input=b"HELO me\r\nMAIL FROM:<me>\r\nRCPT TO:<root>\r\n"
                          b"DATA\r\nSubject: via -bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        assert b"250 2.0.0 Ok: queued as" in r.stdout, r.stdout
        qid = r.stdout.split(b"queued as ")[1].split()[0].decode()
        assert wait_for(lambda: b"Subject: via -bs" in inst.mailbox(), 10), inst.maillog()
    finally:
        stop(pid)
    log = inst.maillog()
    sent = [x for x in log.splitlines() if x.find(f"{qid}: to=<root@example.test>") > 0]
    assert sent and f"[{pid}]:" in sent[0], log     # delivered by the daemon, told at once
    assert f"{qid}: from=<me@example.test>" in log


def test_unprivileged_queue_run_is_one_line_and_77(make_user, shared_dir, pymta_for_users):
    alice = make_user()
    inst = Instance(shared_dir, mail_owner="mail")
    assert subprocess.run(pymta_cmd(inst, "check"), capture_output=True).returncode == 0
    r = run_as(alice, [pymta_for_users.sendmail, "-C", inst.conf_path, "-q"])
    assert r.returncode == 77
    lines = r.stderr.decode().splitlines()
    assert lines == [f"sendmail: cannot run the queue: {inst.spool.dir}: Permission denied "
                     "(only root and mail may)"]


def test_queue_files_root_writes_belong_to_mail_owner(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import pwd
    mail = pwd.getpwnam("mail")
    inst = Instance(shared_dir, mail_owner="mail")
    assert subprocess.run(pymta_cmd(inst, "check"), capture_output=True).returncode == 0
    r = inst.sendmail("-odq", "root", input=b"Subject: q\n\nx\n")
    assert r.returncode == 0, r.stderr
    names = os.listdir(inst.spool.dir)
    assert {n[:2] for n in names} == {"qf", "df"}
    for n in names:
        assert os.stat(os.path.join(inst.spool.dir, n)).st_uid == mail.pw_uid, n


def test_mailq_status_names_the_host_once_and_keeps_the_whole_reason(tmp_path):
    port = free_port()          # nobody listens there
    inst = Instance(tmp_path, relayhost=f"[127.0.0.1]:{port}", mail_owner="root")
    r = inst.sendmail("-odi", "someone@remote.example", input=b"Subject: q\n\nx\n")
    assert r.returncode == 0, r.stderr
    out = inst.run("mailq").stdout.decode()
    assert "[127.0.0.1][127.0.0.1]" not in out and "[127.0.0.1][127.0.0.1]" not in inst.maillog()
    status = out.split("   (", 1)[1].split(")", 1)[0]
    assert f"connect to [127.0.0.1]:{port}" in status
    assert " ".join(status.split()).endswith("Connection refused"), out
    # (the header line names the queue directory, as long as the test's path)
    assert all(len(line) <= 80 for line in out.splitlines()
               if inst.params["queue_directory"] not in line), out


def test_daemon_processes_are_named_in_ps(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        listeners = [int(x) for x in re.findall(r"listener pid (\d+)", inst.maillog())]
        assert open(f"/proc/{pid}/comm").read() == "pymta: master\n"
        assert listeners and all(open(f"/proc/{p}/comm").read() == "pymta: smtpd\n"
                                 for p in listeners)
        out = subprocess.run(["ps", "-o", "comm=", "-p", str(pid)], capture_output=True,
                             text=True).stdout
        assert out.strip() == "pymta: master"
    finally:
        stop(pid)


def test_every_user_may_run_mailq_through_the_daemon(make_user, shared_dir, pymta_for_users):
    alice = make_user()
    port = free_port()
    inst = Instance(shared_dir, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail",
                    queue_run_delay="1h")
    r = inst.sendmail("-odq", "-f", "queued@example.test", "someone@remote.example",
                      input=b"Subject: q\n\nx\n")
    assert r.returncode == 0, r.stderr
    mailq = [pymta_for_users.mailq, "-C", inst.conf_path]
    r = run_as(alice, mailq)            # no daemon: the queue is mail_owner's
    assert r.returncode == 77 and b"no daemon answers" in r.stderr
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        r = run_as(alice, mailq)
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert "<queued@example.test>" in out and "Total requests: 1" in out
        assert out == inst.run("mailq").stdout.decode().replace("*", " ")   # as root sees it
        r = run_as(alice, mailq + ["--json"])
        assert r.returncode == 0 and b'"sender": "queued@example.test"' in r.stdout
    finally:
        stop(pid)
    inst.write_config(authorized_mailq_users="root")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        r = run_as(alice, mailq)
        assert r.returncode == 77 and b"authorized_mailq_users" in r.stderr
    finally:
        stop(pid)


def test_dev_instance_in_a_tree_mail_owner_cannot_enter_runs_as_the_invoking_user(tmp_path):
    """make run's daemon command (mail_owner is who runs it) in a 0700 tree."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the tree is out of the mail user's reach)")
    r = subprocess.run(["make", "-s", "-n", "-C", TOP, "run"], capture_output=True, text=True)
    run_line = [x for x in r.stdout.splitlines() if "bin/sendmail" in x][-1]
    assert "-O mail_owner=$(id -un)" in run_line and "-bD" in run_line
    os.chmod(tmp_path, 0o700)
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="mail")
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 78 and "mail_owner mail cannot reach the queue" in r.stderr
    r = subprocess.run(sendmail_cmd(inst, "-O", "mail_owner=root", "-bd"), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: dev\r\n\r\nx\r\n") == {}
        assert wait_for(lambda: b"Subject: dev" in inst.mailbox(), 20), inst.maillog()
    finally:
        stop(pid)


def test_date_and_message_id_added_for_trusted_smtp_clients_only(tmp_path):
    port = free_port()
    inst = Instance(tmp_path, smtpd_listen=f"127.0.0.1:{port}", mail_owner="root",
                    mynetworks="127.0.0.0/8")
    with detached_daemon_plain(inst):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: bare\r\n\r\nbody\r\n")
            c.sendmail("a@b.example", ["root@example.test"],
                       b"Subject: full\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                       b"Message-ID: <own@b.example>\r\n\r\nbody\r\n")
        assert wait_for(lambda: inst.mailbox().count(b"Subject:") == 2, 20), inst.maillog()
    box = inst.mailbox().decode()
    bare = box[box.index("Subject: bare"):].split("\n\n", 1)[0]
    assert "\nDate: " in bare and "\nMessage-ID: <" in bare and "@mx.example.test>" in bare
    full = box[box.index("Subject: full"):].split("\n\n", 1)[0]
    assert full.count("Date:") == 1 and full.count("Message-ID:") == 1
    assert "msgid=<" in inst.maillog()
    # A client outside mynetworks, not authenticated: stored as sent.
    inst2 = Instance(tmp_path / "other", smtpd_listen=f"127.0.0.1:{port}", mail_owner="root",
                     mynetworks="192.0.2.0/24")
    with detached_daemon_plain(inst2):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: stranger\r\n\r\nbody\r\n")
        assert wait_for(lambda: b"Subject: stranger" in inst2.mailbox(), 20), inst2.maillog()
    head = inst2.mailbox().decode().split("Subject: stranger", 1)[1].split("\n\n", 1)[0]
    assert "Message-ID:" not in head and "Date:" not in head


@contextlib.contextmanager
def detached_daemon_plain(inst):
    r = subprocess.run(sendmail_cmd(inst, "-bd"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int(open(inst.params["pid_file"]).read())
    try:
        yield pid
    finally:
        stop(pid)
