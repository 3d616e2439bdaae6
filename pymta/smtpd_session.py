"""The SMTP protocol (RFC 5321 and its extensions) as a pure state machine.

Bytes go in through :meth:`Session.feed`, reply bytes come out. The session
knows no socket and no spool: the server injects ``begin_message()`` (a
writer with write/commit/abort, in production a queue_commit.MessageWriter),
``recipient_check(address)``, ``auth_verify(user, password)``,
``free_space()`` and ``clock()``.

After each feed the driver asks :meth:`Session.next_step` what comes next:

- ``READ``: more bytes from the client;
- ``COMMIT``: a message is complete (nothing more is read until it is
  committed): the blocking drivers call :meth:`Session.commit`; the event
  loop commits :meth:`Session.message` itself and hands the result to
  :meth:`Session.committed`; both return the replies (the 250 and those
  of commands pipelined after the message);
- ``STARTTLS``: the 220 is out: the driver does the handshake and calls
  :meth:`Session.tls_started` (or :meth:`Session.close`);
- ``CLOSE``: the session has ended (QUIT, too many errors, 421).

A failed AUTH sets :attr:`Session.hold`: the driver sends that feed's
replies only after so many seconds, then calls :meth:`Session.release`.

DATA is processed in large chunks with bytes operations: only CRLF.CRLF
ends it, dot-unstuffing and CRLF -> LF are ``bytes.replace`` over whole
chunks. A bare CR or LF anywhere in the data (SMTP smuggling,
CVE-2023-51764) makes the whole message refused with 550 5.6.0 once the
real end arrives, so a smuggled second transaction never becomes a message.
BDAT chunks (RFC 3030) are counted octets, never searched for commands or
a dot, stored with the same conversion and checks (smtpd_data.ChunkReceiver).

Beside it: :mod:`pymta.smtpd_data` decodes DATA and BDAT,
:mod:`pymta.smtpd_sasl` the AUTH mechanisms, :mod:`pymta.smtpd_policy`
says who may relay where.
"""

import re
import time

from . import address as A
from . import envelope as E
from . import headers
from . import smtpd_sasl as sasl
from .smtpd_data import ChunkReceiver, DataReceiver
from .smtpd_policy import in_networks, rcpt_policy
from .status import AddressError, PymtaError, Reply

COMMAND_LINE_MAX = 512
HELD_COPY = 8192         # message data held back: joined to the next read by a copy up to this size

R_OK = Reply(250, "2.0.0", "Ok")
R_BYE = Reply(221, "2.0.0", "Bye")
R_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R_NESTED = Reply(503, "5.5.1", "Error: nested MAIL command")
R_UNKNOWN = Reply(500, "5.5.2", "Error: command not recognized")
R_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
R_NOSPACE = Reply(452, "4.3.1", "Insufficient system storage")
R_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
R_TOO_MANY_RCPT = Reply(452, "4.5.3", "Error: too many recipients")
R_LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R_TLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R_AUTH_FIRST = Reply(530, "5.7.0", "Authentication required")
R_PIPELINING = Reply(554, "5.5.0", "Error: improper use of SMTP command pipelining")
R_BARE_EOL = Reply(550, "5.6.0", "Message contains a bare CR or LF; refused "
                   "(only CRLF line ends are accepted)")
R_LONG_LINE = Reply(550, "5.6.0", "Message contains a line over the length limit; refused")
R_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")

_HELP = ("Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH\n"
         "See RFC 5321; this server is described in pymta(8)")
_POSTMASTER_RE = re.compile(r'^<\s*(?:"postmaster"|postmaster)\s*>(.*)$', re.I)


_PRINTABLE_ASCII = frozenset(map(chr, range(0x20, 0x7f)))


def _orcpt_text(text):
    """A decoded ORCPT address: no control character (C0, DEL, C1), no
    byte that was not UTF-8; non-ASCII is allowed (RFC 6533 utf-8 type)."""
    return all(" " <= c < "\x7f" or "\xa0" <= c and not "\udc80" <= c <= "\udcff"
               for c in text)


