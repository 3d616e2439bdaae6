"""Hostile clients against the real daemon (``sendmail -bD``) over sockets.

A client, however hostile, cannot smuggle a second message, relay through
the server from outside mynetworks, make it run a command or write a file,
exhaust it (long lines, endless headers, many recipients, many idle
connections, trickled data, oversized messages) while others are still
served, or make mail loop forever.
"""

import contextlib
import mailbox
import os
import pathlib
import resource
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest

from helpers import wait_for
from reliability_util import Daemon, Raw, daemon_instance, message, msgids_in, queue_files
from smtpsink import SMTPSink


@pytest.fixture
def hostile(make_instance):
    """hostile(**params) -> (inst, daemon, sink): a running daemon whose
    relayhost is a sink (which relay tests expect to stay empty)."""
    stack = contextlib.ExitStack()

    def start(sink_rcpt=None, **params):
        sink = stack.enter_context(SMTPSink(rcpt=sink_rcpt))
        inst = daemon_instance(make_instance, relayhost=f"[127.0.0.1]:{sink.port}", **params)
        d = stack.enter_context(Daemon(inst))
        return inst, d, sink

    with stack:
        yield start


def settle(inst, timeout=15):
    """Wait until the daemon has delivered everything it accepted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queue_files(inst, ("qf", "tf")):
            return True
        time.sleep(0.05)
    return False


def drained(inst, timeout=15):
    """Wait until nothing at all is left in the queue: a message's df goes
    just after its qf, and a bounce's files after the sink has it."""
    deadline = time.monotonic() + timeout
    while queue_files(inst) and time.monotonic() < deadline:
        time.sleep(0.05)
    return queue_files(inst)


def session(port):
    c = Raw(port)
    assert c.reply()[0] == 220
    assert c.cmd(b"EHLO hostile.test\r\n")[0] == 250
    return c


def vmrss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def listener(d):
    pids = []
    deadline = time.monotonic() + 5
    while not pids and time.monotonic() < deadline:
        pids = d.listener_pids()
        time.sleep(0.02)
    return pids[0]


def send_ok(port, msgid):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        return c.sendmail("a@b.example", ["root@example.test"], message(msgid))


# -- SMTP smuggling ---------------------------------------------------------------

ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n",
           b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\x00\r\n.\r\n\x00"]


def mbox_messages(inst, user="root"):
    path = os.path.join(inst.root, "mail", user)
    return list(mailbox.mbox(path)) if os.path.exists(path) else []


def test_smuggled_second_transaction_gives_at_most_one_message(hostile):
    inst, d, sink = hostile()
    results = {}
    for n, ending in enumerate(ENDINGS):
        with session(d.port) as c:
            assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
            assert c.cmd(b"RCPT TO:<root@example.test>\r\n")[0] == 250
            assert c.cmd(b"DATA\r\n")[0] == 354
            c.send(b"Message-ID: <first%d@smuggle>\r\nSubject: first\r\n\r\nbody" % n + ending
                   + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n"
                   b"Message-ID: <smuggled%d@smuggle>\r\nSubject: smuggled\r\n\r\nevil\r\n"
                   b"\r\n.\r\n" % n)
            code, text = c.reply()
            assert code in (250, 550), (ending, text)
            extra = []
            c.send(b"QUIT\r\n")
            while True:
                more = c.reply()
                if more[0] in (0, 221):
                    break
                extra.append(more)
            # No smuggled command may start a transaction.
            assert not [r for r in extra if r[0] in (250, 354)], (ending, extra)
            results[ending] = code
    assert settle(inst)
    ids = [m["Message-ID"] for m in mbox_messages(inst)]
    assert not [i for i in ids if "smuggled" in i], ids
    assert len(ids) == len(set(ids)) == sum(1 for c in results.values() if c == 250)
    assert all(results[e] == 550 for e in ENDINGS if b"\x00" not in e), results


# -- open relay from outside mynetworks -------------------------------------------

