"""Where mail for a domain goes: MX records and host addresses through dnspython.

``lookup()`` turns a domain into an ordered list of :class:`Host` (name and
addresses to try, best first), or raises :class:`status.TempFail` /
:class:`status.PermFail` carrying the RFC 3463 status: NXDOMAIN is 5.1.2, a
null MX (RFC 7505) 5.1.10, SERVFAIL or a timeout 4.4.3, an MX list that
leads back to this host 5.4.6. The resolver is made from ``dns_nameservers``
and ``dns_timeout`` (or passed in by the caller), never a module global.
"""

import ipaddress
import random
from dataclasses import dataclass, field

from . import config as C
from .address import literal_ip
from .status import PermFail, Reply, TempFail


@dataclass
class Host:
    """One server to try: its name, MX preference and addresses in order."""

    name: str
    pref: int = 0
    addresses: list = field(default_factory=list)


def make_resolver(cfg):
    """A dnspython Resolver per ``dns_nameservers`` (empty: /etc/resolv.conf).

    dnspython is imported here, not with this module: delivery to an address
    literal or a bracketed relayhost never needs it."""
    import dns.resolver
    if cfg.dns_nameservers:
        res = dns.resolver.Resolver(configure=False)
        set_nameservers(res, cfg.dns_nameservers)
    else:
        res = dns.resolver.Resolver()
    res.lifetime = max(1, cfg.dns_timeout)
    res.timeout = res.lifetime
    res.cache = dns.resolver.LRUCache(1000)
    return res


def set_nameservers(res, items):
    """Point ``res`` at ``items`` (address or address:port), with
    dnspython's Nameserver objects where it has them (2.4 and later) and its
    nameserver_ports table before (Debian 12's 2.3)."""
    pairs = [C.parse_hostport(item, 53) for item in items]
    try:
        import dns.nameserver
    except ImportError:
        res.nameservers = [host for host, _ in pairs]
        res.nameserver_ports = {host: port for host, port in pairs}
        return
    res.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in pairs]


def _temp(text):
    return TempFail(text, Reply(451, "4.4.3", text))


def _perm(text, enhanced, code=550):
    return PermFail(text, Reply(code, enhanced, text))


def _query(resolver, name, rdtype):
    """Answer records, [] for no data; raises on NXDOMAIN and trouble.

    Returns (records, nxdomain)."""
    import dns.exception
    import dns.resolver
    try:
        ans = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return [], True
    except dns.resolver.NoNameservers:
        raise _temp(f"Name service error for name={name} type={rdtype}: server failure")
    except dns.exception.Timeout:
        raise _temp(f"Name service error for name={name} type={rdtype}: timed out")
    except dns.exception.DNSException as e:
        raise _temp(f"Name service error for name={name} type={rdtype}: {e}")
    return (list(ans.rrset) if ans.rrset is not None else []), False


def addresses(resolver, name):
    """IPv6 then IPv4 addresses of ``name``; raises TempFail on DNS trouble,
    returns [] when the name has none (or does not exist)."""
    out = []
    trouble = None
    for rdtype in ("AAAA", "A"):
        try:
            records, nx = _query(resolver, name, rdtype)
        except TempFail as e:
            trouble = e
            continue
        if nx:
            return []
        out.extend(r.address for r in records)
    if not out and trouble is not None:
        raise trouble
    return out


def self_addresses(cfg):
    """(ip, port) pairs this host listens on for SMTP, from smtpd_listen."""
    pairs = set()
    for item in cfg.smtpd_listen:
        try:
            host, port = C.parse_hostport(item, 25)
        except ValueError:
            continue
        pairs.add((host, port))
    return pairs


def is_self(cfg, host, port):
    """Whether delivering to ``host`` (name and addresses) at ``port`` would
    reach this very MTA: its name is myhostname, or one of its addresses
    with ``port`` is one of our listen addresses (a wildcard listen address
    matches loopback addresses)."""
    if host.name.lower().rstrip(".") == cfg.myhostname.lower().rstrip("."):
        return True
    ours = self_addresses(cfg)
    for ip in host.addresses:
        if (ip, port) in ours:
            return True
        try:
            loop = ipaddress.ip_address(ip).is_loopback
        except ValueError:
            loop = False
        if loop and any(h in ("0.0.0.0", "::", "*", "") and p == port for h, p in ours):
            return True
    return False


def lookup(cfg, domain, resolver=None, port=None, use_mx=True):
    """The hosts to try for ``domain``, best first.

    ``domain`` may be an address literal ``[192.0.2.1]``. With ``use_mx``
    False (a bracketed relayhost) the name's own addresses are used.
    """
    port = port or cfg.smtp_port
    ip = literal_ip(domain)
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise _perm(f"Bad address literal {domain}", "5.1.2", 553) from None
        host = Host(domain, 0, [ip])
        if is_self(cfg, host, port):
            raise _perm(f"mail for {domain} loops back to myself", "5.4.6", 554)
        return [host]
    domain = domain.rstrip(".")
    resolver = resolver or make_resolver(cfg)
    if not use_mx:
        addrs = addresses(resolver, domain)
        if not addrs:
            raise _perm(f"Host or domain name not found: {domain}", "5.1.2")
        return [Host(domain, 0, addrs)]
    records, nx = _query(resolver, domain, "MX")
    if nx:
        raise _perm(f"Host or domain name not found. Name service error for "
                    f"name={domain} type=MX: Host not found", "5.1.2")
    if not records:
        addrs = addresses(resolver, domain)
        if not addrs:
            raise _perm(f"Host or domain name not found. No MX and no address "
                        f"records for {domain}", "5.1.2")
        hosts = [Host(domain, 0, addrs)]
    else:
        if any(str(r.exchange) == "." for r in records):
            if len(records) == 1:
                raise _perm(f"Domain {domain} does not accept mail (nullMX)", "5.1.10", 556)
            records = [r for r in records if str(r.exchange) != "."]
        by_pref = {}
        for r in records:
            by_pref.setdefault(r.preference, []).append(str(r.exchange).rstrip(".").lower())
        hosts = []
        trouble = None
        for pref in sorted(by_pref):
            names = by_pref[pref]
            random.shuffle(names)
            for name in names:
                try:
                    addrs = addresses(resolver, name)
                except TempFail as e:
                    trouble = e
                    hosts.append(Host(name, pref, []))
                    continue
                hosts.append(Host(name, pref, addrs))
        hosts = _drop_self(cfg, domain, hosts, port)
        if not any(h.addresses for h in hosts):
            if trouble is not None:
                raise trouble
            raise _perm(f"No address for any MX host of {domain}", "5.4.4")
        hosts = [h for h in hosts if h.addresses]
    hosts = _drop_self(cfg, domain, hosts, port)
    return hosts


def _drop_self(cfg, domain, hosts, port):
    """Drop this host and every MX no better than it (RFC 5321 5.1); none
    left means a loop."""
    for i, h in enumerate(hosts):
        if h.addresses and is_self(cfg, h, port) or \
                h.name.lower() == cfg.myhostname.lower().rstrip("."):
            kept = [x for x in hosts if x.pref < h.pref]
            if not kept:
                raise _perm(f"mail for {domain} loops back to myself", "5.4.6", 554)
            return kept
    return hosts
