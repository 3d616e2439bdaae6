"""MX lookups against a real DNS server on 127.0.0.1."""

import time

import pytest

from pymta import config, mx
from pymta.status import PermFail, TempFail

from dnsserver import DNSServer

ZONE = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.12"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test"), (10, "c.equal.test")]},
    "a.equal.test": {"A": ["127.0.0.21"]},
    "b.equal.test": {"A": ["127.0.0.22"]},
    "c.equal.test": {"A": ["127.0.0.23"]},
    "implicit.test": {"A": ["127.0.0.31"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "slow.test": "STALL",
    "noaddr.test": {"MX": [(10, "gone.noaddr.test")]},
    "loop.test": {"MX": [(10, "mx.example.org"), (20, "backup.loop.test")]},
    "backup.loop.test": {"A": ["127.0.0.41"]},
    "mx.example.org": {"A": ["127.0.0.40"]},
    "selfonly.test": {"MX": [(10, "me.test")]},
    "me.test": {"A": ["127.0.0.50"]},
}


@pytest.fixture(scope="module")
def dns_server():
    with DNSServer(ZONE) as srv:
        yield srv


def cfg_for(srv, **kw):
    return config.from_dict(dns_nameservers=srv.address, dns_timeout="1s",
                            myhostname="mx.example.org", smtpd_listen="127.0.0.1:0", **kw)


def test_mx_hosts_sorted_by_preference_with_ipv6_first(dns_server):
    hosts = mx.lookup(cfg_for(dns_server), "example.test")
    assert [h.name for h in hosts] == ["mx1.example.test", "mx2.example.test"]
    assert hosts[0].addresses == ["::1", "127.0.0.11"]
    assert hosts[1].pref == 20


def test_equal_preference_hosts_come_in_random_order(dns_server):
    cfg = cfg_for(dns_server)
    res = mx.make_resolver(cfg)
    orders = {tuple(h.name for h in mx.lookup(cfg, "equal.test", resolver=res)) for _ in range(30)}
    assert len(orders) > 1
    assert all(sorted(o) == ["a.equal.test", "b.equal.test", "c.equal.test"] for o in orders)


def test_domain_without_mx_uses_its_own_address(dns_server):
    hosts = mx.lookup(cfg_for(dns_server), "implicit.test")
    assert [(h.name, h.addresses) for h in hosts] == [("implicit.test", ["127.0.0.31"])]


def test_null_mx_is_a_permanent_5_1_10(dns_server):
    with pytest.raises(PermFail) as e:
        mx.lookup(cfg_for(dns_server), "nullmx.test")
    assert e.value.reply.enhanced == "5.1.10"


def test_nxdomain_is_a_permanent_5_1_2(dns_server):
    with pytest.raises(PermFail) as e:
        mx.lookup(cfg_for(dns_server), "no-such-domain.test")
    assert e.value.reply.enhanced == "5.1.2"


def test_servfail_is_temporary_4_4_3(dns_server):
    with pytest.raises(TempFail) as e:
        mx.lookup(cfg_for(dns_server), "broken.test")
    assert e.value.reply.enhanced == "4.4.3"


def test_dns_server_that_never_answers_is_temporary_after_dns_timeout(dns_server):
    t0 = time.monotonic()
    with pytest.raises(TempFail) as e:
        mx.lookup(cfg_for(dns_server), "slow.test")
    assert e.value.reply.enhanced == "4.4.3"
    assert time.monotonic() - t0 < 5


def test_mx_host_without_address_is_5_4_4(dns_server):
    with pytest.raises(PermFail) as e:
        mx.lookup(cfg_for(dns_server), "noaddr.test")
    assert e.value.reply.enhanced == "5.4.4"


@pytest.mark.unit
def test_address_literal_needs_no_dns(dns_server):
    hosts = mx.lookup(cfg_for(dns_server), "[127.0.0.9]")
    assert hosts[0].addresses == ["127.0.0.9"]
    assert mx.lookup(cfg_for(dns_server), "[IPv6:::1]")[0].addresses == ["::1"]


def test_mx_naming_this_host_drops_it_and_worse_ones(dns_server):
    # loop.test: MX 10 is myhostname, so the backup MX 20 must not be used.
    with pytest.raises(PermFail) as e:
        mx.lookup(cfg_for(dns_server), "loop.test")
    assert e.value.reply.enhanced == "5.4.6"


def test_mx_at_our_own_listen_address_and_port_is_a_loop(dns_server):
    cfg = cfg_for(dns_server).with_overrides(smtpd_listen="127.0.0.50:2525", smtp_port="2525")
    with pytest.raises(PermFail) as e:
        mx.lookup(cfg, "selfonly.test")
    assert e.value.reply.enhanced == "5.4.6"
    # The same address on another port is another MTA (as tests' sinks are).
    cfg = cfg.with_overrides(smtp_port="2526")
    assert mx.lookup(cfg, "selfonly.test")[0].addresses == ["127.0.0.50"]


@pytest.mark.unit
def test_literal_of_our_listen_address_is_a_loop(dns_server):
    cfg = cfg_for(dns_server).with_overrides(smtpd_listen="127.0.0.50:2525", smtp_port="2525")
    with pytest.raises(PermFail):
        mx.lookup(cfg, "[127.0.0.50]")


def test_lookup_through_dns_nameservers_with_the_oldest_dnspython():
    """dnspython 2.3.0 (Debian 12's, in TESTPY) has no dns.nameserver: the
    resolver is pointed at dns_nameservers the way that version knows."""
    import os
    import subprocess
    from conftest import TOP
    from users import TESTPY
    python = os.path.join(TESTPY, "bin", "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {TESTPY} (run `make testpy`)")
    zone = {"remote.test": {"MX": [(10, "mx1.remote.test")]}, "mx1.remote.test": {"A": ["127.0.0.2"]}}
    with DNSServer(zone) as dns:
        code = ("from pymta import config, mx\n"
                f"cfg = config.from_dict(dns_nameservers={dns.address!r}, dns_timeout='2s')\n"
                "h = mx.lookup(cfg, 'remote.test')[0]\n"
                "print(h.name, h.addresses)\n")
        r = subprocess.run([python, "-c", code], capture_output=True, cwd=TOP, timeout=60,
                           env=dict(os.environ, PYTHONPATH=TOP))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "mx1.remote.test ['127.0.0.2']"
