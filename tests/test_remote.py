"""Remote delivery over real sockets to test sinks on 127.0.0.x."""

import os
import shutil
import socket
import ssl
import time
import subprocess

import pytest

from pymta import config, remote, sched
from pymta import envelope as E
from pymta.queue_dir import Spool

from dnsserver import DNSServer
from smtpsink import SMTPSink


def make_cfg(tmp_path, **kw):
    params = dict(queue_directory=str(tmp_path / "spool"), myhostname="mx.example.org",
                  smtpd_listen="127.0.0.1:0", dns_nameservers="127.0.0.1:1", dns_timeout="1s",
                  smtp_connect_timeout="2s", smtp_helo_timeout="2s",
                  smtp_command_timeout="2s", smtp_data_done_timeout="2s")
    params.update(kw)
    cfg = config.from_dict(**params)
    Spool.from_config(cfg).create()
    return cfg


def queue(cfg, data, rcpts, sender="alice@example.org", **envkw):
    sp = Spool.from_config(cfg)
    env = E.Envelope(sender=sender, **envkw)
    for r in rcpts:
        if isinstance(r, E.Recipient):
            env.recipients.append(r)
        else:
            env.add_recipient(r)
    with sp.new_message() as w:
        w.write(data)
        w.commit(env)
    return env


MSG = b"From: alice@example.org\nTo: bob@remote.test\nSubject: hi\n\nline one\n.dotted\n..two\nend\n"


@pytest.fixture
def sink():
    with SMTPSink("127.0.0.2") as s:
        yield s


def test_all_recipients_in_one_transaction_with_a_reply_each(tmp_path, sink):
    sink.rcpt = {"later@remote.test": "451", "nobody@remote.test": "550"}
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    env = queue(cfg, MSG, ["bob@remote.test", "later@remote.test", "nobody@remote.test"])
    res = remote.deliver(cfg, env, env.recipients, "remote.test")
    assert res["bob@remote.test"].code == 250
    assert res["later@remote.test"].code == 451 and res["later@remote.test"].enhanced == "4.0.0"
    assert res["nobody@remote.test"].code == 550
    assert res.relay == f"127.0.0.2 [127.0.0.2]:{sink.port}" or "127.0.0.2" in res.relay
    assert len(sink.transactions) == 1
    t = sink.transactions[0]
    assert t.sender == "alice@example.org"
    assert t.rcpts == ["bob@remote.test", "later@remote.test", "nobody@remote.test"]
    assert t.accepted == ["bob@remote.test"]


