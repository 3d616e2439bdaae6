"""Address rewriting: canonical maps and masquerading (pymta-tables(5)).

Postfix's cleanup(8) rules, for the mail pymta rewrites (local
submissions, sendmail -bs, and SMTP clients in mynetworks or
authenticated): a sender address goes through ``sender_canonical_maps``
then ``canonical_maps`` then masquerading; a recipient through
``recipient_canonical_maps`` then ``canonical_maps`` (envelope recipients
are not masqueraded, header recipients are, as Postfix's default
``masquerade_classes``). Both the envelope and the header addresses are
rewritten; a header is changed only where one of its addresses changes,
the rest of its text (names, comments, folding) kept as it was.

``smtp_generic_maps`` (mail leaving by SMTP) uses the same header code
from pymta.remote.
"""

import email.utils
import re

from . import address, tables

SENDER_HEADERS = frozenset({
    "from", "sender", "reply-to", "errors-to", "return-receipt-to", "resent-from",
    "resent-sender", "resent-reply-to", "disposition-notification-to"})
RECIPIENT_HEADERS = frozenset({
    "to", "cc", "bcc", "apparently-to", "resent-to", "resent-cc", "resent-bcc"})
_PARAMS = ("canonical_maps", "sender_canonical_maps", "recipient_canonical_maps",
           "masquerade_domains")


def wanted(cfg):
    """Whether any canonical rewriting or masquerading is configured."""
    return any(getattr(cfg, p) for p in _PARAMS)


def masquerade(cfg, addr):
    """``user@host.example.com`` -> ``user@example.com`` per masquerade_domains
    (first entry that matches wins; ``!domain`` stops it), except the local
    parts of masquerade_exceptions."""
    if not addr or "@" not in addr or not cfg.masquerade_domains:
        return addr
    local, domain = address.split(addr)
    if local.lower() in (x.lower() for x in cfg.masquerade_exceptions):
        return addr
    d = domain.lower().rstrip(".")
    for entry in cfg.masquerade_domains:
        entry = entry.lower().rstrip(".")
        if entry.startswith("!"):
            if d == entry[1:] or d.endswith("." + entry[1:]):
                return addr
            continue
        if d.endswith("." + entry):
            return f"{local}@{entry}"
    return addr


class Rewriter:
    """Canonical rewriting and masquerading for one configuration."""

    def __init__(self, cfg, log=None):
        self.cfg = cfg
        self.sender_maps = [m for m in (tables.maps(cfg, "sender_canonical_maps", log),
                                        tables.maps(cfg, "canonical_maps", log)) if m]
        self.recipient_maps = [m for m in (tables.maps(cfg, "recipient_canonical_maps", log),
                                           tables.maps(cfg, "canonical_maps", log)) if m]

    def _through(self, maps, addr):
        for m in maps:
            new = tables.rewrite(self.cfg, m, addr)
            if new is not None:
                addr = new
        return addr

    def sender(self, addr):
        if not addr:
            return addr
        return masquerade(self.cfg, self._through(self.sender_maps, addr))

    def recipient(self, addr):
        return self._through(self.recipient_maps, addr) if addr else addr

    def header_recipient(self, addr):
        return masquerade(self.cfg, self.recipient(addr))

    def envelope(self, env):
        """Rewrite an Envelope's sender and recipients in place; a rewritten
        recipient keeps its original address as ORCPT."""
        env.sender = self.sender(env.sender)
        for r in env.recipients:
            new = self.recipient(r.address)
            if new != r.address:
                if not r.orcpt:
                    r.orcpt = f"rfc822;{r.address}"
                r.address = new

    def header_field(self, field):
        """One header field (bytes, with its folding and final newline),
        with its addresses rewritten; the same object when nothing changes."""
        name = field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if name in SENDER_HEADERS:
            func = self.sender
        elif name in RECIPIENT_HEADERS:
            func = self.header_recipient
        else:
            return field
        return rewrite_field(field, func)

    def header_section(self, data):
        """A whole header section (bytes, LF line ends), rewritten."""
        return rewrite_section(data, self.header_field)


def split_fields(data):
    """The fields of a header section: each with its continuation lines."""
    fields = []
    for line in data.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def rewrite_section(data, field_func):
    fields = split_fields(data)
    out = [field_func(f) for f in fields]
    if all(a is b for a, b in zip(out, fields)):
        return data
    return b"".join(out)


def rewrite_field(field, func):
    """Apply ``func`` to each address of an address-list field; only the
    addr-spec text of changed addresses is replaced."""
    head, colon, raw = field.partition(b":")
    if not colon:
        return field
    text = raw.decode("utf-8", "surrogateescape")
    unfolded = re.sub(r"\r?\n[ \t]", " ", text)
    changed = {}
    for _, addr in email.utils.getaddresses([unfolded]):
        if not addr or addr in changed:
            continue
        new = func(addr)
        if new and new != addr:
            changed[addr] = new
    if not changed:
        return field
    for old, new in changed.items():
        text = _replace_addr(text, old, new)
    return head + colon + text.encode("utf-8", "surrogateescape")


def _replace_addr(text, old, new):
    """``old`` replaced by ``new`` where it stands as an address (not inside
    a quoted string, not part of a longer word)."""
    out = []
    pat = re.compile(r"(?<![\w.+\-=@])" + re.escape(old) + r"(?![\w.\-@])")
    # Walk the text outside double quotes only.
    pieces = re.split(r'("(?:[^"\\]|\\.)*")', text)
    for piece in pieces:
        if piece.startswith('"') and piece.endswith('"') and len(piece) >= 2:
            out.append(piece)
        else:
            out.append(pat.sub(lambda m: new, piece))
    return "".join(out)


def generic(cfg, log=None):
    """The smtp_generic_maps rewriting of one address (a function), or None
    when no table is set."""
    maps = tables.maps(cfg, "smtp_generic_maps", log)
    if not maps:
        return None

    def func(addr):
        if not addr:
            return addr
        return tables.rewrite(cfg, maps, addr) or addr
    return func


class HeaderRewritingReader:
    """A df opened for reading, its header section (up to ``limit`` bytes)
    passed through ``field_func`` field by field; the body as it is."""

    def __init__(self, f, field_func, limit):
        head = bytearray()
        while len(head) <= limit:
            line = f.readline(limit + 1)
            if not line:
                break
            head += line
            if line == b"\n":
                break
        self.head = rewrite_section(bytes(head), field_func)
        self.f = f

    def read(self, size=-1):
        if self.head:
            data, self.head = self.head, b""
            return data
        return self.f.read(size)


def generic_field(func):
    """A field function applying ``func`` to the addresses of every sender
    and recipient header (smtp_generic_maps rewrites them all)."""
    def field_func(field):
        name = field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        if name in SENDER_HEADERS or name in RECIPIENT_HEADERS:
            return rewrite_field(field, func)
        return field
    return field_func
