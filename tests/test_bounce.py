"""RFC 3464 reports made by bounce.report(), read back from the spool with
the stdlib email package."""

import email
import time

from pymta import bounce, config
from pymta import envelope as E
from pymta.queue_dir import Spool
import pytest

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them


def setup(tmp_path, **kw):
    cfg = config.from_dict(queue_directory=str(tmp_path / "spool"), myhostname="mx.example.test",
                           myorigin="example.test", **kw)
    sp = Spool.from_config(cfg)
    sp.create()
    return cfg, sp


def original(sp, rcpts, sender="alice@sender.test", body=b"Hello.\n", **kw):
    env = E.Envelope(sender=sender, created=int(time.time()) - 60, **kw)
    for r in rcpts:
        env.recipients.append(r if isinstance(r, E.Recipient) else E.Recipient(r))
    with sp.new_message() as w:
        w.write(b"From: alice@sender.test\nSubject: orig\n\n" + body)
        w.commit(env)
    return env


def failed(env, dsn="5.1.1", text="550 5.1.1 No such user", relay="mx.remote.test [192.0.2.1]:25"):
    for r in env.recipients:
        r.set_state(E.FAILED, dsn, text, relay=relay)
    return env.recipients


def read_back(sp, lock):
    with lock:
        env = sp.read(lock.id)
        with sp.open_data(lock.id) as f:
            return env, email.message_from_binary_file(f)


def test_bounce_is_a_null_sender_report_to_the_sender_with_the_whole_original(tmp_path):
    cfg, sp = setup(tmp_path)
    big = b"0123456789abcdef" * 4095 + b"\n"
    env = original(sp, ["bob@remote.test"], body=big * 80)      # about 5 MB
    lock = bounce.report(cfg, env, failed(env), "failed", spool=sp)
    new, msg = read_back(sp, lock)
    assert new.sender == "" and [r.address for r in new.recipients] == ["alice@sender.test"]
    assert msg["To"] == "<alice@sender.test>"
    assert msg.get_content_type() == "multipart/report"
    inner = msg.get_payload()[2].get_payload()[0]
    assert inner["Subject"] == "orig"
    assert inner.get_payload(decode=True) == big * 80
    status = msg.get_payload()[1].get_payload()
    assert status[1]["Remote-MTA"] == "dns; mx.remote.test"
    assert status[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert status[1]["Status"] == "5.1.1"


def test_recipients_that_asked_for_no_failure_notice_are_left_out(tmp_path):
    cfg, sp = setup(tmp_path)
    env = original(sp, [E.Recipient("a@remote.test", flags="S"), E.Recipient("b@remote.test")])
    lock = bounce.report(cfg, env, failed(env), "failed", spool=sp)
    _, msg = read_back(sp, lock)
    finals = [b["Final-Recipient"] for b in msg.get_payload()[1].get_payload()[1:]]
    assert finals == ["rfc822; b@remote.test"]
    env = original(sp, [E.Recipient("a@remote.test", flags="N")])
    assert bounce.report(cfg, env, failed(env), "failed", spool=sp) is None


def test_failed_bounce_goes_to_the_postmaster_from_double_bounce(tmp_path):
    cfg, sp = setup(tmp_path)
    env = original(sp, ["alice@sender.test"], sender="")
    lock = bounce.report(cfg, env, failed(env), "failed", spool=sp)
    new, msg = read_back(sp, lock)
    assert new.sender == "double-bounce@example.test"
    assert [r.address for r in new.recipients] == ["postmaster@example.test"]
    assert msg["Subject"].startswith("Postmaster notify")


def test_failed_double_bounce_makes_nothing(tmp_path):
    cfg, sp = setup(tmp_path)
    env = original(sp, ["postmaster@example.test"], sender="double-bounce@example.test")
    before = sp.ids()
    assert bounce.report(cfg, env, failed(env), "failed", spool=sp) is None
    assert sp.ids() == before


def test_delay_warning_carries_only_the_header_and_respects_notify_delay(tmp_path):
    cfg, sp = setup(tmp_path)
    env = original(sp, [E.Recipient("a@remote.test"), E.Recipient("b@remote.test", flags="F")])
    for r in env.recipients:
        r.set_state(E.DEFERRED, "4.4.1", "451 4.4.1 connection refused")
    lock = bounce.report(cfg, env, env.recipients, "delayed", spool=sp)
    _, msg = read_back(sp, lock)
    blocks = msg.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; a@remote.test"]
    assert blocks[1]["Action"] == "delayed"
    headers = msg.get_payload()[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Hello." not in headers.get_payload()


def test_eight_bit_original_makes_an_eight_bit_bounce(tmp_path):
    cfg, sp = setup(tmp_path)
    env = original(sp, ["bob@remote.test"], body="Grüße\n".encode(), body_type="8BITMIME")
    lock = bounce.report(cfg, env, failed(env), "failed", spool=sp)
    new, msg = read_back(sp, lock)
    assert new.body_type == "8BITMIME"
    assert msg["Content-Transfer-Encoding"] == "8bit"