RELAY_TRICKS = [
    "user@remote.test",
    "user%remote.test@example.test",
    "remote.test!user@example.test",
    "@example.test:user@remote.test",
    "@example.test,@remote.test:user@remote.test",
    '"user@remote.test"@example.test',
    '"user%remote.test"@example.test',
    "user@remote.test@example.test",
    "user@[192.0.2.7]",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@remote.test.",
    "USER@REMOTE.TEST",
    "root@example.test@remote.test",
]


def test_relay_attempts_from_outside_mynetworks_reach_no_remote_receiver(hostile):
    inst, d, sink = hostile(mynetworks="192.0.2.0/24")
    accepted = []
    for sender in ("root@example.test", "", "postmaster@example.test"):
        for rcpt in RELAY_TRICKS:
            with session(d.port) as c:
                assert c.cmd(f"MAIL FROM:<{sender}>\r\n".encode())[0] == 250
                code, text = c.cmd(f"RCPT TO:<{rcpt}>\r\n".encode())
                if code == 250:
                    accepted.append(rcpt)
                    assert c.cmd(b"DATA\r\n")[0] == 354
                    c.cmd(message(f"relay-{len(accepted)}@relay.test") + b".\r\n")
                else:
                    assert 500 <= code < 600, (rcpt, text)
                c.cmd(b"QUIT\r\n")
    assert settle(inst)
    # Every accepted message is done (delivered or bounced, its qf gone):
    # none went to the relay. A local submission to the same relay now
    # arrives, which shows that the relay would have been seen.
    r = inst.sendmail("-odi", "-i", "user@remote.test", input=message("marker@relay.test"))
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: sink.delivered, 15)
    assert [t.rcpts for t in sink.transactions] == [["user@remote.test"]], (accepted, sink.transactions)
    assert b"marker@relay.test" in sink.transactions[0].data
    assert "user@remote.test" not in accepted
    print(f"\naccepted as local from outside mynetworks: {sorted(set(accepted))}")


# -- command and file injection ------------------------------------------------------

def test_pipe_file_and_include_recipients_typed_by_a_client_are_refused(hostile, tmp_path):
    marker = tmp_path / "pwned"
    inst, d, sink = hostile()          # 127.0.0.1 is in mynetworks: a trusted client
    tricks = [f'"|touch {marker}1"@example.test', f"|touch{marker}2",
              f'"/{marker}3"@example.test', f"{marker}4", f'"{marker}5"',
              '":include:/etc/passwd"@example.test', ":include:/etc/passwd",
              f'"|touch {marker}6"', f'"\\|touch {marker}7"@example.test']
    for rcpt in tricks:
        with session(d.port) as c:
            assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
            code, text = c.cmd(f"RCPT TO:<{rcpt}>\r\n".encode())
            assert 500 <= code < 600, (rcpt, text)
            c.cmd(b"QUIT\r\n")
    assert settle(inst)
    assert not list(tmp_path.glob("pwned*"))
    assert b"root:x:0:0" not in inst.mailbox()
    assert sink.transactions == []


