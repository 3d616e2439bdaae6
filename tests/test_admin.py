"""pymta hold|release|delete|flush|bounce|requeue|show on a real spool, run as
the real bin/pymta program, including messages locked by another process."""

import os
import subprocess
import sys

import pytest

import queuefixture as Q
from conftest import BIN

ID1, ID2, ID3 = "kASHWR000003001", "kASHWR000003002", "kASHWR000003003"


def pymta(inst, *args, input=b""):
    cmd = [sys.executable, os.path.join(BIN, "pymta"), "-C", inst.conf_path, *args]
    env = dict(os.environ, TZ="UTC")
    env.pop("PYMTA_CONFIG", None)
    return subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=60)


@pytest.fixture
def queue(inst):
    Q.put(inst.spool, ID1, "alice@example.test", ["bob@remote.test"])
    Q.put(inst.spool, ID2, "spammer@bad.test", ["carol@example.test", "dave@example.test"],
          created=Q.T0 + 60, attempts=4, next_try=Q.FAR_FUTURE,
          status="Deferred: Connection refused")
    Q.put(inst.spool, ID3, "spammer@bad.test", ["erin@example.test"], created=Q.T0 + 120)
    return inst


class Holder:
    """Another process holding a message's lock, as a delivery does."""

    def __init__(self, path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX);"
             " print('locked', flush=True); sys.stdin.read()", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"locked\n"

    def release(self):
        self.proc.stdin.close()
        self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_hold_then_release(queue):
    inst = queue
    r = pymta(inst, "hold", "-r", "looks like spam", ID3)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ID3}: held\n".encode()
    assert os.path.exists(inst.spool.path("hf", ID3))
    assert not os.path.exists(inst.spool.path("qf", ID3))
    env = inst.spool.read(ID3)
    assert env.held and env.status == "looks like spam"
    listing = inst.run("mailq", env={"TZ": "UTC"}).stdout.decode()
    assert f"{ID3}X" in listing and "QUARANTINE: looks like spam" in listing
    assert f"{ID3}: held by root: looks like spam" in inst.maillog() or os.geteuid() != 0

    r = pymta(inst, "release", ID3)
    assert r.returncode == 0 and r.stdout == f"{ID3}: released\n".encode()
    env = inst.spool.read(ID3)
    assert not env.held and env.status == "" and env.next_try == 0
    assert f"{ID3}: released by" in inst.maillog()


def test_hold_without_reason_records_who_held_it(queue):
    r = pymta(queue, "hold", ID1)
    assert r.returncode == 0
    assert queue.spool.read(ID1).status.startswith("held by ")


def test_delete_removes_qf_and_df_and_logs(queue):
    inst = queue
    r = pymta(inst, "delete", ID1)
    assert r.returncode == 0, r.stderr
    assert not any(os.path.exists(inst.spool.path(p, ID1)) for p in ("qf", "hf", "df", "tf"))
    assert f"{ID1}: removed by " in inst.maillog()
    assert os.path.exists(inst.spool.path("qf", ID2))


def test_delete_by_sender_asks_first(queue):
    inst = queue
    r = pymta(inst, "delete", "--sender", "spammer@", input=b"n\n")
    assert r.returncode == 1
    assert b"delete these 2 message(s)?" in r.stderr
    assert f"{ID2} <spammer@bad.test> -> <carol@example.test>, <dave@example.test>".encode() \
        in r.stdout
    assert os.path.exists(inst.spool.path("qf", ID2))
    r = pymta(inst, "delete", "--sender", "spammer@", input=b"y\n")
    assert r.returncode == 0
    assert not os.path.exists(inst.spool.path("qf", ID2))
    assert not os.path.exists(inst.spool.path("qf", ID3))
    assert os.path.exists(inst.spool.path("qf", ID1))


