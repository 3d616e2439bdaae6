"""sendmail as programs call it: stdin in, a committed qf/df pair out."""

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import BIN



@pytest.fixture
def q(make_instance):
    """An instance whose sendmail only queues (delivery_mode = queue)."""
    return make_instance(delivery_mode="queue")


def queued(inst):
    """[(env, df bytes)] of every queued message."""
    out = []
    for qid in inst.spool.ids():
        env = inst.spool.read(qid)
        with inst.spool.open_data(qid) as f:
            out.append((env, f.read()))
    return out


def only(inst):
    msgs = queued(inst)
    assert len(msgs) == 1, msgs
    return msgs[0]


def header_and_body(data):
    head, _, body = data.partition(b"\n\n")
    return head.decode("utf-8", "surrogateescape"), body


def test_message_is_queued_and_exit_is_0(q):
    r = q.sendmail("root", input=b"Subject: hi\n\nhello\n")
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert env.sender == "root@mx.example.test"
    assert [x.address for x in env.recipients] == ["root@mx.example.test"]
    assert env.protocol == "local" and env.uid == os.getuid()
    assert data.endswith(b"Subject: hi\n" + data.split(b"Subject: hi\n", 1)[1])
    assert header_and_body(data)[1] == b"hello\n"
    assert not os.listdir(q.spool.maildrop)


def test_crlf_input_is_stored_with_lf(q):
    r = q.sendmail("-i", "root", input=b"Subject: crlf\r\nX-A: 1\r\n\r\nline 1\r\nline 2\r\n")
    assert r.returncode == 0, r.stderr
    _, data = only(q)
    assert b"\r" not in data
    assert header_and_body(data)[1] == b"line 1\nline 2\n"


def test_a_lone_dot_ends_input_without_i(q):
    r = q.sendmail("root", input=b"Subject: d\n\nbefore\n.\nafter\n")
    assert r.returncode == 0, r.stderr
    assert header_and_body(only(q)[1])[1] == b"before\n"


def test_a_lone_dot_with_crlf_ends_input_too(q):
    r = q.sendmail("root", input=b"Subject: d\r\n\r\nbefore\r\n.\r\nafter\r\n")
    assert r.returncode == 0, r.stderr
    assert header_and_body(only(q)[1])[1] == b"before\n"


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_with_i_a_lone_dot_is_just_a_line(q, flag):
    r = q.sendmail(flag, "root", input=b"Subject: d\n\nbefore\n.\nafter\n..\n")
    assert r.returncode == 0, r.stderr
    assert header_and_body(only(q)[1])[1] == b"before\n.\nafter\n..\n"


def test_dots_are_not_unstuffed_without_i(q):
    r = q.sendmail("root", input=b"Subject: d\n\n..two\n.x\n")
    assert r.returncode == 0
    assert header_and_body(only(q)[1])[1] == b"..two\n.x\n"


def test_t_reads_to_cc_bcc_and_removes_bcc(q):
    msg = (b"To: Alice <alice@example.com>, bob\nCc: \"C, D\" <cd@example.org>\n"
           b"Bcc: secret@example.net\nSubject: t\n\nbody\n")
    r = q.sendmail("-t", "-i", "extra@example.com", input=msg)
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert sorted(x.address for x in env.recipients) == sorted([
        "extra@example.com", "alice@example.com", "bob@mx.example.test",
        "cd@example.org", "secret@example.net"])
    head, _ = header_and_body(data)
    assert "Bcc" not in head and "secret" not in head
    assert "To: Alice <alice@example.com>, bob" in head


def test_t_with_resent_headers_uses_only_those(q):
    msg = b"To: old@example.com\nResent-To: new@example.com\nResent-Bcc: hid@example.com\n\nx\n"
    r = q.sendmail("-t", input=msg)
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert sorted(x.address for x in env.recipients) == ["hid@example.com", "new@example.com"]
    assert b"hid@" not in data


