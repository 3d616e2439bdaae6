"""DKIM signing: keys made by `pymta dkim-keygen`, signatures checked with
dkimpy's verify against the record served by the test DNS server; mail
relayed for others is not signed."""

import contextlib
import hashlib
import io
import logging
import os
import re
import smtplib
import threading
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

dkim = pytest.importorskip("dkim")
import dns.resolver  # noqa: E402
from dkim.canonicalization import Relaxed  # noqa: E402

from pymta import dkimsign, smtpd_common  # noqa: E402

from dnsserver import DNSServer  # noqa: E402
from smtpsink import SMTPSink  # noqa: E402

MSG = (b"From: Alice <alice@example.test>\nTo: bob@remote.test\nSubject: signed\n"
       b"Message-ID: <1@example.test>\n\nHello,  world \t\n\n.dot line\n\n\n")


@pytest.fixture
def sink():
    with SMTPSink("127.0.0.2") as s:
        yield s


@pytest.fixture
def dkim_inst(make_instance, sink):
    inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", smtp_connect_timeout="2s",
                         smtp_helo_timeout="2s", smtp_command_timeout="2s",
                         smtp_data_done_timeout="2s")
    key = os.path.join(inst.root, "dkim.key")
    inst.write_config(dkim_selector="sel1", dkim_private_key_file=key)
    p = inst.run("pymta", "dkim-keygen")
    assert p.returncode == 0, p.stderr
    inst.dns_text = p.stdout.decode()
    return inst


def published(text):
    """The record's strings from dkim-keygen's zone file lines."""
    head = re.search(r"^(\S+)\. IN TXT \(", text, re.M)
    strings = re.findall(r'"([^"]*)"', text[head.end():])
    return head.group(1), strings


@contextlib.contextmanager
def dns_for(inst):
    name, strings = published(inst.dns_text)
    zone = {name: {"TXT": [" ".join(f'"{s}"' for s in strings)]}}
    with DNSServer(zone) as srv:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers, res.port, res.lifetime = ["127.0.0.1"], srv.port, 5

        def dnsfunc(qname, timeout=5):
            qname = qname.decode() if isinstance(qname, bytes) else qname
            answer = res.resolve(qname.rstrip("."), "TXT")
            return b"".join(s for r in answer for s in r.strings)
        yield dnsfunc


def verify(data, dnsfunc):
    return dkim.verify(data, dnsfunc=dnsfunc)


def test_keygen_prints_the_record_and_keeps_the_key_private(dkim_inst):
    name, strings = published(dkim_inst.dns_text)
    assert name == "sel1._domainkey.example.test"
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MII")
    key = dkim_inst.params["dkim_private_key_file"]
    assert os.stat(key).st_mode & 0o777 == 0o600
    again = dkim_inst.run("pymta", "dkim-keygen")
    assert again.returncode == 73 and b"exists" in again.stderr
    show = dkim_inst.run("pymta", "dkim-keygen", "--show")
    assert show.returncode == 0 and published(show.stdout.decode()) == (name, strings)


def test_locally_submitted_mail_is_signed_and_verifies(dkim_inst, sink):
    p = dkim_inst.sendmail("-odi", "-f", "alice@example.test", "bob@remote.test", input=MSG)
    assert p.returncode == 0, p.stderr
    data = sink.delivered[0].data
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;")
    with dns_for(dkim_inst) as dnsfunc:
        assert verify(data, dnsfunc)
        changed = data.replace(b"Hello,", b"Hello!")
        assert not verify(changed, dnsfunc)
        assert not verify(data.replace(b"Subject: signed", b"Subject: forged"), dnsfunc)
    assert "DKIM-Signature field added (s=sel1, d=example.test)" in dkim_inst.maillog()


def test_signature_covers_the_header_as_smtp_generic_maps_sends_it(dkim_inst, sink):
    generic = os.path.join(dkim_inst.root, "generic")
    with open(generic, "w") as f:
        f.write("alice@host.lan  alice@example.test\n")
    dkim_inst.write_config(smtp_generic_maps=f"hash:{generic}")
    p = dkim_inst.sendmail("-odi", "-f", "alice@host.lan", "bob@remote.test",
                           input=MSG.replace(b"alice@example.test", b"alice@host.lan"))
    assert p.returncode == 0, p.stderr
    data = sink.delivered[0].data
    assert b"\r\nFrom: Alice <alice@example.test>\r\n" in data
    assert sink.delivered[0].sender == "alice@example.test"
    with dns_for(dkim_inst) as dnsfunc:
        assert verify(data, dnsfunc)


