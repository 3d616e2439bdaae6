"""The queue runner against real sinks and a real DNS server: delivery,
retries with back-off, expiry, bounces, concurrency and crashes."""

import email
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pymta import cli
from pymta import envelope as E
from pymta import queue_attempt
from pymta import queue_run as R

from conftest import BIN, TOP
from dnsserver import DNSServer
from smtpsink import SMTPSink

MSG = b"From: alice@sender.test\nTo: bob@remote.test\nSubject: %s\nMessage-ID: <%s@sender.test>\n\nHello.\n"


class Clock:
    def __init__(self, t=None):
        self.t = t if t is not None else time.time()

    def __call__(self):
        return self.t


def queue(inst, rcpts, sender="alice@sender.test", subject="test", created=None, **envkw):
    env = E.Envelope(sender=sender, created=int(created or time.time()), **envkw)
    for r in rcpts:
        if isinstance(r, E.Recipient):
            env.recipients.append(r)
        else:
            env.add_recipient(r)
    with inst.spool.new_message() as w:
        w.write(MSG % (subject.encode(), subject.encode()))
        return w.commit(env)


def make_runner(inst, **kw):
    """A Runner on inst, logging to inst's maillog as the commands do."""
    cli.setup_logging(inst.cfg)
    return R.Runner(inst.cfg, **kw)


def qf(inst, qid):
    return inst.spool.read(qid)


def parse(t):
    return email.message_from_bytes(t.data.replace(b"\r\n", b"\n"))


def dsn_fields(msg):
    """The per-recipient field blocks of a delivery-status part."""
    part = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    return [dict(block.items()) for block in part.get_payload()]


@pytest.fixture
def sink():
    with SMTPSink("127.0.0.2") as s:
        yield s


@pytest.fixture
def relay_inst(make_instance, sink):
    return make_instance(relayhost=f"[127.0.0.2]:{sink.port}", smtp_connect_timeout="2s",
                         smtp_helo_timeout="2s", smtp_command_timeout="2s",
                         smtp_data_done_timeout="2s")


def test_pass_delivers_logs_and_removes_the_message(relay_inst, sink):
    qid = queue(relay_inst, ["bob@remote.test", "carol@remote.test"])
    st = make_runner(relay_inst).run_pass()
    assert (st.tried, st.removed) == (1, 1)
    assert relay_inst.spool.ids() == [] and not os.path.exists(relay_inst.spool.path("df", qid))
    assert len(sink.delivered) == 1 and sink.delivered[0].accepted == ["bob@remote.test", "carol@remote.test"]
    log = relay_inst.maillog()
    assert f"{qid}: to=<bob@remote.test>, delay=00:00:" in log
    assert "mailer=esmtp" in log and f"relay=127.0.0.2 [127.0.0.2]:{sink.port}" in log
    assert "dsn=2.0.0, stat=Sent (Ok: queued as SINK1)" in log


def test_deferred_recipient_waits_for_its_backoff_and_done_ones_are_not_retried(relay_inst, sink):
    sink.rcpt = {"later@remote.test": "451"}
    clock = Clock()
    run = make_runner(relay_inst, now=clock)
    qid = queue(relay_inst, ["bob@remote.test", "later@remote.test"])
    run.run_pass()
    env = qf(relay_inst, qid)
    states = {r.address: (r.state, r.dsn) for r in env.recipients}
    assert states == {"bob@remote.test": ("S", "2.0.0"), "later@remote.test": ("D", "4.0.0")}
    assert env.attempts == 1 and env.next_try == int(clock.t) + 300
    assert env.status.startswith("Deferred: 451 4.0.0 Try again later")
    assert "stat=Deferred: 451 4.0.0 Try again later" in relay_inst.maillog()

    st = run.run_pass()                       # not due yet: nothing happens
    assert st.not_due == 1 and len(sink.transactions) == 1
    clock.t += 301
    run.run_pass()
    assert sink.transactions[-1].rcpts == ["later@remote.test"]
    env = qf(relay_inst, qid)
    assert env.attempts == 2 and env.next_try == int(clock.t) + 600   # doubled
    sink.rcpt = {}
    clock.t += 601
    run.run_pass()
    assert relay_inst.spool.ids() == []
    assert [t.accepted for t in sink.delivered] == [["bob@remote.test"], ["later@remote.test"]]