@pytest.fixture
def short_dir():
    """A directory with a short path (local parts are limited to 64 octets)."""
    path = tempfile.mkdtemp(prefix="pm", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_shell_metacharacters_in_the_sender_reach_a_pipe_as_inert_data(hostile, tmp_path,
                                                                       short_dir):
    # The pipe runs as default_privs (nobody; root is refused there): its
    # script and output directory are where nobody can reach them.
    out = short_dir / "out"
    out.mkdir()
    os.chmod(short_dir, 0o755)
    os.chmod(out, 0o777)
    script = short_dir / "pipe.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$SENDER" >> {out}/senders\n'
                      f"cat >> {out}/bodies\n")
    os.chmod(script, 0o755)
    aliases = tmp_path / "pipe-aliases"
    aliases.write_text(f'postmaster: root\npipe: "|/bin/sh {script}"\n')
    inst, d, sink = hostile(alias_maps=f"hash:{aliases}")
    senders = ['"`touch ' + f"{out}/p1" + '`"@b.example',
               '"$(touch ' + f"{out}/p2" + ')"@b.example',
               f'"a;touch {out}/p3;"@b.example',
               f"`touch${{IFS}}{out}/p4`@b.example",
               f'"|touch {out}/p5"@b.example',
               f"a&&touch${{IFS}}{out}/p6@b.example",
               "'$(id)'@b.example"]
    accepted = []
    for i, sender in enumerate(senders):
        with session(d.port) as c:
            code, text = c.cmd(f"MAIL FROM:<{sender}>\r\n".encode())
            if code != 250:
                assert 500 <= code < 600, text
                continue
            assert c.cmd(b"RCPT TO:<pipe@example.test>\r\n")[0] == 250
            assert c.cmd(b"DATA\r\n")[0] == 354
            assert c.cmd(message(f"meta{i}@pipe.test") + b".\r\n")[0] == 250
            accepted.append(sender)
            c.cmd(b"QUIT\r\n")
    assert settle(inst)
    assert len(accepted) >= 4, accepted
    lines = (out / "senders").read_text().splitlines()
    # $SENDER is censored as Postfix's local(8) does: every character outside
    # command_expansion_filter becomes "_", so none of it is shell syntax.
    allowed = set(inst.cfg.command_expansion_filter)
    assert sorted(lines) == sorted("".join(c if c in allowed else "_" for c in a) for a in accepted)
    assert not any(set(line) & set("`$;&|'\"()") for line in lines), lines
    assert sorted(os.listdir(out)) == ["bodies", "senders"]


@pytest.mark.parametrize("flag,value", [
    ("-F", "Innocent\nBcc: victim@remote.test\nX-Injected: yes"),
    ("-f", "a@b.example\nX-Injected: yes"),
    ("-f", "a@b.example\r\nRCPT TO:<victim@remote.test>"),
    ("-F", "Name\r\nX-Injected: yes"),
])
def test_newlines_in_sendmail_f_and_F_inject_no_header_or_recipient(inst, flag, value):
    inst.write_config(delivery_mode="queue")
    r = inst.sendmail(flag, value, "root@example.test", input=b"Subject: s\n\nbody\n")
    qfs = queue_files(inst, ("qf",))
    if r.returncode != 0:
        assert qfs == []
        return
    qid = qfs[0][2:]
    env = inst.spool.read(qid)
    assert [x.address for x in env.recipients] == ["root@example.test"]
    assert "\n" not in env.sender and "\r" not in env.sender
    with open(inst.spool.path("df", qid), "rb") as f:
        head = f.read().split(b"\n\n", 1)[0]
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\n")
             if line and line[:1] not in (b" ", b"\t")]
    assert b"x-injected" not in names and b"bcc" not in names and b"rcpt to" not in names, head


def test_plaintext_pipelined_after_starttls_is_discarded(hostile, tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=mx.example.test"],
                   check=True, capture_output=True, timeout=60)
    inst, d, sink = hostile(smtpd_tls_cert_file=str(crt), smtpd_tls_key_file=str(key))
    c = session(d.port)
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<root@example.test>\r\n")
    code, _ = c.reply()
    assert code == 220
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(c.sock, server_hostname="mx.example.test")
    c.sock, c.f = tls, tls.makefile("rb")
    assert c.cmd(b"EHLO hostile.test\r\n")[0] == 250
    code, text = c.cmd(b"RCPT TO:<root@example.test>\r\n")
    assert code == 503, text                 # the injected MAIL never happened
    assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
    c.cmd(b"QUIT\r\n")
    c.close()
    assert queue_files(inst, ("qf",)) == []


# -- resource abuse -------------------------------------------------------------------------

