"""Small helpers shared by the tests that start daemons: a free port, a
poll for a condition, and ``sendmail -bD``/``-bd`` as a real subprocess."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin")


def free_port():
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=15, step=0.05):
    """``pred()``'s first true value within ``timeout`` seconds, else its
    last value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def can_connect(port, host="127.0.0.1"):
    """Whether a server at (host, port) greets with 220 now."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


@contextlib.contextmanager
def daemon(inst, *args, mode="-bD", port=None, env=None, **params):
    """``sendmail -C conf -bD args`` (or ``mode``) for an Instance, in its own
    session, listening on ``port`` (a free one by default), with ``env``
    added to the environment; yields (Popen, port) once it greets; SIGTERM
    then SIGKILL of its group at the end."""
    port = port or free_port()
    params.setdefault("mail_owner", "root")
    params.setdefault("smtpd_listen", f"127.0.0.1:{port}")
    inst.write_config(**params)
    cmd = [sys.executable, os.path.join(BIN, "sendmail"), "-C", inst.conf_path, mode, *args]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, **env} if env else None)
    try:
        assert wait_for(lambda: can_connect(port) or p.poll() is not None), "daemon did not start"
        assert p.poll() is None or mode == "-bd", p.stderr.read()
        yield p, port
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)   # anything left of the group we started
        p.wait(5)
        p.stdout.close()
        p.stderr.close()


def listener_pids(inst):
    """The listener pids the daemon logged as started."""
    return [int(x) for x in re.findall(r"listener pid (\d+)", inst.maillog())]