def test_backoff_doubles_up_to_the_maximum(relay_inst):
    cfg = relay_inst.cfg
    assert [queue_attempt.backoff(cfg, n) for n in (1, 2, 3, 4, 5, 6)] == [300, 600, 1200, 2400, 4000, 4000]


def test_failed_recipient_gets_one_rfc3464_bounce_with_the_original(relay_inst, sink):
    sink.rcpt = {"nobody@remote.test": "550", "gone@remote.test": "550"}
    orig = E.Recipient("gone@remote.test", orcpt="rfc822;Gone@remote.test")
    qid = queue(relay_inst, ["bob@remote.test", "nobody@remote.test", orig], subject="partial",
                envid="env-1")
    make_runner(relay_inst).run_pass()
    assert relay_inst.spool.ids() == []
    assert len(sink.delivered) == 2          # the message, then the bounce
    bounce = sink.delivered[1]
    assert bounce.sender == "" and bounce.accepted == ["alice@sender.test"]
    msg = parse(bounce)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = [p.get_content_type() for p in msg.get_payload()]
    assert parts == ["text/plain", "message/delivery-status", "message/rfc822"]
    fields = dsn_fields(msg)
    assert fields[0]["Reporting-MTA"] == "dns; mx.example.test"
    assert fields[0]["Original-Envelope-Id"] == "env-1"
    assert "Arrival-Date" in fields[0]
    per = {f["Final-Recipient"]: f for f in fields[1:]}
    assert set(per) == {"rfc822; nobody@remote.test", "rfc822; gone@remote.test"}
    f = per["rfc822; gone@remote.test"]
    assert f["Action"] == "failed" and f["Status"] == "5.0.0"
    assert f["Original-Recipient"] == "rfc822; Gone@remote.test"
    assert f["Remote-MTA"] == "dns; 127.0.0.2"
    assert f["Diagnostic-Code"] == "smtp; 550 5.0.0 No thanks"
    assert "Last-Attempt-Date" in f
    original = msg.get_payload()[2].get_payload()[0]
    assert original["Subject"] == "partial" and original.get_payload() == "Hello.\n"
    assert "<nobody@remote.test>: 550 5.0.0 No thanks" in msg.get_payload()[0].get_payload()
    log = relay_inst.maillog()
    assert f"{qid}: to=<nobody@remote.test>" in log and "dsn=5.0.0, stat=550 5.0.0 No thanks" in log
    assert ": DSN: <nobody@remote.test> 5.0.0, <gone@remote.test> 5.0.0" in log


def test_ret_hdrs_returns_only_the_header(relay_inst, sink):
    sink.rcpt = {"nobody@remote.test": "550"}
    queue(relay_inst, ["nobody@remote.test"], ret="HDRS", subject="hdrs")
    make_runner(relay_inst).run_pass()
    msg = parse(sink.delivered[0])
    part = msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert "Subject: hdrs" in part.get_payload() and "Hello." not in part.get_payload()


def test_notify_never_means_no_bounce(relay_inst, sink):
    sink.rcpt = {"nobody@remote.test": "550"}
    queue(relay_inst, [E.Recipient("nobody@remote.test", flags="N" + E.PRIMARY)])
    make_runner(relay_inst).run_pass()
    assert sink.delivered == [] and relay_inst.spool.ids() == []


def test_expired_message_bounces_with_4_4_7(relay_inst, sink):
    sink.rcpt = {"later@remote.test": "451"}
    clock = Clock()
    queue(relay_inst, ["later@remote.test"], created=clock.t, subject="old")
    run = make_runner(relay_inst, now=clock)
    run.run_pass()
    assert sink.delivered == []
    clock.t += 5 * 86400 + 1
    run.run_pass()
    assert relay_inst.spool.ids() == []
    msg = parse(sink.delivered[-1])
    f = dsn_fields(msg)[1]
    assert f["Status"] == "4.4.7" and f["Action"] == "failed"
    assert "451 4.0.0 Try again later" in f["Diagnostic-Code"]
    assert "4.4.7" not in f["Diagnostic-Code"]
    assert "dsn=4.4.7" in relay_inst.maillog()


