"""Lookup tables (pymta-tables(5)): the file format, Postfix's lookup order,
virtual alias domains and relay_recipient_maps at RCPT and at delivery,
`pymta map -q`, and `sendmail -bv` showing the rewriting."""

import mailbox
import os
import smtplib
import subprocess
import sys

import pytest

from conftest import BIN, Instance
from pymta import config, tables
from test_server import running


def cfg_for(**more):
    return config.from_dict(myhostname="mx.example.test", mydestination="mx.example.test, example.test",
                            myorigin="example.test", **more)


def table(tmp_path, text, name="virtual"):
    path = tmp_path / name
    path.write_text(text)
    return tables.Maps([f"hash:{path}"])


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


def test_table_is_read_again_when_it_changes(tmp_path):
    m = table(tmp_path, "a  one\n")
    assert m.get("a") == "one"
    path = tmp_path / "virtual"
    path.write_text("a  two, three\n")
    os.utime(path, ns=(1, 1))
    assert m.get("a") == "two, three"


def test_unsupported_table_type_is_an_error():
    with pytest.raises(tables.TableError):
        tables.Maps(["ldap:/etc/ldap.cf"])


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


def test_virtual_alias_domain_addresses_are_checked_at_rcpt(make_instance):
    inst = virtual_inst(make_instance)
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo("client.example")
            c.mail("a@remote.example")
            assert c.rcpt("info@virt.test")[0] == 250
            code, msg = c.rcpt("nobody@virt.test")
            assert (code, msg[:5]) == (550, b"5.1.1")
            assert b"User unknown in virtual alias table" in msg
            assert c.rcpt("root@example.test")[0] == 250


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
    with running(inst) as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo("client.example")
            c.mail("a@remote.example")
            assert c.rcpt("anyone@backup.test")[0] == 250     # no table: all accepted
    with running(inst, relay_recipient_maps=f"hash:{path}") as port:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo("client.example")
            c.mail("a@remote.example")
            assert c.rcpt("known@backup.test")[0] == 250
            code, msg = c.rcpt("unknown@backup.test")
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
