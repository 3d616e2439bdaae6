"""transport_maps: where a recipient domain's mail goes, Postfix's transport(5)
in a plain file.

The files are lookup tables (pymta-tables(5): ``hash:``, ``texthash:`` or a
bare path, read again when changed), each entry ``pattern  transport:nexthop``.
Patterns, most specific first:

- ``example.com``: that domain;
- ``.example.com``: its subdomains (``a.example.com``, ``b.a.example.com``);
- ``*``: every other remote domain (never a local one: local mail stays local).

Transports:

- ``smtp:[host]:port``, ``smtp:[host]``, ``smtp:host`` (MX lookup of host),
  ``smtp:host:port``; ``smtp:`` alone is the recipient domain's own MX, even
  with a relayhost (``relay`` and ``esmtp`` are the same);
- ``local:`` delivers the local part here as a local name (aliases, users);
- ``error:text`` fails the recipient with 550 5.1.0 and the text.

A map entry overrides relayhost, as in Postfix.
"""

from . import config as C
from . import tables
from .status import Reply, TableError

SMTP_KINDS = ("smtp", "relay", "esmtp")
KINDS = SMTP_KINDS + ("local", "error")


class TransportMap:
    """transport_maps through pymta.tables: read when first used and again
    when a file changes; a malformed value is logged and not used."""

    def __init__(self, cfg, log=None):
        self.log = log
        try:
            self.maps = tables.maps(cfg, "transport_maps", log)
        except TableError as e:
            if log:
                log.error(f"transport_maps: {e}; no entry is used")
            self.maps = tables.Maps([])
        self._bad = set()

    @classmethod
    def from_config(cls, cfg, log=None):
        return cls(cfg, log)

    def _get(self, key):
        raw = self.maps.get(key)
        if raw is None:
            return None
        value = parse_value(raw)
        if value is None and (key, raw) not in self._bad:
            self._bad.add((key, raw))
            if self.log:
                self.log.error(f"transport_maps: the entry of {key!r} is not transport:nexthop; "
                               "ignored")
        return value

    def lookup(self, domain, local=False):
        """(kind, nexthop) for ``domain``, or None. ``local``: the domain is
        one of mydestination (then ``*`` does not apply)."""
        if not self.maps:
            return None
        domain = domain.lower().rstrip(".")
        hit = self._get(domain)
        if hit is not None:
            return hit
        labels = domain.split(".")
        for i in range(1, len(labels)):
            hit = self._get("." + ".".join(labels[i:]))
            if hit is not None:
                return hit
        if not local:
            return self._get("*")
        return None


def parse_value(text):
    """'smtp:[host]:port' -> ('smtp', '[host]:port'); None when malformed."""
    kind, sep, nexthop = text.partition(":")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        return None
    if kind in SMTP_KINDS:
        if any(c.isspace() for c in nexthop):
            return None
        if nexthop:
            try:
                C.parse_hostport(nexthop, 25)
            except ValueError:
                return None
        return ("smtp", nexthop)
    return (kind, nexthop)


def error_reply(nexthop):
    return Reply(550, "5.1.0", nexthop or "mail for this domain is not accepted")
