"""Outbound TLS policy: what a delivery asks of the next server's TLS.

``smtp_tls_security_level`` has Postfix's meanings (see pymta.conf(5)):

- none: no TLS.
- may: STARTTLS when offered, the certificate not checked; a failed
  handshake is tried again in plain text on the same server.
- encrypt: TLS required (4.7.4 when not offered), the certificate not
  checked.
- verify: TLS required; the certificate must chain to a trusted CA
  (``smtp_tls_CAfile``, else the system store) and name the server: the
  MX host name, or the relayhost's name (its address for an address
  literal).
- secure: as verify, but the certificate must name the next-hop domain
  (the recipient domain, or the relayhost's name) or a name under it: a
  name learnt from an unsigned MX record proves nothing.
- dane: see :mod:`pymta.dane`; without usable TLSA records, as may.

:class:`Plan` combines the level with DANE and MTA-STS for one next hop.

A certificate refused at verify and above defers the message (4.7.5):
nothing has been sent but EHLO and STARTTLS, and nothing is sent in plain
text instead. Names are matched here, not by OpenSSL's check_hostname,
because secure accepts a set of names: SAN dNSName entries (the subject CN
only when there is none), a wildcard only as a whole leftmost label.
"""

import ipaddress
import os
import ssl
import threading
import time

from . import maptable
from .status import ConfigError, TableError

VERIFYING = ("verify", "secure")


class Policy:
    """The TLS a session must have with one server.

    ``level``: none, may, encrypt, verify, secure, or ``dane`` when TLSA
    records authenticate the server (``tlsa``: (usage, selector, mtype,
    data) tuples); ``names``: (name, suffix) pairs a certificate may match at
    verify and secure, ``suffix`` meaning any name under ``name``;
    ``why``: what set the level, for messages."""

    __slots__ = ("level", "names", "tlsa", "why")

    def __init__(self, level, names=(), tlsa=(), why="smtp_tls_security_level"):
        self.level, self.names, self.tlsa, self.why = level, tuple(names), tuple(tlsa), why

    @property
    def required(self):
        """TLS is mandatory (no plain text, no fall-back)."""
        return self.level not in ("none", "may")

    @property
    def verifies(self):
        return self.level in VERIFYING

    def __repr__(self):
        return f"Policy({self.level!r}, names={self.names!r}, tlsa={len(self.tlsa)}, why={self.why!r})"


