"""SMTP AUTH as a client (RFC 4954): credentials from smtp_sasl_password_maps,
PLAIN or LOGIN, only ever over TLS.

The password file is a table (pymta-tables(5), read by
:mod:`pymta.maptable`): ``key user:password`` lines; a ``hash:`` prefix
names the same file (no .db is made or read).
Keys are looked up as Postfix does: the next hop as written in relayhost
(``[smtp.example.com]:587``), then the server's host name; without a
relayhost the recipient domain, then the MX host name. Case does not matter.

Who reads it: remote delivery runs in the daemon's master process (root)
and its delivery children, or in a ``sendmail -q`` / ``-odi`` run by root;
the file is opened there, when a server offers AUTH, never by the
unprivileged listener (mail_owner), which neither delivers nor needs it.
Install it root-owned, mode 0600: a file that other users may read is
refused (the message is deferred with 4.7.0 and the log says why), and so
is a symlink.
"""

import base64

from . import maptable
from .status import Reply
from .status import TableError as PasswordError   # the name callers use


def keys_for(cfg, domain, host):
    """The lookup keys, in order, for server ``host`` of next hop ``domain``."""
    first = cfg.relayhost or domain
    out = [first.strip().lower()]
    name = host.strip().lower()
    if name not in out:
        out.append(name)
    return out


def credentials(cfg, domain, host):
    """(user, password) for this server, or None when there are none.
    Raises PasswordError when a file cannot be used."""
    found = maptable.lookup(cfg.smtp_sasl_password_maps, "smtp_sasl_password_maps",
                            keys_for(cfg, domain, host), secret=True)
    if found is None:
        return None
    user, sep, password = found[1].partition(":")
    if not sep:
        raise PasswordError(f"smtp_sasl_password_maps: the entry for {host} is not user:password")
    return user, password


def mechanisms(smtp):
    """The mechanisms the server offered, upper-cased."""
    return smtp.esmtp_features.get("auth", "").upper().split()


def login(smtp, creds, where):
    """AUTH PLAIN (else LOGIN) on the smtplib session ``smtp``; None on
    success, else a Reply deferring the message (with the server's reply)."""
    user, password = creds
    offered = mechanisms(smtp)
    mech = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
    if mech is None:
        return Reply(454, "4.7.0", f"SASL authentication failed; cannot authenticate to server "
                                   f"{where}: no mechanism available (offered: "
                                   f"{' '.join(offered) or 'none'}; pymta has PLAIN and LOGIN)")
    if mech == "PLAIN":
        token = base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode("ascii")
        steps = [f"AUTH PLAIN {token}"]
    else:
        steps = ["AUTH LOGIN",
                 base64.b64encode(user.encode("utf-8")).decode("ascii"),
                 base64.b64encode(password.encode("utf-8")).decode("ascii")]
    level = smtp.debuglevel
    smtp.set_debuglevel(0)              # -v shows the dialogue: never the password
    try:
        for i, line in enumerate(steps):
            smtp.send((line + "\r\n").encode("ascii"))
            code, msg = smtp.getreply()
            if code == 334 and i < len(steps) - 1:
                continue
            break
    finally:
        smtp.set_debuglevel(level)
    if code == 235:
        return None
    if code == 334:                      # more challenges than the mechanism has
        smtp.send(b"*\r\n")
        code, msg = smtp.getreply()
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    text = " ".join(text.split())
    # The server's reply first: mailq shows the first 60 characters.
    return Reply(454, "4.7.0" if code < 500 else "4.7.8",
                 f"SASL login refused: {code} {text} (by {where})")
