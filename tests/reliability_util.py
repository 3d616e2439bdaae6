"""Helpers of the reliability tests: the daemon as a real process group, a
small tmpfs, a sink that answers slowly, raw SMTP over a socket, and a look
at what is in the queue."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import free_port  # noqa: F401 - the reliability tests take it from here
from smtpsink import SMTPSink, _Handler

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, chattr)")



def queue_files(inst, prefixes=("qf", "df", "tf", "hf", "Qf")):
    """Names in queue/ with one of ``prefixes``."""
    try:
        names = os.listdir(inst.spool.dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n[:2] in prefixes)


def message(msgid, body=b"hello\r\n", extra=b""):
    return (b"From: a@b.example\r\nTo: root@example.test\r\nSubject: t\r\n"
            b"Message-ID: <" + msgid.encode() + b">\r\n" + extra + b"\r\n" + body)


def msgids_in(data):
    """Message-ID values found in a blob of mail (mbox or sink data)."""
    out = []
    for line in data.split(b"\n"):
        if line.lower().startswith(b"message-id:"):
            out.append(line.split(b":", 1)[1].strip().strip(b"<>").decode())
    return out


def group_alive(pgid):
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(name))
    return alive


class Daemon:
    """``sendmail -C conf -bD`` in its own process group."""

    def __init__(self, inst):
        self.inst = inst
        self.port = int(inst.params["smtpd_listen"].rsplit(":", 1)[1])
        self.proc = None

    def start(self, timeout=15):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(TOP, "bin", "sendmail"), "-C", self.inst.conf_path,
             "-bD"], start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("daemon did not start listening")

    @property
    def pid(self):
        return self.proc.pid

    def listener_pids(self):
        """The master's children (the listener, forked deliveries)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def signal(self, sig):
        os.kill(self.pid, sig)

    def kill9(self):
        """SIGKILL the whole process group, as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._wait_group_gone()
        self.proc.stderr.close()
        self.proc = None

    def _wait_group_gone(self, timeout=5):
        """Until every process of the group is dead (a zombie waiting for
        init to reap it counts as dead: it holds no sockets or locks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and group_alive(self.proc.pid):
            time.sleep(0.02)


    def stop(self, timeout=30):
        """SIGTERM and wait; SIGKILL the group if it does not go."""
        if self.proc is None:
            return None
        try:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc.stderr.close()
        self.proc = None
        return code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def daemon_instance(make_instance, **params):
    """An Instance set up for a daemon on a free loopback port (as root the
    listener keeps root: mail_owner=root), short timeouts."""
    base = dict(smtpd_listen=f"127.0.0.1:{free_port()}", mail_owner="root",
                delivery_mode="queue", smtpd_timeout="10s", queue_run_delay="0",
                minimal_backoff_time="0s", maximal_backoff_time="0s")
    base.update(params)
    return make_instance(**base)


@contextlib.contextmanager
def tmpfs(path, size="2m", nr_inodes=None):
    """A tmpfs of ``size`` mounted on ``path`` for the duration (root only)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size},mode=0755" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True,
                   capture_output=True, timeout=20)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-R", "-i", path], capture_output=True, timeout=20)
        for _ in range(50):
            r = subprocess.run(["umount", path], capture_output=True, timeout=20)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=20)


def fill(directory, leave=0, name="filler"):
    """Write a file in ``directory`` until at most ``leave`` bytes remain free."""
    path = os.path.join(directory, name)
    with open(path, "ab") as f:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                break
    return path


def use_inodes(directory, leave=0):
    """Create empty files until at most ``leave`` inodes remain free."""
    n = 0
    while os.statvfs(directory).f_favail > leave:
        try:
            open(os.path.join(directory, f"inode{n}"), "w").close()
        except OSError:
            break
        n += 1
    return [os.path.join(directory, f"inode{i}") for i in range(n)]


class _SlowHandler(_Handler):
    def act(self, action, ok_text="2.0.0 Ok"):
        if ok_text.startswith("2.0.0 Ok: queued"):
            time.sleep(self.sink.delay)
        return super().act(action, ok_text)


class SlowSink(SMTPSink):
    """An SMTPSink that waits ``delay`` seconds before its reply to the data."""

    def __init__(self, delay=0.2, **kw):
        super().__init__(**kw)
        self.delay = delay
        self.server.RequestHandlerClass = _SlowHandler


class Raw:
    """A raw SMTP client: send bytes, read whole replies."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def reply(self):
        """The next reply as (code, text); (0, b'') when the connection ended."""
        lines = []
        while True:
            try:
                line = self.f.readline()
            except OSError:
                line = b""
            if not line:
                return (int(lines[-1][:3]) if lines else 0), b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, data):
        self.send(data)
        return self.reply()

    def close(self):
        for x in (self.f, self.sock):
            try:
                x.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
