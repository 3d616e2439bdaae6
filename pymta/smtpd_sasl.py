"""SMTP AUTH's mechanisms on the server side (RFC 4954): PLAIN (RFC 4616)
and LOGIN, their base64 and their grammar.

An :class:`Exchange` turns what the client sends into the next step:
``(CHALLENGE, text)`` (the 334 to send), ``(ERROR, Reply)`` (the exchange
is over, refused), or ``(CREDENTIALS, (user, password, shown))`` for the
session to verify (``user`` None: refused whatever the password, as a
PLAIN authorization identity other than the user; ``shown``: the name
for the log). What the session does around it (TLS first, the
failure delays and limit, the log lines fail2ban reads) is in
:mod:`pymta.smtpd_session`; the passwords are :mod:`pymta.auth`'s.
"""

import base64
import binascii

from .status import Reply

MECHANISMS = ("PLAIN", "LOGIN")
CHALLENGE, ERROR, CREDENTIALS = "challenge", "error", "credentials"

R_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
R_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
R_MALFORMED = Reply(501, "5.5.2", "Malformed PLAIN response")
_USERNAME, _PASSWORD = "VXNlcm5hbWU6", "UGFzc3dvcmQ6"    # "Username:", "Password:"


class Exchange:
    """One AUTH exchange with mechanism ``mech`` (one of MECHANISMS)."""

    def __init__(self, mech):
        self.mech = mech
        self.user = None     # LOGIN: the user name, once given

    def start(self, initial=""):
        """The first step, with the initial response of the AUTH command (if any)."""
        if initial:
            return self._answer(initial)
        return CHALLENGE, "" if self.mech == "PLAIN" else _USERNAME

    def respond(self, text):
        """The next step, after the client's line ``text``."""
        if text == "*":
            return ERROR, R_CANCELLED
        return self._answer(text)

    def _answer(self, text):
        try:
            value = base64.b64decode(text, validate=True).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            return ERROR, R_UNDECODABLE
        if self.mech == "PLAIN":
            parts = value.split("\0")
            if len(parts) != 3:
                return ERROR, R_MALFORMED
            authz, user, password = parts
            if authz and authz != user:
                return CREDENTIALS, (None, None, user)
            return CREDENTIALS, (user, password, user)
        if self.user is None:
            self.user = value
            return CHALLENGE, _PASSWORD
        return CREDENTIALS, (self.user, value, self.user)