# What the driver does next (Session.next_step).
READ = "read"
COMMIT = "commit"
STARTTLS = "starttls"
CLOSE = "close"


class _Transaction:
    """The envelope being built between MAIL and the end of DATA."""

    def __init__(self, sender, params):
        self.sender, self.params = sender, params
        self.rcpts = []          # envelope.Recipient


class Session:
    """One SMTP conversation. See the module docstring for the injected parts.

    ``client_addr``/``client_name`` describe the peer; ``trusted`` means it may
    relay (mynetworks or a local -bs caller); ``submission`` requires AUTH
    before MAIL; ``tls_available`` offers STARTTLS; ``local_uid`` marks a
    ``sendmail -bs`` caller. ``draining()`` returns True once the server is
    shutting down: the next command gets 421.
    """

    def __init__(self, cfg, *, begin_message, client_addr="", client_name="unknown",
                 recipient_check=None, auth_verify=None, free_space=None, clock=time.time,
                 log=None, trusted=None, submission=False, tls_available=False,
                 local_uid=-1, local_user="", draining=None, expand=None, accepted=None):
        self.cfg = cfg
        self.begin_message = begin_message
        self.client_addr, self.client_name = client_addr, client_name
        self.recipient_check = recipient_check
        self.auth_verify = auth_verify
        self.free_space = free_space
        self.clock = clock
        self.log = log
        self.local_uid, self.local_user = local_uid, local_user
        if trusted is None:
            trusted = local_uid >= 0 or in_networks(client_addr, cfg.mynetworks)
        self.trusted = trusted
        self.submission = submission
        self.tls_available = tls_available and cfg.smtpd_tls_security_level != "none"
        self.draining = draining or (lambda: False)
        self.expand = expand
        self.accepted = accepted
        self.tls = False
        self.auth_user = ""
        self.helo = None
        self.esmtp = False
        self.tx = None
        self.errors = 0
        self.auth_failures = 0
        # Seconds the server waits before it sends the replies of this
        # feed() and reads on (a failed AUTH); then it calls release().
        self.hold = 0
        self.closed = False
        self.starttls_wanted = False
        self.last_command = "CONNECT"
        self.messages = 0
        self._buf = bytearray()
        self._skip_line = False
        self._data = None            # a DataReceiver during DATA
        self._chunks = None          # the ChunkReceiver of a BDAT transaction
        self._chunk_left = None      # octets of the current BDAT chunk still to read
        self._chunk_reply = None     # (Reply, last): what to answer once it is read
        self._auth = None            # the smtpd_sasl.Exchange during AUTH
        self._out = []
        # (writer, envelope, transaction) of a message waiting for its
        # commit (next_step() is COMMIT); input waits until it is done.
        self._pending = None

    # -- the interface to the server ---------------------------------------
    @property
    def peer(self):
        if self.local_uid >= 0:
            return f"{self.local_user or self.local_uid}@localhost"
        return f"{self.client_name}[{self.client_addr}]"

    @property
    def in_data(self):
        return self._data is not None or self._chunk_left is not None

    @property
    def data_received(self):
        rx = self._data or self._chunks
        return rx.received if rx else 0

    def greeting(self):
        return Reply(220, "", self.cfg.smtpd_banner).lines()

    def feed(self, data):
        """Consume client bytes; return the reply bytes to send (maybe b"")."""
        self._out = []
        if self._data is not None and self._pending is None and not self.closed and \
                len(self._buf) < HELD_COPY:
            # Message data: straight to the receiver, after what is held
            # back (the start of a line: copied, when short), and only what
            # it leaves (a part line) is kept.
            if self._buf:
                data = bytes(self._buf) + data
                del self._buf[:]
            used, done = self._data.feed(data)
            self._buf += data[used:] if used else data
            if done:
                self._finish_data()
        else:
            self._buf += data
        return self._run()

    def _run(self):
        while (self._buf or self._chunk_left == 0) and not self.closed and \
                not self.starttls_wanted and self._pending is None and not self.hold:
            if self._chunk_left is not None:
                if self._chunk_step():
                    continue
                break
            if self._data is not None:
                used, done = self._data.feed(self._buf)
                if used:
                    del self._buf[:used]
                if done:
                    self._finish_data()
                    continue
                break
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > COMMAND_LINE_MAX:
                    if not self._skip_line:
                        self._error(R_TOO_LONG)
                    self._skip_line = True
                    del self._buf[:]
                break
            raw = bytes(self._buf[:nl + 1])
            del self._buf[:nl + 1]
            if self._skip_line:
                self._skip_line = False
                continue
            if len(raw) > COMMAND_LINE_MAX:
                self._error(R_TOO_LONG)
                continue
            self._line(raw.rstrip(b"\r\n"))
        if self.closed or self.starttls_wanted:
            del self._buf[:]   # plaintext after STARTTLS is discarded
        out, self._out = b"".join(self._out), []
        return out

    def next_step(self):
        """What the driver does next: READ, COMMIT, STARTTLS or CLOSE."""
        if self.closed:
            return CLOSE
        if self._pending is not None:
            return COMMIT
        if self.starttls_wanted:
            return STARTTLS
        return READ

    def message(self):
        """(writer, envelope) of the message to commit (next_step() is COMMIT)."""
        return self._pending[0], self._pending[1]

    def commit(self):
        """Commit the message here, blocking (the fsyncs); returns the
        replies, as :meth:`committed` does."""
        writer, env, _ = self._pending
        try:
            result = writer.commit(env)
        except (PymtaError, OSError) as e:
            result = e
        return self.committed(result)

    def committed(self, result):
        """The message's commit ended with ``result``: its queue id, or the
        PymtaError or OSError it failed with (the message is then removed
        and the client gets 4xx). Returns the reply bytes, with those of
        any commands the client pipelined after the message."""
        writer, env, tx = self._pending
        self._pending = None
        self._out = []
        if isinstance(result, Exception):
            writer.abort()
            self._logi(f"warning: {self.peer}: queue commit failed: {result}")
            self._send(result.reply if isinstance(result, PymtaError) else R_LOCAL_ERROR)
        else:
            self._accepted(writer, env, tx, result)
        return self._run()

    def release(self):
        """The server has waited :attr:`hold` seconds: returns the replies
        to the commands the client pipelined meanwhile."""
        self.hold = 0
        self._out = []
        return self._run()

    def timeout(self):
        """The reply for a client that went silent (the server then closes)."""
        self.close()
        return Reply(421, "4.4.2", f"{self.cfg.myhostname} Error: timeout exceeded").lines()

    def shutdown_reply(self):
        self.close()
        return Reply(421, "4.3.2", f"{self.cfg.myhostname} {R_SHUTDOWN.text}").lines()

    def close(self):
        """End the session; an unfinished or uncommitted message is removed
        from the spool (the event loop never closes a session whose commit
        is running)."""
        if self._data is not None:
            self._data.writer.abort()
            self._data = None
        if self._pending is not None:
            self._pending[0].abort()
            self._pending = None
        self._drop_chunks()
        self.closed = True

    def tls_started(self, info=""):
        """The handshake succeeded: forget everything learnt before it."""
        self.starttls_wanted = False
        self.tls = True
        self.helo, self.esmtp, self.tx, self._auth = None, False, None, None
        self._buf.clear()
        self._logi(f"TLS connection established from {self.peer}: {info}".rstrip(": "))

    # -- helpers -----------------------------------------------------------
    def _send(self, reply):
        self._out.append(reply.lines())

    def _error(self, reply):
        self._send(reply)
        self.errors += 1
        if self.errors >= self.cfg.smtpd_hard_error_limit and not self.closed:
            self._send(Reply(421, "4.7.0", f"{self.cfg.myhostname} Error: too many errors"))
            self._logi(f"too many errors after {self.last_command} from {self.peer}")
            self.close()

    def _logi(self, text):
        if self.log:
            self.log.info(text)

    def _reject(self, reply, what=""):
        tx = self.tx
        extra = ""
        if tx is not None:
            extra = f" from=<{tx.sender}>"
        if what:
            extra += f" to=<{what}>" if self.last_command == "RCPT" else ""
        self._logi(f"reject: {self.last_command} from {self.peer}: {reply};{extra} "
                   f"proto={self._proto()} helo=<{self.helo or ''}>")
        self._error(reply)

    def _proto(self, tx=None):
        """The Received "with" keyword: SMTP, ESMTP, or for a transaction
        with SMTPUTF8 the RFC 6531 UTF8SMTP; S after TLS, A after AUTH."""
        tx = tx or self.tx
        if tx is not None and "SMTPUTF8" in tx.params:
            p = "UTF8SMTP"
        else:
            p = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            p += "S"
        if self.auth_user:
            p += "A"
        return p

    # -- commands ----------------------------------------------------------
    def _line(self, raw):
        if self._auth is not None:
            return self._auth_step(raw)
        line = raw.decode("utf-8", "surrogateescape")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        self.last_command = verb if verb.isalpha() and len(verb) <= 10 else "UNKNOWN"
        if self.draining():
            self._out.append(self.shutdown_reply())
            return
        if "\0" in line:
            return self._error(Reply(500, "5.5.2", "Error: NUL character in command"))
        handler = getattr(self, "cmd_" + verb, None) if verb.isalpha() else None
        if handler is None:
            return self._error(R_UNKNOWN)
        if verb in ("MAIL", "RCPT", "DATA") and self._buf and not self.esmtp \
                and self.local_uid < 0:
            return self._reject(R_PIPELINING)
        handler(arg.strip())

    def cmd_EHLO(self, arg, esmtp=True):
        if not arg:
            return self._error(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
        helo = "".join(c if " " < c != "\x7f" else "?" for c in arg.split()[0][:255])
        self.helo, self.esmtp, self.tx = helo, esmtp, None
        host = self.cfg.myhostname
        if not esmtp:
            return self._send(Reply(250, "", host))
        ext = [host, "PIPELINING"]
        ext.append(f"SIZE {self.cfg.message_size_limit}" if self.cfg.message_size_limit else "SIZE")
        if self.tls_available and not self.tls:
            ext.append("STARTTLS")
        if self.auth_verify is not None and self.tls and not self.auth_user:
            ext.append("AUTH PLAIN LOGIN")
        ext += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "CHUNKING", "SMTPUTF8"]
        self._send(Reply(250, "", "\n".join(ext)))

    def cmd_HELO(self, arg):
        self.cmd_EHLO(arg, esmtp=False)

    def cmd_NOOP(self, arg):
        self._send(R_OK)

    def cmd_RSET(self, arg):
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: RSET"))
        self._drop_chunks()
        self.tx = None
        self._send(R_OK)

    def cmd_QUIT(self, arg):
        self._send(R_BYE)
        self.close()

    def cmd_HELP(self, arg):
        self._send(Reply(214, "2.0.0", _HELP))

    def cmd_VRFY(self, arg):
        if not arg:
            return self._error(Reply(501, "5.5.4", "Syntax: VRFY address"))
        self._send(Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def cmd_EXPN(self, arg):
        if not self.cfg.smtpd_enable_expn or self.expand is None:
            return self._error(Reply(502, "5.5.1", "EXPN command not available"))
        if not arg:
            return self._error(Reply(501, "5.5.4", "Syntax: EXPN list"))
        members = self.expand(arg.strip("<>"))
        if not members:
            return self._error(Reply(550, "5.1.1", "No such list"))
        self._send(Reply(250, "2.1.5", "\n".join(f"<{m}>" for m in members)))

    def cmd_STARTTLS(self, arg):
        if not self.tls_available:
            return self._error(R_UNKNOWN)
        if self.tls:
            return self._error(Reply(503, "5.5.1", "Error: TLS already active"))
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        self.starttls_wanted = True

    def cmd_AUTH(self, arg):
        if self.auth_verify is None or not self.esmtp:
            return self._error(R_UNKNOWN if self.auth_verify is None else R_NEED_HELO)
        if not self.tls:
            return self._reject(Reply(538, "5.7.11", "Encryption required for requested authentication mechanism"))
        if self.auth_user:
            return self._error(Reply(503, "5.5.1", "Error: already authenticated"))
        if self.tx is not None:
            return self._error(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in sasl.MECHANISMS:
            return self._error(Reply(504, "5.5.4", "Unsupported authentication mechanism"))
        self._auth = sasl.Exchange(mech)
        self._auth_next(self._auth.start(initial.strip()))

    def _auth_step(self, raw):
        self._auth_next(self._auth.respond(raw.decode("ascii", "replace").strip()))

    def _auth_next(self, step):
        kind, value = step
        if kind is sasl.CHALLENGE:
            return self._send(Reply(334, "", value))
        mech, self._auth = self._auth.mech, None
        if kind is sasl.ERROR:
            return self._error(value)
        user, password, shown = value
        self._auth_check(user, password, mech, shown)

    def _auth_check(self, user, password, mech, shown=None):
        ok = user is not None and self.auth_verify(user, password)
        if ok:
            self.auth_user = user
            self._logi(f"{self.peer}: sasl_method={mech}, sasl_username={user}")
            return self._send(Reply(235, "2.7.0", "Authentication successful"))
        # The first line in Postfix's form, which fail2ban's postfix-sasl
        # filter knows; the user name tried goes on a line of its own.
        self.auth_failures += 1
        n, limit = self.auth_failures, self.cfg.smtpd_sasl_failure_limit
        self._logi(f"warning: {self.peer}: SASL {mech} authentication failed: "
                   "authentication failure")
        self._logi(f"{self.peer}: sasl_method={mech}, sasl_username={shown or user}: "
                   f"authentication failure {n} of {limit}")
        # Each failure waits longer for its reply (the server holds it).
        self.hold = n * self.cfg.smtpd_sasl_failure_delay
        if n >= limit and not self.closed:
            self._send(Reply(535, "5.7.8", "Error: authentication failed"))
            self._send(Reply(421, "4.7.0", f"{self.cfg.myhostname} Error: too many "
                             "authentication failures"))
            self._logi(f"too many authentication failures after AUTH from {self.peer}")
            return self.close()
        self._error(Reply(535, "5.7.8", "Error: authentication failed"))

    def cmd_MAIL(self, arg):
        if self.helo is None:
            return self._error(R_NEED_HELO)
        if self.tx is not None:
            return self._error(R_NESTED)
        if not arg[:5].upper() == "FROM:":
            return self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        if self.cfg.smtpd_tls_security_level == "encrypt" and not self.tls and self.local_uid < 0:
            return self._reject(R_TLS_FIRST)
        if self.submission and not self.auth_user:
            return self._reject(R_AUTH_FIRST)
        try:
            sender, rest = A.parse_path(arg[5:], allow_null=True,
                                        require_domain=self.local_uid < 0)
            params = A.parse_params(rest)
        except AddressError as e:
            return self._error(e.reply)
        if self.local_uid >= 0:
            # sendmail -bs: a bare name is qualified as on the command line.
            sender = A.qualify(sender, self.cfg.myorigin)
        if params and not self.esmtp:
            return self._error(Reply(555, "5.5.4", "MAIL parameters need EHLO"))
        for key, value in params.items():
            if key == "SIZE":
                if not (value or "").isdigit():
                    return self._error(Reply(501, "5.5.4", "Bad SIZE parameter"))
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return self._error(Reply(501, "5.5.4", "Unsupported BODY type"))
            elif key == "RET":
                if (value or "").upper() not in ("FULL", "HDRS"):
                    return self._error(Reply(501, "5.5.4", "Bad RET parameter"))
            elif key == "ENVID":
                # RFC 3461 4.4: printable US-ASCII once decoded; a CR or LF
                # (+0D+0A) would end up in a bounce as a header of its own.
                if not value or len(value) > 100 or \
                        not _PRINTABLE_ASCII.issuperset(A.xtext_decode(value)):
                    return self._error(Reply(501, "5.5.4", "Bad ENVID parameter syntax"))
            elif key == "AUTH":
                pass
            elif key == "SMTPUTF8":
                if value is not None:
                    return self._error(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            else:
                return self._error(Reply(555, "5.5.4", f"Unsupported option: {key}"))
        if not sender.isascii() and "SMTPUTF8" not in params:
            return self._error(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"))
        size = int(params.get("SIZE") or 0)
        limit = self.cfg.message_size_limit
        if limit and size > limit:
            return self._reject(R_TOO_BIG)
        if self.free_space is not None:
            try:
                free = self.free_space()
            except OSError:
                free = None
            if free is not None and free < size + self.cfg.queue_minfree:
                return self._reject(R_NOSPACE)
        self.tx = _Transaction(sender, params)
        self._send(Reply(250, "2.1.0", "Ok"))

    def _parse_rcpt(self, arg):
        m = _POSTMASTER_RE.match(arg)
        if m:
            return f"postmaster@{self.cfg.myhostname}", m.group(1).strip(), True
        addr, rest = A.parse_path(arg, require_domain=self.local_uid < 0)
        if self.local_uid >= 0:
            # sendmail -bs: a bare name is qualified as on the command line.
            addr = A.qualify(addr, self.cfg.myorigin)
        return addr, rest, A.local_of(addr).lower() == "postmaster" and \
            self.cfg.is_local_domain(A.domain_of(addr))

    def cmd_RCPT(self, arg):
        if self.tx is None:
            return self._error(R_NEED_MAIL)
        if not arg[:3].upper() == "TO:":
            return self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        try:
            addr, rest, postmaster = self._parse_rcpt(arg[3:])
            params = A.parse_params(rest)
        except AddressError as e:
            return self._error(e.reply)
        if params and not self.esmtp:
            return self._error(Reply(555, "5.5.4", "RCPT parameters need EHLO"))
        flags, orcpt = E.PRIMARY, ""
        for key, value in params.items():
            if key == "NOTIFY":
                words = (value or "").upper().split(",")
                if not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or \
                        ("NEVER" in words and len(words) > 1):
                    return self._error(Reply(501, "5.5.4", "Bad NOTIFY parameter"))
                flags += "".join(w[0] for w in words)
            elif key == "ORCPT":
                atype, semi, xtext = (value or "").partition(";")
                decoded = A.xtext_decode(xtext)
                if not semi or not atype or not xtext or len(value) > 500 or \
                        not A._KEYWORD.issuperset(atype) or not _orcpt_text(decoded):
                    return self._error(Reply(501, "5.5.4", "Bad ORCPT parameter syntax"))
                orcpt = f"{atype.lower()};{decoded}"
            else:
                return self._error(Reply(555, "5.5.4", f"Unsupported option: {key}"))
        if not addr.isascii() and "SMTPUTF8" not in self.tx.params:
            return self._error(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"))
        if len(self.tx.rcpts) >= self.cfg.smtpd_recipient_limit:
            return self._reject(R_TOO_MANY_RCPT, addr)
        if not postmaster:
            reply = rcpt_policy(self.cfg, addr, self.trusted or bool(self.auth_user),
                                self.recipient_check)
            if reply is not None:
                text = reply.text if reply.text.startswith("<") else f"<{addr}>: {reply.text}"
                return self._reject(Reply(reply.code, reply.enhanced, text), addr)
        self.tx.rcpts.append(E.Recipient(addr, flags=flags, orcpt=orcpt))
        self._send(Reply(250, "2.1.5", "Ok"))

    def cmd_DATA(self, arg):
        if self._chunks is not None:
            return self._error(Reply(503, "5.5.1", "Error: DATA after BDAT"))
        if self.tx is None:
            return self._error(R_NEED_MAIL if self.helo else R_NEED_HELO)
        if not self.tx.rcpts:
            return self._error(R_NEED_RCPT)
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: DATA"))
        try:
            writer = self.begin_message()
        except PymtaError as e:
            self._logi(f"warning: {self.peer}: cannot create queue file: {e}")
            return self._send(e.reply)
        except OSError as e:
            self._logi(f"warning: {self.peer}: cannot create queue file: {e}")
            return self._send(R_LOCAL_ERROR)
        self._data = self._receiver(DataReceiver, writer)
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))

    def _receiver(self, cls, writer):
        """A DataReceiver or ChunkReceiver for ``writer``, the Received line
        written first, the header section rewritten when _rewriter says."""
        cfg = self.cfg
        line_limit = cfg.line_length_limit if cfg.smtpd_long_line_action == "reject" else 0
        receiver = cls(writer, cfg.message_size_limit, line_limit, cfg.header_size_limit,
                       header_filter=self._header_filter(writer))
        try:
            writer.write(self._received_header(writer.id))
        except PymtaError as e:
            receiver.error = e.reply
        return receiver

    def _received_header(self, qid):
        if self.local_uid >= 0:
            origin = f"{self.helo} ({self.local_user or 'uid'}@localhost uid={self.local_uid})"
        else:
            origin = f"{self.helo} ({self.client_name} [{self.client_addr}])"
        rcpt = self.tx.rcpts[0].address if len(self.tx.rcpts) == 1 else ""
        return headers.received(qid, self.cfg.myhostname, self.cfg.mail_name, f"from {origin}",
                                self._proto(), rcpt, self.clock())

    # -- BDAT (RFC 3030): length-counted chunks, never a command inside one
    def cmd_BDAT(self, arg):
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or not words[0].isascii() or \
                len(words) == 2 and words[1].upper() != "LAST":
            # Without a size the data cannot be told from commands: no chunk.
            return self._error(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
        size, last = int(words[0]), len(words) == 2
        self._chunk_left = size
        self._chunk_reply = (None, last)
        refusal = None
        if self.helo is None:
            refusal = R_NEED_HELO
        elif self.tx is None:
            refusal = R_NEED_MAIL
        elif not self.tx.rcpts:
            refusal = R_NEED_RCPT
        if refusal is not None:
            # The chunk is read and dropped all the same (RFC 3030 4.1.1).
            self._chunk_reply = (refusal, last)
            return
        if self._chunks is None:
            try:
                writer = self.begin_message()
            except (PymtaError, OSError) as e:
                # The transaction cannot go on without its first chunk.
                self._logi(f"warning: {self.peer}: cannot create queue file: {e}")
                self._chunk_reply = (e.reply if isinstance(e, PymtaError) else R_LOCAL_ERROR, last)
                self.tx = None
                return
            self._chunks = self._receiver(ChunkReceiver, writer)

    def _chunk_step(self):
        """Read what is here of the current chunk; True once it is whole
        (and answered)."""
        n = min(self._chunk_left, len(self._buf))
        if n:
            part = bytes(self._buf[:n])
            del self._buf[:n]
            self._chunk_left -= n
            if self._chunks is not None and self._chunk_reply[0] is None:
                self._chunks.feed_chunk(part)
        if self._chunk_left:
            return False
        self._chunk_left = None
        refusal, last = self._chunk_reply
        self._chunk_reply = None
        if refusal is not None:
            if refusal.code >= 500:
                self._error(refusal)
            else:
                self._send(refusal)
            return True
        if not last:
            self._send(Reply(250, "2.0.0", f"Ok: {self._chunks.received} octets received"))
            return True
        rx, self._chunks = self._chunks, None
        rx.finish()
        self._finish_message(rx)
        return True

    def _drop_chunks(self):
        if self._chunks is not None:
            self._chunks.writer.abort()
            self._chunks = None

    def _finish_data(self):
        data, self._data = self._data, None
        self._finish_message(data)

    def _finish_message(self, data):
        tx, self.tx = self.tx, None
        writer = data.writer
        reply = None
        if data.bare:
            reply = R_BARE_EOL
        elif data.too_big:
            reply = R_TOO_BIG
        elif data.header_too_big:
            reply = Reply(552, "5.6.0", f"Headers too large ({data.header_limit} max)")
        elif data.error is not None:
            reply = data.error
        elif data.long_line:
            reply = R_LONG_LINE
        elif data.hops() + 1 > self.cfg.hopcount_limit:   # + the Received: added here
            reply = R_HOPS
        if reply is not None:
            writer.abort()
            self.last_command, self.tx = "END-OF-MESSAGE", tx
            self._reject(reply)
            self.tx = None
            return
        env = self._envelope(tx, data)
        tx.msgid = data.message_id() or self._added_msgid
        self._pending = (writer, env, tx)

    def _accepted(self, writer, env, tx, qid):
        (getattr(writer, "close", None) or writer.abort)()
        self.messages += 1
        relay = f"{self.client_name} [{self.client_addr}]" if self.local_uid < 0 else self.peer
        msgid = getattr(tx, "msgid", "")
        self._logi(f"{qid}: from=<{tx.sender}>, size={env.size}, nrcpts={len(tx.rcpts)}, "
                   + (f"msgid={msgid}, " if msgid else "")
                   + f"proto={env.protocol}, relay={relay}")
        self._send(Reply(250, "2.0.0", f"Ok: queued as {qid}"))
        if self.accepted is not None and self.accepted(qid) is False and self.cfg.in_flow_delay:
            # Deliveries fall behind (the hand-off is full): this client waits
            # in_flow_delay for the 250, as Postfix's smtpd waits for a token.
            self.hold = self.cfg.in_flow_delay

    def _envelope(self, tx, data):
        p = tx.params
        env = E.Envelope(sender=tx.sender, recipients=tx.rcpts, created=int(self.clock()))
        env.body_type = (p.get("BODY") or "").upper()
        env.smtputf8 = "SMTPUTF8" in p
        env.envid = A.xtext_decode(p["ENVID"]) if p.get("ENVID") else ""
        env.ret = (p.get("RET") or "").upper()
        env.protocol = self._proto(tx)
        env.helo = self.helo or ""
        if self.local_uid >= 0:
            env.uid = self.local_uid
        else:
            env.client_addr = self.client_addr
            env.client_name = self.client_name
        env.auth_user = self.auth_user
        env.trusted = bool(self.trusted or self.auth_user)
        rw = self._rewriter()
        if rw is not None:
            rw.envelope(env)
        return env

    _added_msgid = ""

    def _header_filter(self, writer):
        """What the header section goes through before it is stored: the
        canonical rewriting (pymta.rewrite), and for mail from a local -bs
        caller, mynetworks or an authenticated client a Date: and a
        Message-ID: added at its end when missing, as Postfix's cleanup does
        for the clients whose headers it fixes. None for anyone else's mail,
        which is stored as sent."""
        self._added_msgid = ""
        rw = self._rewriter()
        fix = self.local_uid >= 0 or self.trusted or bool(self.auth_user)
        if rw is None and not fix:
            return None
        from .smtpd_data import header_value, missing_fields
        host, limit = self.cfg.myhostname, self.cfg.header_size_limit

        def header_filter(head):
            if rw is not None:
                head = rw.header_section(head)
            # Only a whole header section (one that ended within the limit).
            if fix and head.endswith(b"\n") and len(head) <= limit:
                extra = missing_fields(head, host, getattr(writer, "id", "") or "")
                if extra:
                    self._added_msgid = header_value(extra, b"message-id")
                    head = extra + head if head == b"\n" else head + extra
            return head
        return header_filter

    def _rewriter(self):
        """The canonical rewriting of this session's mail (pymta.rewrite):
        for local submissions (-bs), mynetworks and authenticated clients,
        when configured; else None."""
        if not (self.local_uid >= 0 or self.trusted or self.auth_user):
            return None
        from . import rewrite
        if not rewrite.wanted(self.cfg):
            return None
        return rewrite.Rewriter(self.cfg, self.log)
