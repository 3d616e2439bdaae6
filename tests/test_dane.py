"""DANE (RFC 7672) at smtp_tls_security_level = dane: TLSA records from the
test DNS server playing a validating resolver (the AD bit), test SMTP
servers with certificates from test CAs that nothing trusts."""

import pytest

from pymta import dane, remote

from dnsserver import DNSServer
from smtpsink import SMTPSink
from testca import TestCA, server_context, tlsa_data
from test_remote import MSG, make_cfg, queue

SMTP_NAME = "smtp.example.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dane")
    ca = TestCA(d / "ca", "Nobody Trusts This CA")

    class C:
        pass
    c = C()
    c.files = ca.issue("some.other.name")          # DANE-EE ignores the names
    c.ctx = server_context(*c.files)
    c.other_files = ca.issue("some.other.name")    # another key
    return c


@pytest.fixture(autouse=True)
def no_dead_hosts():
    remote.dead_hosts.clear()
    dane._resolvers.clear()
    yield
    remote.dead_hosts.clear()
    dane._resolvers.clear()


def zone_for(port, tlsa=None):
    zone = {
        SMTP_NAME: {"A": ["127.0.0.2"]},
        "remote.test": {"MX": [(10, "mx1.remote.test")]},
        "mx1.remote.test": {"A": ["127.0.0.2"]},
    }
    if tlsa is not None:
        zone[f"_{port}._tcp.{SMTP_NAME}"] = tlsa
        zone[f"_{port}._tcp.mx1.remote.test"] = tlsa
    return zone


def run(tmp_path, sink, zone, ad=True, relay=True, rcpt="bob@remote.test", **kw):
    with DNSServer(zone, ad=ad) as dns:
        params = dict(dns_nameservers=dns.address, smtp_tls_security_level="dane")
        if relay:
            params["relayhost"] = f"[{SMTP_NAME}]:{sink.port}"
        else:
            params["smtp_port"] = str(sink.port)
        params.update(kw)
        cfg = make_cfg(tmp_path, **params)
        env = queue(cfg, MSG, [rcpt])
        reply = remote.deliver(cfg, env, env.recipients, "remote.test")[rcpt]
        return reply, dns.queries


def nothing_sent(sink):
    return sink.transactions == [] and not any(c.upper().startswith("MAIL") for c in sink.commands)


@pytest.mark.parametrize("selector,mtype", [(1, 1), (0, 1), (1, 2), (0, 0)])
def test_matching_dane_ee_record_authenticates_the_server(tmp_path, certs, selector, mtype):
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        rec = f"3 {selector} {mtype} {tlsa_data(certs.files[0], selector, mtype)}"
        reply, queries = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}))
        assert reply.code == 250, reply
        assert sink.delivered[0].tls
        assert (f"_{sink.port}._tcp.{SMTP_NAME}", "TLSA") in queries


def test_dane_record_of_another_key_defers_and_nothing_is_sent(tmp_path, certs):
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        rec = f"3 1 1 {tlsa_data(certs.other_files[0], 1, 1)}"
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}))
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert "TLSA" in reply.text
        assert nothing_sent(sink)


def test_dane_server_without_starttls_defers(tmp_path, certs):
    with SMTPSink("127.0.0.2") as sink:
        rec = f"3 1 1 {tlsa_data(certs.files[0], 1, 1)}"
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}))
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.4"), reply
        assert nothing_sent(sink)


def test_insecure_answers_mean_no_dane(tmp_path, certs):
    """Without the AD bit the TLSA records are not believed: as may."""
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        rec = f"3 1 1 {tlsa_data(certs.other_files[0], 1, 1)}"
        reply, queries = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}), ad=False)
        assert reply.code == 250, reply
        assert not any(t == "TLSA" for _, t in queries)


def test_secure_absence_of_tlsa_records_means_may(tmp_path):
    with SMTPSink("127.0.0.2") as sink:
        reply, queries = run(tmp_path, sink, zone_for(sink.port))
        assert reply.code == 250 and not sink.delivered[0].tls
        assert any(t == "TLSA" for _, t in queries)


