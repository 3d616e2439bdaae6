"""Routing and expansion: aliases, lists, :include:, .forward, loops,
duplicates, owner- lists, +tags, and refusal of pipes and files typed by clients."""

import os
import pwd

import pytest

from pymta import envelope as E
from pymta import route

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
HOST = "mx.example.test"


def setup(make_instance, aliases, **params):
    inst = make_instance(**params)
    with open(os.path.join(inst.root, "aliases"), "w") as f:
        f.write(aliases)
    return inst, route.Router(inst.cfg)


def go(router, addr, flags="p"):
    return router.route(E.Recipient(addr, flags=flags))


def kids(r):
    assert r.kind == "expand", r
    return [(c.address, c.flags) for c in r.children]


@pytest.mark.unit
def test_unknown_local_user_fails_user_unknown(make_instance):
    _, rt = setup(make_instance, "")
    r = go(rt, "nosuchuser@" + HOST)
    assert (r.kind, r.reply.code, r.reply.enhanced) == ("fail", 550, "5.1.1")
    assert "User unknown" in r.reply.text


@pytest.mark.unit
def test_passwd_user_routes_to_its_mailbox(make_instance):
    inst, rt = setup(make_instance, "")
    r = go(rt, "ROOT@" + HOST)
    assert r.kind == "local" and r.target.kind == "mailbox"
    assert r.target.path == os.path.join(inst.root, "mail", "root")
    assert r.target.uid == 0


@pytest.mark.unit
def test_home_mailbox_ending_in_slash_is_a_maildir(make_instance):
    _, rt = setup(make_instance, "", home_mailbox="Maildir/")
    t = go(rt, "daemon@localhost").target
    assert (t.kind, t.path) == ("maildir", os.path.join(pwd.getpwnam("daemon").pw_dir, "Maildir"))


@pytest.mark.unit
def test_list_expands_to_users_programs_files_and_remote(make_instance):
    _, rt = setup(make_instance, "staff: root, Daemon, \"|/usr/bin/logger -t x\", /var/log/x, "
                                  "bob@remote.test\n")
    r = go(rt, f"staff@{HOST}")
    assert kids(r) == [(f"root@{HOST}", "n"), (f"daemon@{HOST}", "n"),
                       ("|/usr/bin/logger -t x", "a"), ("/var/log/x", "a"),
                       ("bob@remote.test", "")]
    assert all(c.parent == f"staff@{HOST}" and c.state == "Q" for c in r.children)
    assert r.sender is None
    # The children route on: users to mailboxes, the program as default_privs.
    assert go(rt, r.children[0].address, "n").kind == "local"
    prog = rt.route(r.children[2])
    assert prog.target.kind == "command" and prog.target.user == "nobody"
    assert go(rt, "bob@remote.test").kind == "remote"


@pytest.mark.unit
def test_nested_aliases_and_duplicates_give_one_copy_per_target(make_instance):
    _, rt = setup(make_instance, "all: a, b, root\na: root, daemon\nb: daemon, a\n")
    assert kids(go(rt, "all@localhost")) == [(f"root@{HOST}", "n"), (f"daemon@{HOST}", "n")]


@pytest.mark.unit
def test_alias_loop_fails_5_4_6(make_instance):
    _, rt = setup(make_instance, "a: b\nb: c\nc: a\n")
    r = go(rt, "a@localhost")
    assert (r.kind, r.reply.code, r.reply.enhanced) == ("fail", 554, "5.4.6")
    assert "a -> b -> c -> a" in r.reply.text


@pytest.mark.unit
def test_loop_inside_a_list_is_dropped_and_the_rest_delivered(make_instance, caplog):
    _, rt = setup(make_instance, "a: b, root\nb: a, daemon\n")
    assert kids(go(rt, "a@localhost")) == [(f"daemon@{HOST}", "n"), (f"root@{HOST}", "n")]
    assert "a -> b -> a" in caplog.text


@pytest.mark.unit
def test_user_aliased_to_itself_is_the_user_not_a_loop(make_instance):
    _, rt = setup(make_instance, "daemon: daemon, root\nroot: \\root, daemon\n")
    assert kids(go(rt, "daemon@localhost")) == [(f"daemon@{HOST}", "n"), (f"root@{HOST}", "n")]
    assert kids(go(rt, "root@localhost")) == [(f"root@{HOST}", "n"), (f"daemon@{HOST}", "n")]


