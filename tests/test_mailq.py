"""mailq / sendmail -bp / -bP: sendmail's listing, byte for byte, on fixed queues."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import queuefixture as Q
from conftest import BIN, Instance, TOP

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
UTC = {"TZ": "UTC"}


def mailq(inst, *args):
    r = inst.run("mailq", *args, env=UTC)
    assert r.stderr == b"", r.stderr
    return r.returncode, r.stdout.decode("utf-8")


def expected(name, inst):
    with open(os.path.join(DATA, name)) as f:
        return f.read().replace("@QDIR@", inst.params["queue_directory"])


def check_mailq_count(text):
    """What Nagios' check_mailq (sendmail mode) takes for the queue length."""
    count = 0
    for line in text.splitlines():
        if re.search(r"<.*@.*\.(\w+\.\w+)>", line) or re.search(r"<.*@(\w+\.\w+)>", line):
            continue
        if "mqueue" in line:
            m = re.search(r" \((\d+) request", line)
            if m:
                count = int(m.group(1))
        else:
            m = re.match(r"^\s+Total\sRequests:\s(\d+)$", line, re.I)
            if m:
                count = int(m.group(1))
    return count


def test_listing_is_sendmails_format_for_every_kind_of_entry(inst):
    Q.standard_queue(inst.spool)
    rc, out = mailq(inst)
    assert rc == 0
    assert out == expected("mailq_standard.txt", inst)
    assert check_mailq_count(out) == 7


def test_sendmail_bp_prints_the_same_as_mailq(inst):
    Q.standard_queue(inst.spool)
    r = inst.sendmail("-bp", env=UTC)
    assert r.returncode == 0
    assert r.stdout.decode() == expected("mailq_standard.txt", inst)


def test_empty_queue(inst):
    rc, out = mailq(inst)
    assert rc == 0
    assert out == f"{inst.params['queue_directory']} is empty\n\t\tTotal requests: 0\n"
    assert check_mailq_count(out) == 0


def test_one_request_is_singular(inst):
    Q.put(inst.spool, "kASHWR000002001", "a@example.test", ["b@example.test"])
    rc, out = mailq(inst)
    assert out.startswith(f"\t\t{inst.params['queue_directory']} (1 request)\n")


def test_message_locked_by_another_process_is_starred(inst):
    Q.put(inst.spool, "kASHWR000002001", "a@example.test", ["b@example.test"])
    Q.put(inst.spool, "kASHWR000002002", "a@example.test", ["c@example.test"])
    lock = inst.spool.lock("kASHWR000002002")
    assert lock is not None
    try:
        rc, out = mailq(inst)
    finally:
        lock.release()
    rows = [line for line in out.splitlines() if line.startswith("kASHWR")]
    assert rows[0].startswith("kASHWR000002001 ")
    assert rows[1].startswith("kASHWR000002002*")
    # Listing took no lock: the message can still be locked right after.
    lock = inst.spool.lock("kASHWR000002002")
    assert lock is not None
    lock.release()


def test_flock_held_by_a_separate_process_is_seen(inst):
    Q.put(inst.spool, "kASHWR000002001", "a@example.test", ["b@example.test"])
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); time.sleep(30)",
         inst.spool.path("df", "kASHWR000002001")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        rc, out = mailq(inst)
        assert "kASHWR000002001*" in out
    finally:
        holder.kill()
        holder.wait()
    rc, out = mailq(inst)
    assert "kASHWR000002001 " in out


def test_count_only(inst):
    Q.standard_queue(inst.spool)
    qdir = inst.params["queue_directory"]
    for args in (("-c",), ()):
        r = inst.run("mailq", *args, env=UTC) if args else inst.sendmail("-bP", env=UTC)
        assert r.returncode == 0
        assert r.stdout.decode() == f"{qdir}: entries=7\n\t\tTotal requests: 7\n"
    r = inst.sendmail("-bP", env=UTC)
    assert check_mailq_count(r.stdout.decode()) == 7


