"""Who may send what to where: the SMTP server's relay policy.

A client in ``mynetworks``, a ``sendmail -bs`` caller and an authenticated
client may relay (they are *allowed*); anyone may send to this host's own
domains (``mydestination`` and the virtual alias domains), whose
recipients ``recipient_check`` knows, and to ``relay_domains`` (checked
against ``relay_recipient_maps`` when it is set). Anything else is 554
Relay access denied, as is an address with source routing from a client
that may not relay. ``smtpd_client_event_limit_exceptions`` and
``mynetworks`` are lists of networks: :func:`in_networks` matches them.
"""

import functools
import ipaddress

from . import address as A
from .status import Reply

R_RELAY = Reply(554, "5.7.1", "Relay access denied")


def in_networks(ip, networks):
    """Whether ``ip`` (text) lies in one of ``networks`` (mynetworks syntax)."""
    return _in_networks(ip, tuple(networks))


@functools.lru_cache(maxsize=1024)   # asked at every MAIL and RCPT of a session
def _in_networks(ip, networks):
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return any(addr in net for net in _networks(networks))


@functools.lru_cache(maxsize=16)
def _networks(networks):
    parsed = []
    for net in networks:
        try:
            parsed.append(ipaddress.ip_network(net.replace("[", "").replace("]", ""), strict=False))
        except (ValueError, TypeError):
            continue
    return tuple(parsed)


def rcpt_policy(cfg, addr, allowed, recipient_check=None):
    """None if ``addr`` may be accepted from a client (``allowed``: one
    that may relay), else the Reply; ``recipient_check(addr)`` says whether
    a recipient of a domain of this host (or of relay_domains, with
    relay_recipient_maps) exists (None) or not (a Reply)."""
    domain = A.domain_of(addr)
    if A.has_routing(addr) and not allowed:
        return R_RELAY
    if cfg.is_local_domain(domain) or \
            domain in (d.lower().rstrip(".") for d in cfg.virtual_alias_domains):
        if recipient_check is None:
            return None
        return recipient_check(addr)
    if any(domain == d or domain.endswith("." + d)
           for d in (x.lower().rstrip(".") for x in cfg.relay_domains)):
        # relay_recipient_maps, when set, says which addresses exist there
        if recipient_check is None or not cfg.relay_recipient_maps:
            return None
        return recipient_check(addr)
    return None if allowed else R_RELAY
