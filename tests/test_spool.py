"""The queue: commit, ids, the qf format, torn files, locking, the maildrop."""

import concurrent.futures
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from conftest import BIN, TOP

from pymta import envelope as E
from pymta import queue_dir, queue_file, queue_id, queue_maildrop
from pymta.queue_dir import Spool
from pymta import config as _config
from pymta.status import SpoolCorrupt


def make_env(sender="a@example.com", *rcpts):
    env = E.Envelope(sender=sender)
    for r in rcpts or ("b@example.com",):
        env.add_recipient(r)
    return env


def commit(spool, data=b"Subject: x\n\nbody\n", env=None):
    with spool.new_message() as w:
        w.write(data)
        return w.commit(env or make_env())


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "q"))
    s.create()
    return s


@pytest.mark.unit
def test_commit_leaves_exactly_a_qf_and_a_df(spool):
    qid = commit(spool)
    assert queue_id.valid_id(qid)
    assert sorted(os.listdir(spool.dir)) == ["df" + qid, "qf" + qid]
    env = spool.read(qid)
    assert env.sender == "a@example.com" and env.size == len(b"Subject: x\n\nbody\n")
    assert stat.S_IMODE(os.stat(spool.path("qf", qid)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool.maildrop).st_mode) == 0o1733


@pytest.mark.unit
def test_leaving_the_writer_without_commit_removes_the_data(spool):
    with pytest.raises(RuntimeError):
        with spool.new_message() as w:
            w.write(b"partial")
            raise RuntimeError("client went away")
    assert os.listdir(spool.dir) == []


@pytest.mark.unit
def test_qf_round_trip(spool):
    env = make_env("s@example.com", "r1@example.com", "r 2@example.com")
    env.recipients[0].flags = "pSF"
    env.recipients[1].set_state(E.DEFERRED, "4.4.1", "Connection refused: 100% sure", "mx [192.0.2.1]")
    env.body_type, env.envid, env.ret, env.uid = "8BITMIME", "id%1", "HDRS", 1000
    env.protocol, env.helo, env.client_addr = "ESMTPS", "client.example", "192.0.2.9"
    env.status = "Deferred: line\nbreak"
    env.extra = ["Xfuture line"]
    qid = commit(spool, env=env)
    got = spool.read(qid)
    for attr in ("sender", "body_type", "envid", "ret", "uid", "protocol", "helo",
                 "client_addr", "status", "extra"):
        assert getattr(got, attr) == getattr(env, attr), attr
    assert got.recipients == env.recipients


@pytest.mark.unit
def test_ids_are_time_ordered_and_unique_across_threads(spool):
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        ids = list(ex.map(lambda _: commit(spool), range(200)))
    assert len(set(ids)) == 200
    assert spool.ids() == sorted(ids)


def _commit_many(path, n, out):
    s = Spool(path)
    out.put([commit(s) for _ in range(n)])


def test_ids_are_unique_across_processes(spool):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_commit_many, args=(spool.top, 25, out)) for _ in range(6)]
    for p in procs:
        p.start()
    ids = [i for _ in procs for i in out.get(timeout=60)]
    for p in procs:
        p.join(60)
    assert len(set(ids)) == 150
    assert len(os.listdir(spool.dir)) == 300


@pytest.mark.unit
def test_id_time_decodes_the_arrival_second():
    now = int(time.time())
    assert queue_id.id_time(queue_id.new_id(now)) == now


@pytest.mark.unit
def test_a_locked_message_cannot_be_locked_again(spool):
    qid = commit(spool)
    lock = spool.lock(qid)
    assert lock is not None and spool.is_locked(qid)
    assert spool.lock(qid) is None
    lock.release()
    assert not spool.is_locked(qid)
    with spool.lock(qid) as again:
        assert again is not None


@pytest.mark.unit
def test_lock_of_a_removed_message_is_none(spool):
    qid = commit(spool)
    spool.remove(qid)
    assert spool.lock(qid) is None
    assert os.listdir(spool.dir) == []


@pytest.mark.unit
def test_a_new_message_is_locked_until_handed_off_and_released(spool):
    with spool.new_message() as w:
        w.write(b"x\n")
        qid = w.commit(make_env())
        assert spool.is_locked(qid)
        lock = w.handoff()
    assert spool.is_locked(qid)
    lock.release()
    assert not spool.is_locked(qid)


