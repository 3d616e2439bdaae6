"""The control file (qf): its format, its parser, and the -q selection.

The control file is UTF-8 text, one item a line, a letter then its value::

    V1                 format version, always first
    T<epoch>           arrival time
    K<epoch>           last delivery attempt (0: none)
    N<count>           delivery attempts
    Y<epoch>           next attempt not before this time
    P<priority>        lower is delivered first
    D<length> <crc> <boot id>
                       the df as committed: its length in bytes, its CRC-32
                       (8 hex digits) and the kernel's boot id at the commit
                       (or when the df was last found whole): see
                       pymta.queue_commit; absent in older control files
    F<letters>         w: delay warning sent; u: SMTPUTF8; t: submitted by a
                       trusted client (mynetworks, AUTH) or made here (DKIM)
    B<body>            7BIT, 8BITMIME or BINARYMIME
    Z<envid>           DSN ENVID
    C<uid>             the submitting user's uid, local submissions only
    $r<proto>          SMTP, ESMTP[S][A], UTF8SMTP[S][A], or local
    $s<helo>           the client's HELO/EHLO name
    ${client_addr}...  the client's IP; ${client_name} its verified name;
    ${auth_authen}...  the SASL login; ${dsn_ret} DSN RET (FULL or HDRS)
    S<sender>          envelope sender; empty for the null sender <>
    R<flags> <state> <address> [key=value ...]
                       one line a recipient; flags S F D N (DSN NOTIFY),
                       p (named by the client), a (from an alias, .forward or
                       :include:), n (no further aliasing), v (a result
                       of virtual_alias_maps, not looked up again); state
                       Q queued, D deferred, S sent, F failed, B bounced,
                       X expanded; keys dsn, text, orcpt, parent, via (a
                       |cmd's or /file's naming address), uid, relay, time
    M<text>            last status, shown by mailq
    .                  end: a file without it is torn and never used

Values are percent-encoded where they hold '%', control characters or (in
R lines) spaces. Lines with unknown letters are kept on rewrite.

An Envelope becomes this text by format_control() and comes back by
parse_control(), which refuses a torn or damaged file with SpoolCorrupt
(never a crash of whoever reads it: the queue runner quarantines it,
mailq lists it as unreadable). matches() is sendmail's -qI/-qR/-qS/-qQ
selection on a parsed control file, the one the queue runner, -Q, mailq
and pymta's queue commands use. pymta-spool(5) is the reference for users.
"""

from . import envelope as E
from .status import SpoolCorrupt

VERSION = "1"

# Percent-encoding of qf values (what urllib.parse.quote does with these safe
# sets): '%', controls, non-ASCII, and in R fields spaces. No regular
# expressions: sendmail imports this module, and re costs its start-up.
_HEX = frozenset("0123456789ABCDEFabcdef")


def _enc(value, space=True):
    """Percent-encode what is not printable ASCII, '%', and spaces unless
    ``space``."""
    if value.isascii() and value.isprintable() and "%" not in value and (space or " " not in value):
        return value
    out = []
    for c in value:
        if "!" <= c <= "~" and c != "%" or c == " " and space:
            out.append(c)
        else:
            out.append("".join("%%%02X" % b for b in c.encode("utf-8", "surrogateescape")))
    return "".join(out)


def _dec(value):
    if "%" not in value:
        return value
    out, run, i, n = [], bytearray(), 0, len(value)
    while i < n:
        c = value[i]
        if c == "%" and i + 2 < n and value[i + 1] in _HEX and value[i + 2] in _HEX:
            run.append(int(value[i + 1:i + 3], 16))
            i += 3
            continue
        if run:     # a run of %XX is one UTF-8 sequence (or several)
            out.append(run.decode("utf-8", "surrogateescape"))
            run = bytearray()
        out.append(c)
        i += 1
    if run:
        out.append(run.decode("utf-8", "surrogateescape"))
    return "".join(out)


