"""Crash safety: torn spool files, injectors, queue runners and the daemon
killed with SIGKILL at random moments, SIGTERM and SIGHUP under load.

The promise checked everywhere: a message that got 250 (or exit 0) is
delivered at least once; nothing half-written is ever delivered. Duplicates
after a crash are allowed, counted and printed.
"""

import collections
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pymta import envelope as E
from queuefixture import put
from reliability_util import (TOP, Daemon, Raw, SlowSink, daemon_instance, group_alive, message,
                              msgids_in, queue_files)
from smtpsink import SMTPSink

RNG = random.Random(int(os.environ.get("PYMTA_TEST_SEED", "0")) or None)


def mbox_msgids(inst, user="root"):
    try:
        with open(os.path.join(inst.root, "mail", user), "rb") as f:
            return msgids_in(f.read())
    except FileNotFoundError:
        return []


def sink_msgids(sink):
    return [m for t in sink.delivered for m in msgids_in(t.data.replace(b"\r\n", b"\n"))]


def no_traceback(proc):
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return err


# -- torn files planted by hand ------------------------------------------------

def _qf(qid, rcpt="root@example.test", end=".\n"):
    return f"V1\nT{int(time.time())}\nK0\nN0\nY0\nP100\nSa@b.example\nRp Q {rcpt}\n" + end


def test_torn_spool_files_are_never_delivered_and_never_crash_a_pass(inst, tmp_path):
    inst.write_config(delivery_mode="queue", dns_timeout="1s")
    sp = inst.spool
    planted = {}

    def df(qid, tag):
        with open(sp.path("df", qid), "wb") as f:
            f.write(b"Message-ID: <" + tag.encode() + b">\nSubject: torn\n\nbody\n")
        planted[tag] = qid

    df("kASHWR000009001", "tf-only@torn")            # df + tf, no qf: a crash at step 3
    with open(sp.path("tf", "kASHWR000009001"), "w") as f:
        f.write(_qf("kASHWR000009001"))
    df("kASHWR000009002", "no-dot@torn")             # qf without its final '.'
    with open(sp.path("qf", "kASHWR000009002"), "w") as f:
        f.write(_qf("kASHWR000009002", end=""))
    df("kASHWR000009003", "orphan@torn")              # df alone: a crash at step 1 or 2
    df("kASHWR000009004", "garbage@torn")             # qf of random bytes
    with open(sp.path("qf", "kASHWR000009004"), "wb") as f:
        f.write(bytes(RNG.randrange(256) for _ in range(300)) + b"\n.\n")
    with open(sp.path("qf", "kASHWR000009005"), "w") as f:   # qf without any df
        f.write(_qf("kASHWR000009005"))
    df("kASHWR000009006", "half-line@torn")          # torn in the middle of a line
    with open(sp.path("qf", "kASHWR000009006"), "w") as f:
        f.write(_qf("kASHWR000009006")[:-9])
    # The maildrop: a symlink to a complete submission elsewhere, a FIFO, and
    # a submission never marked complete.
    from pymta import queue_dir, queue_maildrop
    other = queue_dir.Spool(str(tmp_path / "elsewhere"))
    other.create()
    env = E.Envelope(sender="a@b.example", recipients=[E.Recipient("root@example.test")])
    name = queue_maildrop.drop(other, env, [b"Message-ID: <symlink@torn>\n\nx\n"])
    os.symlink(os.path.join(other.maildrop, name), os.path.join(sp.maildrop, "evil"))
    os.mkfifo(os.path.join(sp.maildrop, "fifo"))
    env = E.Envelope(sender="a@b.example", recipients=[E.Recipient("root@example.test")])
    name = queue_maildrop.drop(sp, env, [b"Message-ID: <incomplete@torn>\n\nx\n"])
    os.chmod(os.path.join(sp.maildrop, name), 0o600)
    # And one good message, to show the pass does deliver.
    put(sp, "kASHWR000009010", "a@b.example", ["root@example.test"],
        body=b"Message-ID: <good@torn>\nSubject: ok\n\nfine\n", created=int(time.time()))

    for _ in range(2):
        q = inst.sendmail("-q", timeout=60)
        no_traceback(q)
        assert q.returncode == 0
        m = inst.run("mailq")
        no_traceback(m)
        assert m.returncode == 0
    assert mbox_msgids(inst) == ["good@torn"]
    names = set(os.listdir(sp.dir))
    assert "QfkASHWR000009002" in names and "QfkASHWR000009004" in names
    assert "QfkASHWR000009006" in names
    # A qf without its df cannot come from a crash: it is set aside, not left "locked".
    assert "QfkASHWR000009005" in names and "qfkASHWR000009005" not in names
    assert not names & {"qfkASHWR000009001", "qfkASHWR000009003"}
    # A sweep with no age limit removes the orphans, never a quarantined df.
    inst.write_config(queue_sweep_age="0s")
    q = inst.sendmail("-q")
    no_traceback(q)
    names = set(os.listdir(sp.dir))
    assert not names & {"tfkASHWR000009001", "dfkASHWR000009001", "dfkASHWR000009003"}
    assert "dfkASHWR000009002" in names
    assert mbox_msgids(inst) == ["good@torn"]
    m = inst.run("mailq")
    no_traceback(m)
    assert m.returncode == 0


