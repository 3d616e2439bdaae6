"""sendmail -bD / -bd as real subprocesses: signals, pidfile, handoff, privileges."""

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import BIN, Instance
from helpers import can_connect, daemon, free_port, listener_pids, wait_for

MODELS = ["loop", "threads", "fork"]


def test_accepted_message_is_delivered_at_once_through_the_handoff(inst):
    with daemon(inst) as (p, port):
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: handoff\r\n\r\nhi\r\n") == {}
        assert wait_for(lambda: b"Subject: handoff" in inst.mailbox(), 20)
    log = inst.maillog()
    assert "daemon started" in log and "from=<a@b.example>" in log and "stat=Sent" in log
    assert p.returncode == 0
    assert not os.path.exists(inst.params["pid_file"])


def test_pidfile_holds_the_master_pid_and_a_second_daemon_is_refused(inst):
    with daemon(inst) as (p, port):
        with open(inst.params["pid_file"]) as f:
            assert int(f.read().split()[0]) == p.pid
        second = inst.sendmail("-bD", "-O", f"smtpd_listen=127.0.0.1:{free_port()}", timeout=20)
        assert second.returncode == 75 and b"already running" in second.stderr


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_during_data_lets_the_commit_finish_then_421(inst, model):
    with daemon(inst, smtpd_process_model=model) as (p, port):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO x\r\n")
        while f.readline()[3:4] != b" ":
            pass
        s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n")
        assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        s.sendall(b"Subject: during term\r\n\r\nfirst half\r\n")
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle_f = idle.makefile("rb")
        idle_f.readline()
        p.send_signal(signal.SIGTERM)
        # The idle session's 421 shows that the stop has begun.
        assert idle_f.readline().startswith(b"421 4.3.2")
        s.sendall(b"second half\r\n.\r\n")
        assert f.readline().startswith(b"250 2.0.0 Ok: queued as")
        s.sendall(b"NOOP\r\n")
        assert f.readline().startswith(b"421 4.3.2")
        for x in (f, s, idle_f, idle):
            x.close()
        assert p.wait(30) == 0
        assert not can_connect(port)
    assert not os.path.exists(inst.params["pid_file"])
    assert b"second half" in inst.mailbox() or any(n.startswith("qf") for n in os.listdir(inst.spool.dir))


@pytest.mark.parametrize("model", MODELS)
def test_sighup_rereads_the_configuration(inst, model):
    with daemon(inst, smtpd_process_model=model) as (p, port):
        inst.write_config(smtpd_banner="$myhostname ESMTP reloaded")
        p.send_signal(signal.SIGHUP)

        def banner():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                return b"reloaded" in s.recv(200)
        assert wait_for(banner, 10)
    assert "configuration reloaded" in inst.maillog()


def test_listener_that_dies_is_restarted(inst):
    with daemon(inst) as (p, port):
        first = wait_for(lambda: listener_pids(inst))[0]
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: re.search(r"listener pid \d+ started", inst.maillog()), 10)
        assert wait_for(lambda: can_connect(port), 10)
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.noop()[0] == 250
    assert "restarting it" in inst.maillog()


def _noop_ok(port):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
            return c.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


@pytest.mark.parametrize("model", ["loop", "threads"])
def test_several_listener_processes_share_the_work_and_the_limits(inst, model):
    with daemon(inst, smtpd_process_model=model, smtpd_listeners=2, smtpd_session_limit=40,
                smtpd_client_connection_count_limit=40) as (p, port):
        pids = wait_for(lambda: listener_pids(inst))
        assert len(pids) == 2
        conns = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                conns.append((s, s.recv(200)))
            served = [c for c, banner in conns if banner.startswith(b"220")]
            refused = [c for c, banner in conns if banner.startswith(b"421")]
            # Each listener admits 20: 40 in all, whatever the kernel's spread.
            assert len(served) + len(refused) == 200
            assert 20 <= len(served) <= 40
        finally:
            for c, _ in conns:
                c.close()
        assert wait_for(lambda: _noop_ok(port), 20)     # the listeners saw them go
        for n in range(10):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: %d\r\n\r\nx\r\n" % n) == {}
    log = inst.maillog()
    assert len(set(re.findall(r"pymta\[(\d+)\]: connect from", log))) == 2, "one listener did all the work"


