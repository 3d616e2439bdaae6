"""Delivery that a bad destination cannot stall: stopping, per-destination
limits, the dead-host mark, against real misbehaving peers on loopback."""

import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from badpeers import Blackhole, Tarpit
from conftest import BIN
from dnsserver import DNSServer
from smtpsink import SMTPSink
from helpers import daemon, wait_for


def qfs(inst):
    return sorted(n for n in os.listdir(inst.spool.dir) if n.startswith("qf"))


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def test_blackhole_really_hangs_connect():
    with Blackhole() as bh:
        s = socket.socket()
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.connect((bh.host, bh.port))
        s.close()


def test_sigterm_stops_a_daemon_whose_handoff_hangs_on_a_tarpit(inst):
    with Tarpit() as tp:
        with daemon(inst, relayhost=f"[127.0.0.2]:{tp.port}") as (p, port):
            with smtplib.SMTP("127.0.0.1", port) as c:
                c.sendmail("a@b.example", ["u@remote.test"], b"Subject: stuck\r\n\r\nhi\r\n")
            assert wait_for(lambda: tp.connections >= 1)
            queued = qfs(inst)
            assert len(queued) == 1
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            # It stops accepting at once, while it winds down.
            assert wait_for(lambda: refused(port), 1)
            assert p.wait(10) == 0
            assert time.monotonic() - t0 < 5
            assert qfs(inst) == queued
        assert not os.path.exists(inst.params["pid_file"])
        assert "daemon stopped" in inst.maillog()


def test_sigterm_stops_a_daemon_whose_queue_run_hangs_on_a_blackhole(inst):
    with Blackhole() as bh:
        inst.write_config(relayhost=f"[127.0.0.2]:{bh.port}")
        r = inst.sendmail("-odq", "-i", "u@remote.test", input=b"Subject: hole\n\nhi\n")
        assert r.returncode == 0, r.stderr
        queued = qfs(inst)
        with daemon(inst, "-q1s") as (p, port):
            # The queue run starts a second after start-up and hangs in connect().
            assert wait_for(bh.connecting, 15)
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
            assert time.monotonic() - t0 < 5
        assert qfs(inst) == queued
        assert "daemon stopped" in inst.maillog()


# -- per-destination scheduling in queue runs ---------------------------------

def put(inst, rcpt, subject="s"):
    from pymta import envelope as E
    env = E.Envelope(sender="alice@sender.test", created=int(time.time()))
    env.add_recipient(rcpt)
    with inst.spool.new_message() as w:
        w.write(b"From: alice@sender.test\nSubject: %s\n\nhi\n" % subject.encode())
        return w.commit(env)


def two_destinations(bad_cls):
    """A healthy sink for healthy.test (127.0.0.2) and a bad peer for
    bad.test (127.0.0.3) on the same port, and the zone naming them."""
    sink = SMTPSink("127.0.0.2").start()
    bad = bad_cls("127.0.0.3", port=sink.port)
    zone = {"healthy.test": {"A": ["127.0.0.2"]}, "bad.test": {"A": ["127.0.0.3"]}}
    return sink, bad, zone


@pytest.mark.parametrize("bad_cls", [Tarpit, Blackhole])
def test_healthy_mail_is_not_stalled_by_a_bad_destination(make_instance, bad_cls):
    sink, bad, zone = two_destinations(bad_cls)
    try:
        with bad, DNSServer(zone) as dns:
            inst = make_instance(dns_nameservers=dns.address, smtp_port=sink.port,
                                 smtp_connect_timeout="15s", smtp_helo_timeout="15s",
                                 delivery_process_limit=2, delivery_thread_limit=6,
                                 initial_destination_concurrency=2)
            for i in range(12):       # the bad ones first: each worker meets one
                put(inst, f"u{i}@bad.test")
            for i in range(30):
                put(inst, f"u{i}@healthy.test")
            t0 = time.monotonic()
            p = subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C",
                                  inst.conf_path, "-q"], start_new_session=True)
            try:
                assert wait_for(lambda: len(sink.delivered) == 30, 12), len(sink.delivered)
                healthy = time.monotonic() - t0
                assert p.wait(40) == 0
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            if bad_cls is Tarpit:
                assert bad.connections <= 2          # its initial concurrency, no more
        assert healthy < 12     # before the bad destination's first timeout
        # The bad destination was marked dead after its first failures: every
        # one of its messages is deferred with that reason, none lost.
        left = [inst.spool.read(q) for q in inst.spool.ids()]
        assert len(left) == 12
        assert all(e.recipients[0].state == "D" and "timed out" in e.recipients[0].text
                   for e in left)
    finally:
        sink.stop()