def test_megabyte_command_lines_and_endless_headers_are_bounded(hostile):
    inst, d, sink = hostile(message_size_limit=str(1 << 20))
    pid = listener(d)
    rss0 = vmrss_kb(pid)
    with session(d.port) as c:
        code, text = c.cmd(b"MAIL FROM:<" + b"a" * (1 << 20) + b"@b.example>\r\n")
        assert code == 500 and b"5.5.2" in text, text[:200]
        assert c.cmd(b"NOOP\r\n")[0] == 250
        assert c.cmd(b"NOOP " + b"x" * (1 << 20) + b"\r\n")[0] == 500
        assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
        assert c.cmd(b"RCPT TO:<root@example.test>\r\n")[0] == 250
        assert c.cmd(b"DATA\r\n")[0] == 354
        batch = (b"X-Endless: " + b"h" * 60 + b"\r\n") * 512
        served = []
        other = threading.Thread(target=lambda: served.append(send_ok(d.port, "other@abuse")))
        for i in range(110):                  # 4 MB of header
            c.send(batch)
            if i == 10:
                other.start()
        code, text = c.cmd(b"\r\n.\r\n")
        other.join(20)
        # header_size_limit (100 KB) is met first: refused as sendmail does.
        assert code == 552 and b"5.6.0 Headers too large" in text, text
        assert c.cmd(b"RSET\r\n")[0] == 250
    assert served == [{}]
    assert vmrss_kb(pid) - rss0 < 60 * 1024
    assert settle(inst)
    assert drained(inst) == []


def test_ten_thousand_recipients_get_452_past_the_limit(hostile):
    inst, d, sink = hostile(smtpd_recipient_limit="100", smtpd_hard_error_limit="100000")
    with session(d.port) as c:
        assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
        c.send(b"".join(b"RCPT TO:<root+%d@example.test>\r\n" % i for i in range(10000)))
        codes = [c.reply()[0] for _ in range(10000)]
        assert codes[:100] == [250] * 100
        assert set(codes[100:]) == {452}
        assert c.cmd(b"RSET\r\n")[0] == 250
        assert c.cmd(b"QUIT\r\n")[0] == 221
    assert send_ok(d.port, "after@rcpts") == {}


def test_a_thousand_idle_connections_get_421_past_the_session_limit(hostile):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096)
    if want < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        inst, d, sink = hostile(smtpd_session_limit="50",
                                smtpd_client_connection_count_limit="5000", smtpd_timeout="5s")
        pid = listener(d)
        socks, greetings = [], []
        try:
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
                socks.append(s)
            for s in socks:
                greetings.append(s.recv(512)[:3])
            # (The start-up probe's session may not have ended yet: 49 or 50.)
            assert greetings.count(b"220") in (49, 50)
            assert greetings.count(b"220") + greetings.count(b"421") == 1000
            assert vmrss_kb(pid) < 200 * 1024
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert send_ok(d.port, "after@idle") == {}
                break
            except smtplib.SMTPConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_data_trickled_a_byte_a_second_is_cut_off_while_others_are_served(hostile):
    inst, d, sink = hostile(smtpd_timeout="3s", smtpd_min_data_rate="100")
    with session(d.port) as c:
        assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
        assert c.cmd(b"RCPT TO:<root@example.test>\r\n")[0] == 250
        assert c.cmd(b"DATA\r\n")[0] == 354
        start = time.monotonic()
        code = 0
        for i, ch in enumerate(b"Subject: slow\r\n\r\n" + b"z" * 20):
            try:
                c.send(bytes([ch]))
            except OSError:
                break
            if i == 1:
                assert send_ok(d.port, "meanwhile@trickle") == {}
            ready, _, _ = select.select([c.sock], [], [], 1.0)
            if ready:
                code = c.reply()[0]
                break
        elapsed = time.monotonic() - start
    assert code == 421, code
    assert elapsed < 10
    assert settle(inst)
    assert msgids_in(inst.mailbox()) == ["meanwhile@trickle"]