def test_message_goes_out_with_crlf_and_dot_stuffing_and_no_return_path(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    env = queue(cfg, MSG + b"bare\rcr\nno final newline", ["bob@remote.test"])
    remote.deliver(cfg, env, env.recipients, "remote.test")
    t = sink.delivered[0]
    assert b"\r\n..dotted\r\n...two\r\n" in t.raw
    assert t.data.replace(b"\r\n", b"\n") == MSG + b"barecr\nno final newline\n"
    assert b"\r" not in t.raw.replace(b"\r\n", b"")
    assert b"\n" not in t.raw.replace(b"\r\n", b"")
    assert not t.data.lower().startswith(b"return-path")


def test_dot_at_a_chunk_boundary_is_still_stuffed(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    head = b"Subject: big\n\n"
    filler = b"x" * (remote.CHUNK - len(head) - 1) + b"\n"
    data = head + filler + b".starts the second chunk\n" + b"y\n" * 1000
    env = queue(cfg, data, ["bob@remote.test"])
    remote.deliver(cfg, env, env.recipients, "remote.test")
    t = sink.delivered[0]
    assert b"\r\n..starts the second chunk\r\n" in t.raw
    assert t.data.replace(b"\r\n", b"\n") == data


def test_mail_and_rcpt_carry_size_body_and_dsn_parameters(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    r = E.Recipient("bob@remote.test", flags="SF" + E.PRIMARY, orcpt="rfc822;Bob@remote.test")
    env = queue(cfg, MSG, [r], body_type="8BITMIME", ret="HDRS", envid="id 42")
    remote.deliver(cfg, env, env.recipients, "remote.test")
    t = sink.delivered[0]
    assert f"SIZE={len(MSG)}" in t.params
    assert "BODY=8BITMIME" in t.params and "RET=HDRS" in t.params and "ENVID=id+2042" in t.params
    assert t.rcpt_params["bob@remote.test"] == "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@remote.test"


def test_orcpt_is_sent_as_xtext(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    r = E.Recipient("bob@remote.test", flags="S" + E.PRIMARY, orcpt="rfc822;user+tag@local.test")
    env = queue(cfg, MSG, [r])
    remote.deliver(cfg, env, env.recipients, "remote.test")
    t = sink.delivered[0]
    assert t.rcpt_params["bob@remote.test"] == "NOTIFY=SUCCESS ORCPT=rfc822;user+2Btag@local.test"


def test_server_without_extensions_gets_plain_commands(tmp_path):
    with SMTPSink("127.0.0.2", extensions=(), size=0) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
        r = E.Recipient("bob@remote.test", flags="F" + E.PRIMARY, orcpt="rfc822;bob@remote.test")
        env = queue(cfg, MSG.replace(b"line one", "ligne été".encode()), [r],
                    body_type="8BITMIME", ret="FULL")
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["bob@remote.test"].code == 250
        t = sink.delivered[0]
        assert t.params == "" and t.rcpt_params["bob@remote.test"] == ""
        assert "ligne été".encode() in t.data       # 8-bit sent as is (documented)


def test_message_larger_than_the_servers_size_fails_5_3_4_without_sending(tmp_path):
    with SMTPSink("127.0.0.2", size=20) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
        env = queue(cfg, MSG, ["bob@remote.test"])
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert (res["bob@remote.test"].code, res["bob@remote.test"].enhanced) == (552, "5.3.4")
        assert sink.transactions == []


def test_dead_and_dropping_mx_hosts_move_on_to_the_next(tmp_path):
    with SMTPSink("127.0.0.4") as good, SMTPSink("127.0.0.5", port=good.port, greeting="drop") as dropper:
        zone = {"remote.test": {"MX": [(10, "dead.remote.test"), (20, "drop.remote.test"),
                                       (30, "good.remote.test")]},
                "dead.remote.test": {"A": ["127.0.0.3"]},
                "drop.remote.test": {"A": ["127.0.0.5"]},
                "good.remote.test": {"A": ["127.0.0.4"]}}
        with DNSServer(zone) as dns:
            cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=good.port)
            env = queue(cfg, MSG, ["bob@remote.test"])
            res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["bob@remote.test"].code == 250
        assert "good.remote.test [127.0.0.4]" in res.relay
        assert dropper.connections == 1 and len(good.delivered) == 1


def test_no_server_answering_defers_with_the_last_error(tmp_path):
    with SMTPSink("127.0.0.4", greeting="stall", stall_time=5) as staller:
        zone = {"remote.test": {"MX": [(10, "a.remote.test")]},
                "a.remote.test": {"A": ["127.0.0.3", "127.0.0.4"]}}
        with DNSServer(zone) as dns:
            cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=staller.port,
                           smtp_helo_timeout="1s")
            env = queue(cfg, MSG, ["bob@remote.test"])
            res = remote.deliver(cfg, env, env.recipients, "remote.test")
        reply = res["bob@remote.test"]
        assert reply.code == 451 and reply.enhanced.startswith("4.4.")
        assert "a.remote.test [127.0.0." in res.relay
        assert staller.connections == 1


def test_dns_failures_give_every_recipient_the_dns_status(tmp_path):
    zone = {"nullmx.test": {"MX": [(0, ".")]}, "broken.test": "SERVFAIL"}
    with DNSServer(zone) as dns:
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address)
        env = queue(cfg, MSG, ["a@nullmx.test", "b@nullmx.test"])
        res = remote.deliver(cfg, env, env.recipients, "nullmx.test")
        assert {r.enhanced for r in res.values()} == {"5.1.10"} and len(res) == 2
        env = queue(cfg, MSG, ["a@broken.test"])
        assert remote.deliver(cfg, env, env.recipients, "broken.test")["a@broken.test"].enhanced == "4.4.3"
        env = queue(cfg, MSG, ["a@nowhere.test"])
        assert remote.deliver(cfg, env, env.recipients, "nowhere.test")["a@nowhere.test"].enhanced == "5.1.2"


def test_stall_after_data_defers_after_the_data_done_timeout(tmp_path):
    with SMTPSink("127.0.0.2", data="stall", stall_time=5) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_data_done_timeout="1s")
        env = queue(cfg, MSG, ["bob@remote.test"])
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        reply = res["bob@remote.test"]
        assert reply.code == 451 and "end of data" in reply.text