@pytest.mark.unit
def test_rewrite_replaces_the_qf_whole(spool):
    qid = commit(spool)
    env = spool.read(qid)
    env.attempts = 3
    env.recipients[0].set_state(E.SENT, "2.0.0", "ok")
    spool.rewrite(env)
    assert spool.read(qid).attempts == 3
    assert sorted(os.listdir(spool.dir)) == ["df" + qid, "qf" + qid]


@pytest.mark.unit
def test_hold_and_release(spool):
    qid = commit(spool)
    env = spool.read(qid)
    env.next_try = 2 ** 31
    spool.hold(env, "spam?")
    assert spool.ids() == [] and spool.ids("hf") == [qid]
    held = spool.read(qid)
    assert held.held and held.status == "spam?"
    spool.release(env)
    assert spool.ids() == [qid]
    back = spool.read(qid)
    assert not back.held and back.status == "" and back.next_try == 0


def _plant(spool, prefix, qid, data, age=0):
    path = spool.path(prefix, qid)
    with open(path, "wb") as f:
        f.write(data)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


@pytest.mark.unit
@pytest.mark.unit
def test_a_checked_commit_records_its_df_and_a_restart_has_it_checked_once(spool):
    boot = queue_dir.boot_id()
    if not boot:
        pytest.skip("no kernel boot id here")
    data = b"Subject: x\n\n" + b"body line\n" * 40000       # spilled, more than one block
    with spool.new_message(check=True) as w:
        for i in range(0, len(data), 1000):
            w.write(data[i:i + 1000])
        qid = w.commit(make_env())
    text = open(spool.path("qf", qid)).read()
    assert f"\nD{len(data)} {zlib.crc32(data):08x} {boot}\n" in text
    env = spool.read(qid)
    assert (env.df_length, env.df_crc, env.df_boot) == (len(data), zlib.crc32(data), boot)
    assert spool.verify_data(env) is False          # this boot's commit: nothing to check
    spool.rewrite(env)
    assert open(spool.path("qf", qid)).read() == text     # a rewrite keeps the D line

    def restarted(damage=None):
        with open(spool.path("qf", qid), "w") as f:
            f.write(text.replace(f" {boot}\n", " 00000000-0000-4000-8000-000000000000\n"))
        if damage:
            with open(spool.path("df", qid), "wb") as f:
                f.write(damage)
        return spool.read(qid)

    env = restarted()
    assert spool.verify_data(env) is True and env.df_boot == boot
    spool.rewrite(env)
    assert open(spool.path("qf", qid)).read() == text     # checked once: this boot's id again
    for damage in (data[:-1], data[:-1] + b"X", data + b"\n", b""):
        env = restarted(damage)
        with pytest.raises(SpoolCorrupt, match="torn by a system crash"):
            spool.verify_data(env)
    # An older control file (no D line) is delivered as before.
    env = restarted(b"anything")
    env.df_length = -1
    spool.rewrite(env)
    assert "\nD" not in open(spool.path("qf", qid)).read()
    assert spool.verify_data(spool.read(qid)) is False


@pytest.mark.unit
def test_a_damaged_d_line_is_a_damaged_control_file(spool):
    qid = commit(spool)
    text = open(spool.path("qf", qid)).read()
    for bad in ("D12", "D12 xyz boot", "D-1 00000000 boot", "D12 0000000g boot", "D12 00000000"):
        _plant(spool, "qf", qid, text.replace("\nS", f"\n{bad}\nS").encode())
        with pytest.raises(SpoolCorrupt):
            spool.read(qid)


def test_torn_files_are_never_deliverable(spool):
    good = commit(spool)
    text = open(spool.path("qf", good), "rb").read()
    torn_tf, torn_qf, garbage, no_df, orphan = (queue_id.new_id() for _ in range(5))
    _plant(spool, "tf", torn_tf, text)
    _plant(spool, "df", torn_tf, b"x")
    _plant(spool, "qf", torn_qf, text[:-2])          # no final '.'
    _plant(spool, "df", torn_qf, b"x")
    _plant(spool, "qf", garbage, b"\x00\xffnot a queue file\n.\n")
    _plant(spool, "df", garbage, b"x")
    _plant(spool, "qf", no_df, text)
    _plant(spool, "df", orphan, b"x")
    assert set(spool.ids()) == {good, torn_qf, garbage, no_df}
    for qid in (torn_qf, garbage, no_df):
        with pytest.raises(SpoolCorrupt):
            spool.read(qid)
        assert spool.quarantine(qid)
    assert spool.ids() == [good]
    for qid in (torn_tf, orphan):
        with pytest.raises(FileNotFoundError):
            spool.read(qid)
    assert set(spool.ids("Qf")) == {torn_qf, garbage, no_df}