@pytest.mark.unit
def test_depth_is_bounded(make_instance):
    chain = "".join(f"l{i}: l{i + 1}\n" for i in range(40)) + "l40: root\n"
    _, rt = setup(make_instance, chain)
    r = go(rt, "l0@localhost")
    assert r.kind == "fail" and r.reply.enhanced == "5.4.6"


@pytest.mark.unit
def test_owner_list_becomes_the_envelope_sender(make_instance):
    _, rt = setup(make_instance, "list: root, daemon\nowner-list: root\nlist-request: root\n")
    assert go(rt, "list@localhost").sender == f"owner-list@{HOST}"
    assert go(rt, "list+tag@localhost").sender == f"owner-list@{HOST}"
    assert go(rt, "list-request@localhost").sender is None


@pytest.mark.unit
def test_recipient_delimiter_falls_back_to_user_and_alias(make_instance):
    _, rt = setup(make_instance, "team: root\n")
    r = go(rt, "root+tag@localhost")
    assert r.kind == "local" and r.target.user == "root"
    assert kids(go(rt, "team+x@localhost")) == [(f"root@{HOST}", "n")]
    assert rt.recipient_check("root+anything@localhost") is None
    _, rt2 = setup(make_instance, "", recipient_delimiter="")
    assert go(rt2, "root+tag@localhost").kind == "fail"


@pytest.mark.unit
def test_include_file_expands_one_address_per_line(make_instance, tmp_path):
    members = tmp_path / "members"
    members.write_text("# the members\nroot\n\ndaemon, bob@remote.test\n")
    _, rt = setup(make_instance, f"club: :include:{members}\n")
    assert kids(go(rt, "club@localhost")) == [(f"root@{HOST}", "n"), (f"daemon@{HOST}", "n"),
                                              ("bob@remote.test", "")]


@pytest.mark.unit
def test_include_loop_fails(make_instance, tmp_path):
    a = tmp_path / "a"
    a.write_text(f":include:{a}\n")
    _, rt = setup(make_instance, f"x: :include:{a}\n")
    assert go(rt, "x@localhost").reply.enhanced == "5.4.6"


@pytest.mark.unit
def test_programs_from_a_writable_include_file_are_not_trusted(make_instance, tmp_path):
    inc = tmp_path / "inc"
    inc.write_text("|/bin/true\nroot\n")
    os.chmod(inc, 0o666)
    _, rt = setup(make_instance, f"x: :include:{inc}\n")
    r = go(rt, "x@localhost")
    assert kids(r) == [("|/bin/true", ""), (f"root@{HOST}", "n")]
    assert rt.route(r.children[0]).reply.enhanced == "5.7.1"


@pytest.mark.unit
def test_allow_mail_to_commands_restricts_where_pipes_come_from(make_instance):
    _, rt = setup(make_instance, "p: \"|/bin/true\", /tmp/f\n",
                  allow_mail_to_commands="forward", allow_mail_to_files="include")
    r = go(rt, "p@localhost")
    assert kids(r) == [("|/bin/true", ""), ("/tmp/f", "")]
    assert all(rt.route(c).reply.code == 550 for c in r.children)


@pytest.mark.parametrize("addr", ["|/bin/sh -c 'touch /tmp/x'", "/tmp/pymta-owned",
                                  ":include:/etc/passwd", '"|/bin/true"@mx.example.test',
                                  '"/tmp/x"@localhost'])
@pytest.mark.unit
def test_pipes_and_files_typed_by_a_client_are_refused(make_instance, addr):
    _, rt = setup(make_instance, "")
    r = go(rt, addr)
    assert (r.kind, r.reply.code, r.reply.enhanced) == ("fail", 550, "5.7.1")
    assert rt.recipient_check('"|/bin/true"@localhost').enhanced == "5.7.1"


@pytest.mark.unit
def test_recipient_check_for_the_smtp_server(make_instance):
    _, rt = setup(make_instance, "sales: root\n")
    assert rt.recipient_check(f"root@{HOST}") is None
    assert rt.recipient_check("SALES@localhost") is None
    assert rt.recipient_check("postmaster@localhost") is None
    assert rt.recipient_check("anyone@elsewhere.test") is None   # not ours to judge
    bad = rt.recipient_check("nosuch@localhost")
    assert (bad.code, bad.enhanced) == (550, "5.1.1")