def test_expired_message_never_tried_has_no_invented_diagnostic(relay_inst, sink):
    clock = Clock()
    queue(relay_inst, ["late@remote.test"], created=clock.t - 5 * 86400 - 1, subject="old")
    make_runner(relay_inst, now=clock).run_pass()
    assert relay_inst.spool.ids() == []
    f = dsn_fields(parse(sink.delivered[-1]))[1]
    assert f["Status"] == "4.4.7" and f["Action"] == "failed"
    assert "Diagnostic-Code" not in f
    assert "no attempt made" in relay_inst.maillog()


def test_bounce_that_fails_goes_to_postmaster_and_a_failed_double_bounce_is_dropped(make_instance, sink):
    inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}",
                         bounce_notice_recipient="pm@remote.test")
    sink.rcpt = {"nobody@remote.test": "550", "pm@remote.test": "550"}
    qid = queue(inst, ["nobody@remote.test"], sender="")
    make_runner(inst).run_pass()
    # The notice to the postmaster was tried (and refused); nothing bounces to <>.
    t = sink.transactions[-1]
    assert t.sender == "double-bounce@mx.example.test" and t.rcpts == ["pm@remote.test"]
    assert inst.spool.ids() == []
    log = inst.maillog()
    assert f"{qid}: " in log and ": postmaster notify: <nobody@remote.test> 5.0.0" in log
    assert "double bounce to <pm@remote.test> failed too; discarded" in log


def test_delay_warning_is_sent_once_after_delay_warning_time(make_instance, sink):
    inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delay_warning_time="1h")
    sink.rcpt = {"later@remote.test": "451"}
    clock = Clock()
    qid = queue(inst, ["later@remote.test"], created=clock.t - 3700, subject="slow")
    run = make_runner(inst, now=clock)
    run.run_pass()
    assert len(sink.delivered) == 1
    msg = parse(sink.delivered[0])
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    f = dsn_fields(msg)[1]
    assert f["Action"] == "delayed" and f["Status"] == "4.0.0" and "Will-Retry-Until" in f
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert qf(inst, qid).warned
    clock.t += 5000
    run.run_pass()
    assert len(sink.delivered) == 1          # no second warning


def test_corrupt_control_file_is_quarantined_and_the_pass_goes_on(relay_inst, sink):
    bad = queue(relay_inst, ["x@remote.test"])
    good = queue(relay_inst, ["bob@remote.test"], subject="good")
    with open(relay_inst.spool.path("qf", bad), "w") as f:
        f.write("V1\nT1\nY0\nSa@b\nRp Q\n.\n")
    st = make_runner(relay_inst).run_pass()
    assert st.quarantined == 1
    assert os.path.exists(relay_inst.spool.path("Qf", bad))
    assert [parse(t)["Subject"] for t in sink.delivered] == ["good"]
    assert f"{bad}: unreadable control file, quarantined" in relay_inst.maillog()
    assert good not in relay_inst.spool.ids()


