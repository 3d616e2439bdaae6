"""Local delivery: mbox format and locking, truncation on error, Maildir,
commands and files, privileges."""

import mailbox
import os
import pathlib
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import Instance
from pymta import envelope as E
from pymta import local, local_command, local_mbox, local_target, route
from pymta.queue_dir import Spool
from pymta.status import DeliveryError

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
BODY = b"Subject: test\nFrom: a@b.test\n\nhello\nFrom the start\n>From quoted\nlast line\n"


@pytest.fixture
def open_dir():
    """A directory other users can reach (pytest's base temp is 0700, and each
    xdist worker resets it), removed afterwards."""
    path = tempfile.mkdtemp(prefix="pymta-local-", dir="/tmp")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_inst(open_dir):
    """A pymta instance under open_dir."""
    return Instance(open_dir / "inst")


def writable_dir(path):
    path.mkdir()
    os.chmod(path, 0o777)
    return path


def queue(inst, body=BODY, sender="alice@remote.test", rcpt="me@mx.example.test", flags="p"):
    """Commit a message through the spool; returns (cfg, env, recipient)."""
    cfg = inst.cfg
    env = E.Envelope(sender=sender)
    r = env.add_recipient(rcpt, flags=flags)
    with Spool.from_config(cfg).new_message() as w:
        w.write(body)
        w.commit(env)
    return cfg, env, r


def me_target(cfg, **kw):
    pw = pwd.getpwuid(os.getuid())
    t = route.Router(cfg).mailbox_target(pw)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


ASCTIME = re.compile(rb"^From (\S+)  ([A-Z][a-z]{2} [A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d \d{4})$")


def from_line_date(line, sender):
    """The date of a From_ line in Postfix's form ("From sender  asctime"),
    checked to be the delivery's (within a minute)."""
    m = ASCTIME.match(line)
    assert m, line
    assert m.group(1) == sender
    when = time.mktime(time.strptime(m.group(2).decode(), "%a %b %d %H:%M:%S %Y"))
    assert abs(when - time.time()) < 60
    return m.group(2)


def postfix_mbox(sender, date, rcpt, body):
    """The bytes Postfix's local(8) appends to an mbox (without X-Original-To):
    From_ line, Return-Path, Delivered-To, the message with mboxo quoting
    (only lines that start with "From "), a final newline, a blank line."""
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    quoted = b"".join((b">" + ln if ln.startswith(b"From ") else ln) + b"\n" for ln in lines)
    return (b"From " + (sender or b"MAILER-DAEMON") + b"  " + date + b"\n"
            + b"Return-Path: <" + sender + b">\nDelivered-To: " + rcpt + b"\n" + quoted + b"\n")


def test_mbox_is_byte_for_byte_what_postfix_writes_and_reads_back(inst):
    cfg, env, r = queue(inst)
    t = me_target(cfg)
    reply = local.deliver(cfg, env, r, t)
    assert reply.code == 250, reply
    body2 = b"Subject: second\n\nFrom here\n>From there\n>>From everywhere\nno newline at end"
    cfg, env2, r2 = queue(inst, body=body2, sender="")
    assert local.deliver(cfg, env2, r2, t).code == 250
    raw = open(t.path, "rb").read()
    first = raw[:raw.index(b"\n")]
    second = raw[raw.index(b"\nFrom MAILER-DAEMON") + 1:].split(b"\n", 1)[0]
    expected = (postfix_mbox(b"alice@remote.test", from_line_date(first, b"alice@remote.test"),
                             b"me@mx.example.test", BODY)
                + postfix_mbox(b"", from_line_date(second, b"MAILER-DAEMON"),
                               b"me@mx.example.test", body2))
    assert raw == expected
    # mboxo: the readers (Python's mailbox here; mutt, dovecot, formail) take
    # off nothing but the ">" of ">From ", so the body reads as it was sent
    # except for lines that started with "From ".
    box = mailbox.mbox(t.path)
    msgs = list(box)
    assert len(msgs) == 2
    assert msgs[0]["Return-Path"] == "<alice@remote.test>"
    assert msgs[0]["Delivered-To"] == "me@mx.example.test"
    assert msgs[0]["Subject"] == "test"
    assert msgs[0].get_from() == "alice@remote.test  " + from_line_date(first, b"alice@remote.test").decode()
    assert msgs[0].get_payload().encode() == b"hello\n>From the start\n>From quoted\nlast line\n"
    assert msgs[1]["Return-Path"] == "<>"
    assert msgs[1]["Subject"] == "second"
    assert msgs[1].get_payload().encode() == b">From here\n>From there\n>>From everywhere\nno newline at end\n"
    assert os.stat(t.path).st_mode & 0o777 == 0o600


def test_mailbox_from_quoting_mboxrd_is_the_reversible_choice(inst):
    inst.write_config(mailbox_from_quoting="mboxrd")
    cfg, env, r = queue(inst, body=b"Subject: q\n\nFrom a\n>From b\n>>From c\n>Fromage\n")
    t = me_target(cfg)
    assert local.deliver(cfg, env, r, t).code == 250
    raw = open(t.path, "rb").read()
    assert raw.endswith(b"\n\n>From a\n>>From b\n>>>From c\n>Fromage\n\n")
