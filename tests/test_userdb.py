"""pymta.userdb: passwd and group answers kept while the files are unchanged,
with real users (useradd, usermod, userdel) and the real files."""

import grp
import os
import pwd
import subprocess
import uuid

import pytest

from pymta import envelope as E
from pymta import route, userdb


def _run(*argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_passwd_answers_are_kept_and_follow_every_change_of_the_file(make_user, inst):
    alice = make_user()
    name = alice.pw_name
    first = userdb.getpwnam(name)
    assert first == pwd.getpwnam(name)
    # Kept: the same answer again, not a new look-up (pwd makes a new one each time).
    assert userdb.getpwnam(name) is first
    assert userdb.getpwuid(alice.pw_uid) == first
    assert userdb.getpwuid(alice.pw_uid) is userdb.getpwuid(alice.pw_uid)

    # usermod rewrites /etc/passwd: the next look-up sees the new entry,
    # and so does routing (the mailbox of a user is in the new home).
    router = route.Router(inst.cfg.with_overrides(home_mailbox="Maildir/"))
    old = router.route(E.Recipient(f"{name}@example.test")).target
    assert old.path == os.path.join(alice.pw_dir, "Maildir")
    new_home = alice.pw_dir + "-moved"
    _run("usermod", "-d", new_home, "-m", "-c", "renamed", name)
    assert userdb.getpwnam(name).pw_dir == new_home
    assert userdb.getpwnam(name).pw_gecos == "renamed"
    assert userdb.getpwuid(alice.pw_uid).pw_dir == new_home
    assert router.route(E.Recipient(f"{name}@example.test")).target.path == \
        os.path.join(new_home, "Maildir")

    # A user removed is gone at once, by name and by uid.
    _run("userdel", "-r", name)
    with pytest.raises(KeyError):
        userdb.getpwnam(name)
    with pytest.raises(KeyError):
        userdb.getpwuid(alice.pw_uid)
    assert router.user(name) is None


def test_group_lists_follow_a_change_of_the_group_file(make_user):
    alice = make_user()
    group = f"ptg{uuid.uuid4().hex[:8]}"
    _run("groupadd", group)
    try:
        gid = grp.getgrnam(group).gr_gid
        before = userdb.getgrouplist(alice.pw_name, alice.pw_gid)
        assert before == os.getgrouplist(alice.pw_name, alice.pw_gid)
        assert gid not in before
        _run("usermod", "-a", "-G", group, alice.pw_name)
        after = userdb.getgrouplist(alice.pw_name, alice.pw_gid)
        assert gid in after
        assert sorted(after) == sorted(os.getgrouplist(alice.pw_name, alice.pw_gid))
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def test_an_unknown_user_is_not_kept_and_answers_expire(make_user, monkeypatch):
    with pytest.raises(KeyError):
        userdb.getpwnam("pt-no-such-user")
    # A miss is not kept: a user made since is found (useradd changed the file
    # anyway); a hit is dropped after MAX_AGE whatever the files say, for
    # the NSS sources (LDAP) whose changes touch neither file.
    alice = make_user()
    got = userdb.getpwnam(alice.pw_name)
    assert userdb.getpwnam(alice.pw_name) is got
    monkeypatch.setattr(userdb, "MAX_AGE", 0.0)
    userdb.clear()
    got = userdb.getpwnam(alice.pw_name)
    assert userdb.getpwnam(alice.pw_name) is not got
