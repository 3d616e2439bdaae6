"""The event loop's one-round commit: the df, the control file and the
queue directory fsync'd at once, the control file recording the df's
length, CRC-32 and the boot id (its D line), and a delivery attempt after a
restart of the system checking the df once, with real syncer processes,
a real daemon and real queue runs (bin/sendmail -q)."""

import os
import select
import smtplib
import time
import zlib

import pytest

from pymta import envelope as E
from pymta.queue_commit import Committer
from pymta.queue_dir import boot_id
from helpers import daemon, wait_for
from queuefixture import put

BOOT = boot_id()
OTHER_BOOT = "00000000-0000-4000-8000-000000000000"
pytestmark = pytest.mark.skipif(not BOOT, reason="no kernel boot id (not Linux)")


def _msg(tag):
    return b"Message-ID: <%s@check.test>\nSubject: %s\n\n" % (tag, tag) + b"body of %s\n" % tag * 3


def _d_line(spool, qid):
    with open(spool.path("qf", qid)) as f:
        lines = [line for line in f.read().split("\n") if line.startswith("D")]
    assert len(lines) == 1, lines
    length, crc, boot = lines[0][1:].split(" ")
    return int(length), int(crc, 16), boot


def _restart(spool, qid):
    """The control file as a restart of the system leaves it: the boot id
    it records is no longer the running kernel's."""
    path = spool.path("qf", qid)
    with open(path) as f:
        text = f.read()
    assert f" {BOOT}\n" in text
    with open(path, "w") as f:
        f.write(text.replace(f" {BOOT}\n", f" {OTHER_BOOT}\n"))


def _loop_commit(spool, committer, tag, rcpts):
    w = spool.new_message(check=True)
    w.write(_msg(tag))
    env = E.Envelope(sender="alice@sender.test", created=int(time.time()),
                     recipients=[E.Recipient(r) for r in rcpts])
    results = []
    committer.commit(w, env, results.append)
    deadline = time.time() + 10
    while not results and time.time() < deadline:
        for sock in select.select(list(committer.socks), [], [], 0.2)[0]:
            committer.ready(sock)
    w.close()
    qid, = results
    assert isinstance(qid, str), qid
    return qid


def _mbox_tags(inst):
    box = inst.mailbox()
    return sorted(line.split(b"<")[1].split(b"@")[0].decode()
                  for line in box.split(b"\n") if line.startswith(b"Message-ID: <"))


def test_after_a_restart_a_torn_df_is_quarantined_and_a_whole_one_delivered_once(inst):
    inst.write_config(delivery_mode="queue", dns_timeout="1s")
    sp = inst.spool
    c = Committer(2)
    try:
        torn = _loop_commit(sp, c, b"torn", ["root@example.test"])
        corrupt = _loop_commit(sp, c, b"corrupt", ["root@example.test"])
        whole = _loop_commit(sp, c, b"whole", ["root@example.test"])
        # and one that stays queued (its remote recipient is deferred)
        stays = _loop_commit(sp, c, b"stays", ["root@example.test", "bob@remote.test"])
    finally:
        c.close()
    for qid in (torn, corrupt, whole, stays):
        with open(sp.path("df", qid), "rb") as f:
            data = f.read()
        assert _d_line(sp, qid) == (len(data), zlib.crc32(data), BOOT)
        _restart(sp, qid)
    with open(sp.path("df", torn), "r+b") as f:       # a crash during the fsyncs
        f.truncate(10)
    with open(sp.path("df", corrupt), "r+b") as f:    # same length, other bytes
        f.seek(5)
        f.write(b"\0\0\0\0")
    # An older control file (no D line), as pymta wrote before it had one.
    put(sp, "kASHWR000009020", "alice@sender.test", ["root@example.test"],
        body=_msg(b"old"), created=int(time.time()))

    q = inst.sendmail("-q", timeout=60)
    assert q.returncode == 0, q.stderr
    assert _mbox_tags(inst) == ["old", "stays", "whole"]
    names = set(os.listdir(sp.dir))
    for qid in (torn, corrupt):
        assert "Qf" + qid in names and "qf" + qid not in names and "df" + qid in names
    log = inst.maillog()
    assert f"{torn}: data file torn by a system crash during its commit (length 10, " in log
    assert f"{corrupt}: data file torn by a system crash" in log
    assert f"never acknowledged; quarantined as Qf{corrupt}, not delivered" in log
    # The deferred message was checked once: its qf records this boot's id.
    assert sp.ids() == [stays]
    with open(sp.path("df", stays), "rb") as f:
        data = f.read()
    assert _d_line(sp, stays) == (len(data), zlib.crc32(data), BOOT)
    assert [r.state for r in sp.read(stays).recipients] == ["S", "D"]

    q = inst.sendmail("-q", timeout=60)       # the next pass: nothing delivered twice
    assert q.returncode == 0, q.stderr
    assert _mbox_tags(inst) == ["old", "stays", "whole"]
    assert "Qf" + stays not in set(os.listdir(sp.dir))


def test_a_message_accepted_by_smtp_records_its_df_length_crc_and_the_boot_id(inst):
    with daemon(inst, dns_timeout="1s", smtpd_process_model="loop",
                mynetworks="127.0.0.0/8") as (_, port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("alice@sender.test")
            s.rcpt("bob@remote.test")        # deferred: the message stays queued
            code, reply = s.data(_msg(b"smtp").decode())   # str: CRLF line ends
        assert code == 250
        qid = reply.decode().rsplit(" ", 1)[1]
        assert wait_for(lambda: "stat=Deferred" in inst.maillog())
    with open(inst.spool.path("df", qid), "rb") as f:
        data = f.read()
    assert b"body of smtp" in data
    assert _d_line(inst.spool, qid) == (len(data), zlib.crc32(data), BOOT)
