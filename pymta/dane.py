"""DANE for SMTP (RFC 7672) at ``smtp_tls_security_level = dane``.

pymta does not validate DNSSEC itself: it trusts the AD (authenticated
data) bit of the answers of the resolvers named in ``dns_nameservers``
(or /etc/resolv.conf), which must therefore be validating resolvers that
pymta reaches over a trusted path (on this host, 127.0.0.1). Queries are
sent with the AD bit set (RFC 6840 5.7) to ask for it.

For each server: its TLSA records ``_port._tcp.host`` are looked up only
when the way to the host was secure (the MX RRset, for an MX host; the
host's address records, for a relayhost or a domain without MX). Then:

- secure TLSA records, some usable: TLS is required and the server's
  certificate must match one of them (4.7.5 otherwise, nothing sent);
- secure TLSA records, none usable: TLS is required, the certificate is
  not checked (RFC 7672 2.2);
- no TLSA records (proven absent), or an insecure answer anywhere: as
  ``may``;
- a TLSA lookup that fails (SERVFAIL, time-out) for a secure host: the
  message is deferred (4.7.5): an attacker could cause the failure.

Usable means DANE-EE (usage 3) with selector 0 (whole certificate) or 1
(SubjectPublicKeyInfo) and matching type 0, 1 (SHA-256) or 2 (SHA-512).
DANE-EE ignores names and dates, as RFC 7672 3.1.1 says. DANE-TA (usage 2)
needs the server's chain, which Python's ssl module (before 3.13) does not
give: such records count as unusable, so a domain publishing only DANE-TA
records gets mandatory but unauthenticated TLS. PKIX usages 0 and 1 are
unusable in SMTP (RFC 7672 3.1.3).
"""

import hashlib
import threading

from .status import TempFail


_resolvers = {}
_lock = threading.Lock()


class LookupFailed(TempFail):
    """SERVFAIL, time-out or another DNS failure; the text says which."""


def resolver(cfg):
    """A resolver that asks for the AD bit, one per dns_nameservers setting
    in this process (its cache is kept across deliveries)."""
    import dns.flags
    import dns.resolver
    from .mx import set_nameservers
    key = (tuple(cfg.dns_nameservers), cfg.dns_timeout)
    with _lock:
        res = _resolvers.get(key)
        if res is not None:
            return res
        if cfg.dns_nameservers:
            res = dns.resolver.Resolver(configure=False)
            set_nameservers(res, cfg.dns_nameservers)
        else:
            res = dns.resolver.Resolver()
        res.lifetime = res.timeout = max(1, cfg.dns_timeout)
        res.flags = dns.flags.RD | dns.flags.AD
        res.cache = dns.resolver.LRUCache(1000)
        _resolvers[key] = res
        return res


def query(res, name, rdtype):
    """(records, secure): the answer's records ([] when the name or the
    type does not exist) and whether the resolver authenticated it.
    Raises LookupFailed."""
    import dns.exception
    import dns.flags
    import dns.resolver
    try:
        ans = res.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as e:
        responses = list(getattr(e, "responses", lambda: {})().values())
        secure = bool(responses) and all(r.flags & dns.flags.AD for r in responses)
        return [], secure
    except dns.resolver.NoNameservers:
        raise LookupFailed(f"name={name} type={rdtype}: server failure") from None
    except dns.exception.Timeout:
        raise LookupFailed(f"name={name} type={rdtype}: timed out") from None
    except dns.exception.DNSException as e:
        raise LookupFailed(f"name={name} type={rdtype}: {e}") from None
    records = list(ans.rrset) if ans.rrset is not None else []
    return records, bool(ans.response.flags & dns.flags.AD)


def host_is_secure(res, host, via_mx_of=None):
    """Whether the way to ``host`` was authenticated: the MX RRset of
    ``via_mx_of`` when the host came from an MX record, else the host's own
    address records. DNS failures count as insecure (Postfix does the same:
    the TLSA lookup is then not made)."""
    try:
        if via_mx_of:
            records, secure = query(res, via_mx_of, "MX")
            if not secure:
                return False
        for rdtype in ("A", "AAAA"):
            records, secure = query(res, host, rdtype)
            if records:
                return secure
        return False
    except LookupFailed:
        return False


def tlsa(res, host, port):
    """The TLSA records of ``host``:``port`` as (usage, selector, mtype,
    data) tuples, when authenticated; None when insecure. Raises
    LookupFailed."""
    records, secure = query(res, f"_{port}._tcp.{host}", "TLSA")
    if not secure:
        return None
    return [(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in records]


def usable(records):
    return [r for r in records if r[0] == 3 and r[1] in (0, 1) and r[2] in (0, 1, 2)]


# -- matching -----------------------------------------------------------------

def _der_item(data, pos):
    """(tag, start of content, end of content) of the DER item at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def spki(cert_der):
    """The SubjectPublicKeyInfo (DER) of an X.509 certificate (DER)."""
    tag, start, _ = _der_item(cert_der, 0)           # Certificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, _ = _der_item(cert_der, start)          # TBSCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _der_item(cert_der, pos)
    if tag == 0xA0:                                   # [0] version
        pos = end
    for _ in range(5):                                # serial, signature, issuer, validity, subject
        _, _, pos = _der_item(cert_der, pos)
    tag, _, end = _der_item(cert_der, pos)
    if tag != 0x30:
        raise ValueError("no SubjectPublicKeyInfo")
    return cert_der[pos:end]


def _digest(mtype, data):
    if mtype == 0:
        return data
    return (hashlib.sha256 if mtype == 1 else hashlib.sha512)(data).digest()


def matches(records, cert_der):
    """Whether the certificate (DER) matches one of the usable records."""
    try:
        key = spki(cert_der)
    except (ValueError, IndexError):
        key = None
    for usage, selector, mtype, data in usable(records):
        item = cert_der if selector == 0 else key
        if item is not None and _digest(mtype, item) == data:
            return True
    return False


def check(policy, sslsock):
    """tls_policy.check_peer for the dane level: None or the reason."""
    der = sslsock.getpeercert(binary_form=True)
    if not der:
        return "no server certificate"
    if matches(policy.tlsa, der):
        return None
    return "server certificate matches none of its DANE TLSA records"