def format_control(env):
    """The qf text of an Envelope."""
    out = [f"V{VERSION}", f"T{env.created}", f"K{env.last_attempt}", f"N{env.attempts}",
           f"Y{env.next_try}", f"P{env.priority}"]
    if env.df_length >= 0:
        out.append(f"D{env.df_length} {env.df_crc:08x} {_enc(env.df_boot, space=False)}")
    flags = ("w" if env.warned else "") + ("u" if env.smtputf8 else "") + \
        ("t" if env.trusted else "")
    if flags:
        out.append(f"F{flags}")
    if env.body_type:
        out.append(f"B{env.body_type}")
    if env.envid:
        out.append(f"Z{_enc(env.envid)}")
    if env.uid >= 0:
        out.append(f"C{env.uid}")
    if env.protocol:
        out.append(f"$r{_enc(env.protocol)}")
    if env.helo:
        out.append(f"$s{_enc(env.helo)}")
    for key, val in (("client_addr", env.client_addr), ("client_name", env.client_name),
                     ("auth_authen", env.auth_user), ("dsn_ret", env.ret)):
        if val:
            out.append(f"${{{key}}}{_enc(val)}")
    out.extend(env.extra)
    out.append(f"S{_enc(env.sender)}")
    for r in env.recipients:
        fields = [f"R{r.flags or '-'}", r.state, _enc(r.address, space=False)]
        for key, val in (("dsn", r.dsn), ("text", r.text), ("orcpt", r.orcpt),
                         ("parent", r.parent), ("via", r.via), ("relay", r.relay)):
            if val:
                fields.append(f"{key}={_enc(val, space=False)}")
        if r.uid >= 0:
            fields.append(f"uid={r.uid}")
        if r.updated:
            fields.append(f"time={r.updated}")
        for key, val in r.extra.items():
            fields.append(f"{key}={_enc(val, space=False)}")
        out.append(" ".join(fields))
    if env.status:
        out.append(f"M{_enc(env.status)}")
    out.append(".")
    return "\n".join(out) + "\n"


TIME_MAX = 253402300799            # 9999-12-31 23:59:59 UTC: what time and date functions take
_RANGES = {"arrival time": (0, TIME_MAX), "attempt time": (0, TIME_MAX),
           "next try": (0, TIME_MAX), "recipient time": (0, TIME_MAX),
           "attempt count": (0, 10 ** 9), "priority": (-(2 ** 62), 2 ** 62),
           "uid": (-1, 2 ** 32 - 1), "recipient uid": (-1, 2 ** 32 - 1),
           "data file length": (0, 2 ** 62)}


def _int(value, what):
    """A decimal field of a qf, range-checked: a value out of range is a
    damaged file (SpoolCorrupt), never a crash of whoever reads it."""
    if not (value[1:] if value[:1] == "-" else value).isdigit() or not value.isascii() \
            or len(value) > 20:
        raise SpoolCorrupt(f"bad {what}: {value[:40]!r}")
    n = int(value)
    lo, hi = _RANGES.get(what, (-(2 ** 63), 2 ** 63 - 1))
    if not lo <= n <= hi:
        raise SpoolCorrupt(f"{what} out of range: {value[:40]}")
    return n


