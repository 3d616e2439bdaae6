"""The SMTP service over real sockets on 127.0.0.1, with smtplib and raw sockets."""

import base64
import contextlib
import logging
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time

import pytest

from helpers import wait_for
from pymta import auth, smtpd_common

LOG = logging.getLogger("pymta")


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self):
        return "\n".join(self.lines)


@pytest.fixture
def logs():
    h = ListHandler()
    LOG.addHandler(h)
    LOG.setLevel(logging.INFO)
    yield h
    LOG.removeHandler(h)


@contextlib.contextmanager
def running(inst, submission=False, **params):
    inst.write_config(**params)
    services = smtpd_common.Services(inst.cfg, LOG)
    model = smtpd_common.driver(services.cfg)
    srv = model.Server(smtpd_common.bind("127.0.0.1:0"), services, submission)
    stop = threading.Event()
    t = threading.Thread(target=model.serve, args=([srv],), kwargs={"stop": stop.is_set})
    t.start()
    try:
        yield srv.socket.getsockname()[1]
    finally:
        stop.set()
        smtpd_common.STOPPING.set()
        t.join(30)
        smtpd_common.STOPPING.clear()
        assert not t.is_alive()


MODELS = ["loop", "threads", "fork"]
IN_PROCESS = ["loop", "threads"]   # sessions in this process: they log here, share its counts


def queued(inst):
    return [n for n in sorted(os.listdir(inst.spool.dir))]


def raw(port, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    f = s.makefile("rb")
    return s, f


def raw_in_data(port):
    """A raw session past EHLO, MAIL, RCPT and DATA's 354."""
    s, f = raw(port)
    read_reply(f)
    s.sendall(b"EHLO x\r\n")
    read_reply(f)
    s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n")
    for _ in range(3):
        read_reply(f)
    return s, f


def read_reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            return lines
        lines.append(line)
        if line[3:4] == b" ":
            return lines


def test_smtplib_message_is_queued_with_received_header_and_logged(inst, logs):
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            code, msg = c.ehlo("client.example")
            assert code == 250 and b"PIPELINING" in msg and b"8BITMIME" in msg
            # Date and Message-ID given: from mynetworks, missing ones are added.
            refused = c.sendmail("a@b.example", ["root@example.test"],
                                 b"Subject: hi\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                                 b"Message-ID: <hi@b.example>\r\n\r\n.leading dot\r\nbody\r\n")
            assert refused == {}
    names = queued(inst)
    assert [n[:2] for n in names] == ["df", "qf"]
    qid = names[0][2:]
    with open(inst.spool.path("df", qid), "rb") as f:
        data = f.read()
    assert data.startswith(b"Received: from client.example (unknown [127.0.0.1])\n\tby mx.example.test (pymta) with ESMTP id " + qid.encode())
    assert data.endswith(b"Subject: hi\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
                         b"Message-ID: <hi@b.example>\n\n.leading dot\nbody\n")
    env = inst.spool.read(qid)
    assert env.sender == "a@b.example" and env.client_addr == "127.0.0.1"
    text = logs.text()
    assert "connect from unknown[127.0.0.1]" in text
    assert (f"{qid}: from=<a@b.example>, size={len(data)}, nrcpts=1, msgid=<hi@b.example>, "
            "proto=ESMTP, relay=unknown [127.0.0.1]") in text


@pytest.mark.parametrize("model", MODELS)
def test_bdat_chunks_pipelined_over_a_socket_are_queued_as_one_message(inst, model):
    body = (b"Subject: chunks\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <chunks@b.example>\r\n\r\n" + b"line of text\r\n" * 20000)
    cut = len(body) // 3
    with running(inst, smtpd_process_model=model) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\n")
        assert b"250-CHUNKING\r\n" in b"".join(read_reply(f))
        s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\n"
                  + b"BDAT %d\r\n" % cut + body[:cut]
                  + b"BDAT %d LAST\r\n" % (len(body) - cut) + body[cut:] + b"QUIT\r\n")
        replies = [read_reply(f)[-1] for _ in range(5)]
        s.close()
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"221"]
    assert replies[3].startswith(b"250 2.0.0 Ok: queued as ")
    qid = replies[3].split()[-1].decode()
    with open(inst.spool.path("df", qid), "rb") as fh:
        assert fh.read().endswith(body.replace(b"\r\n", b"\n"))