@pytest.mark.unit
def test_remote_goes_to_the_domain_or_the_relayhost(make_instance):
    _, rt = setup(make_instance, "")
    r = go(rt, "x@Remote.Test")
    assert (r.kind, r.domain, r.host, r.port, r.mx) == ("remote", "remote.test", "remote.test", 25, True)
    _, rt = setup(make_instance, "", relayhost="[smart.test]:587")
    r = go(rt, "x@remote.test")
    assert (r.domain, r.host, r.port, r.mx, r.address) == ("[smart.test]:587", "smart.test", 587,
                                                          False, "x@remote.test")


@pytest.mark.unit
def test_only_local_names_are_aliased(make_instance):
    _, rt = setup(make_instance, "x: root\n")
    assert go(rt, "x@other.test").kind == "remote"


def write_forward(path, text, mode=0o644, uid=None):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)


@pytest.mark.unit
@needs_root
def test_forward_file_redirects_and_backslash_keeps_a_copy(make_instance, tmp_path):
    fw = tmp_path / "fw"
    fw.mkdir()
    _, rt = setup(make_instance, "", forward_path=f"{fw}/$user.forward")
    write_forward(fw / "root.forward", "# mine\n\\root, bob@remote.test\n\"|/usr/bin/procmail\"\n")
    r = go(rt, "root@localhost")
    assert kids(r) == [(f"root@{HOST}", "n"), ("bob@remote.test", ""), ("|/usr/bin/procmail", "a")]
    assert r.children[2].uid == -1      # root's own programs run as default_privs


@pytest.mark.unit
@needs_root
def test_forward_runs_commands_as_its_user(make_instance, tmp_path):
    fw = tmp_path / "fw"
    fw.mkdir()
    _, rt = setup(make_instance, "", forward_path=f"{fw}/$user.forward")
    daemon = pwd.getpwnam("daemon")
    write_forward(fw / "daemon.forward", "|/bin/cat\n", uid=daemon.pw_uid)
    r = go(rt, "daemon@localhost")
    assert r.children[0].uid == daemon.pw_uid
    assert rt.route(r.children[0]).target.user == "daemon"


@pytest.mark.unit
@needs_root
def test_unsafe_forward_is_ignored(make_instance, tmp_path, caplog):
    fw = tmp_path / "fw"
    fw.mkdir()
    _, rt = setup(make_instance, "", forward_path=f"{fw}/$user.forward")
    write_forward(fw / "daemon.forward", "bob@remote.test\n", mode=0o666, uid=1)
    assert go(rt, "daemon@localhost").kind == "local"
    write_forward(fw / "daemon.forward", "bob@remote.test\n", mode=0o644,
                  uid=pwd.getpwnam("nobody").pw_uid)
    assert go(rt, "daemon@localhost").kind == "local"
    assert "ignored" in caplog.text


@pytest.mark.unit
@needs_root
def test_forward_pair_loop_fails(make_instance, tmp_path):
    fw = tmp_path / "fw"
    fw.mkdir()
    _, rt = setup(make_instance, "", forward_path=f"{fw}/$user.forward")
    write_forward(fw / "root.forward", "daemon\n", uid=0)
    write_forward(fw / "daemon.forward", "root\n", uid=pwd.getpwnam("daemon").pw_uid)
    r = go(rt, "root@localhost")
    assert (r.kind, r.reply.enhanced) == ("fail", "5.4.6")
    assert "root -> daemon -> root" in r.reply.text


def test_verify_prints_where_addresses_go(make_instance):
    inst, _ = setup(make_instance, "staff: root, \"|/bin/cat\", /tmp/f, bob@remote.test\n")
    res = inst.sendmail("-bv", "staff", "root@localhost")
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr
    assert f"root@{HOST}... deliverable: mailer local, user root" in out
    assert "|/bin/cat... deliverable: mailer prog" in out
    assert "/tmp/f... deliverable: mailer *file*" in out
    assert "bob@remote.test... deliverable: mailer esmtp, host remote.test" in out
    res = inst.sendmail("-bv", "nosuch", "root")
    assert res.returncode == 67
    assert "nosuch... User unknown\n" in res.stdout.decode()


@pytest.mark.unit
def test_final_users_stay_in_a_local_domain(make_instance):
    _, rt = setup(make_instance, "x: root\nowner-x: root\n", mydestination="example.test")
    r = go(rt, "x@example.test")
    assert kids(r) == [("root@example.test", "n")] and r.sender == "owner-x@example.test"
