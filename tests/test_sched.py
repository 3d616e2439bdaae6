"""Delivery that a bad destination cannot stall: stopping, per-destination
limits, the dead-host mark, against real misbehaving peers on loopback."""

import os
import signal
import smtplib
import socket
import time

import pytest

from badpeers import Blackhole, Tarpit
from test_daemon import daemon, wait_for


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
            time.sleep(2.5)
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
            assert time.monotonic() - t0 < 5
        assert qfs(inst) == queued
        assert "daemon stopped" in inst.maillog()