def test_t_without_recipients_exits_64(q):
    r = q.sendmail("-t", input=b"To: undisclosed-recipients:;\nSubject: none\n\nx\n")
    assert r.returncode == 64
    assert b"No recipient addresses found in header" in r.stderr
    assert queued(q) == []


def test_no_recipients_at_all_is_a_usage_error(q):
    r = q.sendmail(input=b"Subject: x\n\nx\n")
    assert r.returncode == 64
    assert b"Recipient names must be specified" in r.stderr
    assert queued(q) == []


@pytest.mark.parametrize("flag", ["-f", "-r"])
def test_f_and_r_set_the_envelope_sender(q, flag):
    r = q.sendmail(flag, "bounces@example.com", "root", input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert env.sender == "bounces@example.com"
    assert b"From: root <root@mx.example.test>" in data or b"From: root@mx" in data


@pytest.mark.parametrize("null", ["<>", ""])
def test_f_null_sender(q, null):
    r = q.sendmail("-f", null, "root", input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert only(q)[0].sender == ""


def test_f_unqualified_gets_myorigin(q):
    r = q.sendmail("-fwebmaster", "root", input=b"\nx\n")
    assert r.returncode == 0, r.stderr
    assert only(q)[0].sender == "webmaster@mx.example.test"


@pytest.mark.parametrize("bad", ["a@b.example\nRCPT TO:<x@y>", "a\r@b.example", "a@b\x1bc"])
def test_f_with_control_characters_is_refused(q, bad):
    r = q.sendmail("-f", bad, "root", input=b"Subject: x\n\nx\n")
    assert r.returncode == 64
    assert b"control character" in r.stderr
    assert queued(q) == []


def test_F_full_name_goes_into_the_added_from(q):
    r = q.sendmail("-F", "Cron Daemon", "root", input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    head, _ = header_and_body(only(q)[1])
    assert re.search(r"^From: Cron Daemon <\w+@mx\.example\.test>$", head, re.M), head


def test_control_characters_in_F_never_make_a_header(q):
    r = q.sendmail("-F", "Evil\nBcc: victim@example.com\r\nX-Injected: 1", "root",
                   input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    head, _ = header_and_body(data)
    assert not re.search(r"^(Bcc|X-Injected):", head, re.M | re.I), head
    assert [x.address for x in env.recipients] == ["root@mx.example.test"]
    assert "From: \"Evil Bcc: victim@example.com X-Injected: 1\"" in head


def test_header_fixups(q):
    r = q.sendmail("-i", "root", input=b"Return-Path: <forged@example.com>\nSubject: x\n\nbody\n")
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    head, _ = header_and_body(data)
    lines = head.split("\n")
    assert lines[0].startswith("Received: (from ")
    assert f"id {env.id};" in head
    assert "Return-Path" not in head
    assert re.search(r"^Date: \w{3}, \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$", head, re.M)
    assert re.search(rf"^Message-ID: <\d{{14}}\.{env.id}@mx\.example\.test>$", head, re.M)
    assert re.search(r"^From: .*@mx\.example\.test>?$", head, re.M)


def test_existing_date_from_and_message_id_are_kept(q):
    msg = b"From: me@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <a@b>\n\nx\n"
    r = q.sendmail("root", input=msg)
    assert r.returncode == 0
    head, _ = header_and_body(only(q)[1])
    assert head.count("Date:") == 1 and head.count("Message-ID:") == 1
    assert head.count("\nFrom:") == 1 and "From: me@example.com" in head
    assert "msgid=<a@b>" in q.maillog()


def test_bare_cr_in_a_header_never_makes_a_header(q):
    r = q.sendmail("-t", input=b"To: root\nSubject: a\rBcc: victim@example.com\n\nx\n")
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert [x.address for x in env.recipients] == ["root@mx.example.test"]
    assert b"Subject: a Bcc: victim@example.com\n" in data
    assert b"\r" not in data


def test_a_body_without_header_gets_the_fixups_and_a_separator(q):
    r = q.sendmail("root", input=b"just a line\nand another\n")
    assert r.returncode == 0
    head, body = header_and_body(only(q)[1])
    assert "Message-ID:" in head and body == b"just a line\nand another\n"


def test_unix_from_line_is_dropped(q):
    r = q.sendmail("root", input=b"From someone Mon Jan  1 00:00:00 2024\nSubject: x\n\nx\n")
    assert r.returncode == 0
    assert b"From someone" not in only(q)[1]


@pytest.mark.parametrize("target", ["|/bin/sh -c id", "/tmp/file", ":include:/etc/passwd",
                                    '"|cat"'])
def test_programs_and_files_are_refused_as_recipients(q, target):
    r = q.sendmail("--", target, input=b"Subject: x\n\nx\n")
    assert r.returncode == 67
    assert b"not allowed" in r.stderr
    assert queued(q) == []


@pytest.mark.parametrize("bad", ["foo bar", "a@@b", "x@-bad-.example", "<unclosed@example.com"])
def test_bad_recipient_syntax_exits_64(q, bad):
    r = q.sendmail("--", bad, input=b"Subject: x\n\nx\n")
    assert r.returncode == 64, r.stderr
    assert b"bad recipient address" in r.stderr
    assert queued(q) == []


def test_control_character_in_a_recipient_is_refused(q):
    r = q.sendmail("--", "root\nBcc: x@example.com", input=b"\nx\n")
    assert r.returncode == 64
    assert queued(q) == []


def test_bad_address_in_a_header_with_t_exits_65(q):
    r = q.sendmail("-t", input=b"To: good@example.com, bad address\n\nx\n")
    assert r.returncode == 65
    assert queued(q) == []


def test_recipient_lists_names_and_duplicates(q):
    r = q.sendmail("a@example.com, \"Bee\" <b@example.com>", "a@EXAMPLE.com", "\\root",
                   input=b"\nx\n")
    assert r.returncode == 0, r.stderr
    env, _ = only(q)
    assert [(x.address, x.flags) for x in env.recipients] == [
        ("a@example.com", "p"), ("b@example.com", "p"), ("root@mx.example.test", "pn")]


def test_dsn_flags_are_stored(q):
    r = q.sendmail("-N", "success,failure", "-R", "hdrs", "-V", "env-42", "root",
                   input=b"\nx\n")
    assert r.returncode == 0, r.stderr
    env, _ = only(q)
    assert env.recipients[0].flags == "pSF"
    assert env.ret == "HDRS" and env.envid == "env-42"


def test_dsn_never(q):
    assert q.sendmail("-Nnever", "root", input=b"\nx\n").returncode == 0
    env, _ = only(q)
    assert env.recipients[0].flags == "pN"
    assert not env.recipients[0].notify("F")


def test_bad_envid_is_refused(q):
    r = q.sendmail("-V", "has space", "root", input=b"\nx\n")
    assert r.returncode == 64


def test_body_type(q, make_instance):
    assert q.sendmail("root", input=b"\nascii\n").returncode == 0
    assert only(q)[0].body_type == ""
    q2 = make_instance(delivery_mode="queue")
    assert q2.sendmail("root", input="\ngrüße\n".encode()).returncode == 0
    assert only(q2)[0].body_type == "8BITMIME"
    q3 = make_instance(delivery_mode="queue")
    assert q3.sendmail("-B", "8bitmime", "root", input=b"\nascii\n").returncode == 0
    assert only(q3)[0].body_type == "8BITMIME"


def test_untrusted_f_adds_authentication_warning(make_instance):
    q = make_instance(delivery_mode="queue", trusted_users="daemon")
    r = q.sendmail("-f", "ceo@example.com", "root", input=b"Subject: x\n\nx\n")
    assert r.returncode == 0, r.stderr
    head, _ = header_and_body(only(q)[1])
    assert re.search(r"^X-Authentication-Warning: mx\.example\.test: \w+ set sender to "
                     r"ceo@example\.com using -f$", head, re.M), head


def test_trusted_f_adds_no_warning(q):
    assert os.geteuid() == 0 or pytest.skip("needs root (trusted by default)")
    assert q.sendmail("-f", "ceo@example.com", "root", input=b"\nx\n").returncode == 0
    assert b"X-Authentication-Warning" not in only(q)[1]


@pytest.mark.parametrize("argv,stdin", [
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     b"Subject: Cron <root@host> run-parts\nContent-Type: text/plain; charset=UTF-8\n\nout\n"),
    (["-i", "--", "root"], b"Subject: from mail\nTo: root\n\nhi\n.\nstill body\n"),
    (["-t", "-i"], b"To: root@localhost\nSubject: php\n\nhi\n"),
    (["-i", "a@example.com", "b@example.com"],
     b"From: dev@example.com\nTo: a@example.com\nCc: b@example.com\nSubject: [PATCH] x\n\ndiff\n"),
])
def test_real_callers_argv(make_instance, argv, stdin):
    q = make_instance(delivery_mode="queue")
    r = q.sendmail(*argv, input=stdin)
    assert r.returncode == 0, r.stderr
    env, data = only(q)
    assert env.recipients
    assert data.endswith(stdin.split(b"\n\n", 1)[1])


def test_cron_full_name_and_body_type(q):
    r = q.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                   input=b"Subject: Cron\n\nout\n")
    assert r.returncode == 0
    env, data = only(q)
    assert env.body_type == "8BITMIME"
    assert re.search(rb"^From: CronDaemon <", data, re.M)


def test_verbose_prints_the_queue_id(q):
    r = q.sendmail("-v", "root", input=b"\nx\n")
    assert r.returncode == 0
    env, _ = only(q)
    assert f"{env.id}: queued".encode() in r.stderr


def test_log_line(q):
    assert q.sendmail("root", "x@example.com", input=b"\nhello\n").returncode == 0
    env, _ = only(q)
    assert re.search(rf"{env.id}: from=<root@mx\.example\.test>, size={env.size}, class=0, "
                     rf"nrcpts=2, msgid=<\d+\.{env.id}@mx\.example\.test>, relay=root@localhost",
                     q.maillog()), q.maillog()


def test_traffic_file(q, tmp_path):
    xf = tmp_path / "traffic"
    assert q.sendmail("-X", str(xf), "root", input=b"Subject: x\n\nbody line\n").returncode == 0
    text = xf.read_text()
    assert "MAIL FROM:<root@mx.example.test>" in text
    assert "RCPT TO:<root@mx.example.test>" in text
    assert "body line" in text and "Received:" in text


def test_message_size_limit(make_instance):
    q = make_instance(delivery_mode="queue", message_size_limit=1000)
    r = q.sendmail("root", input=b"\n" + b"x" * 2000 + b"\n")
    assert r.returncode == 65
    assert b"message_size_limit" in r.stderr
    assert os.listdir(q.spool.dir) == []


def test_header_size_limit(make_instance):
    q = make_instance(delivery_mode="queue", header_size_limit=200)
    r = q.sendmail("root", input=b"Subject: " + b"y" * 300 + b"\n\nx\n")
    assert r.returncode == 65
    assert b"header_size_limit" in r.stderr
    assert os.listdir(q.spool.dir) == []


def test_too_many_hops(make_instance):
    q = make_instance(delivery_mode="queue", hopcount_limit=3)
    msg = b"Received: a\n" * 3 + b"\nx\n"
    assert q.sendmail("root", input=msg).returncode == 0
    r = q.sendmail("-h", "1", "root", input=msg)
    assert r.returncode == 65 and b"too many hops" in r.stderr


def test_missing_queue_is_a_tempfail(q):
    os.rename(q.spool.dir, q.spool.dir + ".gone")
    r = q.sendmail("root", input=b"\nx\n")
    assert r.returncode == 75


def test_oeq_is_quiet(q):
    r = q.sendmail("-oeq", "--", "|cmd", input=b"\nx\n")
    assert r.returncode == 67 and r.stderr == b""


def test_a_large_message_is_streamed_in_bounded_memory(make_instance, tmp_path):
    q = make_instance(delivery_mode="queue", message_size_limit=0)
    src = tmp_path / "big"
    line = b"0123456789" * 7 + b"abcdefg\r\n"
    with open(src, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        chunk = line * 10000
        for _ in range(50 * 1024 * 1024 // len(chunk) + 1):
            f.write(chunk)
    size_in = os.path.getsize(src)
    # The child's VmHWM (peak RSS of its own address space since exec; the
    # rusage of a child forked from pytest would count pytest's memory too).
    peak_kb = 0
    with open(src, "rb") as stdin:
        p = subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C", q.conf_path,
                              "-i", "root"], stdin=stdin, stderr=subprocess.PIPE)
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
                    peak_kb = max(peak_kb, int(m.group(1))) if m else peak_kb
            except OSError:
                pass
            time.sleep(0.01)
    assert p.returncode == 0, p.stderr.read()
    p.stderr.close()
    peak_mb = peak_kb / 1024
    assert peak_mb < 40, f"peak RSS {peak_mb:.1f} MB for a {size_in >> 20} MB message"
    env, = [q.spool.read(i) for i in q.spool.ids()]
    lines = (size_in - len(b"Subject: big\r\n\r\n")) // len(line)
    assert b"\r" not in open(q.spool.path("df", env.id), "rb").read(1 << 20)
    assert env.size > lines * (len(line) - 1)
    lf_line = line.replace(b"\r\n", b"\n")
    with q.spool.open_data(env.id) as f:
        f.seek(-2 * len(lf_line), 2)
        assert f.read() == lf_line * 2
    print(f"peak RSS {peak_mb:.1f} MB")


def test_concurrent_injectors_get_distinct_ids_and_whole_files(q):
    procs = []
    for n in range(20):
        p = subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C", q.conf_path,
                              "-i", "root"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((n, p))
    for n, p in procs:
        p.stdin.write(f"Subject: n{n}\n\nmessage {n}\n".encode())
        p.stdin.close()
    for n, p in procs:
        assert p.wait(60) == 0, p.stderr.read()
        p.stderr.close()
    msgs = queued(q)
    assert len({env.id for env, _ in msgs}) == 20
    assert sorted(header_and_body(d)[1] for _, d in msgs) == \
        sorted(f"message {n}\n".encode() for n in range(20))
    assert sorted(os.listdir(q.spool.dir)) == sorted(
        p + env.id for env, _ in msgs for p in ("df", "qf"))


def test_unknown_flag_is_a_usage_error(q):
    r = q.sendmail("-Z", "root", input=b"\nx\n")
    assert r.returncode == 64 and b"usage:" in r.stderr


def test_odq_flag_overrides_delivery_mode(make_instance):
    q = make_instance()     # delivery_mode = background by default
    r = q.sendmail("-odq", "root", input=b"\nx\n")
    assert r.returncode == 0
    assert len(queued(q)) == 1


def test_odb_returns_at_once_and_leaves_a_whole_message_or_a_delivery(make_instance):
    q = make_instance()
    t0 = time.monotonic()
    r = q.sendmail("-odb", "root", input=b"Subject: bg\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    # The background delivery may be running or done; never a torn message.
    deadline = time.time() + 10
    while time.time() < deadline:
        names = os.listdir(q.spool.dir)
        if not names or not any(q.spool.is_locked(n[2:]) for n in names if n.startswith("df")):
            break
        time.sleep(0.05)
    for name in os.listdir(q.spool.dir):
        assert name[:2] in ("qf", "df"), name


def test_odi_delivers_before_exit(make_instance):
    q = make_instance()
    r = q.sendmail("-odi", "root", input=b"Subject: now\n\nhello\n")
    assert r.returncode == 0, r.stderr
    assert os.listdir(q.spool.dir) == []
    with open(os.path.join(q.root, "mail", "root"), "rb") as f:
        assert b"Subject: now" in f.read()


def test_odi_permanent_failure_exits_69_and_says_so(make_instance):
    q = make_instance()
    r = q.sendmail("-odi", "no-such-user-here", input=b"Subject: x\n\nx\n")
    assert r.returncode == 69
    assert b"delivery to some recipients failed (a bounce went to <root@mx.example.test>)" \
        in r.stderr


def test_odb_delivers_in_the_background(make_instance):
    q = make_instance()
    r = q.sendmail("-odb", "root", input=b"Subject: later\n\nx\n")
    assert r.returncode == 0
    mbox = os.path.join(q.root, "mail", "root")
    deadline = time.time() + 20
    while time.time() < deadline and not (os.path.exists(mbox) and not os.listdir(q.spool.dir)):
        time.sleep(0.05)
    with open(mbox, "rb") as f:
        assert b"Subject: later" in f.read()


def test_queueing_imports_neither_re_nor_enum_nor_threading(q):
    # sendmail's start-up is its latency: those three (with what they pull
    # in) cost a run about a third of its time. -S: as make install's
    # launchers run. A configuration that names tables and networks (whose
    # checks run at every load) must not pull them in either, nor the
    # tables, nor logging; a submission that commits does not import the
    # maildrop.
    table = os.path.join(q.root, "virtual")
    open(table, "w").close()
    q.write_config(virtual_alias_maps=f"hash:{table}", smtp_sasl_password_maps=f"texthash:{table}",
                   mynetworks="127.0.0.0/8, [::1]/128, 192.0.2.0/24")
    cmd = [sys.executable, "-S", "-X", "importtime", os.path.join(BIN, "sendmail"), "-C", q.conf_path,
           "-t", "-F", "Some One", "-f", "a@example.test"]
    r = subprocess.run(cmd, input=b"To: root, \"x y\"@example.test\nSubject: s\n\nbody\n", capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "pymta.inject" in imported and "pymta.queue_dir" in imported
    assert not imported & {"re", "enum", "threading", "socket", "email", "logging", "pymta.tables",
                           "pymta.queue_maildrop"}, sorted(imported)
    env, data = only(q)
    assert len(env.recipients) == 2 and env.recipients[1].address == '"x y"@example.test'
    assert b"\nFrom: Some One <" in data


def test_local_submission_qualifies_bare_header_addresses_with_myorigin(inst):
    """Postfix's cleanup for local mail: To: daemon is daemon@myorigin."""
    inst.write_config(myorigin="example.test")
    r = inst.sendmail("-t", "-odq", input=b"To: root\nCc: Root <root>, bob (Bob), "
                      b"someone@else.example\nFrom: admin\nSubject: q\n\nx\n")
    assert r.returncode == 0, r.stderr
    r = inst.sendmail("-odq", "root", input=b"To: daemon\nReply-To: undisclosed-recipients:;\n"
                      b"Subject: r\n\nx\n")
    assert r.returncode == 0, r.stderr
    heads = []
    for name in sorted(os.listdir(inst.spool.dir)):
        if name.startswith("df"):
            heads.append(open(os.path.join(inst.spool.dir, name), "rb").read().split(b"\n\n")[0])
    text = b"\n".join(heads).decode()
    assert "To: root@example.test\n" in text
    assert "Cc: Root <root@example.test>, bob@example.test (Bob), someone@else.example\n" in text
    assert "From: admin@example.test\n" in text
    assert "To: daemon@example.test\n" in text
    assert "Reply-To: undisclosed-recipients:;\n" in text