@needs_root
def test_mailbox_is_created_owned_by_the_user_mode_0600(open_inst):
    inst = open_inst
    cfg, env, r = queue(inst)
    pw = pwd.getpwnam("nobody")
    t = route.Router(cfg).mailbox_target(pw)
    assert local.deliver(cfg, env, r, t).code == 250
    st = os.stat(t.path)
    assert (st.st_uid, st.st_mode & 0o777) == (pw.pw_uid, 0o600)
    assert not os.path.exists(t.path + ".lock")


@needs_root
def test_mailbox_in_a_group_mail_spool_gets_group_mail(open_inst):
    inst = open_inst
    import grp
    mail_gid = grp.getgrnam("mail").gr_gid
    spool = inst.root + "/mail"
    os.chown(spool, 0, mail_gid)
    os.chmod(spool, 0o2775)
    cfg, env, r = queue(inst)
    t = route.Router(cfg).mailbox_target(pwd.getpwnam("daemon"))
    assert local.deliver(cfg, env, r, t).code == 250
    st = os.stat(t.path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (t.uid, mail_gid, 0o600)
    assert [n for n in os.listdir(spool) if n != "daemon"] == []    # no lock left


def test_pipe_without_the_alias_flag_is_never_run(inst, open_dir):
    out = writable_dir(open_dir / "o")
    cfg, env, _ = queue(inst)
    t = local_target.Target("command", user="nobody", uid=65534, gid=65534,
                     command=f"touch {out}/ran")
    reply = local.deliver(cfg, env, E.Recipient("|x", flags="p"), t)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert not os.path.exists(out / "ran")
    assert local.deliver(cfg, env, E.Recipient("|x", flags="a"), t).code == 250
    assert os.path.exists(out / "ran")     # the same target with the flag does run


def test_delivery_waits_for_a_dot_lock_held_by_another_process(inst):
    cfg, env, r = queue(inst)
    t = me_target(cfg)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({t.path + '.lock'!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        print("locked", flush=True)
        time.sleep(1.5)
        size = os.path.getsize({t.path!r}) if os.path.exists({t.path!r}) else 0
        print(size, flush=True)
        os.unlink({t.path + '.lock'!r})
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        reply = local.deliver(cfg, env, r, t)
        waited = time.monotonic() - t0
        out, _ = holder.communicate(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert reply.code == 250
    assert waited >= 1.0
    assert out.strip() == "0"          # nothing was written while the lock was held
    assert len(mailbox.mbox(t.path)) == 1


def test_stale_dot_lock_is_broken(inst, caplog):
    cfg, env, r = queue(inst)
    t = me_target(cfg)
    with open(t.path + ".lock", "w"):
        pass
    old = time.time() - local_mbox.STALE_LOCK_AGE - 60
    os.utime(t.path + ".lock", (old, old))
    t0 = time.monotonic()
    assert local.deliver(cfg, env, r, t).code == 250
    assert time.monotonic() - t0 < 30
    assert not os.path.exists(t.path + ".lock")
    assert "stale lock" in caplog.text
    assert len(mailbox.mbox(t.path)) == 1


def test_kill_9_while_locked_leaves_only_the_lock_broken_after_stale_lock_time(inst):
    # A delivery killed while it holds the dot-lock leaves USER.lock and
    # nothing else; a lock younger than stale_lock_time (500 s, Postfix's)
    # holds, an older one is broken, and the spool then holds the mailbox only.
    assert local_mbox.STALE_LOCK_AGE == 500 and inst.cfg.stale_lock_time == 500
    cfg, env, r = queue(inst)
    t = me_target(cfg)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from pymta import local_mbox\n"
         "lock = local_mbox._dot_lock(sys.argv[2], [])\n"
         "print('locked', flush=True); sys.stdin.read()",
         os.path.dirname(os.path.dirname(os.path.abspath(__file__))), t.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
    finally:
        holder.kill()
        holder.wait()
    folder = os.path.dirname(t.path)
    assert os.listdir(folder) == [os.path.basename(t.path) + ".lock"]
    young = time.time() - 400
    os.utime(t.path + ".lock", (young, young))
    old_timeout = local_mbox.LOCK_TIMEOUT
    local_mbox.LOCK_TIMEOUT = 1
    try:
        reply = local.deliver(cfg, env, r, t)
    finally:
        local_mbox.LOCK_TIMEOUT = old_timeout
    assert (reply.code, reply.enhanced) == (450, "4.2.0") and "locked" in reply.text
    old = time.time() - 501
    os.utime(t.path + ".lock", (old, old))
    assert local.deliver(cfg, env, r, t).code == 250
    assert os.listdir(folder) == [os.path.basename(t.path)]
    assert len(mailbox.mbox(t.path)) == 1


def test_write_error_truncates_the_mailbox_back(inst):
    cfg, env, r = queue(inst)
    t = me_target(cfg)
    assert local.deliver(cfg, env, r, t).code == 250
    before = open(t.path, "rb").read()
    cfg, env2, r2 = queue(inst, body=b"Subject: big\n\n" + b"x" * 200 + b"\n" * 20000)
    # A child with RLIMIT_FSIZE just above the mailbox's size: write() fails EFBIG.
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from pymta import config, envelope, local, local_target, queue_dir
        cfg = config.load({inst.conf_path!r})
        env = queue_dir.Spool.from_config(cfg).read({env2.id!r})
        t = local_target.Target("mailbox", user={t.user!r}, uid={t.uid}, gid={t.gid}, home="/",
                         path={t.path!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 5000}, {len(before) + 5000}))
        print(local.deliver(cfg, env, env.recipients[0], t))
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("552 5.2.2"), res.stdout
    assert open(t.path, "rb").read() == before


def test_mailbox_size_limit_refuses_with_552(make_instance):
    inst = make_instance(mailbox_size_limit=1000)
    cfg, env, r = queue(inst, body=b"Subject: big\n\n" + b"y" * 2000 + b"\n")
    t = me_target(cfg)
    reply = local.deliver(cfg, env, r, t)
    assert (reply.code, reply.enhanced) == (552, "5.2.2")
    assert not os.path.exists(t.path) or os.path.getsize(t.path) == 0


def test_maildir_delivery_goes_through_tmp_into_new(inst, tmp_path):
    cfg, env, r = queue(inst)
    pw = pwd.getpwuid(os.getuid())
    t = local_target.Target("maildir", user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                     home=str(tmp_path), path=str(tmp_path / "Maildir"))
    assert local.deliver(cfg, env, r, t).code == 250
    assert local.deliver(cfg, env, r, t).code == 250
    box = mailbox.Maildir(t.path, create=False)
    msgs = list(box)
    assert len(msgs) == 2
    assert msgs[0]["Return-Path"] == "<alice@remote.test>"
    assert msgs[0].get_payload().startswith("hello\nFrom the start\n")   # no quoting in Maildir
    assert os.listdir(os.path.join(t.path, "tmp")) == []
    assert len(os.listdir(os.path.join(t.path, "new"))) == 2


def test_maildir_message_is_what_postfix_writes_with_a_final_newline(inst, tmp_path):
    """Postfix's maildir delivery: Return-Path, Delivered-To, the message
    unquoted, a newline added when the message lacks one; a bare CR is kept
    (pymta's choice, see pymta-local(8))."""
    body = b"Subject: nl\n\nFrom me\nbare\rcr\nno newline at end"
    cfg, env, r = queue(inst, body=body)
    pw = pwd.getpwuid(os.getuid())
    t = local_target.Target("maildir", user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                     home=str(tmp_path), path=str(tmp_path / "Maildir"))
    assert local.deliver(cfg, env, r, t).code == 250
    (name,) = os.listdir(os.path.join(t.path, "new"))
    raw = (pathlib.Path(t.path) / "new" / name).read_bytes()
    assert raw == (b"Return-Path: <alice@remote.test>\nDelivered-To: me@mx.example.test\n"
                   + body + b"\n")
    (msg,) = list(mailbox.Maildir(t.path, create=False))
    assert msg.get_payload().endswith("no newline at end\n")


def command_target(cfg, command, uid=-1):
    rcpt = E.Recipient("|" + command, flags="a", parent="list@mx.example.test", uid=uid)
    return rcpt, route.Router(cfg).route(rcpt).target


def test_pipe_gets_the_message_and_environment_on_stdin(inst, open_dir):
    out = writable_dir(open_dir / "out")
    cfg, env, _ = queue(inst)
    rcpt, t = command_target(cfg, f"cat > {out}/msg; env > {out}/env; id -u > {out}/uid")
    assert t.kind == "command"
    reply = local.deliver(cfg, env, rcpt, t)
    assert reply.code == 250, reply
    msg = (out / "msg").read_bytes()
    # As Postfix's local(8) pipes it: the From_ line (for procmail -f-,
    # formail), Return-Path, Delivered-To, the message unquoted.
    first, rest = msg.split(b"\n", 1)
    from_line_date(first, b"alice@remote.test")
    assert rest == b"Return-Path: <alice@remote.test>\nDelivered-To: list@mx.example.test\n" + BODY
    environ = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines()
                   if "=" in line)
    assert environ["SENDER"] == "alice@remote.test"
    assert environ["RECIPIENT"] == "list@mx.example.test"
    assert environ["LOCAL"] == "list"
    assert environ["DOMAIN"] == "mx.example.test"
    assert environ["EXTENSION"] == ""
    assert environ["ORIGINAL_RECIPIENT"] == "list@mx.example.test"
    assert environ["PATH"] == cfg.command_path
    uid = int((out / "uid").read_text())
    if ROOT:
        pw = pwd.getpwnam(cfg.default_privs)
        assert uid == pw.pw_uid
        assert environ["USER"] == environ["LOGNAME"] == cfg.default_privs
        assert environ["HOME"] == pw.pw_dir
        assert environ["SHELL"] == pw.pw_shell
    else:
        assert uid == os.getuid()


def test_pipe_without_from_line_when_command_from_line_is_off(inst, open_dir):
    out = writable_dir(open_dir / "out")
    inst.write_config(command_from_line="no")
    cfg, env, _ = queue(inst, body=b"Subject: x\n\nno final newline")
    rcpt, t = command_target(cfg, f"cat > {out}/msg")
    assert local.deliver(cfg, env, rcpt, t).code == 250
    assert (out / "msg").read_bytes() == (b"Return-Path: <alice@remote.test>\n"
                                         b"Delivered-To: list@mx.example.test\n"
                                         b"Subject: x\n\nno final newline\n")


@pytest.mark.unit
def test_command_environment_values_are_censored(inst):
    cfg = inst.cfg
    env = E.Envelope(sender="we$(touch /tmp/x)ird;`id`@evil.test", client_addr="127.0.0.1",
                     helo="h`x`", protocol="ESMTP")
    r = env.add_recipient("|x", flags="a")
    r.parent = "Bob+Tag@Example.TEST"
    r.via = "bob+tag@example.test"
    t = local_target.Target("command", user="bob", uid=1234, gid=1234, home="/home/bob",
                     command="x", shell="/bin/bash")
    environ = local_command.command_environment(cfg, env, r, t)
    assert environ["SENDER"] == "we__touch_/tmp/x_ird__id_@evil.test"
    assert environ["RECIPIENT"] == "bob+tag@example.test"
    assert environ["LOCAL"] == "bob+tag"
    assert environ["EXTENSION"] == "tag"
    assert environ["DOMAIN"] == "example.test"
    assert environ["ORIGINAL_RECIPIENT"] == "Bob+Tag@Example.TEST"
    assert environ["CLIENT_ADDRESS"] == "127.0.0.1"
    assert environ["CLIENT_HELO"] == "h_x_"
    assert environ["CLIENT_PROTOCOL"] == "ESMTP"
    assert (environ["USER"], environ["LOGNAME"], environ["HOME"], environ["SHELL"]) == \
        ("bob", "bob", "/home/bob", "/bin/bash")
    # A quoted local part: LOCAL and EXTENSION are its unquoted text, censored.
    r.via = '"bob+$(id);x"@Example.TEST'
    environ = local_command.command_environment(cfg, env, r, t)
    assert (environ["LOCAL"], environ["EXTENSION"], environ["DOMAIN"]) == \
        ("bob+__id__x", "__id__x", "example.test")


def test_pipe_exit_75_defers_and_exit_1_fails_with_its_output(inst):
    cfg, env, _ = queue(inst)
    rcpt, t = command_target(cfg, "cat >/dev/null; echo try later; exit 75")
    reply = local.deliver(cfg, env, rcpt, t)
    assert reply.code // 100 == 4 and "try later" in reply.text
    rcpt, t = command_target(cfg, "cat >/dev/null; echo no such list >&2; echo second; exit 1")
    reply = local.deliver(cfg, env, rcpt, t)
    assert reply.code // 100 == 5 and reply.enhanced.startswith("5.")
    assert "no such list" in reply.text and "second" in reply.text


def test_pipe_that_ignores_its_input_is_delivered(inst):
    cfg, env, _ = queue(inst, body=b"Subject: x\n\n" + b"z" * 1_000_000 + b"\n")
    rcpt, t = command_target(cfg, "exit 0")
    assert local.deliver(cfg, env, rcpt, t).code == 250


def test_command_time_limit_kills_the_command(make_instance):
    inst = make_instance(command_time_limit="1s")
    cfg, env, _ = queue(inst)
    rcpt, t = command_target(cfg, "sleep 30")
    t0 = time.monotonic()
    reply = local.deliver(cfg, env, rcpt, t)
    assert time.monotonic() - t0 < 10
    assert reply.code // 100 == 5 and "time limit" in reply.text


def test_file_target_appends_in_mbox_format(inst, open_dir):
    d = writable_dir(open_dir / "files")
    cfg, env, _ = queue(inst)
    rcpt = E.Recipient(str(d / "log"), flags="a", parent="archive@mx.example.test")
    r = route.Router(cfg).route(rcpt)
    assert r.kind == "local" and r.target.kind == "file"
    assert local.deliver(cfg, env, rcpt, r.target).code == 250
    assert local.deliver(cfg, env, rcpt, r.target).code == 250
    msgs = list(mailbox.mbox(str(d / "log")))
    assert [m["Delivered-To"] for m in msgs] == ["archive@mx.example.test"] * 2
    if ROOT:
        assert os.stat(d / "log").st_uid == pwd.getpwnam(cfg.default_privs).pw_uid


@needs_root
def test_pipe_named_by_root_still_never_runs_as_root(inst, open_dir):
    out = writable_dir(open_dir / "o")
    cfg, env, _ = queue(inst)
    t = local_target.Target("command", user="root", uid=0, gid=0, home="/root",
                     command=f"id -u > {out}/uid")
    rcpt = E.Recipient("|x", flags="a")
    assert local.deliver(cfg, env, rcpt, t).code == 250
    assert int((out / "uid").read_text()) == pwd.getpwnam(cfg.default_privs).pw_uid


def test_sendmail_odi_delivers_through_aliases_to_mailbox_and_pipe(inst, open_dir):
    out = writable_dir(open_dir / "pipe")
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write(f'catcher: "|cat > {out}/got; id -u > {out}/uid"\n')
    me = pwd.getpwuid(os.getuid()).pw_name
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write(f"root: \\{me}\n" if me != "root" else "")
    res = inst.sendmail("-odi", "postmaster", "catcher", input=b"Subject: t\n\nx\n")
    assert res.returncode == 0, res.stderr
    msgs = list(mailbox.mbox(os.path.join(inst.root, "mail", me)))
    assert [m["Subject"] for m in msgs] == ["t"]
    got = (out / "got").read_bytes()
    assert got.startswith(b"From root@mx.example.test  ") and got.endswith(b"\n\nx\n")
    assert b"\nReturn-Path: <root@mx.example.test>\nDelivered-To: catcher@" in got
    if ROOT:
        assert int((out / "uid").read_text()) == pwd.getpwnam("nobody").pw_uid


@needs_root
def test_unprivileged_pymta_delivers_as_itself_and_says_so(open_inst):
    inst = open_inst
    nobody = pwd.getpwnam("nobody")
    cfg, env, r = queue(inst)
    for top, dirs, files in os.walk(inst.root):
        for name in dirs + files:
            os.chown(os.path.join(top, name), nobody.pw_uid, nobody.pw_gid)
    os.chown(inst.root, nobody.pw_uid, nobody.pw_gid)
    script = textwrap.dedent(f"""
        import os, pwd, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from pymta import cli, config, local, queue_dir, route
        os.setgroups([])                 # everything is imported: now become nobody
        os.setgid({nobody.pw_gid})
        os.setuid({nobody.pw_uid})
        cfg = config.load({inst.conf_path!r})
        cli.setup_logging(cfg)
        env = queue_dir.Spool.from_config(cfg).read({env.id!r})
        t = route.Router(cfg).mailbox_target(pwd.getpwuid(os.getuid()))
        for _ in range(2):
            print(local.deliver(cfg, env, env.recipients[0], t))
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("250 2.0.0")
    box = os.path.join(inst.root, "mail", "nobody")
    assert len(mailbox.mbox(box)) == 2 and os.stat(box).st_uid == nobody.pw_uid
    assert inst.maillog().count("not running as root") == 1


@needs_root
def test_dot_lock_refused_by_the_directory_is_logged_once_a_minute(inst, open_dir, caplog):
    # Files are delivered as default_privs: it may write the file, not its
    # directory, so no dot-lock; the fcntl lock does, and it is said once.
    cfg, env, _ = queue(inst)
    log = open_dir / "log"
    log.touch()
    nobody = pwd.getpwnam(cfg.default_privs)
    os.chown(log, nobody.pw_uid, nobody.pw_gid)
    rcpt = E.Recipient(str(log), flags="a", parent="archive@mx.example.test")
    target = route.Router(cfg).route(rcpt).target
    for _ in range(3):
        assert local.deliver(cfg, env, rcpt, target).code == 250
    assert len(list(mailbox.mbox(str(log)))) == 3
    assert caplog.text.count("cannot create a dot-lock") == 1


def _spool_1777(inst):
    spool = inst.root + "/mail"
    os.chmod(inst.root, 0o755)
    os.chmod(spool, 0o1777)
    return spool


@needs_root
def test_mailbox_pre_created_by_another_user_is_not_delivered_into(open_inst, make_user):
    from users import run_as
    victim, attacker = make_user(), make_user()
    spool = _spool_1777(open_inst)
    box = os.path.join(spool, victim.pw_name)
    p = run_as(attacker, ["/bin/sh", "-c", f"umask 0; : > {box}"])
    assert p.returncode == 0, p.stderr
    cfg, env, r = queue(open_inst)
    t = route.Router(cfg).mailbox_target(victim)
    assert t.path == box
    reply = local.deliver(cfg, env, r, t)
    assert reply.code == 450 and "wrong owner" in reply.text
    assert os.path.getsize(box) == 0


@needs_root
def test_fifo_in_place_of_a_mailbox_defers_at_once(open_inst, make_user):
    from users import run_as
    victim, attacker = make_user(), make_user()
    spool = _spool_1777(open_inst)
    box = os.path.join(spool, victim.pw_name)
    p = run_as(attacker, ["/usr/bin/mkfifo", "-m", "666", box])
    assert p.returncode == 0, p.stderr
    cfg, env, r = queue(open_inst)
    t = route.Router(cfg).mailbox_target(victim)
    t0 = time.monotonic()
    reply = local.deliver(cfg, env, r, t)
    assert reply.code == 450 and "not a regular file" in reply.text
    assert time.monotonic() - t0 < 20


@needs_root
def test_stale_lock_of_another_user_defers_within_the_bound_without_spinning(
        open_inst, make_user, monkeypatch):
    from users import run_as
    victim, attacker = make_user(), make_user()
    spool = _spool_1777(open_inst)
    lock = os.path.join(spool, victim.pw_name + ".lock")
    p = run_as(attacker, ["/bin/sh", "-c", f": > {lock} && touch -d '2 hours ago' {lock}"])
    assert p.returncode == 0, p.stderr
    monkeypatch.setattr(local_mbox, "LOCK_TIMEOUT", 2)
    cfg, env, r = queue(open_inst)
    t = route.Router(cfg).mailbox_target(victim)
    t0 = time.monotonic()
    reply = local.deliver(cfg, env, r, t)
    elapsed = time.monotonic() - t0
    assert reply.code == 450 and "locked" in reply.text, reply
    assert elapsed < 20
    assert sorted(os.listdir(spool)) == [victim.pw_name + ".lock"]


@needs_root
def test_home_mailbox_through_a_symlink_the_user_planted_is_not_created_by_root(
        open_dir, make_user):
    from users import run_as
    user = make_user()
    target_dir = open_dir / "sbin"
    target_dir.mkdir()
    os.chmod(target_dir, 0o755)
    p = run_as(user, ["/bin/ln", "-s", str(target_dir), os.path.join(user.pw_dir, "Mail")])
    assert p.returncode == 0, p.stderr
    inst = Instance(open_dir / "inst", home_mailbox="Mail/inbox")
    cfg, env, r = queue(inst)
    t = route.Router(cfg).mailbox_target(user)
    assert t.path == os.path.join(user.pw_dir, "Mail/inbox")
    reply = local.deliver(cfg, env, r, t)
    assert (reply.code, reply.enhanced) == (450, "4.2.0"), reply
    assert "reached through a symbolic link (Mail)" in reply.text
    assert os.listdir(target_dir) == []


@needs_root
@pytest.mark.parametrize("home_mailbox", ["Mail/inbox", "Mail/box/", "Mail/"])
def test_home_mailbox_through_a_symlink_to_a_writable_root_dir_defers(
        open_dir, make_user, home_mailbox):
    # ~/Mail points at a root-owned directory the user may write (sticky and
    # world-writable, as /tmp): with the user's rights alone the mailbox
    # would land there; reached component by component without symlinks it
    # does not, and the reason is in the log and in mailq.
    from users import run_as
    user = make_user()
    target_dir = open_dir / "tmpish"
    target_dir.mkdir()
    os.chmod(target_dir, 0o1777)
    p = run_as(user, ["/bin/ln", "-s", str(target_dir), os.path.join(user.pw_dir, "Mail")])
    assert p.returncode == 0, p.stderr
    inst = Instance(open_dir / "inst", home_mailbox=home_mailbox)
    r = inst.sendmail("-odi", user.pw_name, input=b"Subject: x\n\nbody\n")
    assert r.returncode == 0, r.stderr
    assert os.listdir(target_dir) == []
    if home_mailbox == "Mail/":
        why = "Maildir " + os.path.join(user.pw_dir, "Mail") + " is a symbolic link"
    else:
        why = "reached through a symbolic link (Mail)"
    assert "4.2.0" in inst.maillog() and why in inst.maillog(), inst.maillog()
    q = inst.run("mailq", "-v")
    assert why.encode() in q.stdout, q.stdout


@needs_root
@pytest.mark.parametrize("home_mailbox", ["Mail/inbox", "Maildir/"])
def test_home_mailbox_in_real_directories_is_delivered_as_the_user(
        open_dir, make_user, home_mailbox):
    from users import run_as
    user = make_user()
    p = run_as(user, ["/bin/mkdir", "-p", os.path.join(user.pw_dir, "Mail")])
    assert p.returncode == 0, p.stderr
    inst = Instance(open_dir / "inst", home_mailbox=home_mailbox)
    for _ in range(2):
        r = inst.sendmail("-odi", user.pw_name, input=b"Subject: x\n\nbody\n")
        assert r.returncode == 0, r.stderr
    path = os.path.join(user.pw_dir, home_mailbox)
    if home_mailbox.endswith("/"):
        box = mailbox.Maildir(path, factory=None, create=False)
        assert os.stat(os.path.join(path, "new")).st_uid == user.pw_uid
    else:
        box = mailbox.mbox(path)
        assert os.stat(path).st_uid == user.pw_uid
    assert len(box) == 2, inst.maillog()
    assert "delivered to" in inst.maillog() and "/proc/" not in inst.maillog()


@needs_root
def test_debian_spool_layout_mailboxes_made_by_the_recipient_and_no_one_else(
        open_dir, make_user):
    # make dev-setup / make install make the spool 2775 root:mail: the
    # recipient's delivery (with group mail) creates the mbox, 0600, group
    # mail; another user can plant nothing there.
    from users import run_as
    from pymta import devsetup
    import grp
    victim, attacker = make_user(), make_user()
    inst = Instance(open_dir / "inst")
    os.chmod(inst.root, 0o755)
    spool = os.path.join(inst.root, "mail")
    os.rmdir(spool)
    said = []
    devsetup.mail_spool(spool, said.append)
    st = os.stat(spool)
    mail_gid = grp.getgrnam("mail").gr_gid
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2775, 0, mail_gid), said
    assert "2775, root:mail" in said[0]
    p = run_as(attacker, ["/bin/sh", "-c", f": > {spool}/{victim.pw_name}"])
    assert p.returncode != 0 and os.listdir(spool) == []
    p = run_as(attacker, ["/usr/bin/mkfifo", f"{spool}/{victim.pw_name}.lock"])
    assert p.returncode != 0 and os.listdir(spool) == []
    for _ in range(2):
        r = inst.sendmail("-odi", victim.pw_name, input=b"Subject: x\n\nbody\n")
        assert r.returncode == 0, r.stderr
    box = os.path.join(spool, victim.pw_name)
    st = os.stat(box)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, victim.pw_uid, mail_gid)
    assert len(mailbox.mbox(box)) == 2, inst.maillog()
    assert sorted(os.listdir(spool)) == [victim.pw_name]


@pytest.mark.unit
def test_existing_world_writable_spool_is_warned_about(tmp_path):
    from pymta import devsetup
    spool = tmp_path / "mail"
    spool.mkdir()
    os.chmod(spool, 0o1777)
    said = []
    devsetup.mail_spool(str(spool), said.append)
    assert said[0].startswith(f"warning: mailboxes: {spool} is world-writable (mode 1777)")
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o1777


def _peak_rss_kb(pid, field="VmHWM:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _rss_kb(pid):
    return _peak_rss_kb(pid, "VmRSS:")


@needs_root
@pytest.mark.parametrize("kind", ["mailbox", "maildir"])
def test_a_huge_single_line_streams_through_in_bounded_memory(inst, kind):
    from pymta import workers
    size = 96 << 20                                   # one 96 MB line
    inst.write_config(mailbox_size_limit=0)
    cfg, env, r = queue(inst, body=b"Subject: big\n\n" + b"x" * size + b"\n")
    if kind == "mailbox":
        t = me_target(cfg)
    else:
        t = me_target(cfg, kind="maildir", path=os.path.join(inst.root, "Maildir"))
    reply = local.deliver(cfg, env, r, t)
    assert reply.code == 250, reply
    pids = [w.pid for lst in workers.POOL._idle.values() for w in lst
            if os.path.exists(f"/proc/{w.pid}")]
    # A worker starts with its parent's pages (this test process's): what it
    # grew beyond them holds pieces of the line, never the line.
    base = _rss_kb(os.getpid())
    grown = [_peak_rss_kb(pid) - base for pid in pids]
    assert grown and max(grown) < 40 * 1024, (grown, base)
    if kind == "mailbox":
        assert os.path.getsize(t.path) > size
    else:
        (name,) = os.listdir(os.path.join(t.path, "new"))
        assert os.path.getsize(os.path.join(t.path, "new", name)) > size


def test_delivery_workers_are_named_in_ps(inst):
    from pymta import workers
    cfg, env, r = queue(inst, body=b"Subject: named\n\nx\n")
    t = me_target(cfg)
    assert local.deliver(cfg, env, r, t).code == 250
    pids = [w.pid for lst in workers.POOL._idle.values() for w in lst
            if os.path.exists(f"/proc/{w.pid}")]
    assert pids and all(open(f"/proc/{p}/comm").read() == "pymta: local\n" for p in pids)


def _quoted_by_lines(data, style, chunk):
    """The mbox quoting as a reader of lines does it (pieces of at most
    ``chunk`` bytes, only a line's first piece looked at): the definition
    local_mbox's block copy must match."""
    import io
    df, out, last = io.BytesIO(data), [], b"\n"
    while True:
        line = df.readline(chunk)
        if not line:
            break
        if last.endswith(b"\n") and local_mbox._quoted(line, style):
            out.append(b">")
        out.append(line)
        last = line
    return b"".join(out), last[-1:]


@pytest.mark.unit
@pytest.mark.parametrize("style", ["mboxo", "mboxrd"])
@pytest.mark.parametrize("block,chunk", [(7, 5), (5, 11), (16, 16), (64, 9), (256 * 1024, 64 * 1024)])
def test_mbox_block_copy_quotes_as_a_reader_of_lines_would(monkeypatch, style, block, chunk):
    import io
    import random
    monkeypatch.setattr(local_mbox, "MESSAGE_BLOCK", block)
    monkeypatch.setattr(local_mbox, "LINE_CHUNK", chunk)
    rnd = random.Random(f"{style}{block}{chunk}")
    pieces = [b"From ", b">From ", b">>From x", b"From", b"rom ", b"\n", b"\n", b"\n", b"x" * 13,
              b"From: a@b\n", b">", b"F", b"\r\n", b"y" * 70, b" From ", b"\n\n", b">" * 6]
    cases = [b"", b"\n", b"From ", b"From \n", b"no newline at the end", b"a\nFrom b\n>From c\n",
             b"x" * (3 * chunk) + b"\nFrom z", b">" * (2 * chunk) + b"From \n",
             b"a\n" + b">" * (chunk - 5) + b"From x\n", b"a\n" + b">" * (chunk - 4) + b"From x\n"]
    cases += [b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 60))) for _ in range(300)]
    for data in cases:
        out = io.BytesIO()
        last = local_mbox._copy_quoted(io.BytesIO(data), out, style)
        want, want_last = _quoted_by_lines(data, style, chunk)
        assert out.getvalue() == want, (data, style)
        assert last == (want_last or b"\n"), data


def _stdlib_maildir_bytes(root, head, data):
    """What stdlib mailbox.Maildir.add writes for ``head`` + ``data`` read as
    whole lines, with the final newline pymta adds to a message without a
    line end (the definition local_maildir's block copy must match)."""
    import io
    tail = b"\n" if data[-1:] not in (b"", b"\n", b"\r") else b""
    box = mailbox.Maildir(str(root), factory=None, create=True)
    key = box.add(io.BytesIO(head + data + tail))
    with open(os.path.join(str(root), "new", key), "rb") as f:
        out = f.read()
    box.remove(key)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 16, 256 * 1024])