def test_ipv4_and_ipv6_listeners(inst):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    port = free_port()
    with daemon(inst, port=port, smtpd_listen=f"127.0.0.1:{port}, [::1]:{port}") as (p, _):
        assert can_connect(port, "::1")
        with smtplib.SMTP("::1", port) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: v6\r\n\r\nx\r\n") == {}
    assert "relay=unknown [::1]" in inst.maillog()


@pytest.mark.parametrize("model", ["loop", "threads"])
def test_a_thousand_idle_connections_do_not_stop_service(inst, model):
    with daemon(inst, smtpd_process_model=model, smtpd_session_limit=1100, smtpd_client_connection_count_limit=1100) as (p, port):
        conns = []
        try:
            for _ in range(1000):
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            assert conns[-1].recv(100).startswith(b"220")
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: busy\r\n\r\nx\r\n") == {}
            assert p.poll() is None
        finally:
            for c in conns:
                c.close()


def test_bd_detaches_and_stops_on_sigterm(inst):
    with daemon(inst, mode="-bd") as (p, port):
        assert p.wait(10) == 0
        pid = wait_for(lambda: open(inst.params["pid_file"]).read().strip()
                       if os.path.exists(inst.params["pid_file"]) else None)
        pid = int(pid)
        assert pid != p.pid
        try:
            with smtplib.SMTP("127.0.0.1", port) as c:
                assert c.noop()[0] == 250
        finally:
            os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not os.path.exists(inst.params["pid_file"]), 20)
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)


