"""SMTP AUTH as a client (RFC 4954): credentials from smtp_sasl_password_maps,
PLAIN or LOGIN, only ever over TLS.

The password file has Postfix's plain-table syntax: ``key user:password``
lines, ``#`` comments, a line starting with white space continues the one
before. A ``hash:`` prefix names the same file (no .db is made or read).
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
import os
import stat

from .status import Reply


class PasswordError(Exception):
    """The password file cannot be used; the text says why."""


def _path(item):
    for prefix in ("hash:", "texthash:"):
        if item.startswith(prefix):
            return item[len(prefix):]
    if ":" in item.split("/", 1)[0]:
        raise PasswordError(f"smtp_sasl_password_maps: unsupported table type {item.split(':', 1)[0]!r} "
                            "(a plain file, or hash: naming the same file)")
    return item


def _read(path):
    """The file's text, opened without following a symlink; refused when
    users other than the owner and group may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise PasswordError(f"cannot open smtp_sasl_password_maps file {path}: "
                            f"{e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PasswordError(f"smtp_sasl_password_maps file {path} is not a regular file")
        if st.st_mode & 0o004:
            raise PasswordError(f"smtp_sasl_password_maps file {path} is readable by every user "
                                f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0600")
        data = f.read(1 << 20)
    return data.decode("utf-8", "replace")


def parse(text):
    """{key (lowercased): (user, password)} from the table text."""
    entries = {}
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and lines:
            lines[-1] += " " + line.strip()
            continue
        lines.append(line.strip())
    for line in lines:
        key, _, value = line.partition(" ")
        if "\t" in key:
            key, _, more = key.partition("\t")
            value = more + " " + value
        value = value.strip()
        user, sep, password = value.partition(":")
        if not key or not sep:
            continue
        entries.setdefault(key.lower(), (user, password))
    return entries


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
    keys = keys_for(cfg, domain, host)
    for item in cfg.smtp_sasl_password_maps:
        table = parse(_read(_path(item)))
        for key in keys:
            if key in table:
                return table[key]
    return None


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
