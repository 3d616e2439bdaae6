"""The envelope of a queued message: who sent it, to whom, and how it went.

The envelope decides delivery; the headers are payload. Each recipient keeps
its own state so that a recipient delivered once is never tried again.
"""

from .record import REQUIRED, Record
import time

# Recipient states, as written in the qf (see queue_file.py).
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
VIRTUAL_DONE = "v"   # the result of virtual_alias_maps: not looked up there again


class Recipient(Record):
    _fields = (
        ("address", REQUIRED),
        ("flags", PRIMARY),
        ("state", QUEUED),
        ("dsn", ""),                  # RFC 3463 status of the last attempt
        ("text", ""),                 # the last attempt's status text
        ("orcpt", ""),                # DSN ORCPT, as received ("rfc822;user@dom")
        ("parent", ""),               # the recipient it was expanded from
        ("via", ""),                  # |cmd or /file: the address whose alias/.forward named it
        ("uid", -1),                  # whose privileges a |cmd or /file runs with (-1: default_privs)
        ("relay", ""),                # host [ip] of the last attempt
        ("updated", 0),               # time of the last change of state
        ("extra", dict),              # unknown keys, kept on rewrite
    )

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


class Envelope(Record):
    _fields = (
        ("id", ""),
        ("sender", ""),               # "" is the null sender <>
        ("recipients", list),
        ("created", 0),               # T: arrival time
        ("last_attempt", 0),          # K
        ("attempts", 0),              # N
        ("next_try", 0),              # Y: not before this time
        ("priority", 0),              # P
        ("flags", ""),                # F: see queue_file.py
        ("body_type", ""),            # B: 7BIT / 8BITMIME / BINARYMIME
        ("smtputf8", False),
        ("envid", ""),                # DSN ENVID
        ("ret", ""),                  # DSN RET: FULL or HDRS
        ("protocol", ""),             # $r: SMTP, ESMTP[S][A], UTF8SMTP[S][A], local
        ("helo", ""),                 # $s: the client's HELO name
        ("client_addr", ""),          # the peer's IP
        ("client_name", ""),          # the peer's verified host name
        ("auth_user", ""),            # the SASL login, if any
        ("trusted", False),           # from mynetworks, an authenticated client or this host
        ("uid", -1),                  # the submitting user's uid (local submissions)
        ("size", 0),                  # bytes in the df
        ("df_length", -1),            # D: the df's length at the commit (-1: not recorded)
        ("df_crc", 0),                # D: its CRC-32 (zlib.crc32)
        ("df_boot", ""),              # D: the kernel's boot id when it was last known whole
        ("status", ""),               # M: the last status text, shown by mailq
        ("warned", False),            # a delay warning was sent
        ("held", False),              # on hold (the control file is hf<ID>)
        ("extra", list),              # unknown lines, kept on rewrite
    )

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