def test_maildrop_is_picked_up_by_the_daemon(inst):
    from pymta import envelope, queue_maildrop
    with daemon(inst) as (p, port):
        env = envelope.Envelope(sender="u@example.test")
        env.add_recipient("root@example.test")
        queue_maildrop.drop(inst.spool, env, [b"Subject: dropped\n\nx\n"])
        assert wait_for(lambda: b"Subject: dropped" in inst.mailbox(), 20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_listener_runs_as_mail_owner_and_master_as_root():
    top = tempfile.mkdtemp(prefix="pymta-priv-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        inst = Instance(top)
        with daemon(inst, mail_owner="mail") as (p, port):
            child = wait_for(lambda: listener_pids(inst))[-1]
            with open(f"/proc/{child}/status") as f:
                uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", f.read(), re.M).groups()
            import pwd
            assert uids == (str(pwd.getpwnam("mail").pw_uid),) * 2
            with open(f"/proc/{p.pid}/status") as f:
                assert re.search(r"^Uid:\s+0\s", f.read(), re.M)
            with smtplib.SMTP("127.0.0.1", port) as c:
                assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: priv\r\n\r\nx\r\n") == {}
            assert wait_for(lambda: b"Subject: priv" in inst.mailbox(), 20)
    finally:
        subprocess.run(["rm", "-rf", top])


def _served_cert(port):
    """The DER certificate the server shows after STARTTLS, or None when
    STARTTLS is not offered."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        if not c.has_extn("starttls"):
            return None
        c.starttls(context=ctx)
        assert c.ehlo()[0] == 250
        return c.sock.getpeercert(binary_form=True)


def _make_cert(key, cert, cn):
    import ssl
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", f"/CN={cn}"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    os.chmod(cert, 0o644)
    with open(cert) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_sighup_hands_a_renewed_root_only_key_to_the_listener_and_keeps_the_old_without_one():
    top = tempfile.mkdtemp(prefix="pymta-tls-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        inst = Instance(top)
        key, cert = os.path.join(top, "key.pem"), os.path.join(top, "cert.pem")
        first = _make_cert(key, cert, "first.example.test")
        with daemon(inst, mail_owner="mail", smtpd_tls_cert_file=cert,
                    smtpd_tls_key_file=key) as (p, port):
            assert _served_cert(port) == first
            # A renewal: new files, only root may read the key; then a reload.
            os.unlink(key)
            renewed = _make_cert(key, cert, "renewed.example.test")
            p.send_signal(signal.SIGHUP)
            assert wait_for(lambda: _served_cert(port) == renewed, 10)
            assert "TLS certificate and key loaded again (read by the master)" in inst.maillog()
            # A key nobody can read: the reload keeps the certificate in use.
            os.unlink(key)
            p.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "cannot read TLS certificate or key" in inst.maillog(), 10)
            # The listener's own attempt fails too, and it says it keeps the old.
            assert wait_for(lambda: "STARTTLS goes on with the certificate and key loaded before"
                            in inst.maillog(), 10)
            assert _served_cert(port) == renewed
        log = inst.maillog()
        assert "No such file or directory" in log and "the listeners keep theirs" in log
        assert "STARTTLS goes on with the certificate and key loaded before" in log
    finally:
        subprocess.run(["rm", "-rf", top])


def test_submissions_listener_speaks_tls_at_once(inst, tmp_path):
    import ssl
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=mx.example.test"],
                   check=True, capture_output=True, timeout=60)
    sub = free_port()
    with daemon(inst, submissions_listen=f"127.0.0.1:{sub}", smtpd_tls_cert_file=cert,
                smtpd_tls_key_file=key) as (p, port):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", sub, context=ctx, timeout=10) as c:
            c.ehlo()
            assert c.has_extn("auth") and not c.has_extn("starttls")
            assert c.mail("a@b.example") == (530, b"5.7.0 Authentication required")
    assert f"daemon listening on 127.0.0.1:{sub} (submissions, implicit TLS)" in inst.maillog()


def test_sendmail_hands_a_new_message_to_the_running_daemon(inst):
    with daemon(inst) as (p, port):
        r = inst.sendmail("-i", "root", input=b"Subject: via notify\n\nhello\n")
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: b"Subject: via notify" in inst.mailbox(), 20)
        qid = re.search(r"(\w+): from=<[^>]*>, size=\d+, class=0", inst.maillog()).group(1)
        # The line is logged just after the mailbox is written.
        sent = wait_for(lambda: re.search(rf"(\d+)\]: {qid}: to=<root@[^>]*>.*stat=Sent", inst.maillog()))
        assert sent and int(sent.group(1)) == p.pid       # delivered by the daemon's master
    # With no daemon reading queue/notify, sendmail's own background child delivers.
    r = inst.sendmail("-i", "root", input=b"Subject: no daemon\n\nhello\n")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: b"Subject: no daemon" in inst.mailbox(), 20)


def test_a_message_handed_over_while_locked_a_moment_is_delivered_when_free(inst):
    """The master skips a message it finds locked; one locked for a moment
    when it is handed over (pymta hold, a queue runner's look) is tried
    again a second later, not left for the next queue run (none here)."""
    import fcntl
    with daemon(inst) as (p, port):
        r = inst.sendmail("-odq", "-i", "root", input=b"Subject: locked a moment\n\nhello\n")
        assert r.returncode == 0, r.stderr
        qid, = inst.spool.ids()
        fd = os.open(inst.spool.path("df", qid), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            w = os.open(os.path.join(inst.spool.dir, "notify"), os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, qid.encode() + b"\n")
            os.close(w)
            time.sleep(1.5)
            assert b"Subject: locked a moment" not in inst.mailbox()
        finally:
            os.close(fd)
        assert wait_for(lambda: b"Subject: locked a moment" in inst.mailbox(), 10)


@pytest.mark.parametrize("model", ["loop", "threads"])
def test_out_of_descriptors_the_listener_pauses_then_serves_again(inst, model):
    import resource
    port = free_port()
    inst.write_config(mail_owner="root", smtpd_listen=f"127.0.0.1:{port}", smtpd_listeners=1,
                      smtpd_process_model=model)

    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    p = subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C", inst.conf_path, "-bD"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=few_fds)
    conns = []
    try:
        assert wait_for(lambda: can_connect(port)), "daemon did not start"
        for _ in range(80):      # more than the listener can hold open
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert wait_for(lambda: "Too many open files" in inst.maillog(), 10)
        time.sleep(2.5)          # paused, not spinning: a line a second at most
        assert inst.maillog().count("Too many open files") <= 5
        for c in conns:
            c.close()
        conns = []
        assert wait_for(lambda: _noop_ok(port), 20)
    finally:
        for c in conns:
            c.close()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


@pytest.mark.unit
@pytest.mark.parametrize("cpus,expected", [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (16, 4), (None, 1)])
def test_default_listener_count_follows_the_cpus(inst, monkeypatch, cpus, expected):
    from pymta import daemon as D
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert D.listener_count(inst.cfg.with_overrides(smtpd_listeners=0)) == expected
    assert D.listener_count(inst.cfg.with_overrides(smtpd_listeners=3)) == 3
