"""Local delivery as the tools downstream read it: procmail's From_ line and
the environment of a .forward command, one copy per final target, checked
end to end through sendmail with real users."""

import mailbox
import os
import re
import time

from conftest import Instance

FROM_LINE = re.compile(r"^From (\S+)  ([A-Z][a-z]{2} [A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d \d{4})$")


def write_owned(path, text, pw, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


def test_forward_command_gets_from_line_and_postfix_environment(make_user, shared_dir):
    """procmail run from ~/.forward ("|exec procmail -f-") takes the envelope
    sender from the From_ line: it must be the sender, not the recipient."""
    bob = make_user("ptf")
    got, envfile = os.path.join(bob.pw_dir, "got"), os.path.join(bob.pw_dir, "env")
    write_owned(os.path.join(bob.pw_dir, ".forward"),
                f'"|cat > {got}; env > {envfile}"\n', bob)
    inst = Instance(shared_dir)
    r = inst.sendmail("-odi", "-f", "newsletter@example.org", f"{bob.pw_name}+news",
                      input=b"Subject: capture\n\nFrom the body\nlast line")
    assert r.returncode == 0, r.stderr
    data = open(got, "rb").read()
    first, rest = data.split(b"\n", 1)
    m = FROM_LINE.match(first.decode())
    assert m, first
    assert m.group(1) == "newsletter@example.org"
    when = time.mktime(time.strptime(m.group(2), "%a %b %d %H:%M:%S %Y"))
    assert abs(when - time.time()) < 120
    assert rest.startswith(b"Return-Path: <newsletter@example.org>\n"
                           b"Delivered-To: " + f"{bob.pw_name}+news@mx.example.test".encode())
    assert rest.endswith(b"\n\nFrom the body\nlast line\n")    # unquoted, final newline
    assert os.stat(got).st_uid == bob.pw_uid
    env = dict(line.split("=", 1) for line in open(envfile).read().splitlines() if "=" in line)
    assert env["SENDER"] == "newsletter@example.org"
    assert env["RECIPIENT"] == f"{bob.pw_name}+news@mx.example.test"
    assert env["ORIGINAL_RECIPIENT"] == f"{bob.pw_name}+news@mx.example.test"
    assert env["LOCAL"] == f"{bob.pw_name}+news"
    assert env["EXTENSION"] == "news"
    assert env["DOMAIN"] == "mx.example.test"
    assert env["USER"] == env["LOGNAME"] == bob.pw_name
    assert env["HOME"] == bob.pw_dir
    assert env["SHELL"] == bob.pw_shell
    assert env["PATH"] == inst.cfg.command_path


def test_forward_command_reached_through_a_list_is_for_the_user(make_user, shared_dir):
    """list -> bob -> bob's .forward command: RECIPIENT and Delivered-To are
    bob's address (whose .forward it is), ORIGINAL_RECIPIENT the list's."""
    bob = make_user("ptf")
    envfile = os.path.join(bob.pw_dir, "env")
    write_owned(os.path.join(bob.pw_dir, ".forward"), f'"|env > {envfile}"\n', bob)
    inst = Instance(shared_dir)
    with open(os.path.join(shared_dir, "aliases"), "a") as f:
        f.write(f"team: {bob.pw_name}\n")
    r = inst.sendmail("-odi", "team", input=b"Subject: list\n\nx\n")
    assert r.returncode == 0, r.stderr
    env = dict(line.split("=", 1) for line in open(envfile).read().splitlines() if "=" in line)
    assert env["RECIPIENT"] == f"{bob.pw_name}@mx.example.test"
    assert env["ORIGINAL_RECIPIENT"] == "team@mx.example.test"
    assert env["USER"] == bob.pw_name


def test_one_copy_per_final_target(make_user, shared_dir):
    """`sendmail user user@myhostname USER` and a list naming the user again:
    local parts of local users compare as the lookup does (case-blind), one
    copy in the mailbox; a command named twice runs once."""
    carol = make_user("ptd")
    out = os.path.join(shared_dir, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    runs = os.path.join(out, "runs")
    inst = Instance(shared_dir)
    with open(os.path.join(shared_dir, "aliases"), "a") as f:
        f.write(f"crew: {carol.pw_name}, {carol.pw_name.upper()}@mx.example.test\n"
                f"hook1: \"|echo run >> {runs}\"\nhook2: \"|echo run >> {runs}\"\n")
    name = carol.pw_name
    r = inst.sendmail("-odi", name, f"{name}@mx.example.test", name.upper(), "crew",
                      "hook1", "hook2", input=b"Subject: once\n\nbody\n")
    assert r.returncode == 0, r.stderr
    box = mailbox.mbox(os.path.join(shared_dir, "mail", name))
    assert [m["Subject"] for m in box] == ["once"]
    assert open(runs).read() == "run\n"
    log = inst.maillog()
    assert "duplicate of <" in log, log
    assert "status=deferred" not in log.lower() and "stat=Deferred" not in log
