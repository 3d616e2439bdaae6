"""Lookup tables (pymta-tables(5)): the file format, Postfix's lookup order,
virtual alias domains and relay_recipient_maps at RCPT and at delivery,
`pymta map -q`, and `sendmail -bv` showing the rewriting."""

import mailbox
import os
import smtplib
import subprocess
import sys

import pytest

from conftest import BIN
from pymta import config, status, tables
from test_server import running


def cfg_for(**more):
    return config.from_dict(myhostname="mx.example.test", mydestination="mx.example.test, example.test",
                            myorigin="example.test", **more)


def table(tmp_path, text, name="virtual"):
    path = tmp_path / name
    path.write_text(text)
    return tables.Maps([f"hash:{path}"])


@pytest.mark.unit
def test_file_format_comments_continuations_case_and_bad_lines(tmp_path, caplog):
    m = table(tmp_path, "# comment\nInfo@Virt.TEST   root,\n   bob@remote.test\n\n"
                        "lonely\n\n  continued after a blank line\nkey\tvalue  with   spaces\n")
    assert m.get("info@virt.test") == "root, bob@remote.test"
    assert m.get("INFO@virt.test") == "root, bob@remote.test"
    assert m.get("key") == "value with spaces"
    assert m.get("lonely") is None
    text = caplog.text
    assert "virtual:5: key without a value" in text
    assert "virtual:7: continuation line with nothing to continue" in text
    assert "continued after" not in text        # no line's text in the log


@pytest.mark.unit
def test_table_is_read_again_when_it_changes(tmp_path):
    m = table(tmp_path, "a  one\n")
    assert m.get("a") == "one"
    path = tmp_path / "virtual"
    path.write_text("a  two, three\n")
    os.utime(path, ns=(1, 1))
    assert m.get("a") == "two, three"


@pytest.mark.unit
def test_unsupported_table_type_is_an_error():
    with pytest.raises(status.TableError):
        tables.Maps(["ldap:/etc/ldap.cf"])


@pytest.mark.unit
def test_lookup_order_extensions_domains_and_qualification(tmp_path):
    cfg = cfg_for()
    m = table(tmp_path, "joe+x@virt.test  exact\njoe@virt.test  joseph\nsam  samuel\n"
                        "@virt.test  catchall\n@old.test  @new.test\nlist@virt.test  a, b@remote.test\n")
    assert tables.expand(cfg, m, "joe+x@virt.test") == ["exact@example.test"]
    # a key without the +ext matches, and passes the extension on
    assert tables.expand(cfg, m, "joe+y@virt.test") == ["joseph+y@example.test"]
    # a bare user key matches only this host's own domains
    assert tables.expand(cfg, m, "sam@example.test") == ["samuel@example.test"]
    assert tables.expand(cfg, m, "sam@mx.example.test") == ["samuel@example.test"]
    assert tables.expand(cfg, m, "sam@remote.test") is None
    assert tables.expand(cfg, m, "sam@virt.test") == ["catchall@example.test"]
    # @domain -> @other keeps the local part
    assert tables.rewrite(cfg, m, "u@old.test") == "u@new.test"
    assert tables.expand(cfg, m, "list@virt.test") == ["a@example.test", "b@remote.test"]
    assert tables.rewrite(cfg, m, "list@virt.test") is None     # not one-to-one
    assert tables.rewrite(cfg, m, "") is None                   # the null sender stays


def virtual_inst(make_instance, extra=""):
    inst = make_instance(virtual_alias_domains="virt.test")
    vpath = os.path.join(inst.root, "virtual")
    with open(vpath, "w") as f:
        f.write("info@virt.test      root, sales@virt.test\n"
                "sales@virt.test     staff\n"
                "loop1@virt.test     loop2@virt.test\n"
                "loop2@virt.test     loop1@virt.test\n"
                "self@virt.test      self@virt.test, root\n"
                "postmaster@example.test  root\n" + extra)
    with open(os.path.join(inst.root, "aliases"), "a") as f:
        f.write("staff: root\n")
    inst.write_config(virtual_alias_maps=f"hash:{vpath}")
    return inst


def rcpt_replies(inst, addrs, **params):
    """{address: (code, text)} of RCPT TO for each of ``addrs`` in one session."""
    with running(inst, **params) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo("client.example")
            c.mail("a@remote.example")
            return {a: c.rcpt(a) for a in addrs}


