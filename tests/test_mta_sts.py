"""MTA-STS (RFC 8461) with smtp_mta_sts_enable: the _mta-sts TXT record from
the test DNS server, the policy from a test HTTPS server on port 443 of a
127.x address (root is needed to bind it), certificates from test CAs."""

import os

import pytest

from pymta import mta_sts, remote

from dnsserver import DNSServer
from httpsserver import HTTPSServer
from smtpsink import SMTPSink
from testca import TestCA, server_context
from test_remote import MSG, make_cfg, queue

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binding port 443 needs root")

POLICY_PATH = "/.well-known/mta-sts.txt"
ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.remote.test\r\nmx: *.backup.test\r\nmax_age: 86400\r\n"


def web_address():
    pid = os.getpid()
    return f"127.44.{(pid >> 8) & 255}.{(pid & 255) or 1}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("sts")
    ca1, ca2 = TestCA(d / "ca1", "Test CA 1"), TestCA(d / "ca2", "Test CA 2")

    class P:
        pass
    p = P()
    p.ca1, p.ca2 = ca1, ca2
    p.web = server_context(*ca1.issue("mta-sts.remote.test"))
    p.web_untrusted = server_context(*ca2.issue("mta-sts.remote.test"))
    p.mx = server_context(*ca1.issue("mx1.remote.test"))
    p.mx_untrusted = server_context(*ca2.issue("mx1.remote.test"))
    return p


@pytest.fixture(autouse=True)
def clean():
    remote.dead_hosts.clear()
    mta_sts._memory.clear()
    yield
    remote.dead_hosts.clear()
    mta_sts._memory.clear()


@pytest.fixture
def web(pki):
    with HTTPSServer(web_address(), pki.web, port=443) as w:
        w.pages[POLICY_PATH] = (200, "text/plain", ENFORCE)
        yield w


def zone(web, txt='"v=STSv1; id=20260101"', mx="mx1.remote.test"):
    return {
        "remote.test": {"MX": [(10, mx)]},
        mx: {"A": ["127.0.0.2"]},
        "_mta-sts.remote.test": {"TXT": [txt]} if txt else "NXDOMAIN",
        "mta-sts.remote.test": {"A": [web.host]},
    }


def send(tmp_path, dns, sink, pki, **kw):
    # dns_timeout: the test DNS server is a thread of this loaded test process;
    # 1 s (make_cfg's) was seen to run out under a full parallel suite.
    params = dict(dns_nameservers=dns.address, dns_timeout="10s", smtp_port=str(sink.port),
                  smtp_mta_sts_enable="yes",
                  smtp_tls_CAfile=pki.ca1.cert, data_directory=str(tmp_path / "data"))
    params.update(kw)
    cfg = make_cfg(tmp_path, **params)
    env = queue(cfg, MSG, ["bob@remote.test"])
    return remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"]


def nothing_sent(sink):
    return sink.transactions == []


def test_enforced_policy_with_a_verified_mx_delivers(tmp_path, web, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.mx) as sink, DNSServer(zone(web)) as dns:
        reply = send(tmp_path, dns, sink, pki)
        assert reply.code == 250, reply
        assert sink.delivered[0].tls
        assert web.requests == [("mta-sts.remote.test", POLICY_PATH)]