def test_a_dead_destination_costs_one_connection_across_queue_runs(make_instance):
    with SMTPSink("127.0.0.2", greeting="421") as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_thread_limit=4,
                             initial_destination_concurrency=1)
        for i in range(20):
            put(inst, f"u{i}@remote.test")
        assert inst.sendmail("-q").returncode == 0
        assert sink.connections == 1
        for qid in inst.spool.ids():           # due again at once
            env = inst.spool.read(qid)
            env.next_try = 0
            inst.spool.rewrite(env)
        assert inst.sendmail("-q").returncode == 0
        assert sink.connections == 1            # the mark is in the queue directory
        assert len(inst.spool.ids()) == 20
        assert all("421" in str(inst.spool.read(q).recipients[0].text) or
                   inst.spool.read(q).recipients[0].dsn.startswith("4.")
                   for q in inst.spool.ids())


def test_the_destination_limit_holds_across_concurrent_queue_runs(make_instance):
    with SMTPSink("127.0.0.2", data_delay=0.3) as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=2,
                             delivery_thread_limit=6, default_destination_concurrency_limit=3,
                             initial_destination_concurrency=3)
        for i in range(24):
            put(inst, f"u{i}@remote.test")
        runs = [subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C",
                                  inst.conf_path, "-q"]) for _ in range(2)]
        for p in runs:
            assert p.wait(60) == 0
        assert len(sink.delivered) == 24 and inst.spool.ids() == []
        assert sink.peak == 3
        # Connections are kept for the next message to the same hop.
        assert sink.connections < 24


def test_messages_put_off_in_slow_start_go_to_every_delivery_process(make_instance):
    # Slow start gives the destination one slot: the other process finds it
    # taken for every message it takes. Those messages go back to the run,
    # not into that process's own list: once the destination has delivered,
    # both processes take them, and the server sees two connections at once.
    with SMTPSink("127.0.0.2", data_delay=0.3) as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=2,
                             delivery_thread_limit=2, default_destination_concurrency_limit=2,
                             initial_destination_concurrency=1)
        for i in range(12):
            put(inst, f"u{i}@remote.test")
        assert inst.sendmail("-q").returncode == 0
        assert len(sink.delivered) == 12 and inst.spool.ids() == []
        assert sink.peak == 2


def test_a_server_at_its_connection_limit_is_not_taken_for_dead(make_instance):
    # It serves two connections at once and greets a third with 421.
    with SMTPSink("127.0.0.2", data_delay=0.2, max_sessions=2) as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=2,
                             delivery_thread_limit=6, initial_destination_concurrency=6)
        for i in range(20):
            put(inst, f"u{i}@remote.test")
        assert inst.sendmail("-q").returncode == 0
        assert sink.refused >= 1
        assert len(sink.delivered) == 20 and inst.spool.ids() == []
        assert "at most 2 at once" in inst.maillog() or "at most 1 at once" in inst.maillog()


def test_flush_clears_the_dead_mark_and_keeps_connections(make_instance):
    with SMTPSink("127.0.0.2") as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=2,
                             delivery_thread_limit=4)
        for i in range(30):
            put(inst, f"u{i}@remote.test")
        from pymta import remote, sched
        cfg = inst.cfg
        from pymta.status import Reply
        sched.Scheduler(cfg).mark_dead(remote.hop_key(cfg, "remote.test"),
                                       Reply(421, "4.4.2", "was down"))
        assert inst.sendmail("-q").returncode == 0
        assert sink.connections == 0 and len(inst.spool.ids()) == 30
        r = inst.run("pymta", "flush")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"30 message(s) tried: 30 done, 0 still queued\n"
        assert len(sink.delivered) == 30 and inst.spool.ids() == []
        assert sink.connections <= 4



# -- back-pressure ----------------------------------------------------------------

def _serve(inst, notify):
    import threading
    from pymta import smtpd_common
    services = smtpd_common.Services(inst.cfg, logging.getLogger("test"), notify=notify)
    model = smtpd_common.driver(services.cfg)
    srv = model.Server(smtpd_common.bind("127.0.0.1:0"), services, False)
    stop = threading.Event()
    t = threading.Thread(target=model.serve, args=([srv],), kwargs={"stop": stop.is_set})
    t.start()
    return srv.socket.getsockname()[1], stop, t


@pytest.mark.parametrize("full", [False, True])
def test_a_full_hand_off_makes_the_client_wait_in_flow_delay(inst, full):
    inst.write_config(in_flow_delay="1s")
    handed = []

    def notify(qid):
        handed.append(qid)
        return not full
    port, stop, t = _serve(inst, notify)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            t0 = time.monotonic()
            for i in range(3):
                c.sendmail("a@b.example", ["root@example.test"], b"Subject: %d\r\n\r\nhi\r\n" % i)
            took = time.monotonic() - t0
    finally:
        stop.set()
        t.join(30)
    assert len(handed) == 3 and len(qfs(inst)) == 3      # accepted all the same
    if full:
        assert took >= 3
    else:
        assert took < 1


@pytest.mark.unit
def test_the_listener_reports_a_full_hand_off_pipe(inst):
    from pymta import daemon as D
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        lst = D.Listener(inst.cfg, None, [], w)
        assert lst.notify("kB27rg000000001") is True
        try:
            while True:
                os.write(w, b"x" * 4096)
        except BlockingIOError:
            pass
        assert lst.notify("kB27rg000000002") is False
    finally:
        os.close(r)
        os.close(w)