def _bare(host):
    """'[192.0.2.1]' -> '192.0.2.1', '[IPv6:::1]' -> '::1', names lowercased."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
    return host.lower().rstrip(".")


def static_policy(cfg, nexthop, host, level=None, match=None, why="smtp_tls_security_level"):
    """The Policy from smtp_tls_security_level (or ``level``) for server
    ``host`` (its name, or an address literal) of next hop ``nexthop`` (the
    recipient domain, or the relayhost's host part). ``match``: the names
    a certificate may match at verify and secure, in the syntax of
    smtp_tls_policy_maps' match attribute (default: hostname at verify,
    nexthop:dot-nexthop at secure)."""
    level = level or cfg.smtp_tls_security_level
    if cfg.smtp_tls_wrappermode and level in ("none", "may"):
        level = "encrypt"
    if level not in VERIFYING:
        return Policy(level, (), why=why)
    if match is None:
        match = "hostname" if level == "verify" else "nexthop:dot-nexthop"
    names = []
    for token in match.lower().split(":"):
        if token == "hostname":
            names.append((_bare(host), False))
        elif token == "nexthop":
            names.append((_bare(nexthop), False))
        elif token == "dot-nexthop":
            names.append((_bare(nexthop), True))
        elif token.startswith(".") and len(token) > 1:
            names.append((token[1:].rstrip("."), True))
        elif token:
            names.append((token.rstrip("."), False))
    return Policy(level, names, why=why)


TABLE_LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "verify", "secure")


def table_entry(cfg, nexthop):
    """(level, match or None, key) from smtp_tls_policy_maps for the next
    hop (the relayhost as written, else the recipient domain, then its
    parent domains as .domain), or None. Raises TableError."""
    if not cfg.smtp_tls_policy_maps:
        return None
    first = (cfg.relayhost or nexthop).strip().lower()
    keys = [first]
    if not cfg.relayhost and not first.startswith("["):
        labels = first.rstrip(".").split(".")
        keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
    found = maptable.lookup(cfg.smtp_tls_policy_maps, "smtp_tls_policy_maps", keys)
    if found is None:
        return None
    key, value = found
    words = value.split()
    level = words[0].lower() if words else ""
    if level not in TABLE_LEVELS:
        raise TableError(f"smtp_tls_policy_maps: {key}: unsupported TLS "
                                  f"level {level!r} (pymta has {', '.join(TABLE_LEVELS)})")
    match = None
    for word in words[1:]:
        name, _, arg = word.partition("=")
        if name.lower() == "match":
            match = arg
    return level, match, key


_contexts = {}
_contexts_lock = threading.Lock()
CONTEXT_TTL = 300      # seconds a verifying context (its CA store) is reused


def client_context(cfg, policy):
    """The SSLContext for a session under ``policy``. Certificates are
    checked by OpenSSL (chain, dates) at verify and secure; the name by
    :func:`check_peer` after the handshake.

    Contexts are shared by the sessions of a process: loading the system's
    CA store costs some 60 ms of CPU, once per CONTEXT_TTL (or when
    smtp_tls_CAfile changes) instead of once per connection. A context that
    checks nothing loads no CA store at all."""
    if not policy.verifies:
        key = ("none",)
    else:
        cafile = cfg.smtp_tls_CAfile or None
        stamp = None
        if cafile:
            try:
                st = os.stat(cafile)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError as e:
                raise TLSSetupError(f"cannot load smtp_tls_CAfile {cafile}: {e.strerror}") from None
        key = ("verify", cafile, stamp)
    now = time.monotonic()
    with _contexts_lock:
        hit = _contexts.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
    if key[0] == "none":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            ctx = ssl.create_default_context(cafile=key[1])
        except (OSError, ssl.SSLError) as e:
            raise TLSSetupError(f"cannot load smtp_tls_CAfile {key[1]}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    with _contexts_lock:
        if len(_contexts) > 16:
            _contexts.clear()
        _contexts[key] = (now + CONTEXT_TTL, ctx)
    return ctx


class TLSSetupError(ConfigError):
    """This host's TLS configuration is unusable (a CA file that cannot be read)."""


def _cert_names(cert):
    """(dns names, ip addresses) a verified peer certificate (getpeercert()) names."""
    dns, ips = [], []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(value.lower().rstrip("."))
        elif kind == "IP Address":
            try:
                ips.append(ipaddress.ip_address(value.strip()))
            except ValueError:
                pass
    if not dns and not ips:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    dns.append(value.lower().rstrip("."))
    return dns, ips


def _dns_match(pattern, name, suffix):
    """Does certificate name ``pattern`` cover reference ``name`` (or, with
    ``suffix``, some name under ``name``)?"""
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        base = pattern[2:]
        if "*" in base or "." not in base:
            return False
        if suffix:
            return base == name or base.endswith("." + name)
        first, dot, rest = name.partition(".")
        return bool(dot) and bool(first) and rest == base
    if "*" in pattern:
        return False              # partial-label wildcards: never
    if suffix:
        return pattern.endswith("." + name)
    return pattern == name


def name_matches(cert, names):
    """Whether the verified certificate ``cert`` names one of ``names``."""
    dns, ips = _cert_names(cert)
    for name, suffix in names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is not None:
            if not suffix and ip in ips:
                return True
            continue
        if any(_dns_match(p, name, suffix) for p in dns):
            return True
    return False


def describe_names(names):
    return " or ".join(("*." if suffix else "") + name for name, suffix in names)


def check_peer(policy, sslsock):
    """None when the TLS session on ``sslsock`` satisfies ``policy``, else
    the reason (text)."""
    if policy.level == "dane":
        from . import dane
        return dane.check(policy, sslsock)
    if not policy.verifies:
        return None
    cert = sslsock.getpeercert()
    if not cert:
        return "no verified server certificate"
    if not name_matches(cert, policy.names):
        dns, ips = _cert_names(cert)
        have = ", ".join(dns + [str(i) for i in ips]) or "no names"
        return f"server certificate names {have}, not {describe_names(policy.names)}"
    return None