def test_virtual_alias_domain_addresses_are_checked_at_rcpt(make_instance):
    got = rcpt_replies(virtual_inst(make_instance),
                       ["info@virt.test", "nobody@virt.test", "root@example.test"])
    assert got["info@virt.test"][0] == 250 and got["root@example.test"][0] == 250
    code, msg = got["nobody@virt.test"]
    assert (code, msg[:5]) == (550, b"5.1.1")
    assert b"User unknown in virtual alias table" in msg


def test_virtual_aliases_deliver_locally_recursively_once_and_break_loops(make_instance):
    inst = virtual_inst(make_instance)
    r = inst.sendmail("-odi", "-f", "s@remote.example", "info@virt.test",
                      input=b"Subject: v\n\nbody\n")
    assert r.returncode == 0, r.stderr
    box = list(mailbox.mbox(os.path.join(inst.root, "mail", "root")))
    assert [m["Subject"] for m in box] == ["v"]      # root and sales -> staff -> root: once
    r = inst.sendmail("-odi", "-f", "", "loop1@virt.test", input=b"Subject: l\n\nbody\n")
    log = inst.maillog()
    assert "to=<loop1@virt.test>" in log and "5.4.6" in log and "Virtual alias loop" in log
    r = inst.sendmail("-odi", "-f", "", "self@virt.test", input=b"Subject: s\n\nbody\n")
    # self maps to itself (final: a virtual domain address with no other
    # entry is unknown) and to root
    box = list(mailbox.mbox(os.path.join(inst.root, "mail", "root")))
    subjects = [m["Subject"] for m in box]
    assert subjects.count("v") == 1 and subjects.count("s") == 1, subjects


def test_sendmail_bv_shows_each_virtual_step(make_instance):
    inst = virtual_inst(make_instance)
    r = inst.sendmail("-bv", "info@virt.test")
    out = r.stdout.decode()
    assert "info@virt.test... virtual_alias_maps: -> root@" in out
    assert "sales@virt.test... virtual_alias_maps: -> staff@" in out
    assert "deliverable: mailer local, user root" in out
    r = inst.sendmail("-bv", "nobody@virt.test")
    assert r.returncode != 0
    assert "User unknown in virtual alias table" in r.stdout.decode()


def test_relay_recipient_maps_refuse_unknown_addresses_of_relay_domains(make_instance, tmp_path):
    inst = make_instance(relay_domains="backup.test")
    path = tmp_path / "relay_recipients"
    path.write_text("known@backup.test  x\n@all.backup.test  x\n")
    assert rcpt_replies(inst, ["anyone@backup.test"])["anyone@backup.test"][0] == 250  # no table
    got = rcpt_replies(inst, ["known@backup.test", "unknown@backup.test"],
                       relay_recipient_maps=f"hash:{path}")
    assert got["known@backup.test"][0] == 250
    code, msg = got["unknown@backup.test"]
    assert (code, msg[:5]) == (550, b"5.1.1")
    assert b"relay recipient table" in msg


