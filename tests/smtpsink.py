"""A scriptable receiving SMTP server for tests, on a 127.0.0.x address.

Each stage can be told what to do: a reply code ("250", "451", "550", ...),
"drop" (close the connection without a word) or "stall" (say nothing until
the sink stops). ``rcpt`` maps recipient addresses to actions; the rest get
``default_rcpt``. Every transaction is recorded::

    with SMTPSink("127.0.0.2", rcpt={"bad@remote.test": "550"}) as sink:
        ...
        t = sink.transactions[0]
        t.sender, t.params, t.rcpts, t.accepted, t.data, t.raw

``data`` is the message after dot-unstuffing with CRLF line ends as received;
``raw`` is the DATA section exactly as it came off the wire. With "CHUNKING"
among the extensions the sink also takes BDAT (RFC 3030): ``raw`` and
``data`` are then the chunks joined, ``chunks`` their sizes.

``auth={"user": "password"}`` offers AUTH with ``auth_mechanisms`` (default
PLAIN LOGIN; only after STARTTLS
with ``auth_after_tls``); ``auth_reply`` overrides the answer to a login
("535" refuses every one). ``implicit_tls=True`` speaks TLS from the first
byte with ``tls_context``. ``sink.logins`` records (user, password, tls) of
each AUTH that reached the server.
"""

import base64
import socketserver
import ssl
import threading
from dataclasses import dataclass, field


@dataclass
class Transaction:
    sender: str = ""
    params: str = ""
    rcpts: list = field(default_factory=list)        # every RCPT TO, with parameters
    accepted: list = field(default_factory=list)     # addresses answered 250
    rcpt_params: dict = field(default_factory=dict)
    data: bytes = b""
    raw: bytes = b""
    complete: bool = False                           # final 250 after DATA sent
    helo: str = ""
    tls: bool = False
    chunks: list = field(default_factory=list)        # BDAT chunk sizes
    auth: str = ""                                   # the logged-in user


def _addr(arg):
    """'<a@b> SIZE=1' -> ('a@b', 'SIZE=1')."""
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        return arg[1:end], arg[end + 1:].strip()
    addr, _, rest = arg.partition(" ")
    return addr, rest.strip()