@pytest.mark.unit
def test_sweep_removes_old_orphans_only(spool):
    good = commit(spool)
    quarantined = queue_id.new_id()
    _plant(spool, "qf", quarantined, b"garbage\n")
    _plant(spool, "df", quarantined, b"x", age=10 * 86400)
    spool.quarantine(quarantined)
    old_tf, old_df, young_df, locked_df = (queue_id.new_id() for _ in range(4))
    _plant(spool, "tf", old_tf, b"V1\n", age=2 * 86400)
    _plant(spool, "df", old_df, b"x", age=2 * 86400)
    _plant(spool, "df", young_df, b"x", age=60)
    _plant(spool, "df", locked_df, b"x", age=2 * 86400)
    fd = os.open(spool.path("df", locked_df), os.O_RDONLY)
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        old = time.time() - 2 * 86400
        os.utime(spool.path("df", good), (old, old))
        logged = []
        removed = spool.sweep(86400, log=logged.append)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted(["tf" + old_tf, "df" + old_df])
    assert len(logged) == 2
    left = set(os.listdir(spool.dir))
    assert {"qf" + good, "df" + good, "Qf" + quarantined, "df" + quarantined,
            "df" + young_df, "df" + locked_df} == left


@pytest.mark.unit
def test_drop_and_pickup_in_process(spool):
    env = make_env("user@example.com", "a@example.com", "|/bin/evil", "b@example.com")
    env.df_length, env.df_crc, env.df_boot = 3, 1, "another-boot"   # a user's claim: dropped
    env.recipients[0].flags = "pSFa"
    env.recipients[0].state = E.SENT
    env.client_addr = "192.0.2.1"
    name = queue_maildrop.drop(spool, env, iter([b"Subject: d\n\n", "grüße\n".encode()]))
    path = os.path.join(spool.maildrop, name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    logged = []
    ids = queue_maildrop.pickup(spool, _config.load(os.devnull, ["myhostname=mx.example.test"]),
                                 log=logged.append)
    assert len(ids) == 1 and os.listdir(spool.maildrop) == []
    got = spool.read(ids[0])
    assert got.uid == os.getuid() and got.protocol == "local" and got.client_addr == ""
    assert [(r.address, r.flags, r.state) for r in got.recipients] == [
        ("a@example.com", "SFp", "Q"), ("b@example.com", "p", "Q")]
    assert got.body_type == "8BITMIME"
    assert got.df_length == -1 and b"\nD" not in open(spool.path("qf", ids[0]), "rb").read()
    with spool.open_data(ids[0]) as f:
        data = f.read()
    assert data.startswith(b"Received: (from ")
    assert f"by mx.example.test (pymta) id {ids[0]};".encode() in data
    assert any("refused" in line for line in logged)


@pytest.mark.unit
def test_pickup_ignores_an_incomplete_drop_and_removes_a_torn_one(spool):
    path = os.path.join(spool.maildrop, "incomplete")
    with open(path, "wb") as f:
        f.write(queue_file.format_control(make_env()).encode() + b"body\n")
    os.chmod(path, 0o600)
    assert queue_maildrop.pickup(spool) == [] and os.path.exists(path)
    torn = os.path.join(spool.maildrop, "torn")
    with open(torn, "wb") as f:
        f.write(b"V1\nSa@b\n")
    os.chmod(torn, 0o700)
    assert queue_maildrop.pickup(spool) == [] and not os.path.exists(torn)
    assert spool.ids() == []


# -- the maildrop as a real unprivileged user --------------------------------

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def _as_user(uid, gid):
    def become():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return become


@pytest.fixture
def public_instance():
    """A pymta tree and instance that the user nobody can reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run sendmail as another user")
    if not SYSTEM_PYTHON:
        pytest.skip("no python3 in /usr/bin that other users may run")
    top = tempfile.mkdtemp(prefix="pymta-drop-")
    try:
        os.chmod(top, 0o755)
        shutil.copytree(os.path.join(TOP, "pymta"), os.path.join(top, "pymta"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(BIN, os.path.join(top, "bin"), symlinks=True)
        conf = os.path.join(top, "pymta.conf")
        with open(conf, "w") as f:
            f.write(f"queue_directory = {top}/spool\nmyhostname = mx.example.test\n"
                    f"maillog_file = {top}/maillog\nqueue_minfree = 0\n"
                    "delivery_mode = queue\n")
        open(os.path.join(top, "maillog"), "w").close()
        os.chmod(os.path.join(top, "maillog"), 0o666)
        for dirpath, dirnames, filenames in os.walk(top):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        spool = Spool(os.path.join(top, "spool"))
        spool.create()
        yield top, conf, spool
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unprivileged_user_submits_through_the_maildrop(public_instance):
    top, conf, spool = public_instance
    r = subprocess.run([SYSTEM_PYTHON, os.path.join(top, "bin", "sendmail"), "-C", conf, "-v",
                        "-f", "forged@example.com", "root"],
                       input=b"Subject: from nobody\n\nhello\n", capture_output=True,
                       preexec_fn=_as_user(65534, 65534), cwd="/", timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert b"maildrop/" in r.stderr
    assert os.listdir(spool.dir) == []
    names = os.listdir(spool.maildrop)
    assert len(names) == 1
    st = os.stat(os.path.join(spool.maildrop, names[0]))
    assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o700

    # Another user can neither list the maildrop nor read or remove the file.
    probe = ("import os, sys\n"
             "d, n = sys.argv[1], sys.argv[2]\n"
             "for what, f in (('list', lambda: os.listdir(d)),\n"
             "                ('read', lambda: open(os.path.join(d, n), 'rb')),\n"
             "                ('unlink', lambda: os.unlink(os.path.join(d, n)))):\n"
             "    try:\n        f()\n        print(what, 'ALLOWED')\n"
             "    except PermissionError:\n        print(what, 'denied')\n")
    r2 = subprocess.run([SYSTEM_PYTHON, "-c", probe, spool.maildrop, names[0]],
                        capture_output=True, text=True, preexec_fn=_as_user(1, 1), timeout=60)
    assert r2.stdout.split("\n")[:3] == ["list denied", "read denied", "unlink denied"], r2

    cfg = _config.load(conf)
    spool = Spool.from_config(cfg)    # as the daemon has it
    ids = queue_maildrop.pickup(spool, cfg)
    assert len(ids) == 1 and os.listdir(spool.maildrop) == []
    env = spool.read(ids[0])
    assert env.uid == 65534
    assert env.sender == "forged@example.com"
    with spool.open_data(ids[0]) as f:
        data = f.read()
    assert data.startswith(b"Received: (from nobody@localhost uid 65534)")
    assert b"X-Authentication-Warning: mx.example.test: nobody set sender to " \
           b"forged@example.com using -f" in data
    assert data.endswith(b"\nhello\n")


@pytest.mark.unit
def test_writev_all_writes_every_chunk_in_order_through_partial_writes():
    # A pipe takes at most its buffer per call: the writes come back partial.
    import random
    import threading
    from pymta.queue_commit import _writev_all
    rnd = random.Random(7)
    chunks = [bytes([i % 251]) * rnd.randint(0, 3000) for i in range(3000)]
    r, w = os.pipe()
    got = bytearray()

    def reader():
        while True:
            b = os.read(r, 65536)
            if not b:
                return
            got.extend(b)
    t = threading.Thread(target=reader)
    t.start()
    _writev_all(w, list(chunks))
    os.close(w)
    t.join(10)
    os.close(r)
    assert bytes(got) == b"".join(chunks)


@pytest.mark.unit
@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=20) | st.lists(st.sampled_from(list("%0aF9g z\udcc3\udca9é\n%41")), max_size=30).map("".join))
def test_qf_percent_encoding_agrees_with_its_grammar(value):
    # Written without re (sendmail imports spool): the grammar, with it.
    def enc(v, pattern):
        return re.sub(pattern, lambda m: "".join("%%%02X" % b for b in m.group().encode("utf-8", "surrogateescape")), v)
    try:
        want = enc(value, r"[^\x21-\x24\x26-\x7e ]+"), enc(value, r"[^\x21-\x24\x26-\x7e]+")
    except UnicodeEncodeError:      # a lone surrogate not from surrogateescape: never in a str we read
        return
    assert (queue_file._enc(value), queue_file._enc(value, space=False)) == want
    assert queue_file._dec(value) == re.sub(r"(?:%[0-9A-Fa-f]{2})+", lambda m: bytes.fromhex(
        m.group().replace("%", "")).decode("utf-8", "surrogateescape"), value)
    assert queue_file._dec(queue_file._enc(value, space=False)) == queue_file._dec(queue_file._enc(value))


@pytest.mark.unit
@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789AZaxyz\n%", max_size=21))
def test_valid_id_agrees_with_its_grammar(qid):
    assert queue_id.valid_id(qid) == bool(re.fullmatch(r"[0-9A-Za-x]{9}[0-9]{6,10}", qid))