def test_maildir_block_copy_writes_what_stdlib_mailbox_writes(monkeypatch, tmp_path, block):
    import io
    import random
    from pymta import local_maildir
    monkeypatch.setattr(local_maildir, "MESSAGE_BLOCK", block)
    rnd = random.Random(f"maildir{block}")
    pieces = [b"\r", b"\r", b"\n", b"\r\n", b"\r\r", b"\n\r", b"x" * 13, b"y" * 70, b"From ",
              b"Subject: s\n", b"\r\r\n", b"z", b"\n\n", b"\x00", b"\xff"]
    cases = [b"", b"\n", b"\r", b"\r\n", b"\r\r", b"\r\r\n", b"\n\r", b"no newline at the end",
             b"Subject: nl\n\nFrom me\nbare\rcr\nno newline at end", b"ends in a bare CR\r",
             b"x" * 300 + b"\r" + b"\r" * 5 + b"y" * 300, b"a\r" * 200, b"\r\n" * 100 + b"\r"]
    cases += [b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 80)))
              for _ in range(200 if block < 100 else 50)]
    heads = [b"Return-Path: <alice@remote.test>\nDelivered-To: me@mx.example.test\n",
             b"Return-Path: <>\nDelivered-To: a\r\n", b"Return-Path: <a\rb>\nDelivered-To: c\r\r\n"]
    for n, data in enumerate(cases):
        head = heads[n % len(heads)]
        out = io.BytesIO()
        local_maildir._copy(head, io.BytesIO(data), out)
        assert out.getvalue() == _stdlib_maildir_bytes(tmp_path / "std", head, data), (head, data)


