"""The ``threads`` process model on the real daemon (``sendmail -bD``):
many concurrent smtplib sessions, the bound on session threads, and a
listener killed with SIGKILL in the middle of DATA losing nothing it
acknowledged. The group commit itself: tests/test_queue_groupsync.py; the
behaviours every model shares (limits, timeouts, STARTTLS, signals): the
tests parametrised over the models in test_server.py, test_daemon.py,
test_smtp_security.py and test_reliability_crash.py."""

import os
import re
import signal
import smtplib
import threading
import time
import uuid

from helpers import wait_for
from pymta import smtpd_common, smtpd_threads
from reliability_util import Daemon, Raw, daemon_instance, message, msgids_in, queue_files


def threads_daemon(make_instance, **params):
    inst = daemon_instance(make_instance, smtpd_process_model="threads", **params)
    return inst, Daemon(inst).start()


def listener_pid(inst, old=()):
    """The pid of the listener started last (not one of ``old``)."""
    def find():
        log = inst.maillog()
        pids = [int(p) for p in re.findall(r"daemon started \(pid \d+\), listener pid (\d+)", log)
                + re.findall(r"listener pid (\d+) started", log)]
        pids = [p for p in pids if p not in old and os.path.exists(f"/proc/{p}")]
        return pids[-1] if pids else None
    pid = wait_for(find, 15)
    assert pid, inst.maillog()
    return pid


def thread_count(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def delivered_or_queued(inst):
    """Message-IDs in root's mailbox or in a df of the queue."""
    ids = set(msgids_in(inst.mailbox()))
    for name in queue_files(inst, ("df",)):
        if os.path.exists(inst.spool.path("qf", name[2:])):
            with open(inst.spool.path("df", name[2:]), "rb") as f:
                ids.update(msgids_in(f.read()))
    return ids


class Clients:
    """``n`` smtplib clients, each sending messages with unique Message-IDs
    over one session until stopped (or ``per_client`` are sent); records
    each 250's Message-ID and queue id."""

    def __init__(self, port, n, per_client=None):
        self.port, self.per_client = port, per_client
        self.acked = {}             # Message-ID -> queue id
        self.errors = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self):
        sent, conn = 0, None
        while not self.stop.is_set() and (self.per_client is None or sent < self.per_client):
            msgid = f"{uuid.uuid4().hex}@threads.test"
            try:
                if conn is None:
                    conn = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                    conn.ehlo("client.test")
                conn.mail("a@b.example")
                conn.rcpt("root@example.test")
                code, text = conn.data(message(msgid, body=b"x" * 3000 + b"\r\n"))
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.errors += 1
                conn = None
                time.sleep(0.05)
                continue
            if code == 250:
                with self.lock:
                    self.acked[msgid] = text.decode().rsplit(" ", 1)[-1]
                sent += 1
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                pass

    def count(self):
        with self.lock:
            return len(self.acked)

    def join(self):
        """Wait for the clients: until each has sent its messages, or stop them."""
        if self.per_client is None:
            self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads)


def test_many_concurrent_sessions_are_each_acknowledged_after_a_durable_commit(make_instance):
    inst, d = threads_daemon(make_instance, smtpd_session_limit=60,
                             smtpd_client_connection_count_limit=60)
    try:
        clients = Clients(d.port, 40, per_client=5)
        clients.join()
        assert clients.count() == 200 and clients.errors == 0
        assert wait_for(lambda: set(clients.acked) <= delivered_or_queued(inst), 60)
    finally:
        assert d.stop() == 0
    log = inst.maillog()
    assert len(set(clients.acked.values())) == 200
    for qid in clients.acked.values():
        assert f"{qid}: from=<a@b.example>" in log


def test_session_threads_are_bounded_by_the_session_limit(make_instance):
    inst, d = threads_daemon(make_instance, smtpd_session_limit=5,
                             smtpd_client_connection_count_limit=0)
    held = []
    try:
        pid = listener_pid(inst)
        # Idle, the listener is its main thread alone (the start-up check's
        # session has ended).
        assert wait_for(lambda: thread_count(pid) == 1, 10)
        for _ in range(12):
            r = Raw(d.port)
            held.append(r)
        codes = [r.reply()[0] for r in held]
        assert codes.count(220) == 5 and codes.count(421) == 7, codes
        assert thread_count(pid) == 1 + 5
        for r in held[:5]:
            assert r.cmd(b"QUIT\r\n")[0] == 221
        # Their threads end: the slots are free again.
        assert wait_for(lambda: thread_count(pid) == 1, 10)
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
            assert c.noop()[0] == 250
    finally:
        for r in held:
            r.close()
        assert d.stop() == 0


def test_listener_killed_mid_data_loses_nothing_it_acknowledged(make_instance):
    inst, d = threads_daemon(make_instance)
    half = None
    try:
        first = listener_pid(inst)
        clients = Clients(d.port, 12)
        assert wait_for(lambda: clients.count() >= 30, 60)
        # A session in the middle of its DATA when the listener dies.
        half = Raw(d.port)
        assert half.reply()[0] == 220
        for cmd in (b"EHLO half.test\r\n", b"MAIL FROM:<a@b.example>\r\n",
                    b"RCPT TO:<root@example.test>\r\n"):
            assert half.cmd(cmd)[0] == 250
        assert half.cmd(b"DATA\r\n")[0] == 354
        half.send(message("half@threads.test", body=b"first half\r\n"))
        os.kill(first, signal.SIGKILL)
        listener_pid(inst, old=(first,))         # the master starts another
        before = clients.count()
        assert wait_for(lambda: clients.count() >= before + 30, 60), "no mail after the restart"
        clients.join()
    finally:
        if half is not None:
            half.close()
        assert d.stop() == 0
    assert clients.errors, "the kill should have been felt by the clients"
    got = delivered_or_queued(inst)
    lost = set(clients.acked) - got
    assert not lost, f"{len(lost)} acknowledged messages lost"
    assert "half@threads.test" not in got
    assert "restarting it" in inst.maillog()


def test_a_reload_gives_the_new_spool_a_shared_directory_fsync(inst):
    """The daemon hands a reloaded configuration's services to the servers
    (server.services = new): the new spool's commits share their
    directory fsyncs too, those of one listener through one GroupSync."""
    services = smtpd_common.Services(inst.cfg)
    socks = [smtpd_common.bind("127.0.0.1:0") for _ in range(2)]
    servers = [smtpd_threads.Server(sock, services) for sock in socks]
    try:
        first = services.spool.dir_sync
        assert first is not None
        new = smtpd_common.Services(inst.cfg, previous=services)
        assert new.spool is not services.spool and new.spool.dir_sync is None
        for srv in servers:
            srv.services = new
        assert new.spool.dir_sync is not None and new.spool.dir_sync != first
        assert services.spool.dir_sync is first     # sessions still on the old one keep theirs
    finally:
        for srv in servers:
            srv.server_close()