class Plan:
    """The TLS policies of one next hop's servers: the static level, DANE
    (:mod:`pymta.dane`) at level dane, MTA-STS (:mod:`pymta.mta_sts`) for
    MX deliveries when smtp_mta_sts_enable is set.

    ``nexthop`` is the recipient domain or the relayhost's host part,
    ``use_mx`` whether its servers come from MX records."""

    def __init__(self, cfg, nexthop, port, use_mx, resolver, log):
        self.cfg, self.nexthop, self.port, self.use_mx = cfg, nexthop, port, use_mx
        self.log = log
        self._resolver = resolver
        self.literal = nexthop.startswith("[")
        self.sts = None
        self.entry = self.error = None
        try:
            self.entry = table_entry(cfg, nexthop)
        except TableError as e:      # the messages wait for a fixed table
            self.error = str(e)
            log.error(self.error)
        if self.entry is None and cfg.smtp_mta_sts_enable and use_mx and not cfg.relayhost \
                and not self.literal:
            from . import mta_sts
            self.sts = mta_sts.policy_for(cfg, nexthop, self.resolver, log)

    @property
    def resolver(self):
        if self._resolver is None:
            from . import mx
            self._resolver = mx.make_resolver(self.cfg)
        return self._resolver

    def hosts(self, hosts):
        """The MX hosts an MTA-STS policy allows; raises TempFail when an
        enforced policy allows none (or smtp_tls_policy_maps is unusable)."""
        if self.error is not None:
            from .status import Reply, TempFail
            raise TempFail(self.error, Reply(451, "4.7.5", self.error))
        if self.sts is None:
            return hosts
        ok = [h for h in hosts if self.sts.mx_matches(h.name)]
        refused = [h.name for h in hosts if h not in ok]
        if refused:
            self.log.info(f"MTA-STS policy of {self.nexthop} ({self.sts.mode}): MX host(s) "
                          f"{', '.join(refused)} match no mx line of the policy")
        if self.sts.mode != "enforce":
            return hosts
        if not ok:
            from .status import Reply, TempFail
            text = (f"MTA-STS policy of {self.nexthop}: no MX host matches the policy "
                    f"({', '.join(refused)})")
            raise TempFail(text, Reply(451, "4.7.5", text))
        return ok

    def policy(self, host):
        """(Policy, None) for server ``host`` (an mx.Host), or (None, Reply)
        when the message must be deferred before connecting to it."""
        from .status import Reply
        cfg = self.cfg
        level, match, why = cfg.smtp_tls_security_level, None, "smtp_tls_security_level"
        if self.entry is not None:
            level, match, key = self.entry
            why = f"smtp_tls_policy_maps entry {key}"
        if level in ("dane", "dane-only"):
            only = level == "dane-only"
            level = "may"
            if not self.literal and not host.name.startswith("["):
                from . import dane
                res = dane.resolver(cfg)
                if dane.host_is_secure(res, host.name, self.nexthop if self.use_mx else None):
                    try:
                        records = dane.tlsa(res, host.name, self.port)
                    except dane.LookupFailed as e:
                        return None, Reply(451, "4.7.5", f"DANE: TLSA lookup failed, {e}")
                    where = f"TLSA records of _{self.port}._tcp.{host.name}"
                    if records and dane.usable(records):
                        return Policy("dane", tlsa=records, why=f"DANE {where}"), None
                    if records and not only:
                        return Policy("encrypt", why=f"DANE {where}, none usable"), None
            if only:
                return None, Reply(451, "4.7.5", f"DANE required ({why}), but {host.name} has no "
                                                 f"usable TLSA records authenticated by DNSSEC")
        if self.sts is not None and self.sts.mode == "enforce" and level not in VERIFYING:
            return Policy("verify", [(_bare(host.name), False)],
                          why=f"MTA-STS policy of {self.nexthop}"), None
        return static_policy(cfg, self.nexthop, host.name, level, match, why), None