@pytest.mark.unit
def test_maildir_delivery_is_byte_for_byte_stdlib_mailbox_in_new_files(monkeypatch, tmp_path):
    """deliver_batch on real files, blocks of 7 bytes: each message's file
    in new/ has what stdlib mailbox writes, a Maildir unique name of this
    process, mode 0600 under the workers' umask, and nothing stays in tmp/."""
    import io
    from pymta import local_maildir
    monkeypatch.setattr(local_maildir, "MESSAGE_BLOCK", 7)
    me = pwd.getpwuid(os.getuid())
    box = tmp_path / "home" / "Maildir"
    (tmp_path / "home").mkdir()
    t = local_target.Target("maildir", user=me.pw_name, uid=me.pw_uid, gid=me.pw_gid,
                            home=str(tmp_path / "home"), path=str(box))
    bodies = [b"Subject: a\n\nline\r\nbare\rcr\n", b"", b"no end\r", b"x" * 100 + b"\r\r" + b"y"]
    env = E.Envelope(sender="alice@remote.test")
    rcpt = env.add_recipient("me@mx.example.test")
    old = os.umask(0o077)
    try:
        replies = local_maildir.deliver_batch([(env, rcpt, io.BytesIO(b)) for b in bodies], t)
    finally:
        os.umask(old)
    assert [r.code for r in replies] == [250] * len(bodies), replies
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "cur") == []
    names = sorted(os.listdir(box / "new"), key=lambda n: int(n.split("Q")[1].split(".")[0]))
    host = os.uname().nodename.replace("/", r"\057").replace(":", r"\072")
    head = local_target.prefix(env, rcpt)
    for name, body in zip(names, bodies):
        assert re.fullmatch(rf"\d+\.M\d+P{os.getpid()}Q\d+\.{re.escape(host)}", name), name
        st = os.lstat(box / "new" / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (box / "new" / name).read_bytes() == _stdlib_maildir_bytes(tmp_path / "std", head,
                                                                         body)
    assert len(set(names)) == len(bodies)


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_maildir_with_a_symlinked_subdirectory_defers_and_writes_nothing_there(inst, tmp_path,
                                                                               sub):
    from pymta import local_maildir
    cfg, env, r = queue(inst)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    box = tmp_path / "Maildir"
    box.mkdir()
    os.symlink(elsewhere, box / sub)
    pw = pwd.getpwuid(os.getuid())
    t = local_target.Target("maildir", user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                            home=str(tmp_path), path=str(box))
    with Spool.from_config(cfg).open_data(env.id) as df:
        with pytest.raises(DeliveryError) as e:
            local_maildir.deliver(env, r, t, df)
    reply = e.value.reply
    assert (reply.code, reply.enhanced) == (450, "4.2.0"), reply
    assert f"Maildir {box}/{sub} is not a directory" in reply.text
    assert os.listdir(elsewhere) == []
    assert not any(os.listdir(box / d) for d in ("tmp", "new", "cur") if d != sub
                   and (box / d).is_dir())