def test_enforced_policy_refuses_an_unverified_certificate(tmp_path, web, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, DNSServer(zone(web)) as dns:
        reply = send(tmp_path, dns, sink, pki)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert nothing_sent(sink)
        # without MTA-STS the same server gets the message (level may)
        reply = send(tmp_path, dns, sink, pki, smtp_mta_sts_enable="no")
        assert reply.code == 250


def test_enforced_policy_refuses_a_server_without_starttls(tmp_path, web, pki):
    with SMTPSink("127.0.0.2") as sink, DNSServer(zone(web)) as dns:
        reply = send(tmp_path, dns, sink, pki)
        assert reply.enhanced == "4.7.4" and nothing_sent(sink), reply


def test_enforced_policy_refuses_an_mx_it_does_not_name(tmp_path, web, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.mx) as sink, \
            DNSServer(zone(web, mx="mx.evil.test")) as dns:
        reply = send(tmp_path, dns, sink, pki)
        assert reply.enhanced == "4.7.5" and "no MX host matches" in reply.text, reply
        assert sink.connections == 0


def test_testing_mode_delivers_anyway(tmp_path, web, pki):
    web.pages[POLICY_PATH] = (200, "text/plain", ENFORCE.replace(b"enforce", b"testing"))
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, \
            DNSServer(zone(web, mx="mx.evil.test")) as dns:
        assert send(tmp_path, dns, sink, pki).code == 250


@pytest.mark.parametrize("page", [
    (404, "text/plain", ENFORCE),
    (301, "text/plain", ENFORCE),
    (200, "text/html", ENFORCE),
    (200, "text/plain", b"version: STSv2\nmode: enforce\nmx: mx1.remote.test\nmax_age: 86400\n"),
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_bad_policy_answers_are_no_policy(tmp_path, web, pki, page):
    web.pages[POLICY_PATH] = page
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, DNSServer(zone(web)) as dns:
        assert send(tmp_path, dns, sink, pki).code == 250
        assert len(web.requests) == 1


def test_policy_server_with_an_untrusted_certificate_is_no_policy(tmp_path, pki):
    with HTTPSServer(web_address(), pki.web_untrusted, port=443) as web:
        web.pages[POLICY_PATH] = (200, "text/plain", ENFORCE)
        with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, \
                DNSServer(zone(web)) as dns:
            assert send(tmp_path, dns, sink, pki).code == 250
            assert web.requests == []      # the handshake failed: nothing was asked


def test_policy_is_cached_for_max_age_and_fetched_again_when_the_id_changes(tmp_path, web, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, DNSServer(zone(web)) as dns:
        assert send(tmp_path, dns, sink, pki).enhanced == "4.7.5"
        path = tmp_path / "data" / "mta-sts" / "remote.test"
        assert path.exists() and (path.stat().st_mode & 0o077) == 0
        for d in (tmp_path / "data", path.parent):
            assert d.stat().st_mode & 0o777 == 0o700
        mta_sts._memory.clear()               # as a new process: from the file
        web.pages.clear()                     # the web server knows nothing now
        assert send(tmp_path, dns, sink, pki).enhanced == "4.7.5"
        dns.zone["_mta-sts.remote.test"] = "NXDOMAIN"     # the record gone: the cache holds
        assert send(tmp_path, dns, sink, pki).enhanced == "4.7.5"
        assert len(web.requests) == 1
        # a new id: fetched again; the server now says mode none
        dns.zone["_mta-sts.remote.test"] = {"TXT": ['"v=STSv1; id=20260202"']}
        web.pages[POLICY_PATH] = (200, "text/plain", b"version: STSv1\nmode: none\nmax_age: 86400\n")
        assert send(tmp_path, dns, sink, pki).code == 250
        assert len(web.requests) == 2


def test_expired_cached_policy_is_not_used(tmp_path, web, pki):
    web.pages[POLICY_PATH] = (200, "text/plain", ENFORCE.replace(b"86400", b"0"))
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, DNSServer(zone(web)) as dns:
        assert send(tmp_path, dns, sink, pki).enhanced == "4.7.5"   # fetched, used once
        web.pages.clear()
        assert send(tmp_path, dns, sink, pki).code == 250           # expired, not refetched


def test_relayhost_deliveries_ignore_mta_sts(tmp_path, web, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.mx_untrusted) as sink, DNSServer(zone(web)) as dns:
        reply = send(tmp_path, dns, sink, pki, relayhost=f"[127.0.0.2]:{sink.port}")
        assert reply.code == 250 and web.requests == []


@pytest.mark.unit
def test_mx_patterns():
    p = mta_sts.Policy("remote.test", "1", "enforce", ["mx1.remote.test", "*.backup.test"], 1, 0)
    assert p.mx_matches("MX1.remote.test.") and p.mx_matches("a.backup.test")
    assert not p.mx_matches("a.b.backup.test") and not p.mx_matches("backup.test")
    assert not p.mx_matches("mx2.remote.test")


@pytest.mark.unit
def test_txt_record_parsing():
    assert mta_sts.parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert mta_sts.parse_txt(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    assert mta_sts.parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert mta_sts.parse_txt(["v=STSv1; id=bad-id"]) is None
    assert mta_sts.parse_txt([]) is None