def test_drop_during_rcpt_defers_every_recipient(tmp_path):
    with SMTPSink("127.0.0.2", rcpt={"b@remote.test": "drop"}) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
        env = queue(cfg, MSG, ["a@remote.test", "b@remote.test"])
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert all(r.code == 451 for r in res.values()) and len(res) == 2
        assert sink.delivered == []


def test_connection_is_reused_for_the_next_message(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    cache = remote.ConnectionCache()
    for i in range(3):
        env = queue(cfg, MSG, [f"u{i}@remote.test"])
        assert remote.deliver(cfg, env, env.recipients, "remote.test",
                              cache=cache)[f"u{i}@remote.test"].code == 250
    cache.close_all()
    assert sink.connections == 1 and len(sink.delivered) == 3
    assert [c.upper() for c in sink.commands].count("RSET") == 2


def test_encrypt_level_defers_when_starttls_is_not_offered(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_tls_security_level="encrypt")
    env = queue(cfg, MSG, ["bob@remote.test"])
    reply = remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.4")
    assert sink.transactions == []


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=sink.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_starttls_is_used_when_offered_without_checking_the_certificate(tmp_path, tls_context, level):
    with SMTPSink("127.0.0.2", tls_context=tls_context) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_tls_security_level=level)
        env = queue(cfg, MSG, ["bob@remote.test"])
        assert remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"].code == 250
        assert sink.delivered[0].tls and sink.delivered[0].helo == "mx.example.org"


def test_tls_level_none_never_starts_tls(tmp_path, tls_context):
    with SMTPSink("127.0.0.2", tls_context=tls_context) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_tls_security_level="none")
        env = queue(cfg, MSG, ["bob@remote.test"])
        assert remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"].code == 250
        assert not sink.delivered[0].tls and "STARTTLS" not in sink.commands


def test_large_message_with_many_dot_lines_arrives_intact(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
    sp = Spool.from_config(cfg)
    env = E.Envelope(sender="alice@example.org")
    env.add_recipient("bob@remote.test")
    line = b"." + b"z" * 98 + b"\n"
    with sp.new_message() as w:
        w.write(b"Subject: big\n\n")
        for _ in range(100):
            w.write(line * 1000)          # 10 MB, every line dot-stuffed on the wire
        w.commit(env)
    assert remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"].code == 250
    data = sink.delivered[0].data.replace(b"\r\n", b"\n")
    assert len(data) == os.path.getsize(sp.path("df", env.id))
    assert data.count(b"\n.z") == 100000


def test_recipients_are_split_at_the_destination_recipient_limit(tmp_path, sink):
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_destination_recipient_limit="3")
    rcpts = [f"u{i}@remote.test" for i in range(7)]
    env = queue(cfg, MSG, rcpts)
    res = remote.deliver(cfg, env, env.recipients, "remote.test")
    assert all(res[a].code == 250 for a in rcpts)
    assert [t.rcpts for t in sink.delivered] == [rcpts[0:3], rcpts[3:6], rcpts[6:7]]
    assert sink.connections == 1            # one connection, three transactions


def test_recipients_answered_452_go_again_at_once_in_a_new_transaction(tmp_path):
    with SMTPSink("127.0.0.2", rcpt_limit=2) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_destination_recipient_limit="50")
        rcpts = [f"u{i}@remote.test" for i in range(5)]
        env = queue(cfg, MSG, rcpts)
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert {a: res[a].code for a in rcpts} == {a: 250 for a in rcpts}
        assert [t.accepted for t in sink.delivered] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]


def test_452_with_nothing_accepted_defers_instead_of_looping(tmp_path):
    with SMTPSink("127.0.0.2", default_rcpt="452") as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
        env = queue(cfg, MSG, ["a@remote.test", "b@remote.test"])
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["a@remote.test"].code == 452 and res["b@remote.test"].code == 452
        assert len(sink.transactions) == 1


@pytest.fixture(autouse=True)
def _no_dead_hosts():
    remote.dead_hosts.clear()
    yield
    remote.dead_hosts.clear()


