"""The SMTP side against a hostile client, on the real daemon (``sendmail
-bD``) over sockets, in every process model: nothing a client sends
reaches the mail log or a bounce unescaped, AUTH failures cost time and
end the session, one client cannot take every session slot, and a client
that trickles cannot stay past its deadline."""

import base64
import contextlib
import email
import os
import re
import shutil
import ssl
import subprocess
import time

import pytest

from pymta import auth
from reliability_util import Daemon, Raw, daemon_instance

MODELS = ["loop", "threads", "fork"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl command not available")
    d = tmp_path_factory.mktemp("cert")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=mx.example.test"],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


@pytest.fixture
def daemon(make_instance):
    """daemon(**params) -> (inst, Daemon): a running daemon (mail stays queued)."""
    stack = contextlib.ExitStack()

    def start(**params):
        inst = daemon_instance(make_instance, **params)
        return inst, stack.enter_context(Daemon(inst))

    with stack:
        yield start


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


def log_lines(inst):
    """The mail log as lines, read as bytes: it must be UTF-8 throughout."""
    with open(inst.params["maillog_file"], "rb") as f:
        return f.read().decode("utf-8").split("\n")


def client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_session(port, helo=b"EHLO client.test\r\n"):
    """A Raw session, after STARTTLS and a second EHLO."""
    c = Raw(port)
    assert c.reply()[0] == 220
    assert c.cmd(helo)[0] == 250
    assert c.cmd(b"STARTTLS\r\n")[0] == 220
    c.f.close()
    c.sock = client_ctx().wrap_socket(c.sock, server_hostname="mx.example.test")
    c.f = c.sock.makefile("rb")
    assert c.cmd(b"EHLO client.test\r\n")[0] == 250
    return c


def password_file(tmp_path):
    path = str(tmp_path / "passwd")
    tmp, _ = auth.set_password(path, "alice", "s3cret")
    os.rename(tmp, path)
    return path


# -- the mail log -------------------------------------------------------------------

FORGED = "Dec  2 04:00:00 mx pymta[1]: 4AB: to=<victim@example.test>, status=sent"
# fail2ban's postfix-sasl filter (filter.d/postfix.conf, before its 0.10 rewrite)
FAIL2BAN = re.compile(r"warning: [-._\w]+\[(?P<host>[0-9.]+)\]: SASL ((?i:LOGIN)|PLAIN|"
                      r"(?:CRAM|DIGEST)-MD5) authentication failed(:[ A-Za-z0-9+/:]*={0,2})?\s*$")


@pytest.mark.parametrize("model", MODELS)
def test_lf_cr_nul_and_non_utf8_from_a_client_never_make_a_log_line(daemon, cert, model,
                                                                     tmp_path):
    inst, _ = daemon(smtpd_process_model=model, smtpd_tls_cert_file=cert[0],
                     smtpd_tls_key_file=cert[1], mynetworks="192.0.2.0/24",
                     smtpd_sasl_failure_delay="0s", smtpd_sasl_failure_limit="10",
                     smtpd_sasl_password_file=password_file(tmp_path))
    evil = ("x\n" + FORGED + "\r\n" + FORGED + "\0z").encode() + b"\xff\xfe"
    with tls_session(_.port) as c:
        # AUTH LOGIN with the user name as the injection.
        assert c.cmd(b"AUTH LOGIN " + base64.b64encode(evil) + b"\r\n")[0] == 334
        assert c.cmd(base64.b64encode(b"wrong") + b"\r\n")[0] == 535
        # AUTH PLAIN (user names cannot hold NUL there).
        plain = b"\0" + evil.replace(b"\0", b"") + b"\0wrong"
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(plain) + b"\r\n")[0] == 535
        # A non-UTF-8 sender and recipient in a reject line (relay denied).
        assert c.cmd(b"MAIL FROM:<\xff\xfe\xe2\x80\xa8@b.example> SMTPUTF8\r\n")[0] == 250
        code, text = c.cmd(b"RCPT TO:<\xfe\x85x@elsewhere.example>\r\n")
        assert code == 554, text
    assert wait_for(lambda: any("Relay access denied" in ln for ln in log_lines(inst)))
    lines = log_lines(inst)
    assert not [ln for ln in lines if "4AB:" in ln and not ln.startswith(lines[0][:3])
                or ln.startswith("Dec  2 04:00:00")]
    for ln in lines:
        assert ln.isprintable(), repr(ln)
    fails = [ln for ln in lines if "sasl_username=" in ln and "authentication failure" in ln]
    assert len(fails) == 2, lines
    assert "sasl_username=x\\012Dec  2 04:00:00 mx pymta[1]: 4AB" in fails[0]
    assert "status=sent\\015\\012Dec" in fails[0]
    assert "status=sent\\000z\\377\\376" in fails[0]
    reject = [ln for ln in lines if "Relay access denied" in ln]
    assert "from=<\\377\\376\\u2028@b.example>" in reject[0], reject
    assert "to=<\\376\\302\\205x@elsewhere.example>" in reject[0] or \
        "to=<\\376\\205x@elsewhere.example>" in reject[0], reject