def test_two_runners_at_once_never_deliver_a_message_twice(make_instance):
    with SMTPSink("127.0.0.2") as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=4)
        subjects = {f"m{i}" for i in range(40)}
        for s in sorted(subjects):
            queue(inst, ["bob@remote.test"], subject=s)
        runners = [make_runner(inst), make_runner(inst)]
        threads = [threading.Thread(target=r.run_pass) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = [parse(t)["Subject"] for t in sink.delivered]
        assert sorted(got) == sorted(subjects)
        assert inst.spool.ids() == []


def test_a_pass_ends_though_another_process_holds_its_sockets(make_instance, monkeypatch):
    # As when another thread of the same process forks while a pass runs: the
    # new process holds a copy of the pass's feed socket and stats pipe, so
    # they never reach end-of-file; the pass must not wait for it.
    holders = []

    def hold(*fds):
        pid = os.fork()
        if pid == 0:        # keeps every descriptor of the parent's, as a fork does
            time.sleep(30)
            os._exit(0)
        holders.append(pid)

    real_socketpair, real_pipe = R.socket.socketpair, R.os.pipe

    def socketpair(*a, **kw):
        pair = real_socketpair(*a, **kw)
        hold()
        return pair

    def pipe():
        fds = real_pipe()
        hold()
        return fds
    with SMTPSink("127.0.0.2") as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=3)
        for i in range(6):
            queue(inst, ["bob@remote.test"], subject=f"m{i}")
        runner = make_runner(inst)
        monkeypatch.setattr(R.socket, "socketpair", socketpair)
        monkeypatch.setattr(R.os, "pipe", pipe)
        try:
            t0 = time.monotonic()
            st = runner.run_pass()
            took = time.monotonic() - t0
            monkeypatch.undo()
            assert len(holders) == 2
            assert (st.tried, st.removed) == (6, 6)       # the children's counts arrived
            assert took < 20, took
        finally:
            for pid in holders:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert len(sink.delivered) == 6


def test_a_pass_with_several_delivery_processes_delivers_each_message_once(make_instance):
    with SMTPSink("127.0.0.2") as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=3,
                             delivery_thread_limit=3)
        subjects = [f"m{i}" for i in range(12)]
        for s in subjects:
            queue(inst, ["bob@remote.test"], subject=s)
        st = make_runner(inst).run_pass()
        assert (st.messages, st.tried, st.removed, st.deferred) == (12, 12, 12, 0)
        assert sorted(parse(t)["Subject"] for t in sink.delivered) == sorted(subjects)
        assert inst.spool.ids() == []
        pids = set(re.findall(r"\[(\d+)\]: \w+: done", inst.maillog()))
        assert 1 <= len(pids) <= 3 and str(os.getpid()) not in pids
        assert sink.connections <= 3          # each process keeps its connection


def test_several_delivery_processes_add_up_their_counts(make_instance):
    with SMTPSink("127.0.0.2", rcpt={"later@remote.test": "451"}) as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}", delivery_process_limit=4)
        for i in range(5):
            queue(inst, ["bob@remote.test"], subject=f"ok{i}")
        for i in range(3):
            queue(inst, ["later@remote.test"], subject=f"later{i}")
        st = make_runner(inst).run_pass()
        assert (st.tried, st.removed, st.deferred) == (8, 5, 3)
        assert len(inst.spool.ids()) == 3
        assert len(sink.delivered) == 5