# -- sendmail injectors killed mid-write ------------------------------------------

def _inject_slowly(inst, msgid, lines, results, kill_at):
    p = subprocess.Popen([sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C",
                          inst.conf_path, "-odq", "-i", "root@example.test"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    killed = False
    try:
        p.stdin.write(f"Message-ID: <{msgid}>\nSubject: slow\n\n".encode())
        for i in range(lines):
            p.stdin.write(f"line {i} of {msgid} {'x' * 60}\n".encode())
            if i % 20 == 0:
                p.stdin.flush()
                time.sleep(0.01)
            if kill_at is not None and time.monotonic() - start > kill_at:
                break
        else:
            p.stdin.write(f"END {msgid}\n".encode())
        if kill_at is not None:
            time.sleep(max(0.0, kill_at - (time.monotonic() - start)))
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
        p.stdin.close()
    except BrokenPipeError:
        pass
    code = p.wait(60)
    results[msgid] = "killed" if killed and code != 0 else code


def test_injectors_killed_mid_write_never_leave_a_half_committed_message(inst):
    inst.write_config(delivery_mode="queue")
    results = {}
    threads = []
    for n in range(12):
        msgid = f"inj{n}.{uuid.uuid4().hex[:8]}@crash.test"
        kill_at = None if n % 3 == 0 else RNG.uniform(0.05, 1.2)
        t = threading.Thread(target=_inject_slowly, args=(inst, msgid, 400, results, kill_at))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(90)
    ok = [m for m, code in results.items() if code == 0]
    assert len(ok) >= 4, results
    # Every qf has its whole df: the message ends in its END line.
    for name in queue_files(inst, ("qf",)):
        with open(inst.spool.path("df", name[2:]), "rb") as f:
            data = f.read()
        assert data.rstrip().split(b"\n")[-1].startswith(b"END "), name
    # (A tf beside its df is a kill inside the commit: an orphan pair, swept.)
    inst.write_config(queue_sweep_age="0s")
    q = inst.sendmail("-q")
    no_traceback(q)
    with open(os.path.join(inst.root, "mail", "root"), "rb") as f:
        mbox = f.read()
    got = msgids_in(mbox)
    assert set(ok) <= set(got), (results, got)
    for m in got:           # whatever got in is whole, killed or not
        assert f"END {m}".encode() in mbox
    assert queue_files(inst) == []      # orphans of the killed ones swept
    print(f"\ninjectors: {len(ok)} finished, "
          f"{sum(1 for c in results.values() if c == 'killed')} killed, "
          f"{len(got) - len(ok)} killed after their commit (delivered whole)")


# -- a queue runner killed mid-delivery -----------------------------------------------

def _queue_messages(inst, n, rcpt="user@remote.test"):
    ids = []
    for i in range(n):
        msgid = f"run{i}.{uuid.uuid4().hex[:8]}@crash.test"
        with inst.spool.new_message() as w:
            w.write(f"Message-ID: <{msgid}>\nSubject: q\n\nbody {i}\n".encode())
            w.commit(E.Envelope(sender="a@b.example", recipients=[E.Recipient(rcpt)]))
        ids.append(msgid)
    return ids


def test_queue_runner_killed_mid_delivery_delivers_every_message_at_least_once(inst):
    with SlowSink(delay=0.05) as sink:
        inst.write_config(relayhost=f"[127.0.0.1]:{sink.port}", delivery_process_limit=2,
                          minimal_backoff_time="0s", maximal_backoff_time="0s")
        ids = _queue_messages(inst, 30)
        kills = 0
        for _ in range(3):
            p = subprocess.Popen([sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C",
                                  inst.conf_path, "-q"], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            start = len(sink.delivered)
            # Kill it once it is delivering, at a random point after that.
            while len(sink.delivered) == start and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(RNG.uniform(0.0, 0.3))
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                kills += 1
            p.wait(10)
        assert kills >= 1
        for _ in range(3):
            q = inst.sendmail("-q", timeout=60)
            no_traceback(q)
            if not queue_files(inst, ("qf",)):
                break
        got = collections.Counter(sink_msgids(sink))
    assert queue_files(inst, ("qf", "hf", "Qf")) == []
    # A kill between the unlink of a qf and of its df leaves an orphan df:
    # never delivered, removed by a sweep.
    inst.write_config(queue_sweep_age="0s")
    no_traceback(inst.sendmail("-q"))
    assert queue_files(inst) == []
    missing = [m for m in ids if m not in got]
    assert not missing
    dups = sum(c - 1 for c in got.values())
    print(f"\nqueue runner killed {kills} times: {len(ids)} messages, {dups} delivered twice")


# -- the daemon: flood and kill -----------------------------------------------------

class Flood:
    """Clients sending messages with unique Message-IDs; records 250s."""

    def __init__(self, port, n, clients=8, rcpt="user@remote.test"):
        self.port, self.rcpt = port, rcpt
        self.todo = [f"flood{i}.{uuid.uuid4().hex[:10]}@crash.test" for i in range(n)]
        self.accepted = set()
        self.lock = threading.Lock()
        self.errors = collections.Counter()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k, clients))
                        for k in range(clients)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def wait_for(self, count, timeout=60):
        """Wait until ``count`` messages got 250."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    def join(self, timeout=120):
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads)

    def _client(self, k, clients):
        mine = self.todo[k::clients]
        conn = None
        deadline = time.monotonic() + 90
        while mine and time.monotonic() < deadline and not self.stopping.is_set():
            msgid = mine[0]
            try:
                if conn is None:
                    conn = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                    conn.ehlo("flood.test")
                conn.sendmail("a@b.example", [self.rcpt], message(msgid))
            except (OSError, smtplib.SMTPException) as e:
                with self.lock:
                    self.errors[type(e).__name__] += 1
                try:
                    if conn is not None:
                        conn.close()
                except OSError:
                    pass
                conn = None
                time.sleep(0.05)
                continue
            with self.lock:
                self.accepted.add(msgid)
            mine.pop(0)
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                pass


def _drain(inst, rounds=3):
    for _ in range(rounds):
        q = inst.sendmail("-q", timeout=90)
        no_traceback(q)
        if not queue_files(inst, ("qf",)):
            return


MODELS = ["loop", "threads", "fork"]


@pytest.mark.parametrize("model", MODELS)
def test_daemon_killed_repeatedly_under_load_loses_no_accepted_message(make_instance, model):
    with SMTPSink() as sink:
        inst = daemon_instance(make_instance, relayhost=f"[127.0.0.1]:{sink.port}",
                               delivery_process_limit=2, smtpd_process_model=model)
        d = Daemon(inst).start()
        try:
            flood = Flood(d.port, 300).start()
            kills = 0
            for k in range(1, 4):
                flood.wait_for(k * 60 + RNG.randrange(40))
                d.kill9()
                kills += 1
                time.sleep(RNG.uniform(0.0, 0.3))
                d.start()
            flood.join()
        finally:
            d.stop()
        _drain(inst)
        got = collections.Counter(sink_msgids(sink))
    assert len(flood.accepted) == 300
    assert all(t.data.endswith(b"\r\n\r\nhello\r\n") for t in sink.delivered)  # all whole
    assert flood.errors, "the kills should have been felt by the clients"
    lost = flood.accepted - set(got)
    assert not lost, f"{len(lost)} accepted messages lost"
    dups = sum(c - 1 for c in got.values())
    print(f"\nflood: 300 accepted, daemon killed {kills} times, {dups} duplicates, "
          f"client errors {dict(flood.errors)}")


@pytest.mark.parametrize("model", MODELS)
def test_sigterm_under_load_gives_421_to_every_open_session_and_loses_nothing(make_instance,
                                                                            model):
    with SMTPSink() as sink:
        inst = daemon_instance(make_instance, relayhost=f"[127.0.0.1]:{sink.port}",
                               smtpd_process_model=model, smtpd_timeout="60s")
        # smtpd_timeout: the session in mid-DATA waits for the flood's first
        # 100 messages; 4 s ran out on a loaded machine. Idle sessions get
        # their 421 from the SIGTERM, not from a timeout.
        d = Daemon(inst).start()
        idle = []
        try:
            for _ in range(5):
                r = Raw(d.port)
                assert r.reply()[0] == 220
                assert r.cmd(b"EHLO idle.test\r\n")[0] == 250
                idle.append(r)
            mid = Raw(d.port)           # a session in the middle of its DATA
            idle.append(mid)
            assert mid.reply()[0] == 220
            for cmd in (b"EHLO mid.test\r\n", b"MAIL FROM:<a@b.example>\r\n",
                        b"RCPT TO:<user@remote.test>\r\n"):
                assert mid.cmd(cmd)[0] == 250
            assert mid.cmd(b"DATA\r\n")[0] == 354
            mid.send(b"Message-ID: <middata@crash.test>\r\n\r\nfirst half\r\n")
            flood = Flood(d.port, 3000, clients=4).start()
            flood.wait_for(100)
            d.signal(signal.SIGTERM)
            for r in idle[:-1]:
                code, text = r.reply()
                assert code == 421 and b"4.3.2" in text, text
            code, text = mid.cmd(b"second half\r\n.\r\n")
            assert code == 250, text          # a DATA in progress is finished and committed
            code, text = mid.reply()
            assert code == 421 and b"4.3.2" in text, text
            flood.accepted.add("middata@crash.test")
            assert d.proc.wait(30) == 0
            flood.stopping.set()
            flood.join()
        finally:
            for r in idle:
                r.close()
            d.stop()
        accepted = set(flood.accepted)
        assert 100 <= len(accepted) < 3000
        _drain(inst)
        got = set(sink_msgids(sink))
    assert not accepted - got
    assert "daemon stopped" in inst.maillog()


def test_concurrent_queue_runners_deliver_each_message_exactly_once(inst):
    with SlowSink(delay=0.02) as sink:
        inst.write_config(relayhost=f"[127.0.0.1]:{sink.port}", delivery_process_limit=2)
        ids = _queue_messages(inst, 40)
        runs = [subprocess.Popen([sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C",
                                  inst.conf_path, "-q"], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for _ in range(3)]
        try:
            errs = [p.communicate(timeout=60)[1] for p in runs]
        finally:
            for p in runs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        assert all(p.returncode == 0 for p in runs), errs
        got = collections.Counter(sink_msgids(sink))
    assert got == collections.Counter(ids)
    assert queue_files(inst) == []


def test_sighup_under_load_reloads_and_loses_nothing(make_instance):
    with SMTPSink() as sink:
        inst = daemon_instance(make_instance, relayhost=f"[127.0.0.1]:{sink.port}")
        d = Daemon(inst).start()
        try:
            flood = Flood(d.port, 120, clients=4).start()
            for _ in range(3):
                time.sleep(0.3)
                d.signal(signal.SIGHUP)
            flood.join()
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0
        assert len(flood.accepted) == 120
        assert not flood.errors, flood.errors
        _drain(inst)
        got = set(sink_msgids(sink))
    assert flood.accepted <= got
    assert "listener: configuration reloaded" in inst.maillog()


def test_master_killed_alone_the_listener_exits_and_a_restart_serves(make_instance):
    with SMTPSink() as sink:
        inst = daemon_instance(make_instance, relayhost=f"[127.0.0.1]:{sink.port}")
        d = Daemon(inst).start()
        pgid = d.pid
        try:
            with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
                c.sendmail("a@b.example", ["user@remote.test"], message("before@master"))
            os.kill(d.pid, signal.SIGKILL)
            d.proc.wait(10)
            d.proc.stderr.close()
            deadline = time.monotonic() + 5
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            orphans = group_alive(pgid)
            d.proc = None
            assert not orphans, f"listener {orphans} outlived its master"
            d.start()
            with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
                c.sendmail("a@b.example", ["user@remote.test"], message("after@master"))
            assert d.proc.poll() is None
        finally:
            for pid in group_alive(pgid):
                os.kill(pid, signal.SIGKILL)
            d.stop()
        _drain(inst)
        got = set(sink_msgids(sink))
    assert {"before@master", "after@master"} <= got