def test_from_outside_dkim_domains_is_not_signed(dkim_inst, sink):
    p = dkim_inst.sendmail("-odi", "bob@remote.test",
                           input=MSG.replace(b"alice@example.test", b"alice@other.test"))
    assert p.returncode == 0, p.stderr
    assert b"DKIM-Signature" not in sink.delivered[0].data


@contextlib.contextmanager
def smtp_server(inst, **params):
    inst.write_config(**params)
    services = smtpd_common.Services(inst.cfg, logging.getLogger("pymta"))
    model = smtpd_common.driver(services.cfg)
    srv = model.Server(smtpd_common.bind("127.0.0.1:0"), services)
    stop = threading.Event()
    t = threading.Thread(target=model.serve, args=([srv],), kwargs={"stop": stop.is_set})
    t.start()
    try:
        yield srv.socket.getsockname()[1]
    finally:
        stop.set()
        t.join(30)
        assert not t.is_alive()


@pytest.mark.parametrize("mynetworks, signed", [("127.0.0.0/8", True), ("192.0.2.0/24", False)])
def test_mail_from_mynetworks_is_signed_and_relayed_mail_is_not(dkim_inst, sink, mynetworks, signed):
    with smtp_server(dkim_inst, mynetworks=mynetworks, relay_domains="remote.test") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            assert c.sendmail("alice@example.test", ["bob@remote.test"],
                              MSG.replace(b"\n", b"\r\n")) == {}
    p = dkim_inst.sendmail("-q")
    assert p.returncode == 0, p.stderr
    data = sink.delivered[0].data
    assert (b"DKIM-Signature" in data) == signed
    if signed:
        with dns_for(dkim_inst) as dnsfunc:
            assert verify(data, dnsfunc)


def test_an_unreadable_key_defers_instead_of_sending_unsigned(dkim_inst, sink):
    os.unlink(dkim_inst.params["dkim_private_key_file"])
    p = dkim_inst.sendmail("-odi", "bob@remote.test", input=MSG)
    assert sink.transactions == []
    q = dkim_inst.run("mailq").stdout.decode()
    assert "Deferred: 451 4.3.0 DKIM signing failed: cannot read the key" in q
    assert "cannot read the DKIM key" in dkim_inst.maillog()
    assert p.returncode in (0, 75)


def test_signing_a_large_message_keeps_memory_small(dkim_inst):
    cfg = dkim_inst.cfg
    body = (b"x" * 70 + b" \t \n") * 150_000          # 11 MB
    df = io.BytesIO(MSG + body)
    tracemalloc.start()
    try:
        sig = dkimsign.sign(cfg, df)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sig.startswith(b"DKIM-Signature:")
    assert peak < 3 * 1024 * 1024
    with dns_for(dkim_inst) as dnsfunc:
        wire = (sig + MSG + body).replace(b"\n", b"\r\n")
        assert verify(wire, dnsfunc)


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\n", b"\r", b"xy", b"\n\n", b"  \t"]),
                max_size=40),
       st.integers(min_value=1, max_value=9))
def test_body_hash_is_dkimpys_relaxed_body_hash_in_any_chunking(parts, step):
    body = b"".join(parts)
    wire = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    h = dkimsign.BodyHash()
    for i in range(0, len(body), step):
        h.update(body[i:i + step])
    assert h.digest() == hashlib.sha256(Relaxed.canonicalize_body(wire)).digest()


def test_a_key_others_can_read_is_used_with_a_warning(dkim_inst, sink):
    os.chmod(dkim_inst.params["dkim_private_key_file"], 0o644)
    p = dkim_inst.sendmail("-odi", "bob@remote.test", input=MSG)
    assert p.returncode == 0, p.stderr
    assert sink.delivered[0].data.startswith(b"DKIM-Signature:")
    assert "is mode 0644: anyone who can read it can sign" in dkim_inst.maillog()


def test_a_malformed_header_goes_out_unsigned_with_a_warning(dkim_inst, sink):
    cfg = dkim_inst.cfg
    bad = b"From: alice@example.test\nthis line has no colon\n\nbody\n"
    assert dkimsign.sign(cfg, io.BytesIO(bad), logging.getLogger("pymta"), "Q1") is None
    assert dkimsign.sign(cfg, io.BytesIO(b" folded first\nFrom: alice@example.test\n\nb\n")) is None
