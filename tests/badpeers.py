"""Misbehaving SMTP peers on loopback, for the scheduling and stopping tests.

- :class:`Tarpit`: accepts connections and never says a word (counts them).
- :class:`Blackhole`: a port where connect() hangs: a listening socket with
  a backlog of 0 that never accepts, its one queue slot taken by a filler
  connection, so that the kernel drops every further SYN (checked in
  tests/test_sched.py: a connect there times out).
A server that greets with 421 is ``SMTPSink(greeting="421")``.
"""

import socket
import threading


def _bind(host, port=0, backlog=128):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


class Tarpit:
    def __init__(self, host="127.0.0.2", port=0):
        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.conns = []
        self._lock = threading.Lock()
        self._thread = None

    @property
    def connections(self):
        with self._lock:
            return len(self.conns)

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns.append(c)

    def __enter__(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        with self._lock:
            for c in self.conns:
                c.close()


class Blackhole:
    def __init__(self, host="127.0.0.2", port=0):
        self.sock = _bind(host, port, backlog=0)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.filler = socket.create_connection((host, self.port), timeout=5)

    def connecting(self):
        """How many connections to it hang in SYN_SENT now (/proc/net/tcp):
        the sign that a client is stuck in connect()."""
        a, b, c, d = self.host.split(".")
        rem = "%02X%02X%02X%02X:%04X" % (int(d), int(c), int(b), int(a), self.port)
        with open("/proc/net/tcp") as f:
            return sum(1 for line in f if line.split()[2:4] == [rem, "02"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.filler.close()
        self.sock.close()