def parse_control(text, qid=""):
    """An Envelope from qf text; raises SpoolCorrupt if torn or malformed."""
    if not text.endswith("\n.\n"):
        raise SpoolCorrupt("control file has no final '.' line (torn)")
    lines = text[:-1].split("\n")
    if lines[0] != f"V{VERSION}":
        raise SpoolCorrupt(f"unknown control file version {lines[0][:20]!r}")
    env = E.Envelope(id=qid)
    seen_sender = False
    for line in lines[1:-1]:
        if not line:
            raise SpoolCorrupt("empty line in control file")
        k, v = line[0], line[1:]
        if k == "T":
            env.created = _int(v, "arrival time")
        elif k == "K":
            env.last_attempt = _int(v, "attempt time")
        elif k == "N":
            env.attempts = _int(v, "attempt count")
        elif k == "Y":
            env.next_try = _int(v, "next try")
        elif k == "P":
            env.priority = _int(v, "priority")
        elif k == "D":
            _parse_data_check(env, v)
        elif k == "F":
            env.warned = "w" in v
            env.smtputf8 = "u" in v
            env.trusted = "t" in v
        elif k == "B":
            env.body_type = v
        elif k == "Z":
            env.envid = _dec(v)
        elif k == "C":
            env.uid = _int(v, "uid")
        elif k == "$":
            if v.startswith("{"):
                key, _, val = v[1:].partition("}")
                val = _dec(val)
                if key == "client_addr":
                    env.client_addr = val
                elif key == "client_name":
                    env.client_name = val
                elif key == "auth_authen":
                    env.auth_user = val
                elif key == "dsn_ret":
                    env.ret = val
                else:
                    env.extra.append(line)
            elif v[:1] == "r":
                env.protocol = _dec(v[1:])
            elif v[:1] == "s":
                env.helo = _dec(v[1:])
            else:
                env.extra.append(line)
        elif k == "S":
            env.sender = _dec(v)
            seen_sender = True
        elif k == "R":
            env.recipients.append(_parse_rcpt(v))
        elif k == "M":
            env.status = _dec(v)
        else:
            env.extra.append(line)
    if not seen_sender:
        raise SpoolCorrupt("control file has no sender (S) line")
    if not env.recipients:
        raise SpoolCorrupt("control file has no recipient (R) line")
    return env


def _parse_data_check(env, v):
    parts = v.split(" ")
    crc = parts[1] if len(parts) == 3 else ""
    if len(crc) != 8 or not all(c in _HEX for c in crc):
        raise SpoolCorrupt(f"bad data file check D{v[:60]!r}")
    env.df_length = _int(parts[0], "data file length")
    env.df_crc = int(crc, 16)
    env.df_boot = _dec(parts[2])


def _parse_rcpt(v):
    parts = v.split(" ")
    if len(parts) < 3:
        raise SpoolCorrupt(f"bad recipient line R{v[:60]!r}")
    flags, state, addr = parts[0], parts[1], _dec(parts[2])
    if state not in "QDSFBX" or len(state) != 1:
        raise SpoolCorrupt(f"bad recipient state {state!r}")
    r = E.Recipient(addr, flags="" if flags == "-" else flags, state=state)
    for kv in parts[3:]:
        key, eq, val = kv.partition("=")
        if not eq:
            raise SpoolCorrupt(f"bad recipient field {kv[:40]!r}")
        val = _dec(val)
        if key in ("dsn", "text", "orcpt", "parent", "via", "relay"):
            setattr(r, key, val)
        elif key == "uid":
            r.uid = _int(val, "recipient uid")
        elif key == "time":
            r.updated = _int(val, "recipient time")
        else:
            r.extra[key] = val
    return r


# -- selection ---------------------------------------------------------------

def _contains(hay, needle):
    return needle.lower() in hay.lower()


def matches(qid, env, filters):
    """sendmail's -qI/-qR/-qS/-qQ[!]substring selection.

    ``filters`` are (kind, substring, negated) triples. Filters of one kind
    are alternatives (any may match); kinds combine with AND. I compares the
    id (case-sensitive); S the sender and R any recipient not yet delivered
    (case-insensitive); Q selects held messages whose reason contains the
    substring (empty: every held message). ``!`` negates one filter. A
    message whose control file cannot be read (``env`` None) matches I
    filters only.
    """
    by_kind = {}
    for kind, sub, neg in filters:
        by_kind.setdefault(kind, []).append((sub, neg))
    for kind, items in by_kind.items():
        ok = False
        for sub, neg in items:
            if kind == "I":
                hit = sub in qid
            elif env is None:
                return False
            elif kind == "S":
                hit = _contains(env.sender, sub)
            elif kind == "R":
                hit = any(_contains(r.address, sub) for r in env.recipients if not r.done)
            elif kind == "Q":
                hit = env.held and _contains(env.status, sub)
            else:
                hit = False
            if hit != neg:
                ok = True
                break
        if not ok:
            return False
    return True