class _Handler(socketserver.StreamRequestHandler):
    timeout = 30

    def setup(self):
        super().setup()
        self.sink = self.server.sink

    def send(self, text):
        self.wfile.write(text.encode() + b"\r\n")
        self.wfile.flush()

    def act(self, action, ok_text="2.0.0 Ok"):
        """Carry out an action; returns False when the session must end."""
        if action == "drop":
            return False
        if action == "stall":
            self.sink._stop.wait(self.sink.stall_time)
            return False
        code = str(action)
        if code.startswith("2"):
            self.send(f"{code} {ok_text}")
        elif code.startswith("4"):
            self.send(f"{code} 4.0.0 Try again later")
        else:
            self.send(f"{code} 5.0.0 No thanks")
        return True

    def handle(self):
        sink = self.sink
        with sink._lock:
            sink.connections += 1
            sink.active += 1
            sink.peak = max(sink.peak, sink.active)
        try:
            self._session(sink)
        finally:
            with sink._lock:
                sink.active -= 1

    def _session(self, sink):
        if sink.max_sessions and sink.active > sink.max_sessions:
            with sink._lock:
                sink.refused += 1
            self.send("421 4.7.0 Too many connections")
            return
        tls = False
        if sink.implicit_tls:
            try:
                conn = sink.tls_context.wrap_socket(self.connection, server_side=True)
            except (OSError, ssl.SSLError):
                return
            self.connection = self.request = conn
            self.rfile = conn.makefile("rb")
            self.wfile = conn.makefile("wb")
            tls = True
        if not self.act(sink.greeting, f"{sink.name} ESMTP sink"):
            return
        t = None
        helo = ""
        user = ""
        while True:
            try:
                line = self.rfile.readline(4096)
            except OSError:
                return
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            with sink._lock:
                sink.commands.append(text)
            if verb == "EHLO":
                helo = arg
                exts = [sink.name]
                if sink.size:
                    exts.append(f"SIZE {sink.size}")
                exts += [e for e in sink.extensions]
                if sink.tls_context is not None and not tls:
                    exts.append("STARTTLS")
                if sink.auth is not None and (tls or not sink.auth_after_tls):
                    exts.append("AUTH " + sink.auth_mechanisms)
                for i, e in enumerate(exts):
                    self.send(f"250{'-' if i < len(exts) - 1 else ' '}{e}")
            elif verb == "HELO":
                helo = arg
                self.send(f"250 {sink.name}")
            elif verb == "STARTTLS" and sink.tls_context is not None and not tls:
                self.send("220 2.0.0 Ready to start TLS")
                self.wfile.flush()
                try:
                    conn = sink.tls_context.wrap_socket(self.connection, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                self.connection = self.request = conn
                self.rfile = conn.makefile("rb")
                self.wfile = conn.makefile("wb")
                tls = True
                helo = ""
            elif verb == "AUTH" and sink.auth is not None:
                got = self.login(arg, tls)
                if got is None:
                    return
                user = got or user
            elif verb == "MAIL":
                sender, params = _addr(arg.split(":", 1)[1] if ":" in arg else "")
                t = Transaction(sender=sender, params=params, helo=helo, tls=tls, auth=user)
                if not self.act(sink.mail):
                    return
                if not str(sink.mail).startswith("2"):
                    t = None
                else:
                    with sink._lock:
                        sink.transactions.append(t)
            elif verb == "RCPT":
                addr, params = _addr(arg.split(":", 1)[1] if ":" in arg else "")
                if t is None:
                    self.send("503 5.5.1 Need MAIL first")
                    continue
                t.rcpts.append(addr)
                t.rcpt_params[addr] = params
                action = sink.rcpt.get(addr, sink.default_rcpt)
                if sink.rcpt_limit and len(t.accepted) >= sink.rcpt_limit:
                    action = "452"
                if not self.act(action):
                    return
                if str(action).startswith("2"):
                    t.accepted.append(addr)
            elif verb == "DATA":
                if t is None or not t.accepted:
                    self.send("554 5.5.1 No valid recipients")
                    continue
                self.send("354 End data with <CR><LF>.<CR><LF>")
                raw = []
                while True:
                    dline = self.rfile.readline()
                    if not dline:
                        return
                    raw.append(dline)
                    if dline == b".\r\n":
                        break
                t.raw = b"".join(raw)
                t.data = b"".join(ln[1:] if ln.startswith(b".") else ln for ln in raw[:-1])
                sink.data_seen.set()
                if sink.data_delay:
                    sink._stop.wait(sink.data_delay)
                action = sink.data
                t.complete = str(action).startswith("2")
                if not self.act(action, f"2.0.0 Ok: queued as SINK{sink.transactions.index(t) + 1}"):
                    t.complete = False
                    return
                t = None
            elif verb == "BDAT" and "CHUNKING" in sink.extensions:
                words = arg.split()
                size, last = int(words[0]), words[1:] == ["LAST"]
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return
                if t is None or not t.accepted:
                    self.send("503 5.5.1 No valid recipients")
                    continue
                t.chunks.append(size)
                t.raw += chunk
                if not last:
                    self.send(f"250 2.0.0 {size} octets received")
                    continue
                t.data = t.raw
                sink.data_seen.set()
                t.complete = str(sink.data).startswith("2")
                if not self.act(sink.data, f"2.0.0 Ok: queued as SINK{sink.transactions.index(t) + 1}"):
                    t.complete = False
                    return
                t = None
            elif verb == "RSET":
                t = None
                self.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("502 5.5.2 Command not recognized")


    def _b64line(self):
        line = self.rfile.readline(4096)
        if not line:
            return None
        text = line.strip()
        if text == b"*":
            return None
        try:
            return base64.b64decode(text, validate=True).decode("utf-8", "replace")
        except ValueError:
            return ""

    def login(self, arg, tls):
        """One AUTH exchange; the user name on success, "" on failure, None
        when the client went away."""
        sink = self.sink
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech == "PLAIN":
            if initial:
                try:
                    blob = base64.b64decode(initial, validate=True).decode("utf-8", "replace")
                except ValueError:
                    blob = ""
            else:
                self.send("334 ")
                blob = self._b64line()
                if blob is None:
                    self.send("501 5.7.0 Authentication aborted")
                    return ""
            parts = blob.split("\0")
            user, password = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        elif mech == "LOGIN":
            self.send("334 VXNlcm5hbWU6")
            user = self._b64line()
            if user is None:
                self.send("501 5.7.0 Authentication aborted")
                return ""
            self.send("334 UGFzc3dvcmQ6")
            password = self._b64line()
            if password is None:
                self.send("501 5.7.0 Authentication aborted")
                return ""
        else:
            self.send("504 5.5.4 Unrecognized authentication type")
            return ""
        with sink._lock:
            sink.logins.append((user, password, tls))
        if sink.auth_reply is not None:
            self.act(sink.auth_reply)
            return user if str(sink.auth_reply).startswith("2") else ""
        if sink.auth.get(user) == password:
            self.send("235 2.7.0 Authentication successful")
            return user
        self.send("535 5.7.8 Error: authentication failed: bad credentials")
        return ""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows when a queue run opens
    # 20 connections at once: the kernel then drops the last ACK of a
    # handshake, the client believes it is connected and waits for a
    # greeting that never comes. Real servers listen with far more.
    request_queue_size = 128


class SMTPSink:
    """See the module docstring. ``port=0`` picks a free port."""

    def __init__(self, host="127.0.0.1", port=0, rcpt=None, default_rcpt="250",
                 greeting="220", mail="250", data="250", size=10240000,
                 extensions=("8BITMIME", "DSN", "PIPELINING", "ENHANCEDSTATUSCODES"),
                 tls_context=None, stall_time=30, name="sink.test", rcpt_limit=0,
                 auth=None, auth_after_tls=False, auth_reply=None, implicit_tls=False,
                 auth_mechanisms="PLAIN LOGIN", data_delay=0, max_sessions=0):
        self.host = host
        self.rcpt = dict(rcpt or {})
        self.default_rcpt, self.greeting, self.mail, self.data = default_rcpt, greeting, mail, data
        self.size, self.extensions, self.tls_context = size, list(extensions), tls_context
        self.stall_time, self.name = stall_time, name
        self.rcpt_limit = rcpt_limit        # accepted RCPTs per transaction; more get 452
        self.auth, self.auth_after_tls, self.auth_reply = auth, auth_after_tls, auth_reply
        self.implicit_tls, self.auth_mechanisms = implicit_tls, auth_mechanisms
        self.logins = []
        self.transactions, self.commands = [], []
        self.connections = 0
        self.active = self.peak = 0         # sessions open now, and at most at once
        self.data_delay = data_delay        # seconds before the reply to the end of data
        self.max_sessions = max_sessions    # more at once are greeted with 421
        self.refused = 0
        self.data_seen = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server = _Server((host, port), _Handler)
        self.server.sink = self
        self.port = self.server.server_address[1]
        self._thread = None

    @property
    def delivered(self):
        """Transactions that ended with a 2xx after the data."""
        return [t for t in self.transactions if t.complete]

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