def test_message_over_the_size_limit_without_size_gets_552_and_memory_stays_bounded(hostile):
    inst, d, sink = hostile(message_size_limit="100000")
    pid = listener(d)
    rss0 = vmrss_kb(pid)
    with session(d.port) as c:
        assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
        assert c.cmd(b"RCPT TO:<root@example.test>\r\n")[0] == 250
        assert c.cmd(b"DATA\r\n")[0] == 354
        line = b"y" * 998 + b"\r\n"
        for _ in range(20000):            # 20 MB
            c.send(line)
        code, text = c.cmd(b".\r\n")
        assert code == 552 and b"5.3.4" in text, text
        assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
        c.cmd(b"QUIT\r\n")
    assert vmrss_kb(pid) - rss0 < 40 * 1024
    assert queue_files(inst) == []
    assert send_ok(d.port, "after@size") == {}


# -- mail loops -------------------------------------------------------------------------------

def test_message_with_101_received_headers_is_refused_as_a_loop(hostile):
    inst, d, sink = hostile()
    limit = inst.cfg.hopcount_limit
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as c:
        hops = b"".join(b"Received: from hop%d.test by x.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                        % i for i in range(101))
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("a@b.example", ["root@example.test"], message("loop@hops", extra=hops))
        assert err.value.smtp_code == 554 and b"5.4.6" in err.value.smtp_error
        ok = b"".join(b"Received: from hop%d.test by x.test\r\n" % i for i in range(limit - 1))
        assert c.sendmail("a@b.example", ["root@example.test"], message("ok@hops", extra=ok)) == {}


def _bounces(sink):
    return [t for t in sink.delivered if t.sender == ""]


def test_alias_and_forward_loops_bounce_with_5_4_6(hostile, tmp_path):
    fwd = tmp_path / "fwd"
    fwd.mkdir()
    (fwd / "root.forward").write_text("daemon@example.test\n")
    (fwd / "daemon.forward").write_text("root@example.test\n")
    aliases = tmp_path / "loop-aliases"
    aliases.write_text("postmaster: root\nloopa: loopb\nloopb: loopc\nloopc: loopa\n")
    inst, d, sink = hostile(alias_maps=f"hash:{aliases}", forward_path=f"{fwd}/$user.forward")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as c:
        c.sendmail("sender@remote.test", ["loopa@example.test"], message("alias@loop"))
        c.sendmail("sender@remote.test", ["root@example.test"], message("forward@loop"))
    assert settle(inst)
    deadline = time.monotonic() + 10
    while len(_bounces(sink)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    bounces = _bounces(sink)
    assert len(bounces) == 2
    for t in bounces:
        assert t.rcpts == ["sender@remote.test"]
        assert b"5.4.6" in t.data
    assert drained(inst) == []


def test_a_bounce_that_cannot_be_delivered_is_not_bounced_again(hostile, tmp_path):
    aliases = tmp_path / "loop-aliases"
    aliases.write_text("postmaster: root\nloopa: loopb\nloopb: loopa\n")
    inst, d, sink = hostile(sink_rcpt={"sender@remote.test": "550", "pm@remote.test": "550"},
                            alias_maps=f"hash:{aliases}", bounce_notice_recipient="pm@remote.test")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as c:
        c.sendmail("sender@remote.test", ["loopa@example.test"], message("dead@bounce"))
    assert settle(inst)
    # The double bounce's failure is the last event: it is logged as
    # discarded, and a further bounce would have been queued before that.
    assert wait_for(lambda: "discarded" in inst.maillog(), 15)
    assert settle(inst)
    tried = [(t.sender, t.rcpts) for t in sink.transactions]
    # The bounce to the sender fails, the notice to postmaster fails: then
    # it is logged and dropped, never bounced again.
    assert tried == [("", ["sender@remote.test"]), ("double-bounce@mx.example.test",
                                                    ["pm@remote.test"])], tried
    assert drained(inst) == []
    assert "discarded" in inst.maillog()
