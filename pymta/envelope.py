"""The envelope of a queued message: who sent it, to whom, and how it went.

The envelope decides delivery; the headers are payload. Each recipient keeps
its own state so that a recipient delivered once is never tried again.
"""

from dataclasses import dataclass, field
import time

# Recipient states, as written in the qf (see spool.py).
QUEUED = "Q"      # not yet tried
DEFERRED = "D"    # tried, temporary failure; tried again later
SENT = "S"        # delivered (or handed to the next MTA)
FAILED = "F"      # permanent failure, the bounce is still to be sent
BOUNCED = "B"     # permanent failure, the sender has been told (or needn't be)
EXPANDED = "X"    # an alias/list/.forward replaced by the recipients after it

DONE_STATES = frozenset({SENT, BOUNCED, EXPANDED})
PENDING_STATES = frozenset({QUEUED, DEFERRED})

# Recipient flags.
NOTIFY_SUCCESS = "S"
NOTIFY_FAILURE = "F"
NOTIFY_DELAY = "D"
NOTIFY_NEVER = "N"
FROM_ALIAS = "a"     # produced by aliases/.forward/:include:, so |cmd and /file are allowed
PRIMARY = "p"        # named by the client (SMTP RCPT, command line, -t header)
NO_ALIAS = "n"       # \user: deliver to the user, no further aliasing


@dataclass
class Recipient:
    address: str
    flags: str = PRIMARY
    state: str = QUEUED
    dsn: str = ""          # RFC 3463 status of the last attempt
    text: str = ""         # the last attempt's status text
    orcpt: str = ""        # DSN ORCPT, as received ("rfc822;user@dom")
    parent: str = ""       # the recipient it was expanded from
    uid: int = -1          # whose privileges a |cmd or /file runs with (-1: default_privs)
    relay: str = ""        # host [ip] of the last attempt
    updated: int = 0       # time of the last change of state
    extra: dict = field(default_factory=dict)  # unknown keys, kept on rewrite

    @property
    def pending(self):
        return self.state in PENDING_STATES

    @property
    def done(self):
        return self.state in DONE_STATES

    def notify(self, what):
        """Whether DSN NOTIFY asks for ``what`` (S, F or D); RFC 3461 defaults."""
        if NOTIFY_NEVER in self.flags:
            return False
        has_any = any(f in self.flags for f in "SFD")
        if not has_any:
            return what in ("F", "D")
        return what in self.flags

    def set_state(self, state, dsn="", text="", relay="", now=None):
        self.state, self.dsn, self.text = state, dsn, text
        if relay:
            self.relay = relay
        self.updated = int(now if now is not None else time.time())


@dataclass
class Envelope:
    id: str = ""
    sender: str = ""                 # "" is the null sender <>
    recipients: list = field(default_factory=list)
    created: int = 0                 # T: arrival time
    last_attempt: int = 0            # K
    attempts: int = 0                # N
    next_try: int = 0                # Y: not before this time
    priority: int = 0                # P
    flags: str = ""                  # F: see spool.py
    body_type: str = ""              # B: 7BIT / 8BITMIME / BINARYMIME
    smtputf8: bool = False
    envid: str = ""                  # DSN ENVID
    ret: str = ""                    # DSN RET: FULL or HDRS
    protocol: str = ""               # $r: SMTP, ESMTP, ESMTPS, ESMTPA, local
    helo: str = ""                   # $s: the client's HELO name
    client_addr: str = ""            # the peer's IP
    client_name: str = ""            # the peer's verified host name
    auth_user: str = ""              # the SASL login, if any
    uid: int = -1                    # the submitting user's uid (local submissions)
    size: int = 0                    # bytes in the df
    status: str = ""                 # M: the last status text, shown by mailq
    warned: bool = False             # a delay warning was sent
    held: bool = False               # on hold (the control file is hf<ID>)
    extra: list = field(default_factory=list)   # unknown lines, kept on rewrite

    def add_recipient(self, address, **kw):
        r = Recipient(address, **kw)
        self.recipients.append(r)
        return r

    @property
    def pending(self):
        return [r for r in self.recipients if r.pending]

    @property
    def done(self):
        return all(r.done for r in self.recipients)

    @property
    def is_bounce(self):
        return self.sender == ""