def test_count_of_an_empty_queue(inst):
    rc, out = mailq(inst, "-c")
    assert out == f"{inst.params['queue_directory']} is empty\n\t\tTotal requests: 0\n"


@pytest.mark.parametrize("flag, ids", [
    ("-qRremote.test", ["1001"]),
    ("-qRERIN@", ["1002"]),
    ("-qSalice", ["1001", "1005"]),
    ("-qS!alice", ["1002", "1003", "1004"]),
    ("-qI1003", ["1003"]),
    ("-qQ", ["1004"]),
    ("-qQspam", ["1004"]),
    ("-qQnothing-like-this", []),
])
def test_filters(inst, flag, ids):
    Q.standard_queue(inst.spool)
    rc, out = mailq(inst, flag)
    assert rc == 0
    shown = re.findall(r"^kASHWR00000(\d{4})", out, re.M)
    # the torn and the lost entry have no sender or recipient to match
    assert shown == ids
    assert f"Total requests: {len(ids)}" in out


def test_filters_of_one_kind_are_alternatives_and_kinds_combine(inst):
    Q.standard_queue(inst.spool)
    rc, out = mailq(inst, "-qRbob", "-qRerin")
    assert re.findall(r"^kASHWR00000(\d{4})", out, re.M) == ["1001", "1002"]
    rc, out = mailq(inst, "-qRbob", "-qRerin", "-qSbounces")
    assert re.findall(r"^kASHWR00000(\d{4})", out, re.M) == ["1002"]


def test_json_listing(inst):
    Q.standard_queue(inst.spool)
    rc, out = mailq(inst, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["queue_directory"] == inst.params["queue_directory"]
    assert doc["requests"] == 7
    by_id = {m["id"]: m for m in doc["messages"]}
    first = by_id["kASHWR000001001"]
    assert first["sender"] == "alice@example.test"
    assert first["arrival"] == Q.T0
    assert first["size"] == 21
    assert first["locked"] is False and first["held"] is False
    assert [(r["address"], r["state"]) for r in first["recipients"]] == [
        ("bob@remote.test", "queued"), ("carol@remote.test", "sent"),
        ("dave@remote.test", "deferred")]
    deferred = by_id["kASHWR000001002"]
    assert deferred["attempts"] == 3
    assert deferred["status"].startswith("Deferred: Connection timed out")
    assert deferred["recipients"][0]["dsn"] == "4.4.1"
    held = by_id["kASHWR000001004"]
    assert held["held"] is True and held["hold_reason"] == "suspected spam, reported by frank"
    assert by_id["kASHWR000001005"]["next_try"] == Q.FAR_FUTURE
    assert by_id["kASHWR000001003"]["sender"] == ""
    assert "torn" in by_id["kASHWR000001006"]["error"]
    assert by_id["kASHWR000001007"]["lost"] is True


def test_json_count_only(inst):
    Q.standard_queue(inst.spool)
    rc, out = mailq(inst, "--json", "-c")
    assert json.loads(out) == {"queue_directory": inst.params["queue_directory"], "requests": 7}


def test_verbose_listing_shows_priority(inst):
    Q.put(inst.spool, "kASHWR000002001", "a@example.test", ["b@example.test"], priority=4242)
    rc, out = mailq(inst, "-v")
    lines = out.splitlines()
    assert lines[1] == ("-----Q-ID----- --Size-- -Priority- ---Q-Time--- "
                        "--------Sender/Recipient--------")
    assert lines[2] == "kASHWR000002001       21       4242 Nov 14 22:13 <a@example.test>"
    assert lines[3] == "\t\t\t\t\t\t<b@example.test>"


def test_long_and_hostile_addresses_are_cut_and_escaped(inst):
    Q.put(inst.spool, "kASHWR000002001", "x" * 60 + "@example.test",
          ["evil\x1b[2J\\@example.test"])
    rc, out = mailq(inst)
    row = out.splitlines()[2]
    assert row.endswith(" <" + "x" * 38)          # 39 columns of sender
    assert "\t\t\t\t\t <evil\\033[2J\\\\@example.test>" in out
    assert "\x1b" not in out


def test_a_vanished_queue_directory_is_an_error(inst):
    shutil.rmtree(inst.params["queue_directory"])
    r = inst.run("mailq")
    assert r.returncode == 72
    assert b"does not exist" in r.stderr


SYSTEM_PY = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
@pytest.mark.skipif(not os.access(SYSTEM_PY, os.X_OK), reason="no system python3")
def test_a_user_who_may_not_read_the_queue_gets_exit_77():
    top = tempfile.mkdtemp(prefix="pymta-mailq-")
    try:
        os.chmod(top, 0o755)
        inst = Instance(top)
        os.chmod(inst.conf_path, 0o644)
        Q.put(inst.spool, "kASHWR000002001", "a@example.test", ["b@example.test"])
        probe = subprocess.run([SYSTEM_PY, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "import pymta.mailq", TOP], user="nobody", capture_output=True)
        if probe.returncode != 0:
            pytest.skip("the source tree is not readable by nobody")
        r = subprocess.run([SYSTEM_PY, os.path.join(TOP, "bin", "mailq"), "-C", inst.conf_path],
                           user="nobody", capture_output=True, timeout=30)
        assert r.returncode == 77, r.stderr
        assert b"Permission denied" in r.stderr
        assert r.stdout == b""
    finally:
        shutil.rmtree(top)


def _fill(inst, n):
    from pymta import envelope as E
    from pymta.queue_dir import Spool
    sp = Spool(inst.params["queue_directory"], fsync=False)
    for i in range(n):
        with sp.new_message() as w:
            w.write(b"Subject: q\n\nhi\n")
            env = E.Envelope(sender="alice@sender.test", next_try=int(time.time()) + 86400)
            env.add_recipient(f"user{i}@remote.test")
            env.status = "Deferred: 451 4.4.1 connect to [192.0.2.1]:25: Connection timed out"
            w.commit(env)


def _mailq_kb(inst):
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, os.path.join(BIN, "mailq"),
                        "-C", inst.conf_path], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.decode().split()[-1]), r.stdout


@pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="needs /usr/bin/time")
def test_mailq_memory_stays_flat_as_the_queue_grows(make_instance):
    small, big = make_instance(), make_instance()
    _fill(small, 200)
    _fill(big, 6000)
    kb_small, _ = _mailq_kb(small)
    kb_big, out = _mailq_kb(big)
    assert out.count(b"<user") == 6000 and b"(6000 requests)" in out
    # Each listed entry no longer stays in memory: a few hundred bytes of
    # directory listing per message at most.
    assert kb_big - kb_small < 4000, (kb_small, kb_big)


@pytest.mark.unit
def test_a_queue_larger_than_a_chunk_is_listed_whole_and_oldest_first(inst, monkeypatch):
    # mailq holds CHUNK ids at a time (flat memory) and reads the directory
    # again for each further CHUNK: the listing is the same as at once.
    from pymta import envelope as E
    from pymta import mailq as M
    from pymta.queue_dir import Spool
    spool = Spool(inst.params["queue_directory"], fsync=False)
    ids = []
    for i in range(53):
        with spool.new_message() as w:
            w.write(b"Subject: %d\n\nhi\n" % i)
            env = E.Envelope(sender="a@b.example")
            env.add_recipient(f"u{i}@remote.test")
            w.commit(env)
            ids.append(w.id)
    held = spool.read(ids[10])
    spool.hold(held, "test")
    os.rename(spool.path("qf", ids[20]), spool.path("Qf", ids[20]))
    monkeypatch.setattr(M, "CHUNK", 7)
    n, entries = M.iter_scan(spool)
    listed = [e.id for e in entries]
    assert n == 53 and listed == sorted(ids)
    assert M.count(spool) == 53
    monkeypatch.setattr(M, "CHUNK", 53)          # a chunk of exactly the queue's size
    assert [e.id for e in M.iter_scan(spool)[1]] == sorted(ids)