def test_delete_by_recipient_forced(queue):
    r = pymta(queue, "delete", "-f", "--recipient", "ERIN@")
    assert r.returncode == 0
    assert r.stdout == f"{ID3}: removed\n".encode()


def test_a_message_being_delivered_is_refused_then_waited_for(queue):
    inst = queue
    with Holder(inst.spool.path("df", ID1)) as holder:
        for cmd in ("hold", "release", "delete", "requeue", "bounce", "flush"):
            r = pymta(inst, cmd, ID1)
            assert r.returncode == 75, (cmd, r.stderr)
            assert b"being delivered, try again" in r.stderr
        assert os.path.exists(inst.spool.path("qf", ID1))
        waiting = subprocess.Popen(
            [sys.executable, os.path.join(BIN, "pymta"), "-C", inst.conf_path,
             "delete", "--wait", ID1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(0.7)
            assert os.path.exists(inst.spool.path("qf", ID1))
            holder.release()
            out, err = waiting.communicate(timeout=20)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    assert waiting.returncode == 0, err
    assert not os.path.exists(inst.spool.path("qf", ID1))


def test_show_works_on_a_locked_message(queue):
    inst = queue
    with Holder(inst.spool.path("df", ID2)):
        r = pymta(inst, "show", ID2)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert f"Queue-ID: {ID2}" in text
    assert "State: queued, being delivered (locked)" in text
    assert "Sender: <spammer@bad.test>" in text
    assert "Attempts: 4" in text
    assert "Status: Deferred: Connection refused" in text
    assert "  <carol@example.test> queued" in text
    assert text.rstrip().endswith("Subject: test")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "kASHWR00000300", "kASHWR0000030x1",
                                 "kASHWR0000030/1", ""])
def test_malformed_ids_are_refused_with_65(queue, bad):
    for cmd in ("hold", "delete", "show", "requeue"):
        r = pymta(queue, cmd, bad)
        assert r.returncode == 65, (cmd, bad, r.stderr)
        assert b"not a queue id" in r.stderr


def test_unknown_ids_are_refused_with_67(queue):
    for cmd in ("hold", "release", "delete", "show", "requeue", "bounce", "flush"):
        r = pymta(queue, cmd, "kASHWR000009999")
        assert r.returncode == 67, (cmd, r.stderr)
        assert b"no such message" in r.stderr


def test_several_ids_each_tried_first_failure_returned(queue):
    inst = queue
    r = pymta(inst, "delete", ID1, "kASHWR000009999", "bad/id", ID3)
    assert r.returncode == 67
    assert not os.path.exists(inst.spool.path("qf", ID1))
    assert not os.path.exists(inst.spool.path("qf", ID3))


def test_requeue_resets_attempts_and_next_try(queue):
    r = pymta(queue, "requeue", ID2)
    assert r.returncode == 0
    env = queue.spool.read(ID2)
    assert env.attempts == 0 and env.next_try == 0
    assert [x.address for x in env.pending] == ["carol@example.test", "dave@example.test"]
    assert f"{ID2}: requeued by " in queue.maillog()


def test_flush_of_a_held_message_is_refused(queue):
    pymta(queue, "hold", ID1)
    r = pymta(queue, "flush", ID1)
    assert r.returncode == 69
    assert b"held; release it first" in r.stderr


def test_delete_and_show_a_corrupt_message(inst):
    with open(inst.spool.path("df", ID1), "wb") as f:
        f.write(b"Subject: x\n\n")
    with open(inst.spool.path("Qf", ID1), "w") as f:
        f.write("V1\ngarbage\n")
    r = pymta(inst, "show", ID1)
    assert r.returncode == 0 and b"corrupt control file" in r.stdout and b"garbage" in r.stdout
    r = pymta(inst, "hold", ID1)
    assert r.returncode == 69
    r = pymta(inst, "delete", ID1)
    assert r.returncode == 0, r.stderr
    assert os.listdir(inst.spool.dir) == []