def test_pipelined_commands_get_all_replies_in_order(inst):
    with running(inst) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\n")
        read_reply(f)
        s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nRCPT TO:<nosuch-user-x@example.test>\r\n"
                  b"RCPT TO:<postmaster@example.test>\r\nDATA\r\n")
        replies = [read_reply(f)[-1][:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"550", b"250", b"354"]
        s.sendall(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
        assert read_reply(f)[-1].startswith(b"250 2.0.0 Ok: queued as")
        assert read_reply(f)[-1].startswith(b"221")
        f.close()
        s.close()
    env = inst.spool.read(queued(inst)[0][2:])
    assert [r.address for r in env.recipients] == ["root@example.test", "postmaster@example.test"]


def test_two_messages_in_one_write_are_committed_and_answered_in_order(inst):
    # The commit of the first runs away from the event loop; what the client
    # sent after its end waits, then is answered in order.
    with running(inst) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\n")
        read_reply(f)
        tx = (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n"
              b"Subject: %d\r\n\r\nx\r\n.\r\n")
        s.sendall(tx % 1 + tx % 2 + b"QUIT\r\n")
        replies = [read_reply(f)[-1] for _ in range(9)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250", b"250", b"250", b"354",
                                            b"250", b"221"]
        ids = [replies[i].split()[-1].decode() for i in (3, 7)]
        f.close()
        s.close()
    assert sorted(n[2:] for n in queued(inst) if n.startswith("qf")) == sorted(ids)
    subjects = sorted(open(inst.spool.path("df", i), "rb").read().split(b"Subject: ")[1][:1] for i in ids)
    assert subjects == [b"1", b"2"]


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"])
def test_smuggled_second_transaction_never_becomes_a_message(inst, ending):
    with running(inst) as port:
        s, f = raw_in_data(port)
        s.sendall(b"Subject: one\r\n\r\nfirst" + ending
                  + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n"
                  + b"Subject: smuggled\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        replies = [read_reply(f)[-1][:3] for _ in range(2)]
        f.close()
        s.close()
    assert replies == [b"550", b"221"]
    assert len([n for n in queued(inst) if n.startswith("qf")]) <= 1
    assert queued(inst) == []


def test_relay_from_outside_mynetworks_is_denied_and_logged(inst, logs):
    with running(inst, mynetworks="192.0.2.0/24") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            c.mail("a@b.example")
            assert c.rcpt("x@elsewhere.example") == (554, b"5.7.1 <x@elsewhere.example>: Relay access denied")
            assert c.rcpt("user%elsewhere.example@example.test")[0] == 554
            assert c.rcpt("root@example.test")[0] == 250
    assert "reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <x@elsewhere.example>: Relay access denied" in logs.text()


def test_relay_from_mynetworks_is_allowed(inst):
    with running(inst, mynetworks="127.0.0.0/8") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            c.mail("a@b.example")
            assert c.rcpt("x@elsewhere.example")[0] == 250


def test_unknown_local_recipient_is_550(inst):
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            c.mail("a@b.example")
            code, msg = c.rcpt("no-such-user-zz@example.test")
            assert code == 550 and msg.startswith(b"5.1.1")


def test_client_dropping_mid_data_leaves_nothing(inst, logs):
    with running(inst) as port:
        s, f = raw_in_data(port)
        s.sendall(b"Subject: half\r\n\r\n" + b"x" * 100000)
        f.close()
        s.close()
        assert wait_for(lambda: "lost connection after DATA from unknown[127.0.0.1]" in logs.text(), 10)
        assert wait_for(lambda: queued(inst) == [], 5)


def test_size_declared_over_limit_and_free_space_below_minfree(inst):
    with running(inst, message_size_limit=1000) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            assert c.mail("a@b.example", ["SIZE=1001"])[0] == 552
            assert c.mail("a@b.example", ["SIZE=999"])[0] == 250
            c.rcpt("root@example.test")
            assert c.data(b"x" * 2000)[0] == 552
    with running(inst, queue_minfree=10 ** 18) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            assert c.mail("a@b.example") == (452, b"4.3.1 Insufficient system storage")
    assert queued(inst) == []


def _greeting(port):
    s, f = raw(port)
    try:
        return read_reply(f)[0]
    finally:
        f.close()
        s.close()


@pytest.mark.parametrize("model", MODELS)
def test_session_limit_and_per_client_limit_answer_421(inst, model):
    with running(inst, smtpd_session_limit=2, smtpd_process_model=model) as port:
        a, fa = raw(port)
        b, fb = raw(port)
        assert read_reply(fa)[0].startswith(b"220") and read_reply(fb)[0].startswith(b"220")
        c, fc = raw(port)
        assert read_reply(fc)[0].startswith(b"421 4.7.0")
        for s, f in ((a, fa), (b, fb), (c, fc)):
            f.close()
            s.close()
    with running(inst, smtpd_client_connection_count_limit=1, smtpd_process_model=model,
                 smtpd_client_event_limit_exceptions="") as port:
        a, fa = raw(port)
        read_reply(fa)
        c, fc = raw(port)
        assert read_reply(fc)[0].startswith(b"421 4.7.0")
        a.sendall(b"QUIT\r\n")
        read_reply(fa)
        assert fa.read() == b""             # closed by the server
        # Its slot is free once the session is over (fork: once the
        # listener has reaped its child, a moment later): a new one is served.
        assert wait_for(lambda: _greeting(port).startswith(b"220"), 10)
        for s, f in ((a, fa), (c, fc)):
            f.close()
            s.close()


def _trickle(port, prelude, seconds=8.0):
    """Send ``prelude`` (whole lines), then one byte every 0.3 s without a
    line end; returns (seconds from the first byte to the server's reply or
    close, what the server said)."""
    s, f = raw(port)
    read_reply(f)
    if prelude:
        s.sendall(prelude)
        for _ in range(prelude.count(b"\n")):
            read_reply(f)
    t0 = time.monotonic()
    got = b""
    s.settimeout(0.3)
    while time.monotonic() - t0 < seconds:
        try:
            s.sendall(b"x")
        except OSError:
            break
        try:
            chunk = s.recv(1000)
        except socket.timeout:
            continue
        except OSError:
            break
        got += chunk
        if not chunk or b"\n" in got:
            break
    elapsed = time.monotonic() - t0
    f.close()
    s.close()
    return elapsed, got


@pytest.mark.parametrize("model", MODELS)
def test_client_trickling_a_command_line_is_dropped_after_smtpd_timeout(inst, logs, model):
    with running(inst, smtpd_timeout="2s", smtpd_process_model=model) as port:
        elapsed, got = _trickle(port, b"EHLO x\r\n")
    assert got.startswith(b"421 4.4.2"), got
    assert 1.5 < elapsed < 5
    if model in IN_PROCESS:      # a forked session logs in its own process
        assert "timeout after EHLO from unknown[127.0.0.1]" in logs.text()


@pytest.mark.parametrize("model", MODELS)
def test_client_trickling_a_message_line_is_dropped_after_smtpd_timeout(inst, model):
    with running(inst, smtpd_timeout="2s", smtpd_min_data_rate=0,
                 smtpd_process_model=model) as port:
        elapsed, got = _trickle(port, b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n"
                                      b"RCPT TO:<root@example.test>\r\nDATA\r\n")
    assert got.startswith(b"421 4.4.2"), got
    assert 1.5 < elapsed < 5
    assert queued(inst) == []


def test_slow_message_of_prompt_lines_outlives_smtpd_timeout_without_min_rate(inst):
    with running(inst, smtpd_timeout="2s", smtpd_min_data_rate=0) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n")
        for _ in range(4):
            read_reply(f)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            s.sendall(b"a line\r\n")
            time.sleep(0.5)
        s.sendall(b".\r\n")
        reply = read_reply(f)
        f.close()
        s.close()
    assert reply and reply[0].startswith(b"250"), reply


def test_without_per_record_deadline_each_byte_restarts_the_clock(inst):
    with running(inst, smtpd_timeout="2s", smtpd_per_record_deadline="no") as port:
        elapsed, got = _trickle(port, b"", seconds=4)
    assert got == b"" and elapsed >= 4


def _connect_from(port, source):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s, s.makefile("rb")


@pytest.mark.parametrize("model", MODELS)
def test_one_client_cannot_take_the_sessions_of_others(inst, model):
    # Defaults, but 127.0.0.1 not exempt: one client is refused well before
    # smtpd_session_limit, and another address still gets in.
    cfg_limit = inst.cfg.smtpd_session_limit
    with running(inst, mynetworks="127.0.0.1/32", smtpd_process_model=model,
                 smtpd_client_event_limit_exceptions="") as port:
        held, refused_at = [], None
        try:
            for i in range(cfg_limit):
                s, f = _connect_from(port, "127.0.0.1")
                held.append((s, f))
                if read_reply(f)[0].startswith(b"421 4.7.0"):
                    refused_at = i
                    break
            b, fb = _connect_from(port, "127.0.0.2")
            held.append((b, fb))
            other = read_reply(fb)[0]
        finally:
            for s, f in held:
                f.close()
                s.close()
    assert refused_at is not None and refused_at <= cfg_limit // 4, refused_at
    assert other.startswith(b"220"), other


def test_mynetworks_clients_are_exempt_from_the_per_client_limit(inst):
    with running(inst, smtpd_client_connection_count_limit=2) as port:
        held = []
        try:
            for _ in range(4):
                s, f = raw(port)
                held.append((s, f))
                assert read_reply(f)[0].startswith(b"220")
        finally:
            for s, f in held:
                f.close()
                s.close()
        # Outside the exceptions the same limit holds.
        inst.write_config(smtpd_client_event_limit_exceptions="127.0.0.2")
    with running(inst, smtpd_client_connection_count_limit=2) as port:
        held = []
        try:
            replies = []
            for _ in range(3):
                s, f = raw(port)
                held.append((s, f))
                replies.append(read_reply(f)[0][:9])
        finally:
            for s, f in held:
                f.close()
                s.close()
        assert replies == [b"220 mx.ex", b"220 mx.ex", b"421 4.7.0"]


@pytest.mark.parametrize("model", IN_PROCESS)
def test_idle_client_gets_421_after_smtpd_timeout(inst, logs, model):
    with running(inst, smtpd_timeout="1s", smtpd_process_model=model) as port:
        s, f = raw(port)
        read_reply(f)
        t0 = time.time()
        assert read_reply(f)[0].startswith(b"421 4.4.2")
        assert 0.8 < time.time() - t0 < 5
        f.close()
        s.close()
    assert "timeout after CONNECT from unknown[127.0.0.1]" in logs.text()


@pytest.mark.parametrize("model", MODELS)
def test_slow_data_below_min_rate_gets_421(inst, model):
    with running(inst, smtpd_timeout="1s", smtpd_min_data_rate=1000, smtpd_process_model=model) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n")
        for _ in range(4):
            read_reply(f)
        got = None
        for _ in range(10):
            try:
                s.sendall(b"slow\r\n")
            except OSError:
                break
            time.sleep(0.4)
            s.settimeout(0.01)
            try:
                got = s.recv(1000)
            except socket.timeout:
                continue
            except OSError:
                break
            if got:
                break
        f.close()
        s.close()
    assert got is not None and got.startswith(b"421 4.4.2")
    assert queued(inst) == []


@pytest.mark.parametrize("model", MODELS)
def test_early_talker_before_greeting_gets_554(inst, model):
    with running(inst, smtpd_greet_pause="1s", smtpd_process_model=model) as port:
        s, f = raw(port)
        s.sendall(b"EHLO early\r\n")
        assert read_reply(f)[0].startswith(b"554 5.5.1")
        f.close()
        s.close()
        s, f = raw(port)
        assert read_reply(f)[0].startswith(b"220")
        f.close()
        s.close()


def test_megabyte_line_and_binary_flood_do_not_stop_the_server(inst):
    with running(inst) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"x" * (1 << 20))
        s.sendall(b"\r\nNOOP\r\n")
        assert read_reply(f)[0].startswith(b"500 5.5.2")
        assert read_reply(f)[0].startswith(b"250")
        f.close()
        s.close()
        s, f = raw(port)
        read_reply(f)
        try:
            s.sendall(os.urandom(300000).replace(b"\n", b"\r\n"))
        except OSError:
            pass
        replies = []
        while True:
            r = read_reply(f)
            if not r:
                break
            replies.append(r[-1][:3])
        assert replies[-1] == b"421"
        f.close()
        s.close()
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.noop()[0] == 250


@pytest.mark.parametrize("model", IN_PROCESS)
def test_two_hundred_concurrent_sessions(inst, model):
    with running(inst, smtpd_session_limit=250, smtpd_client_connection_count_limit=250, smtpd_process_model=model) as port:
        results = []

        def one(i):
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                    c.sendmail("a@b.example", ["root@example.test"], b"Subject: %d\r\n\r\nx\r\n" % i)
                results.append(True)
            except Exception as e:  # noqa: BLE001 - reported below
                results.append(e)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results.count(True) == 200, [r for r in results if r is not True][:3]
    assert len([n for n in queued(inst) if n.startswith("qf")]) == 200


def test_forking_process_model_accepts_mail(inst):
    with running(inst, smtpd_process_model="fork") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.sendmail("a@b.example", ["root@example.test"], b"Subject: f\r\n\r\nx\r\n") == {}
    assert len([n for n in queued(inst) if n.startswith("qf")]) == 1


@pytest.fixture
def cert(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl command not available")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(crt), "-days", "2", "-subj", "/CN=mx.example.test"],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


def _client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.parametrize("model", IN_PROCESS)
def test_starttls_then_auth_then_relay(inst, cert, logs, model):
    pwfile = os.path.join(inst.root, "passwd")
    tmp, _ = auth.set_password(pwfile, "alice", "s3cret")
    os.rename(tmp, pwfile)
    with running(inst, smtpd_tls_cert_file=cert[0], smtpd_tls_key_file=cert[1],
                 smtpd_sasl_password_file=pwfile, mynetworks="192.0.2.0/24", smtpd_process_model=model) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            assert c.has_extn("starttls") and not c.has_extn("auth")
            assert c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode())[0] == 538
            c.starttls(context=_client_ctx())
            c.ehlo()
            assert c.has_extn("auth") and not c.has_extn("starttls")
            assert c.docmd("STARTTLS")[0] == 503
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("alice", "wrong")
            c.login("alice", "s3cret")
            assert c.sendmail("alice@example.test", ["x@elsewhere.example"], b"Subject: r\r\n\r\nx\r\n") == {}
    env = inst.spool.read(queued(inst)[0][2:])
    assert env.protocol == "ESMTPSA" and env.auth_user == "alice"
    text = logs.text()
    assert "TLS connection established from unknown[127.0.0.1]" in text
    assert "sasl_method=PLAIN, sasl_username=alice" in text or "sasl_method=LOGIN, sasl_username=alice" in text
    assert "authentication failed" in text


@pytest.mark.parametrize("model", MODELS)
def test_plaintext_pipelined_after_starttls_is_discarded(inst, cert, model):
    with running(inst, smtpd_tls_cert_file=cert[0], smtpd_tls_key_file=cert[1], smtpd_process_model=model) as port:
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"EHLO x\r\n")
        read_reply(f)
        s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@b.example>\r\n")
        assert read_reply(f)[0].startswith(b"220 2.0.0")
        tls = _client_ctx().wrap_socket(s, server_hostname="mx.example.test")
        tf = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@b.example>\r\n")
        assert read_reply(tf)[0].startswith(b"503")   # state reset: EHLO again first
        tls.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
        read_reply(tf)
        assert read_reply(tf)[0].startswith(b"250 2.1.0")
        tf.close()
        tls.close()
        f.close()


def test_submission_requires_auth_before_mail(inst, cert):
    with running(inst, submission=True, smtpd_tls_cert_file=cert[0], smtpd_tls_key_file=cert[1]) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            assert c.mail("a@b.example")[0] == 530
            c.starttls(context=_client_ctx())
            c.ehlo()
            assert c.mail("a@b.example") == (530, b"5.7.0 Authentication required")


@pytest.mark.parametrize("model", MODELS)
def test_submissions_speaks_tls_from_the_first_byte_and_requires_auth(inst, cert, model):
    pwfile = os.path.join(inst.root, "passwd")
    tmp, _ = auth.set_password(pwfile, "alice", "s3cret")
    os.rename(tmp, pwfile)
    with running(inst, submission="tls", smtpd_tls_cert_file=cert[0], smtpd_tls_key_file=cert[1],
                 smtpd_sasl_password_file=pwfile, mynetworks="192.0.2.0/24",
                 smtpd_process_model=model) as port:
        s, f = raw(port, timeout=5)
        s.sendall(b"EHLO plain\r\n")
        try:
            assert not f.readline().startswith(b"220")     # no greeting in plain text
        except OSError:
            pass
        s.close()
        with smtplib.SMTP_SSL("127.0.0.1", port, context=_client_ctx(), timeout=10) as c:
            c.ehlo()
            assert c.has_extn("auth") and not c.has_extn("starttls")
            assert c.mail("alice@example.test") == (530, b"5.7.0 Authentication required")
            c.rset()
            c.login("alice", "s3cret")
            assert c.sendmail("alice@example.test", ["x@elsewhere.example"],
                              b"Subject: 465\r\n\r\nx\r\n") == {}
    env = inst.spool.read(queued(inst)[0][2:])
    assert env.protocol == "ESMTPSA" and env.auth_user == "alice" and env.trusted


def test_encrypt_level_requires_tls_before_mail(inst, cert):
    with running(inst, smtpd_tls_cert_file=cert[0], smtpd_tls_key_file=cert[1],
                 smtpd_tls_security_level="encrypt") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            assert c.mail("a@b.example") == (530, b"5.7.0 Must issue a STARTTLS command first")
            c.starttls(context=_client_ctx())
            c.ehlo()
            assert c.mail("a@b.example")[0] == 250


def test_sendmail_bs_speaks_smtp_on_stdin(inst):
    dialogue = (b"EHLO local\r\nMAIL FROM:<me@example.test>\r\nRCPT TO:<root@example.test>\r\n"
                b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\nSubject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    p = inst.sendmail("-bs", input=dialogue)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith(b"220 mx.example.test")
    assert b"250 2.0.0 Ok: queued as " in out and out.endswith(b"221 2.0.0 Bye\r\n")
    qid = queued(inst)[0][2:]
    env = inst.spool.read(qid)
    assert env.uid == os.getuid() and [r.address for r in env.recipients] == ["root@example.test", "x@elsewhere.example"]
    with open(inst.spool.path("df", qid), "rb") as f:
        assert b"@localhost uid=%d)" % os.getuid() in f.readline()


def test_auth_adduser_and_deluser_commands(inst):
    import sys
    pwfile = os.path.join(inst.root, "sasl-passwd")
    cmd = [sys.executable, "-m", "pymta.auth", "-C", inst.conf_path, "-f", pwfile]
    p = subprocess.run(cmd + ["adduser", "bob"], input=b"hunter2\n", capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with open(pwfile) as f:
        text = f.read()
    assert text.startswith("bob:$scrypt$") and "hunter2" not in text
    verify = auth.PasswordFile(pwfile)
    assert verify("bob", "hunter2") and not verify("bob", "hunter3") and not verify("eve", "hunter2")
    p = subprocess.run(cmd + ["deluser", "bob"], capture_output=True, timeout=60)
    assert p.returncode == 0 and not verify("bob", "hunter2")


def test_expn_lists_an_alias_when_enabled(inst):
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write("staff: root, postmaster\n")
    inst.sendmail("-bi")
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.expn("staff")[0] == 502
    with running(inst, smtpd_enable_expn="yes") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            code, text = c.expn("staff")
            assert code == 250 and b"root@" in text


def test_limits_on_the_wire_hops_recipients_long_lines_and_errors(inst):
    with running(inst, hopcount_limit=5, smtpd_recipient_limit=2,
                 smtpd_long_line_action="reject", smtpd_hard_error_limit=5) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            c.mail("a@b.example")
            assert c.rcpt("root@example.test")[0] == 250
            assert c.rcpt("postmaster@example.test")[0] == 250
            assert c.rcpt("root@example.test") == (452, b"4.5.3 Error: too many recipients")
            assert c.data(b"Received: x\r\n" * 5 + b"Subject: loop\r\n\r\nx\r\n")[0:1] == (554,)
            c.mail("a@b.example")
            c.rcpt("root@example.test")
            code, msg = c.data(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")
            assert (code, msg[:5]) == (550, b"5.6.0")
        s, f = raw(port)
        read_reply(f)
        s.sendall(b"BAD\r\n" * 6)
        replies = [read_reply(f)[-1][:3] for _ in range(6)]
        assert replies == [b"500"] * 5 + [b"421"]
        assert f.readline() == b""
        f.close()
        s.close()
    assert queued(inst) == []


def _hosts_names_loopback():
    """Whether this host's resolver answers 127.0.0.1 from /etc/hosts before
    any DNS (so the test below asks no DNS server)."""
    try:
        with open("/etc/nsswitch.conf") as f:
            hosts = [ln.split()[1:] for ln in f if ln.startswith("hosts:")]
        with open("/etc/hosts") as f:
            names = [ln.split()[1:] for ln in f if ln.split()[:1] == ["127.0.0.1"]]
    except OSError:
        return None
    if not hosts or hosts[0][:1] != ["files"] or not names or not names[0]:
        return None
    return names[0][0]


@pytest.mark.parametrize("model", MODELS)
def test_client_name_comes_from_etc_hosts_without_dns_nameservers(inst, logs, model):
    """No dns_nameservers: the client's name is looked up in the system's
    order (nsswitch.conf: /etc/hosts first), so a loopback client is named."""
    name = _hosts_names_loopback()
    if name is None:
        pytest.skip("127.0.0.1 is not named by /etc/hosts before DNS here")
    with running(inst, smtpd_peername_lookup="yes", dns_nameservers="",
                 smtpd_process_model=model) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("a@b.example", ["root@example.test"], b"Subject: n\r\n\r\nx\r\n")
    if model in IN_PROCESS:     # a forked session logs in its own process
        assert f"connect from {name}[127.0.0.1]" in logs.text()
    env = inst.spool.read([n for n in queued(inst) if n.startswith("qf")][0][2:])
    assert env.client_name == name


def test_client_name_is_the_forward_confirmed_ptr(inst, logs):
    from dnsserver import DNSServer
    zone = {"1.0.0.127.in-addr.arpa": {"PTR": ["client.example.test."]},
            "client.example.test": {"A": ["127.0.0.1"]}}
    with DNSServer(zone) as dns_server:
        with running(inst, smtpd_peername_lookup="yes", dns_nameservers=dns_server.address) as port:
            with smtplib.SMTP("127.0.0.1", port) as c:
                c.sendmail("a@b.example", ["root@example.test"], b"Subject: n\r\n\r\nx\r\n")
        dns_server.zone["client.example.test"] = {"A": ["127.0.0.9"]}   # PTR no longer confirmed
        with running(inst, smtpd_peername_lookup="yes", dns_nameservers=dns_server.address) as port:
            with smtplib.SMTP("127.0.0.1", port) as c:
                c.noop()
    text = logs.text()
    assert "connect from client.example.test[127.0.0.1]" in text
    assert "relay=client.example.test [127.0.0.1]" in text
    assert "connect from unknown[127.0.0.1]" in text
    env = inst.spool.read([n for n in queued(inst) if n.startswith("qf")][0][2:])
    assert env.client_name == "client.example.test"


def _send_message(port, message):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("x")
        try:
            c.sendmail("a@b.example", ["root@example.test"], message)
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


def test_header_section_over_header_size_limit_is_refused_as_sendmail_does(inst):
    big = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(2000))   # ~150 KB
    with running(inst) as port:
        code, text = _send_message(port, b"Subject: big\r\n" + big + b"\r\nbody\r\n")
        assert (code, text) == (552, b"5.6.0 Headers too large (102400 max)")
        assert queued(inst) == []
        # Within the limit, a body with no empty line before it, and a body
        # of lines that are no fields: all accepted.
        assert _send_message(port, b"Subject: ok\r\n" + big[:50000] + b"\r\nbody\r\n")[0] == 250
        assert _send_message(port, b"no header at all\r\n" + b"z" * 70 + b"\r\n" * 3000)[0] == 250
        assert _send_message(port, b"Subject: s\r\nnot a field line\r\n"
                             + b"line of body text\r\n" * 10000)[0] == 250
    assert len([n for n in queued(inst) if n.startswith("qf")]) == 3


def test_nul_bytes_in_data_are_kept_as_they_come(inst):
    # The documented choice (pymta(8), SMTP SERVICE): NUL bytes are stored
    # and delivered unchanged, as Postfix does with its default empty
    # message_reject_characters; nothing is lost or rewritten.
    with running(inst) as port:
        assert _send_message(port, b"Subject: n\x00ul\r\n\r\nbin\x00ary\x00\r\n")[0] == 250
    (df,) = [n for n in queued(inst) if n.startswith("df")]
    with open(os.path.join(inst.spool.dir, df), "rb") as f:
        data = f.read()
    # (from mynetworks: Date and Message-ID are added after the Subject)
    assert b"Subject: n\x00ul\n" in data and data.endswith(b"\n\nbin\x00ary\x00\n")


# (smtpd_timeout, smtpd_stress_timeout): a session thread looks at the
# stress when its poll wakes it, once a second, so the threads model is
# shown with a stress timeout of a few seconds (as in use: 10 s) rather
# than one, for those idle the longest to be gone before a new one's could
# run out.
STRESS_TIMES = {"loop": (4, 1), "threads": (6, 3)}


@pytest.mark.parametrize("model", IN_PROCESS)
def test_idle_sessions_get_the_stress_timeout_when_slots_run_short(inst, logs, model):
    # With slots to spare, idle sessions get smtpd_timeout; once all 8 are
    # taken (new clients would get 421), the idle ones are closed after
    # smtpd_stress_timeout. Each case is seen by when its 421 arrives.
    def timed_out_after(s, since):
        s.settimeout(10)
        assert s.recv(1000).startswith(b"421 4.4.2")
        return time.monotonic() - since

    timeout, stress = STRESS_TIMES[model]
    with running(inst, smtpd_session_limit=8, smtpd_timeout=f"{timeout}s",
                 smtpd_stress_timeout=f"{stress}s", smtpd_process_model=model) as port:
        t0 = time.monotonic()
        few = [raw(port) for _ in range(3)]
        for s, f in few:
            assert read_reply(f)[0].startswith(b"220")
        for s, f in few:
            assert timed_out_after(s, t0) >= timeout - 0.5     # smtpd_timeout, not the stress one
            f.close()
            s.close()
        t0 = time.monotonic()
        few = [raw(port) for _ in range(3)]
        for s, f in few:
            assert read_reply(f)[0].startswith(b"220")
        time.sleep(stress + 0.5)                           # idle past the stress timeout
        more = [raw(port) for _ in range(5)]
        t1 = time.monotonic()
        for s, f in more:
            assert read_reply(f)[0].startswith(b"220")
        # All 8 in use: the 3 idle past the stress timeout go at once; then
        # 5 of 8 are in use, no stress: the 5 new ones keep smtpd_timeout.
        for s, f in few:
            assert timed_out_after(s, t1) < 2.0             # else at t1 + 2.5
        for s, f in more:
            assert timed_out_after(s, t1) >= timeout - 0.5
        for s, f in few + more:
            f.close()
            s.close()
    assert "timeout after CONNECT" in logs.text()