def test_delivery_to_a_bracketed_relayhost_never_loads_the_dns_resolver(relay_inst, sink):
    queue(relay_inst, ["bob@remote.test"], subject="no-dns")
    script = ("import sys; from pymta import cli, config, queue_run; "
              f"cfg = config.load({relay_inst.conf_path!r}); cli.setup_logging(cfg); "
              "st = queue_run.Runner(cfg).run_pass(); "
              "print(st.removed, 'dns.resolver' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=TOP, timeout=60)
    assert r.stdout.split() == ["1", "False"], r.stderr
    assert parse(sink.delivered[0])["Subject"] == "no-dns"


def test_runner_killed_during_delivery_delivers_on_the_next_run(relay_inst, sink):
    sink.data, sink.stall_time = "stall", 30
    qid = queue(relay_inst, ["bob@remote.test"], subject="killed")
    relay_inst.write_config(smtp_data_done_timeout="60s")
    proc = subprocess.Popen([sys.executable, os.path.join(BIN, "sendmail"), "-C",
                             relay_inst.conf_path, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sink.data_seen.wait(20)
        assert relay_inst.spool.is_locked(qid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert relay_inst.spool.ids() == [qid]
    sink.data = "250"
    r = relay_inst.sendmail("-q")
    assert r.returncode == 0, r.stderr
    assert relay_inst.spool.ids() == []
    assert parse(sink.delivered[-1])["Subject"] == "killed"


def test_sendmail_q_filters_select_by_id_recipient_and_sender(relay_inst, sink):
    a = queue(relay_inst, ["bob@remote.test"], sender="alice@sender.test", subject="a")
    queue(relay_inst, ["carol@remote.test"], sender="dave@sender.test", subject="b")
    queue(relay_inst, ["erin@remote.test"], sender="dave@sender.test", subject="c")
    assert relay_inst.sendmail("-qRcarol").returncode == 0
    assert [parse(t)["Subject"] for t in sink.delivered] == ["b"]
    assert relay_inst.sendmail("-qS!dave").returncode == 0
    assert [parse(t)["Subject"] for t in sink.delivered] == ["b", "a"]
    assert a not in relay_inst.spool.ids()
    c = relay_inst.spool.ids()[0]
    assert relay_inst.sendmail(f"-qI{c[:12]}X").returncode == 0     # matches nothing
    assert len(sink.delivered) == 2
    assert relay_inst.sendmail(f"-qI{c}").returncode == 0
    assert relay_inst.spool.ids() == []


def test_hold_with_Q_and_release(relay_inst, sink):
    qid = queue(relay_inst, ["bob@remote.test"])
    r = relay_inst.sendmail(f"-qI{qid}", "-Qspam suspect")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(relay_inst.spool.path("hf", qid))
    assert qf(relay_inst, qid).status == "spam suspect"
    relay_inst.sendmail("-q")
    assert sink.transactions == []
    r = relay_inst.sendmail("-qQspam", "-Q")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(relay_inst.spool.path("qf", qid))
    relay_inst.sendmail("-q")
    assert len(sink.delivered) == 1


def test_verbose_queue_run_prints_the_smtp_dialogue(relay_inst, sink):
    queue(relay_inst, ["bob@remote.test"])
    r = relay_inst.sendmail("-q", "-v")
    assert r.returncode == 0
    out = (r.stdout + r.stderr).decode()
    assert "MAIL FROM:<alice@sender.test>" in out and "stat=Sent" in out


def test_mailq_shows_why_a_message_is_deferred(relay_inst, sink):
    sink.rcpt = {"later@remote.test": "451"}
    queue(relay_inst, ["later@remote.test"])
    relay_inst.sendmail("-q")
    r = relay_inst.run("mailq")
    assert "Deferred: 451 4.0.0 Try again later" in r.stdout.decode()


def test_deliver_locked_summary_gives_sendmail_exit_codes(relay_inst, sink):
    sink.rcpt = {"later@remote.test": "451", "nobody@remote.test": "550"}
    cli.setup_logging(relay_inst.cfg)
    run = queue_attempt.Deliverer(relay_inst.cfg)
    for rcpts, code in ((["bob@remote.test"], 0), (["later@remote.test"], 75),
                        (["nobody@remote.test", "later@remote.test"], 69)):
        qid = queue(relay_inst, rcpts)
        with relay_inst.spool.lock(qid) as lock:
            assert run.deliver_locked(lock).exit_code == code


ZONE = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.3"]},
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": [(0, ".")]},
}


def test_unknown_remote_domain_comes_back_as_a_readable_bounce(make_instance):
    with SMTPSink("127.0.0.3") as sink, DNSServer(ZONE) as dns:
        inst = make_instance(dns_nameservers=dns.address, smtp_port=sink.port, dns_timeout="2s")
        qid = queue(inst, ["bob@remote.test", "x@no-such-domain.test", "y@nullmx.test"])
        make_runner(inst).run_pass()
        assert inst.spool.ids() == []
        assert sink.delivered[0].accepted == ["bob@remote.test"]
        msg = parse(sink.delivered[1])
        assert sink.delivered[1].accepted == ["alice@sender.test"]
        per = {f["Final-Recipient"]: f["Status"] for f in dsn_fields(msg)[1:]}
        assert per == {"rfc822; x@no-such-domain.test": "5.1.2", "rfc822; y@nullmx.test": "5.1.10"}
        text = msg.get_payload()[0].get_payload()
        assert "x@no-such-domain.test" in text and "could not" in text
        assert f"{qid}: to=<x@no-such-domain.test>" in inst.maillog()


def test_dns_trouble_defers(make_instance):
    with DNSServer({"broken.test": "SERVFAIL"}) as dns:
        inst = make_instance(dns_nameservers=dns.address, dns_timeout="1s")
        qid = queue(inst, ["x@broken.test"])
        make_runner(inst).run_pass()
        r = qf(inst, qid).recipients[0]
        assert (r.state, r.dsn) == ("D", "4.4.3")


@pytest.mark.skipif(os.geteuid() != 0, reason="local delivery as another user needs root")
def test_local_and_remote_recipient_in_one_message(relay_inst, sink):
    qid = queue(relay_inst, ["root@mx.example.test", "bob@remote.test"], subject="both")
    make_runner(relay_inst).run_pass()
    assert relay_inst.spool.ids() == []
    assert sink.delivered[0].accepted == ["bob@remote.test"]
    with open(os.path.join(relay_inst.root, "mail", "root"), "rb") as f:
        box = f.read()
    assert b"Subject: both" in box
    log = relay_inst.maillog()
    assert f"{qid}: to=<root@mx.example.test>" in log and "mailer=local" in log


def test_list_with_an_owner_is_sent_as_a_new_message_from_the_owner(relay_inst, sink):
    with open(os.path.join(relay_inst.root, "aliases"), "a") as f:
        f.write("team: bob@remote.test, carol@remote.test\nowner-team: alice@sender.test\n")
    relay_inst.sendmail("-bi")
    qid = queue(relay_inst, ["team@mx.example.test"], sender="zed@sender.test", subject="list")
    make_runner(relay_inst).run_pass()
    assert relay_inst.spool.ids() == []
    t = sink.delivered[0]
    assert t.sender == "owner-team@mx.example.test"
    assert sorted(t.accepted) == ["bob@remote.test", "carol@remote.test"]
    assert parse(t)["Subject"] == "list"
    assert f"{qid}: " in relay_inst.maillog() and "clone: owner=owner-team@mx.example.test" in relay_inst.maillog()


def test_plain_alias_expansion_is_recorded_before_delivery(relay_inst, sink):
    with open(os.path.join(relay_inst.root, "aliases"), "a") as f:
        f.write("pair: bob@remote.test, later@remote.test\n")
    relay_inst.sendmail("-bi")
    sink.rcpt = {"later@remote.test": "451"}
    qid = queue(relay_inst, ["pair@mx.example.test"])
    make_runner(relay_inst).run_pass()
    env = qf(relay_inst, qid)
    states = {r.address: r.state for r in env.recipients}
    assert states == {"pair@mx.example.test": "X", "bob@remote.test": "S", "later@remote.test": "D"}
    assert sink.delivered[0].accepted == ["bob@remote.test"]


def _report(sink, subject):
    msgs = [parse(t) for t in sink.delivered]
    return [m for m in msgs if m["Subject"] == subject]


def test_notify_success_gets_a_delivered_report_for_local_delivery(relay_inst, sink):
    qid = queue(relay_inst, [E.Recipient("root@example.test", flags="SF" + E.PRIMARY,
                                         orcpt="rfc822;root@example.test")], subject="ok")
    make_runner(relay_inst).run_pass()
    assert b"Subject: ok" in relay_inst.mailbox()
    [msg] = _report(sink, "Successful Mail Delivery Report")
    assert sink.delivered[0].sender == "" and sink.delivered[0].rcpts == ["alice@sender.test"]
    fields = dsn_fields(msg)[1]
    assert fields["Final-Recipient"] == "rfc822; root@example.test"
    assert fields["Original-Recipient"] == "rfc822; root@example.test"
    assert (fields["Action"], fields["Status"]) == ("delivered", "2.0.0")
    part = msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers" and "Subject: ok" in part.get_payload()
    assert f"{qid}: " in relay_inst.maillog() and "success DSN (delivered)" in relay_inst.maillog()


def test_without_notify_success_no_report(relay_inst, sink):
    queue(relay_inst, ["root@example.test"])
    make_runner(relay_inst).run_pass()
    assert sink.delivered == []


@pytest.mark.parametrize("server_dsn", [True, False])
def test_notify_success_relayed_to_a_server_without_dsn_gets_a_relayed_report(
        make_instance, server_dsn):
    exts = ("PIPELINING", "DSN") if server_dsn else ("PIPELINING",)
    with SMTPSink("127.0.0.2", extensions=exts) as sink:
        inst = make_instance(relayhost=f"[127.0.0.2]:{sink.port}")
        queue(inst, [E.Recipient("bob@remote.test", flags="S" + E.PRIMARY)], subject="relay")
        make_runner(inst).run_pass()
        first = sink.delivered[0]
        assert first.rcpts == ["bob@remote.test"]
        reports = _report(sink, "Successful Mail Delivery Report")
        if server_dsn:
            # That server reports delivery itself: NOTIFY went on, no report here.
            assert first.rcpt_params["bob@remote.test"] == "NOTIFY=SUCCESS" and reports == []
            return
        fields = dsn_fields(reports[0])[1]
        assert (fields["Action"], fields["Status"]) == ("relayed", "2.0.0")
        assert fields["Final-Recipient"] == "rfc822; bob@remote.test"
        assert fields["Remote-MTA"] == "dns; 127.0.0.2"
        assert "250" in fields["Diagnostic-Code"]


def test_a_command_recipient_is_reported_as_the_alias_that_led_there(relay_inst, sink):
    with open(os.path.join(relay_inst.root, "aliases"), "a") as f:
        f.write('okcmd: "|/bin/true"\nbadcmd: "|/bin/false"\n')
    queue(relay_inst, [E.Recipient("okcmd@example.test", flags="SF" + E.PRIMARY),
                       E.Recipient("badcmd@example.test", flags="F" + E.PRIMARY)], subject="cmd")
    make_runner(relay_inst).run_pass()
    [ok] = _report(sink, "Successful Mail Delivery Report")
    fields = dsn_fields(ok)[1]
    assert fields["Final-Recipient"] == "rfc822; okcmd@example.test"
    assert fields["X-Actual-Recipient"] == "X-unix; |/bin/true"
    assert fields["Action"] == "delivered"
    [bounce] = _report(sink, "Undelivered Mail Returned to Sender")
    fields = dsn_fields(bounce)[1]
    assert fields["Final-Recipient"] == "rfc822; badcmd@example.test"
    assert fields["X-Actual-Recipient"] == "X-unix; |/bin/false"
    assert fields["Action"] == "failed"
    text = bounce.get_payload()[0].get_payload()
    assert "<badcmd@example.test>:" in text and "<|/bin/false>" not in text


def test_a_command_of_a_nested_alias_is_reported_as_the_alias_that_named_it(relay_inst, sink):
    with open(os.path.join(relay_inst.root, "aliases"), "a") as f:
        f.write('outer: inner\ninner: "|/bin/false"\n')
    queue(relay_inst, ["outer@example.test"], subject="nested")
    make_runner(relay_inst).run_pass()
    [bounce] = _report(sink, "Undelivered Mail Returned to Sender")
    fields = dsn_fields(bounce)[1]
    assert fields["Final-Recipient"] == "rfc822; inner@mx.example.test"
    assert fields["X-Actual-Recipient"] == "X-unix; |/bin/false"


def test_notify_success_to_a_list_gets_one_expanded_report_and_no_member_reports(relay_inst, sink):
    with open(os.path.join(relay_inst.root, "aliases"), "a") as f:
        f.write("staff: root, postmaster, carol@remote.test\nsolo: dave@remote.test\n")
    queue(relay_inst, [E.Recipient("staff@example.test", flags="S" + E.PRIMARY),
                       E.Recipient("solo@example.test", flags="S" + E.PRIMARY)], subject="list")
    make_runner(relay_inst).run_pass()
    reports = _report(sink, "Successful Mail Delivery Report")
    got = {}
    for msg in reports:
        for block in dsn_fields(msg)[1:]:
            got[block["Final-Recipient"]] = block["Action"]
    assert got == {"rfc822; staff@example.test": "expanded"}
    params = {a: p for t in sink.delivered for a, p in t.rcpt_params.items()}
    assert params["carol@remote.test"] == "NOTIFY=NEVER"
    # A one-address alias passes NOTIFY on to its target.
    assert params["dave@remote.test"].startswith("NOTIFY=SUCCESS")