def test_failed_tlsa_lookup_for_a_secure_host_defers_without_connecting(tmp_path, certs):
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        zone = zone_for(sink.port)
        zone[f"_{sink.port}._tcp.{SMTP_NAME}"] = "SERVFAIL"
        reply, _ = run(tmp_path, sink, zone)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert "TLSA lookup failed" in reply.text
        assert sink.connections == 0


def test_only_unusable_records_still_require_tls(tmp_path, certs):
    rec = f"2 1 1 {tlsa_data(certs.files[0], 1, 1)}"        # DANE-TA: unusable here
    with SMTPSink("127.0.0.2") as sink:
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}))
        assert reply.enhanced == "4.7.4" and nothing_sent(sink), reply
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}))
        assert reply.code == 250 and sink.delivered[0].tls


def test_mx_host_tlsa_used_only_when_the_mx_answer_is_secure(tmp_path, certs):
    rec = f"3 1 1 {tlsa_data(certs.other_files[0], 1, 1)}"  # would refuse the server
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        zone = zone_for(sink.port, {"TLSA": [rec]})
        reply, _ = run(tmp_path, sink, zone, relay=False)
        assert reply.enhanced == "4.7.5" and nothing_sent(sink), reply
        secure = {"mx1.remote.test", f"_{sink.port}._tcp.mx1.remote.test"}   # not the MX RRset
        reply, queries = run(tmp_path, sink, zone, ad=secure, relay=False)
        assert reply.code == 250, reply
        assert not any(t == "TLSA" for _, t in queries)


def test_spki_extraction_matches_openssl(certs):
    import ssl
    with open(certs.files[0]) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    import hashlib
    assert hashlib.sha256(dane.spki(der)).hexdigest() == tlsa_data(certs.files[0], 1, 1)


def test_lookups_work_with_the_oldest_dnspython(tmp_path):
    """MX, address and TLSA lookups through dns_nameservers with the minimum
    dnspython (2.3.0, Debian 12's, in TESTPY): it has no dns.nameserver."""
    import os
    import subprocess
    from conftest import TOP
    from users import TESTPY
    python = os.path.join(TESTPY, "bin", "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {TESTPY} (run `make testpy`)")
    zone = zone_for(2525, {"TLSA": ["3 1 1 " + "ab" * 32]})
    with DNSServer(zone, ad=True) as dns:
        code = (
            "import sys; from pymta import config, mx, dane\n"
            f"cfg = config.from_dict(dns_nameservers={dns.address!r}, dns_timeout='2s')\n"
            "hosts = mx.lookup(cfg, 'remote.test')\n"
            "res = dane.resolver(cfg)\n"
            "print(hosts[0].name, hosts[0].addresses, dane.host_is_secure(res, 'mx1.remote.test', 'remote.test'),\n"
            "      dane.tlsa(res, 'mx1.remote.test', 2525)[0][:3])\n")
        r = subprocess.run([python, "-c", code], capture_output=True, cwd=TOP, timeout=60,
                           env=dict(os.environ, PYTHONPATH=TOP))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split("\n")[0] == "mx1.remote.test ['127.0.0.2'] True (3, 1, 1)"


def test_dane_only_from_the_policy_table(tmp_path, certs):
    """dane-only: without usable, authenticated TLSA records nothing is sent."""
    with SMTPSink("127.0.0.2", tls_context=certs.ctx) as sink:
        table = tmp_path / "tls_policy"
        table.write_text(f"[{SMTP_NAME}]:{sink.port} dane-only\n")
        reply, _ = run(tmp_path, sink, zone_for(sink.port), smtp_tls_security_level="may",
                       smtp_tls_policy_maps=str(table))
        assert reply.enhanced == "4.7.5" and "DANE required" in reply.text, reply
        assert sink.connections == 0
        rec = f"3 1 1 {tlsa_data(certs.files[0], 1, 1)}"
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}), ad=False,
                       smtp_tls_policy_maps=str(table))
        assert reply.enhanced == "4.7.5" and sink.connections == 0, reply
        reply, _ = run(tmp_path, sink, zone_for(sink.port, {"TLSA": [rec]}),
                       smtp_tls_policy_maps=str(table))
        assert reply.code == 250 and sink.delivered[0].tls
