"""transport_maps: a plain file routing domains to a hop, to local delivery
or to a refusal, with real sinks on loopback."""

import logging

import pytest

from pymta import config
from pymta.transport import TransportMap

from smtpsink import SMTPSink


def tmap(tmp_path, text):
    path = tmp_path / "transport"
    path.write_text(text)
    cfg = config.from_dict(transport_maps=f"hash:{path}", queue_directory=str(tmp_path / "q"))
    return TransportMap(cfg, logging.getLogger("test"))


@pytest.mark.unit
def test_exact_then_subdomain_then_star(tmp_path):
    m = tmap(tmp_path, "# comment\nexample.com smtp:[10.0.0.1]:2525\n"
                       ".example.com  smtp:mx.example.net\n"
                       "*  relay:[10.0.0.9]\nhere.test local:\nno.test error:go away\n")
    assert m.lookup("example.com") == ("smtp", "[10.0.0.1]:2525")
    assert m.lookup("Sub.Example.COM.") == ("smtp", "mx.example.net")
    assert m.lookup("a.b.example.com") == ("smtp", "mx.example.net")
    assert m.lookup("other.org") == ("smtp", "[10.0.0.9]")
    assert m.lookup("other.org", local=True) is None        # * never takes local mail
    assert m.lookup("here.test") == ("local", "")
    assert m.lookup("no.test") == ("error", "go away")


@pytest.mark.unit
def test_malformed_entries_are_logged_and_not_used(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        m = tmap(tmp_path, "a.test\nb.test bogus:x\nc.test smtp:[1.2.3.4]:99999\nd.test smtp:\n")
        assert m.lookup("a.test") is None and m.lookup("b.test") is None
        assert m.lookup("c.test") is None and m.lookup("d.test") == ("smtp", "")
    assert sum("transport_maps" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.unit
def test_an_edited_map_is_read_again(tmp_path):
    m = tmap(tmp_path, "a.test smtp:[10.0.0.1]\n")
    assert m.lookup("a.test") == ("smtp", "[10.0.0.1]")
    (tmp_path / "transport").write_text("a.test smtp:[10.0.0.22]:26\n")
    assert m.lookup("a.test") == ("smtp", "[10.0.0.22]:26")


def test_domains_go_to_their_hops_to_local_delivery_and_to_refusal(inst):
    with SMTPSink("127.0.0.2") as one, SMTPSink("127.0.0.3") as two, \
            SMTPSink("127.0.0.4") as default_port:
        path = f"{inst.root}/transport"
        with open(path, "w") as f:
            f.write(f"one.test smtp:[127.0.0.2]:{one.port}\n"
                    f".two.test smtp:[127.0.0.3]:{two.port}\n"
                    "bare.test smtp:[127.0.0.4]\n"
                    "here.test local:\n"
                    "no.test error:this domain is closed\n")
        # relayhost points nowhere: the map overrides it.
        inst.write_config(transport_maps=path, relayhost="[127.0.0.9]:1",
                          smtp_port=default_port.port)
        rcpts = ["a@one.test", "b@x.two.test", "c@bare.test", "root@here.test", "d@no.test"]
        r = inst.sendmail("-odq", "-f", "alice@example.test", "-i", *rcpts,
                          input=b"Subject: routed\n\nhi\n")
        assert r.returncode == 0, r.stderr
        r = inst.sendmail("-q")
        assert r.returncode == 0, r.stderr
        assert [t.rcpts[0].split()[0] for t in one.delivered] == ["a@one.test"]
        assert [t.rcpts[0].split()[0] for t in two.delivered] == ["b@x.two.test"]
        assert [t.rcpts[0].split()[0] for t in default_port.delivered] == ["c@bare.test"]
    assert b"Subject: routed" in inst.mailbox("root")
    log = inst.maillog()
    assert "to=<d@no.test>" in log and "this domain is closed" in log
