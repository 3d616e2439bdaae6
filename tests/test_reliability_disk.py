"""Full disks and failing commits, on small tmpfs file systems mounted by the
test (root only).

What a user sees: a submission that cannot be stored gets a 4xx reply or
exit 75 and leaves nothing in the queue; space coming back makes the next
one go through; a mailbox on a full file system is never left with half a
message. The commit-order tests make the control file step (tf, rename)
fail in the middle of a real transaction, with no hooks into pymta: by
using up the file system's inodes, or by making queue/ immutable, after the
data file exists. The client must then see 451/452 or exit 75, never 250
or 0: the acknowledgement comes only after the commit.
"""

import mailbox
import os

import pytest
import smtplib
import subprocess
import sys
import time

from reliability_util import (TOP, Daemon, Raw, daemon_instance, fill, message, queue_files,
                              root_only, tmpfs, use_inodes)

pytestmark = root_only

BIG = b"x" * 76 + b"\r\n"


def _wait(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _sendmail_popen(inst, *args):
    return subprocess.Popen([sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C",
                             inst.conf_path, "-odq", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_sendmail_on_a_full_queue_disk_exits_75_and_leaves_nothing(inst):
    inst.write_config(message_size_limit="0", delivery_mode="queue")
    with tmpfs(inst.params["queue_directory"], size="2m"):
        inst.spool.create()
        big = b"Subject: big\n\n" + b"y" * 76 * 40000 + b"\n"     # 3 MB
        r = inst.sendmail("root@example.test", input=big)
        assert r.returncode == 75, r.stderr
        assert b"Insufficient system storage" in r.stderr or b"No space" in r.stderr, r.stderr
        assert queue_files(inst) == []
        r = inst.sendmail("root@example.test", input=b"Subject: small\n\nok\n")
        assert r.returncode == 0, r.stderr
        assert [n[:2] for n in queue_files(inst)] == ["df", "qf"]


def test_local_delivery_into_a_full_mailbox_file_system_defers_and_truncates_back(inst):
    mail = os.path.join(inst.root, "mail")
    with tmpfs(mail, size="1m"):
        inst.write_config(delivery_mode="queue", minimal_backoff_time="0s",
                          maximal_backoff_time="0s")
        r = inst.sendmail("-odi", "root@example.test",
                          input=b"Message-ID: <first@disk>\nSubject: first\n\nfirst\n")
        assert r.returncode == 0, r.stderr
        mbox = os.path.join(mail, "root")
        before = os.path.getsize(mbox)
        filler = fill(mail, leave=64 * 1024)
        big = b"Message-ID: <big@disk>\nSubject: big\n\n" + b"z" * 79 * 4000 + b"\n"   # 316 kB
        r = inst.sendmail("root@example.test", input=big)
        assert r.returncode == 0, r.stderr
        qid = queue_files(inst, ("qf",))[0][2:]
        q = inst.sendmail("-q")
        assert q.returncode == 0 and b"Traceback" not in q.stderr, q.stderr
        assert os.path.getsize(mbox) == before
        msgs = list(mailbox.mbox(mbox))
        assert [m["Message-ID"] for m in msgs] == ["<first@disk>"]
        assert queue_files(inst, ("qf",)) == ["qf" + qid]
        env = inst.spool.read(qid)
        assert env.recipients[0].state == "D" and env.recipients[0].dsn.startswith("4.")
        m = inst.run("mailq")
        assert m.returncode == 0 and qid.encode() in m.stdout, m.stdout
        os.unlink(filler)
        q = inst.sendmail("-q")
        assert q.returncode == 0
        msgs = list(mailbox.mbox(mbox))
        assert [m["Message-ID"] for m in msgs] == ["<first@disk>", "<big@disk>"]
        assert msgs[1].get_payload() == "z" * 79 * 4000 + "\n"
        assert queue_files(inst) == []


def test_maildir_delivery_on_a_full_file_system_leaves_nothing_behind(tmp_path):
    """A Maildir batch on a full file system, as a worker runs it: the
    message that does not fit fails alone with 452 4.3.1 and leaves no
    partial file in tmp/ or new/; the others are delivered whole."""
    import io
    from pymta import envelope as E
    from pymta import local_maildir, local_target
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt, size="1m"):
        box = os.path.join(mnt, "Maildir")
        target = local_target.Target("maildir", user="root", uid=0, gid=0, home="/nonexistent",
                                     path=box)
        env = E.Envelope(sender="a@b.test")
        rcpt = env.add_recipient("root@example.test")
        fill(mnt, leave=64 * 1024)
        bodies = [b"Subject: m0\n\nsmall\n", b"Subject: big\n\n" + b"z" * 79 * 4000 + b"\n",
                  b"Subject: m2\n\nsmall\n"]
        replies = local_maildir.deliver_batch([(env, rcpt, io.BytesIO(b)) for b in bodies],
                                              target)
        assert [(r.code, r.enhanced) for r in replies] == \
            [(250, "2.0.0"), (452, "4.3.1"), (250, "2.0.0")], replies
        assert os.listdir(os.path.join(box, "tmp")) == []
        got = sorted(open(os.path.join(box, "new", n), "rb").read()
                     for n in os.listdir(os.path.join(box, "new")))
        head = local_target.prefix(env, rcpt)
        assert got == sorted([head + bodies[0], head + bodies[2]])


def test_smtp_mail_below_queue_minfree_gets_452_4_3_1(make_instance):
    inst = daemon_instance(make_instance, queue_minfree=str(4 << 20))
    with tmpfs(inst.params["queue_directory"], size="2m"), Daemon(inst) as d:
        with Raw(d.port) as c:
            assert c.reply()[0] == 220
            c.cmd(b"EHLO client.test\r\n")
            code, text = c.cmd(b"MAIL FROM:<a@b.example>\r\n")
            assert code == 452 and b"4.3.1" in text, text
            code, text = c.cmd(b"MAIL FROM:<a@b.example> SIZE=100\r\n")
            assert code == 452 and b"4.3.1" in text, text
        assert queue_files(inst) == []


def test_smtp_message_filling_the_disk_during_data_is_refused_and_leaves_nothing(make_instance):
    inst = daemon_instance(make_instance, queue_minfree="0", message_size_limit="0")
    with tmpfs(inst.params["queue_directory"], size="2m"), Daemon(inst) as d:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.mail("a@b.example")[0] == 250        # no SIZE: the disk fills in DATA
            assert c.rcpt("root@example.test")[0] == 250
            code, text = c.data(message("full@disk", body=BIG * 40000))     # 3 MB
            assert code in (451, 452) and text.startswith(b"4.3."), text
            assert queue_files(inst) == []
            assert c.sendmail("a@b.example", ["root@example.test"], message("next@disk")) == {}
        assert len(queue_files(inst, ("qf",))) == 1 or "next@disk" in _mbox(inst)


def _mbox(inst):
    try:
        with open(os.path.join(inst.root, "mail", "root"), "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# -- commit order: the control file step fails after the data file exists ---------

def _to_data(c):
    """MAIL, RCPT and DATA on a Raw session, each accepted."""
    assert c.cmd(b"MAIL FROM:<a@b.example>\r\n")[0] == 250
    assert c.cmd(b"RCPT TO:<root@example.test>\r\n")[0] == 250
    assert c.cmd(b"DATA\r\n")[0] == 354


# A writer keeps the first 256 KB in memory: these bodies are larger, so
# that the df exists before the end of the data, as it does for big mail.
SPILLED = 60000


def _eat_inodes_after_df(inst, top):
    """Once a df is in queue/, use up every free inode of the file system."""
    assert _wait(lambda: queue_files(inst, ("df",))), "no df appeared"
    return use_inodes(top)


def test_sendmail_exit_0_only_after_the_commit_inodes_run_out(inst):
    top = inst.params["queue_directory"]
    inst.write_config(delivery_mode="queue")
    with tmpfs(top, size="4m", nr_inodes=64):
        inst.spool.create()
        p = _sendmail_popen(inst, "root@example.test")
        p.stdin.write(b"Subject: commit order\n\n" + b"body\n" * SPILLED)
        p.stdin.flush()
        eaten = _eat_inodes_after_df(inst, top)
        assert eaten and os.statvfs(top).f_favail == 0
        p.stdin.close()
        assert p.wait(30) == 75, p.stderr.read()
        err = p.stderr.read()
        assert b"No space left" in err or b"Insufficient system storage" in err, err
        assert queue_files(inst) == []
        for path in eaten:
            os.unlink(path)
        r = inst.sendmail("root@example.test", input=b"Subject: again\n\nok\n")
        assert r.returncode == 0, r.stderr
        assert [n[:2] for n in queue_files(inst)] == ["df", "qf"]


@pytest.mark.parametrize("body, df_first", [
    (b"Subject: commit order\r\n\r\n" + b"body\r\n" * SPILLED, True),   # the tf step fails
    # Under 256 KB the df is only created at the end of the data: with no
    # inode left by then, the df itself cannot be made.
    (b"Subject: small\r\n\r\nbody\r\n", False),
])
def test_smtp_250_only_after_the_commit_inodes_run_out(make_instance, body, df_first):
    inst = daemon_instance(make_instance, queue_minfree="0")
    top = inst.params["queue_directory"]
    with tmpfs(top, size="4m", nr_inodes=64), Daemon(inst) as d:
        with Raw(d.port) as c:
            assert c.reply()[0] == 220
            c.cmd(b"EHLO client.test\r\n")
            _to_data(c)
            c.send(body)
            if df_first:
                eaten = _eat_inodes_after_df(inst, top)
            else:
                assert queue_files(inst) == []
                eaten = use_inodes(top)
            code, text = c.cmd(b".\r\n")
            assert code in (451, 452) and text[4:5] == b"4", text
            assert queue_files(inst) == []
            for path in eaten:
                os.unlink(path)
            _to_data(c)
            code, text = c.cmd(b"Subject: again\r\n\r\nok\r\n.\r\n")
            assert code == 250, text
            c.cmd(b"QUIT\r\n")


def test_smtp_250_only_after_the_commit_queue_made_immutable(make_instance):
    inst = daemon_instance(make_instance, queue_minfree="0")
    top = inst.params["queue_directory"]
    with tmpfs(top, size="4m"), Daemon(inst) as d:
        qdir = inst.spool.dir
        with Raw(d.port) as c:
            assert c.reply()[0] == 220
            c.cmd(b"EHLO client.test\r\n")
            _to_data(c)
            c.send(b"Subject: commit order\r\n\r\n" + b"body\r\n" * SPILLED)
            assert _wait(lambda: queue_files(inst, ("df",)))
            subprocess.run(["chattr", "+i", qdir], check=True, timeout=10)
            try:
                code, text = c.cmd(b".\r\n")
            finally:
                subprocess.run(["chattr", "-i", qdir], check=True, timeout=10)
            assert code == 451 and b"4.3.0" in text, text
            c.cmd(b"QUIT\r\n")
        # The df could not be unlinked in the immutable directory: an orphan,
        # never delivered, removed by the next sweep.
        assert queue_files(inst, ("qf", "tf", "hf")) == []
        inst.write_config(queue_sweep_age="0s")
        r = inst.sendmail("-q")
        assert r.returncode == 0 and b"Traceback" not in r.stderr
        assert queue_files(inst) == []
        assert "commit order" not in _mbox(inst)


def test_a_bounce_that_cannot_be_queued_for_lack_of_space_is_not_lost(inst):
    top = inst.params["queue_directory"]
    inst.write_config(delivery_mode="queue", minimal_backoff_time="0s", maximal_backoff_time="0s")
    with tmpfs(top, size="1m"):
        inst.spool.create()
        body = b"Message-ID: <lost@bounce>\nSubject: to nobody\n\n" + b"b" * 79 * 3000 + b"\n"
        r = inst.sendmail("-f", "root@example.test", "nosuchuser@example.test", input=body)
        assert r.returncode == 0, r.stderr
        qid = queue_files(inst, ("qf",))[0][2:]
        filler = fill(top, leave=48 * 1024)        # room for no bounce of a 240 kB message
        q = inst.sendmail("-q")
        assert q.returncode == 0 and b"Traceback" not in q.stderr, q.stderr
        assert "could not queue the bounce" in inst.maillog()
        assert queue_files(inst, ("qf",)) == ["qf" + qid], "the failed message and its bounce are gone"
        os.unlink(filler)
        q = inst.sendmail("-q")
        assert q.returncode == 0
        assert queue_files(inst) == []
    msgs = list(mailbox.mbox(os.path.join(inst.root, "mail", "root")))
    assert len(msgs) == 1 and "nosuchuser@example.test" in msgs[0].as_string()