@pytest.mark.parametrize("model", MODELS)
def test_auth_failures_wait_longer_each_time_end_the_session_and_log_for_fail2ban(
        daemon, cert, model, tmp_path):
    inst, d = daemon(smtpd_process_model=model, smtpd_tls_cert_file=cert[0],
                     smtpd_tls_key_file=cert[1], smtpd_sasl_failure_delay="1s",
                     smtpd_sasl_failure_limit="2", smtpd_sasl_password_file=password_file(tmp_path))
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n"
    with tls_session(d.port) as c:
        t0 = time.monotonic()
        # Pipelined: the second attempt is not read before the first's delay.
        c.send(bad + bad + b"NOOP\r\n")
        assert c.reply()[0] == 535
        t1 = time.monotonic()
        assert c.reply()[0] == 535
        t2 = time.monotonic()
        code, text = c.reply()
        assert code == 421 and b"too many authentication failures" in text, text
        assert c.reply() == (0, b"")          # closed: the NOOP was never answered
    assert 1.0 <= t1 - t0 < 1.9, t1 - t0
    assert 2.0 <= t2 - t1 < 2.9, t2 - t1
    # A client that logs in right is not delayed.
    with tls_session(d.port) as c:
        t0 = time.monotonic()
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret") + b"\r\n")[0] == 235
        assert time.monotonic() - t0 < 0.9
    assert wait_for(lambda: sum(bool(FAIL2BAN.search(ln)) for ln in log_lines(inst)) == 2)
    hosts = {FAIL2BAN.search(ln).group("host") for ln in log_lines(inst) if FAIL2BAN.search(ln)}
    assert hosts == {"127.0.0.1"}
    assert any("sasl_username=alice: authentication failure 2 of 2" in ln
               for ln in log_lines(inst))


# -- DSN parameters --------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_envid_and_orcpt_decoding_to_control_characters_get_501(daemon, model):
    inst, d = daemon(smtpd_process_model=model)
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd(b"EHLO client.test\r\n")[0] == 250
        for envid in (b"x+0D+0AX-Injected:+20yes", b"a+00b", b"a+09b", b"a+7Fb", b"+C3+A9"):
            code, text = c.cmd(b"MAIL FROM:<a@b.example> ENVID=" + envid + b"\r\n")
            assert (code, text[4:9]) == (501, b"5.5.4"), (envid, text)
        assert c.cmd(b"MAIL FROM:<a@b.example> ENVID=ok+2Bid\r\n")[0] == 250
        for orcpt in (b"rfc822;a+0D+0A--boundary@x", b"rfc822;a+0Ab@x", b"rfc822;a+00@x",
                      b"rfc822;a+C2+85@x", b"rfc+0A822;a@x", b"x:y;a@x"):
            code, text = c.cmd(b"RCPT TO:<root@example.test> ORCPT=" + orcpt + b"\r\n")
            assert (code, text[4:9]) == (501, b"5.5.4"), (orcpt, text)
        assert c.cmd(b"RCPT TO:<root@example.test> ORCPT=rfc822;Root+40example.test\r\n")[0] == 250
        assert c.cmd(b"RCPT TO:<root@example.test> ORCPT=utf-8;r\xc3\xa9@example.test\r\n")[0] \
            == 250
        assert c.cmd(b"QUIT\r\n")[0] == 221


@pytest.mark.unit
def test_a_bounce_escapes_what_it_copies_from_the_client(tmp_path):
    """Older queue files (or any path that let them in) may hold ENVID,
    ORCPT and addresses with CR/LF: the bounce keeps them on one line."""
    from pymta import bounce, config
    from pymta import envelope as E
    from pymta.queue_dir import Spool
    cfg = config.from_dict(queue_directory=str(tmp_path / "spool"),
                           myhostname="mx.example.test", myorigin="example.test")
    sp = Spool.from_config(cfg)
    sp.create()
    env = E.Envelope(sender="alice@sender.test", created=int(time.time()) - 60,
                     envid="id\r\nX-Injected: envid\r\n\r\n--fake")
    env.recipients.append(E.Recipient("bob@remote.test", orcpt="rfc822;b\r\nX-Injected: orcpt\0"))
    with sp.new_message() as w:
        w.write(b"From: alice@sender.test\nSubject: orig\n\nbody\n")
        w.commit(env)
    for r in env.recipients:
        r.set_state(E.FAILED, "5.1.1", "550 5.1.1 No\r\nX-Injected: diag", relay="mx [192.0.2.1]")
    lock = bounce.report(cfg, env, env.recipients, "failed", spool=sp)
    with lock:
        with sp.open_data(lock.id) as f:
            data = f.read()
    assert b"\nX-Injected" not in data and b"\0" not in data
    msg = email.message_from_bytes(data)
    parts = msg.get_payload()
    assert len(parts) == 3
    status = parts[1].get_payload()
    assert status[0]["Original-Envelope-Id"] == "id X-Injected: envid  --fake"
    assert status[1]["Original-Recipient"] == "rfc822; b X-Injected: orcpt+00"
    assert status[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No X-Injected: diag"