def test_nothing_outside_the_queue_is_touched(queue, tmp_path):
    outside = tmp_path / f"qf{ID1}"
    outside.write_text("keep me")
    before = sorted(os.listdir(queue.spool.dir))
    r = pymta(queue, "delete", str(tmp_path / ID1))
    assert r.returncode == 65
    assert outside.read_text() == "keep me"
    assert sorted(os.listdir(queue.spool.dir)) == before


def test_usage_errors_exit_64(inst):
    assert pymta(inst).returncode == 64
    assert pymta(inst, "frobnicate").returncode == 64
    assert pymta(inst, "delete").returncode == 64
    assert pymta(inst, "delete", "--sender", "x", ID1).returncode == 64


def test_flush_delivers_now_ignoring_the_retry_time(make_instance):
    inst = make_instance()
    mail = os.path.join(inst.root, "mail")
    Q.put(inst.spool, ID1, "alice@example.test", ["root@mx.example.test"],
          next_try=Q.FAR_FUTURE, attempts=2)
    r = pymta(inst, "flush", ID1)
    assert r.returncode == 0, r.stderr
    assert f"{ID1}: flushed by " in inst.maillog()
    # delivered (gone from the queue) or, if local delivery is refused here,
    # at least tried now: the attempt count went up.
    if os.path.exists(inst.spool.path("qf", ID1)):
        assert inst.spool.read(ID1).attempts == 3, inst.maillog()
    else:
        assert os.listdir(mail), inst.maillog()


def test_bounce_returns_the_message_to_its_sender_now(inst):
    # The sender is local, so the report is delivered here without DNS.
    Q.put(inst.spool, ID3, "root@mx.example.test", ["erin@remote.test"],
          next_try=Q.FAR_FUTURE, attempts=5)
    r = pymta(inst, "bounce", ID3)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ID3}: bounced to <root@mx.example.test>\n".encode()
    assert not os.path.exists(inst.spool.path("qf", ID3))
    log = inst.maillog()
    assert f"{ID3}: bounced by " in log
    assert ": DSN: <erin@remote.test> 5.0.0" in log


def test_flush_without_ids_tries_every_queued_message(inst):
    for qid in (ID1, ID2):
        Q.put(inst.spool, qid, "root@mx.example.test", ["root@mx.example.test"],
              next_try=Q.FAR_FUTURE, attempts=1)
    Q.put(inst.spool, ID3, "root@mx.example.test", ["root@mx.example.test"], held=True,
          status="keep")
    r = pymta(inst, "flush")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"2 message(s) tried: 2 done, 0 still queued\n"
    assert inst.maillog().count("queue flushed by ") == 1
    for qid in (ID1, ID2):
        assert f"{qid}: done" in inst.maillog()
    assert inst.spool.read(ID3).held
    assert f"{ID3}: done" not in inst.maillog()


@pytest.mark.parametrize("field", ["T99999999999999999", "K-5", "Y1e9", "N99999999999999",
                                   "C4294967296", "P99999999999999999999999"])
def test_out_of_range_qf_field_is_listed_as_damaged_without_a_traceback(queue, field):
    # One damaged qf among good ones: mailq lists it as damaged and the
    # others as usual; `pymta show` says what is wrong; no traceback.
    path = queue.spool.path("qf", ID2)
    text = open(path).read()
    key = field[0]
    lines = [ln for ln in text.split("\n") if not ln.startswith(key)]
    lines.insert(1, field)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    r = subprocess.run([sys.executable, os.path.join(BIN, "mailq"), "-C", queue.conf_path],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr + r.stdout
    assert f"{ID2}  (unreadable control file:".encode() in r.stdout, r.stdout
    assert ID1.encode() in r.stdout and ID3.encode() in r.stdout
    r = pymta(queue, "show", ID2)
    assert b"Traceback" not in r.stderr + r.stdout
    assert r.returncode != 0 and b"unreadable control file" in r.stderr, r.stderr