@pytest.mark.parametrize("greeting", ["421", "stall"])
def test_a_server_that_greets_with_421_or_never_is_marked_dead(tmp_path, greeting):
    with SMTPSink("127.0.0.2", greeting=greeting, stall_time=5) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", smtp_helo_timeout="1s")
        replies = []
        for i in range(5):
            env = queue(cfg, MSG, [f"u{i}@remote.test"])
            replies.append(remote.deliver(cfg, env, env.recipients, "remote.test")[f"u{i}@remote.test"])
        assert sink.connections == 1
        assert all(r.code == replies[0].code and r.text == replies[0].text for r in replies)
        assert replies[0].code == (421 if greeting == "421" else 451)


def test_a_refusing_server_is_tried_once_until_the_dead_host_time_passes(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    port = s.getsockname()[1]
    s.close()                          # nothing listens there: connection refused
    cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{port}", smtp_dead_host_time="1s")
    env = queue(cfg, MSG, ["a@remote.test"])
    first = remote.deliver(cfg, env, env.recipients, "remote.test")["a@remote.test"]
    assert "refused" in first.text
    assert remote.dead_hosts.get(("127.0.0.2", port)) is not None
    with SMTPSink("127.0.0.2", port=port) as sink:
        again = remote.deliver(cfg, env, env.recipients, "remote.test")["a@remote.test"]
        assert again.text == first.text and sink.connections == 0
        deadline = time.monotonic() + 10
        hop = remote.hop_key(cfg, "remote.test")
        while (remote.dead_hosts.get(("127.0.0.2", port)) is not None
               or sched.for_config(cfg).dead(hop) is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote.deliver(cfg, env, env.recipients, "remote.test")["a@remote.test"].code == 250
        assert sink.connections == 1


def test_a_server_with_chunking_gets_bdat_chunks_without_dot_stuffing(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CHUNK", 64)
    with SMTPSink("127.0.0.2", extensions=("PIPELINING", "CHUNKING", "8BITMIME")) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}")
        body = MSG + b"bare\rcr\n" + b"x" * 150 + b"\n.\nno final newline"
        env = queue(cfg, body, ["bob@remote.test", "nobody@remote.test"])
        sink.rcpt = {"nobody@remote.test": "550"}
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["bob@remote.test"].code == 250 and res["nobody@remote.test"].code == 550
        t = sink.delivered[0]
        assert not any(c.startswith("DATA") for c in sink.commands)
        assert len(t.chunks) > 2 and sum(t.chunks) == len(t.raw)
        assert t.raw == body.replace(b"\r", b"").replace(b"\n", b"\r\n") + b"\r\n"


def test_bdat_from_pymta_to_pymta_stores_the_message_as_sent(tmp_path, monkeypatch):
    import logging
    monkeypatch.setattr(remote, "stream_data", None)      # DATA is not used
    import threading
    from pymta import smtpd_common, smtpd_loop
    # The peer does not count us in its mynetworks: it stores the message as
    # sent (it would add Date and Message-ID for a trusted client).
    peer = make_cfg(tmp_path / "peer", mydestination="remote.test", mynetworks="192.0.2.0/24",
                    smtpd_peername_lookup="no")
    srv = smtpd_loop.Server(smtpd_common.bind("127.0.0.1:0"), smtpd_common.Services(peer, logging.getLogger("pymta")))
    port = srv.socket.getsockname()[1]
    stop = threading.Event()
    th = threading.Thread(target=smtpd_loop.serve, args=([srv],), kwargs={"stop": stop.is_set})
    th.start()
    try:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.1]:{port}")
        body = MSG + b"." * 3 + b"\n" + b"y" * 300_000 + b"\n"
        env = queue(cfg, body, ["root@remote.test"])
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["root@remote.test"].code == 250, res["root@remote.test"]
    finally:
        stop.set()
        th.join(30)
    sp = Spool.from_config(peer)
    [qid] = sp.ids()
    with sp.open_data(qid) as f:
        stored = f.read()
    assert stored.endswith(body) and b"with ESMTP id" in stored


def test_bdat_sends_the_header_as_smtp_generic_maps_rewrites_it(tmp_path):
    generic = tmp_path / "generic"
    generic.write_text("alice@example.org  alice@public.test\n")
    with SMTPSink("127.0.0.2", extensions=("PIPELINING", "CHUNKING")) as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}",
                       smtp_generic_maps=f"hash:{generic}")
        env = queue(cfg, MSG, ["bob@remote.test"])
        assert remote.deliver(cfg, env, env.recipients, "remote.test")["bob@remote.test"].code == 250
        t = sink.delivered[0]
        assert t.chunks and t.sender == "alice@public.test"
        assert t.raw.startswith(b"From: alice@public.test\r\n")