def test_pymta_map_query_and_check(tmp_path):
    path = tmp_path / "generic"
    path.write_text("root@host.lan  admin@example.com\nbroken\n")
    cmd = [sys.executable, os.path.join(BIN, "pymta"), "map"]
    r = subprocess.run(cmd + ["-q", "ROOT@host.lan", f"hash:{path}"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "admin@example.com\n")
    r = subprocess.run(cmd + ["-q", "nobody@host.lan", f"hash:{path}"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (1, "")
    r = subprocess.run(cmd + [str(path)], capture_output=True, text=True)
    assert r.returncode == 65
    assert f"{path}: 1 entries" in r.stdout and f"{path}:2: key without a value" in r.stderr


# -- canonical maps and masquerading ----------------------------------------

from pymta import rewrite  # noqa: E402


def canonical_inst(make_instance, **more):
    inst = make_instance(**more)
    path = os.path.join(inst.root, "canonical")
    with open(path, "w") as f:
        f.write("root@mx.example.test   admin@example.com\n"
                "joe                    Joe.Bloggs@example.com\n"
                "@old.example           @new.example\n")
    sender_path = os.path.join(inst.root, "sender_canonical")
    with open(sender_path, "w") as f:
        f.write("noreply@example.test   bounces@example.com\n")
    inst.write_config(canonical_maps=f"hash:{path}", sender_canonical_maps=f"hash:{sender_path}",
                      masquerade_domains="!keep.example.org, example.org",
                      masquerade_exceptions="root")
    return inst


@pytest.mark.unit
def test_masquerade_domains_first_match_exceptions_and_bang():
    cfg = cfg_for(masquerade_domains="!keep.example.org, example.org", masquerade_exceptions="root")
    assert rewrite.masquerade(cfg, "u@host.example.org") == "u@example.org"
    assert rewrite.masquerade(cfg, "u@a.b.example.org") == "u@example.org"
    assert rewrite.masquerade(cfg, "u@example.org") == "u@example.org"
    assert rewrite.masquerade(cfg, "u@keep.example.org") == "u@keep.example.org"
    assert rewrite.masquerade(cfg, "u@x.keep.example.org") == "u@x.keep.example.org"
    assert rewrite.masquerade(cfg, "root@host.example.org") == "root@host.example.org"
    assert rewrite.masquerade(cfg, "") == ""


@pytest.mark.unit
def test_header_rewriting_keeps_names_comments_and_quoted_strings(make_instance):
    inst = canonical_inst(make_instance)
    rw = rewrite.Rewriter(inst.cfg)
    field = (b'To: "root@mx.example.test" <root@mx.example.test>, Joe (the boss) <joe@mx.example.test>,\n'
             b"\tother@remote.test, a@old.example\n")
    assert rw.header_field(field) == (
        b'To: "root@mx.example.test" <admin@example.com>, Joe (the boss) <Joe.Bloggs@example.com>,\n'
        b"\tother@remote.test, a@new.example\n")
    assert rw.header_field(b"Subject: root@mx.example.test\n") == b"Subject: root@mx.example.test\n"
    assert rw.header_field(b"From: u@host.example.org\n") == b"From: u@example.org\n"


def test_local_submission_is_rewritten_in_envelope_and_header(make_instance):
    inst = canonical_inst(make_instance)
    r = inst.sendmail("-odq", "-f", "noreply@example.test", "joe@mx.example.test",
                      "x@old.example", input=b"From: noreply@example.test\n"
                      b"To: joe@mx.example.test, x@old.example\nSubject: c\n\nbody mentions "
                      b"joe@mx.example.test\n")
    assert r.returncode == 0, r.stderr
    (qf,) = [n for n in os.listdir(inst.spool.dir) if n.startswith("qf")]
    env = inst.spool.read(qf[2:])
    assert env.sender == "bounces@example.com"
    assert sorted(r.address for r in env.recipients) == ["Joe.Bloggs@example.com", "x@new.example"]
    assert {r.orcpt for r in env.recipients} == {"rfc822;joe@mx.example.test", "rfc822;x@old.example"}
    with inst.spool.open_data(qf[2:]) as f:
        data = f.read()
    assert b"\nFrom: bounces@example.com\n" in data
    assert b"\nTo: Joe.Bloggs@example.com, x@new.example\n" in data
    assert data.endswith(b"body mentions joe@mx.example.test\n")     # the body is never touched


def test_smtp_mail_from_mynetworks_is_rewritten_not_from_others(make_instance):
    inst = canonical_inst(make_instance)
    msg = (b"From: noreply@example.test\r\nTo: joe@mx.example.test\r\nSubject: s\r\n"
           b"\r\njoe@mx.example.test\r\n")
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("noreply@example.test", ["root@mx.example.test"], msg)
    with running(inst, mynetworks="10.9.9.0/24") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("noreply@example.test", ["root@mx.example.test"], msg)
    envs = []
    for qf in sorted(n for n in os.listdir(inst.spool.dir) if n.startswith("qf")):
        env = inst.spool.read(qf[2:])
        with inst.spool.open_data(qf[2:]) as f:
            envs.append((env, f.read()))
    trusted = [e for e in envs if e[0].sender == "bounces@example.com"]
    other = [e for e in envs if e[0].sender == "noreply@example.test"]
    assert len(trusted) == 1 and len(other) == 1
    env, data = trusted[0]
    assert [r.address for r in env.recipients] == ["admin@example.com"]
    # (Date and Message-ID are added after them: mynetworks mail lacked them.)
    assert b"\nFrom: bounces@example.com\nTo: Joe.Bloggs@example.com\nSubject: s\nDate: " in data
    assert data.endswith(b"\n\njoe@mx.example.test\n")
    env, data = other[0]
    assert [r.address for r in env.recipients] == ["root@mx.example.test"]
    assert b"\nFrom: noreply@example.test\nTo: joe@mx.example.test\n" in data


@pytest.mark.unit
def test_smtp_header_filter_holds_the_header_back_across_any_chunking():
    from pymta.smtpd_data import DataReceiver

    class W:
        data = b""

        def write(self, b):
            self.data += b

    raw = (b"From: a@old.example\r\nTo: b@old.example,\r\n c@old.example\r\n\r\n"
           b"a@old.example in the body\r\n..dot\r\n.\r\n")
    for step in (1, 2, 7, 64, len(raw)):
        w = W()
        d = DataReceiver(w, 0, 0, 1000,
                         header_filter=lambda h: h.replace(b"old.example", b"new.example"))
        buf, done = b"", False
        for i in range(0, len(raw), step):
            buf += raw[i:i + step]
            while buf and not done:
                used, done = d.feed(buf)
                buf = buf[used:]
                if not used:
                    break
        assert done and not d.failed
        assert w.data == (b"From: a@new.example\nTo: b@new.example,\n c@new.example\n\n"
                          b"a@old.example in the body\n.dot\n"), step


def test_sendmail_bv_shows_canonical_then_virtual_steps(make_instance):
    inst = virtual_inst(make_instance)
    path = os.path.join(inst.root, "canonical")
    with open(path, "w") as f:
        f.write("old@example.test  info@virt.test\n")
    inst.write_config(canonical_maps=f"hash:{path}")
    out = inst.sendmail("-bv", "old@example.test").stdout.decode()
    lines = out.splitlines()
    assert lines[0] == "old@example.test... canonical: -> info@virt.test"
    assert lines[1].startswith("info@virt.test... virtual_alias_maps: -> root@")
    assert "deliverable: mailer local, user root" in out


# -- smtp_generic_maps --------------------------------------------------------

from smtpsink import SMTPSink  # noqa: E402
from test_remote import make_cfg, queue  # noqa: E402
from pymta import remote  # noqa: E402


def test_smtp_generic_maps_rewrite_envelope_and_headers_on_the_way_out(tmp_path):
    path = tmp_path / "generic"
    path.write_text("root@host.lan  admin@example.com\n@host.lan  @example.com\n")
    with SMTPSink("127.0.0.2") as sink:
        cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}", myhostname="host.lan",
                       smtp_generic_maps=f"hash:{path}")
        msg = (b"From: Root <root@host.lan>\nTo: bob@remote.test, cron@host.lan\n"
               b"Subject: root@host.lan\n\nroot@host.lan in the body\n")
        env = queue(cfg, msg, ["bob@remote.test", "cron@host.lan"], sender="root@host.lan")
        res = remote.deliver(cfg, env, env.recipients, "remote.test")
        assert res["bob@remote.test"].code == 250 and res["cron@host.lan"].code == 250
        t = sink.delivered[0]
        assert t.sender == "admin@example.com"
        assert t.rcpts == ["bob@remote.test", "cron@example.com"]
        assert t.data.replace(b"\r\n", b"\n") == (
            b"From: Root <admin@example.com>\nTo: bob@remote.test, cron@example.com\n"
            b"Subject: root@host.lan\n\nroot@host.lan in the body\n")
        # the queue keeps the addresses as they were
        assert env.sender == "root@host.lan"


def test_bdat_message_from_mynetworks_is_rewritten_too(make_instance):
    import socket
    inst = canonical_inst(make_instance)
    msg = b"From: noreply@example.test\r\nTo: joe@mx.example.test\r\nSubject: b\r\n\r\nbody\r\n"
    with running(inst) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.example\r\n")
            while f.readline()[3:4] == b"-":
                pass
            s.sendall(b"MAIL FROM:<noreply@example.test>\r\nRCPT TO:<root@mx.example.test>\r\n")
            assert f.readline()[:3] == b"250" and f.readline()[:3] == b"250"
            half = len(msg) // 2
            s.sendall(b"BDAT %d\r\n" % half + msg[:half])
            assert f.readline()[:3] == b"250"
            s.sendall(b"BDAT %d LAST\r\n" % (len(msg) - half) + msg[half:])
            assert f.readline()[:3] == b"250"
            s.sendall(b"QUIT\r\n")
    (qf,) = [n for n in os.listdir(inst.spool.dir) if n.startswith("qf")]
    env = inst.spool.read(qf[2:])
    assert env.sender == "bounces@example.com"
    with inst.spool.open_data(qf[2:]) as fh:
        data = fh.read()
    assert b"\nFrom: bounces@example.com\nTo: Joe.Bloggs@example.com\nSubject: b\nDate: " in data
    assert b"\nMessage-ID: <" in data and data.endswith(b"\n\nbody\n")
