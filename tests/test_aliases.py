"""The aliases(5) parser (golden files), the newaliases database and its
counts and exit codes, and lookups that prefer a fresh source to a stale db."""

import json
import logging
import os
import threading
import time

import pytest

from pymta import aliases, route
from pymta import envelope as E

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "aliases")


def golden(name):
    return os.path.join(DATA, name)


@pytest.mark.unit
def test_good_file_parses_to_the_golden_table():
    af = aliases.read(golden("good.aliases"))
    assert af.errors == []
    with open(golden("good.expected")) as f:
        expected = json.load(f)
    assert {k: a.targets for k, a in af.aliases.items()} == expected
    assert list(af.aliases) == list(expected)          # file order kept
    assert af.aliases["staff"].lineno == 7


@pytest.mark.unit
def test_bad_file_reports_each_bad_line_with_its_number():
    af = aliases.read(golden("bad.aliases"))
    got = [str(e).replace(DATA + "/", "") for e in af.errors]
    with open(golden("bad.expected")) as f:
        assert got == f.read().splitlines()
    # The good entries still load; the duplicate's last value wins, as in sendmail.
    assert {k: a.targets for k, a in af.aliases.items()} == {"postmaster": ["alice"], "ok": ["root"]}


@pytest.mark.unit
def test_targets_are_canonical():
    assert aliases.parse_targets(' "|cmd a" , /x/y ,:INCLUDE: /l , \\Root, u@D.test, <v@e.test>') == (
        ["|cmd a", "/x/y", ":include:/l", "\\Root", "u@D.test", "v@e.test"], [])


def write(inst, text):
    path = os.path.join(inst.root, "aliases")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_newaliases_builds_the_database_and_prints_counts(inst):
    path = write(inst, "# c\npostmaster: root\nstaff: root,\n  daemon\n")
    res = inst.run("newaliases")
    assert res.returncode == 0, res.stderr
    # rhs bytes: "root" (4), "root, daemon" (12); total = names + rhs = 10+4+5+12.
    assert res.stdout.decode() == f"{path}: 2 aliases, longest 12 bytes, 31 bytes total\n"
    assert aliases.read_db(path + aliases.DB_SUFFIX) == {"postmaster": ["root"], "staff": ["root", "daemon"]}
    assert [n for n in os.listdir(inst.root) if aliases.DB_SUFFIX + ".tmp" in n] == []
    res = inst.sendmail("-bi")
    assert res.returncode == 0 and b"2 aliases" in res.stdout


def test_newaliases_refuses_a_bad_file_and_keeps_the_old_database(inst):
    path = write(inst, "postmaster: root\n")
    assert inst.run("newaliases").returncode == 0
    old = open(path + aliases.DB_SUFFIX).read()
    write(inst, "postmaster: root\nbroken line\nx: \"|unterminated\n")
    res = inst.run("newaliases")
    assert res.returncode == 65
    err = res.stderr.decode()
    assert f"{path}:2: missing colon" in err
    assert f"{path}:3: x: unbalanced quote" in err
    assert open(path + aliases.DB_SUFFIX).read() == old


def test_newaliases_on_a_missing_file_fails(inst):
    os.unlink(os.path.join(inst.root, "aliases"))
    res = inst.run("newaliases")
    assert res.returncode != 0 and b"no such file" in res.stderr


def test_lookups_use_the_database(inst):
    path = write(inst, "team: root\n")
    assert inst.run("newaliases").returncode == 0
    # Same mtime-or-newer db: the db is used, even if the source changed content
    # without changing its mtime (proves the db is what is read).
    st = os.stat(path)
    write(inst, "other: root\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    maps = aliases.AliasMaps.from_config(inst.cfg)
    assert maps.lookup("TEAM") == ["root"]
    assert maps.lookup("other") is None


def test_source_newer_than_database_is_used_and_logged(inst, caplog):
    path = write(inst, "team: root\n")
    assert inst.run("newaliases").returncode == 0
    write(inst, "team: daemon\n")
    future = time.time() + 10
    os.utime(path, (future, future))
    with caplog.at_level(logging.WARNING, "pymta"):
        rt = route.Router(inst.cfg)
        r = rt.route(E.Recipient("team@localhost"))
    assert [c.address for c in r.children] == ["daemon@mx.example.test"]
    assert "out of date" in caplog.text


@pytest.mark.unit
def test_map_type_prefixes_are_accepted():
    assert aliases.map_paths(["hash:/etc/aliases", "/etc/more", "dbm:/x"]) == [
        "/etc/aliases", "/etc/more", "/x"]


def test_the_database_has_a_name_of_its_own_and_an_old_one_is_removed(inst):
    path = os.path.join(inst.root, "aliases")
    old = path + ".db"
    with open(old, "w") as f:          # what an older pymta wrote
        json.dump({"format": aliases.DB_FORMAT, "source": path, "aliases": {}}, f)
    r = inst.run("newaliases")
    assert r.returncode == 0, r.stderr
    assert aliases.DB_SUFFIX == ".pymta.json" and os.path.exists(path + ".pymta.json")
    assert not os.path.exists(old) and b"removed" in r.stdout
    with open(old, "wb") as f:          # another MTA's Berkeley DB file
        f.write(b"\x00\x06\x15\x61 not json")
    assert inst.run("newaliases").returncode == 0
    assert open(old, "rb").read().startswith(b"\x00\x06")


def test_a_scope_checks_the_files_once_and_the_next_lookups_see_newaliases(inst):
    """Within a scope (the routing of one message) the files are checked at
    the first lookup only; outside it, and in other threads, every lookup
    checks them: a newaliases is seen by the next message."""
    path = write(inst, "team: root\n")
    assert inst.run("newaliases").returncode == 0
    maps = aliases.AliasMaps.from_config(inst.cfg)

    def rebuild(text):
        write(inst, text)
        assert inst.run("newaliases").returncode == 0
        later = time.time() + 5      # a new mtime even within the clock's granularity
        os.utime(path + aliases.DB_SUFFIX, (later, later))

    with maps.scope():
        assert maps.lookup("team") == ["root"]
        rebuild("team: daemon\n")
        assert maps.lookup("team") == ["root"]      # the state of the first lookup
        other = []
        t = threading.Thread(target=lambda: other.append(maps.lookup("team")))
        t.start()
        t.join()
        assert other == [["daemon"]]
    assert maps.lookup("team") == ["daemon"]
    with maps.scope():
        assert maps.lookup("team") == ["daemon"]
        rebuild("team: root, daemon\n")
    assert maps.lookup("team") == ["root", "daemon"]
