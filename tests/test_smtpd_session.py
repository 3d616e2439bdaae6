"""The SMTP state machine fed lines directly: no socket, an in-memory writer."""

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pymta import config, smtpd_session
from pymta.smtpd_session import COMMIT, READ
from pymta.status import Reply, SpoolError

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them

REPLY_RE = re.compile(rb"(\d{3})([ -])(.*)\r\n")


class Writer:
    """A writer like queue_commit.MessageWriter, in memory."""

    count = 0

    def __init__(self, store, fail_commit=None):
        Writer.count += 1
        self.id = f"TESTID{Writer.count:06d}"
        self.data = bytearray()
        self.size = 0
        self.store = store
        self.fail_commit = fail_commit
        self.aborted = False

    def write(self, b):
        self.data += b
        self.size += len(b)

    def commit(self, env):
        if self.fail_commit:
            raise self.fail_commit
        env.id, env.size = self.id, self.size
        self.store.append((env, bytes(self.data)))
        return self.id

    def abort(self):
        self.aborted = True


class Session(smtpd_session.Session):
    """The session as the blocking pump drives it: a message is committed
    as soon as next_step() asks for it."""

    def feed(self, data):
        return self._drive(super().feed(data))

    def release(self):
        return self._drive(super().release())

    def _drive(self, out):
        while self.next_step() is COMMIT:
            out += self.commit()
        return out


def make(cfg=None, client="192.0.2.10", fail_commit=None, **kw):
    cfg = cfg or config.from_dict(myhostname="mx.example.test",
                                  mydestination="mx.example.test, example.test",
                                  mynetworks="127.0.0.0/8", queue_minfree=0)
    store, writers = [], []

    def begin():
        w = Writer(store, fail_commit)
        writers.append(w)
        return w
    kw.setdefault("recipient_check", lambda a: None if a.startswith(("user@", "root@"))
                  else Reply(550, "5.1.1", "User unknown"))
    s = Session(cfg, begin_message=begin, client_addr=client, **kw)
    s.store, s.writers = store, writers
    return s


def codes(out):
    return [int(m) for m in re.findall(rb"^(\d{3}) ", out, re.M)]


def talk(s, *lines):
    return s.feed(b"".join(ln + b"\r\n" for ln in lines))


def test_a_whole_transaction_is_queued_with_lf_line_ends_and_received_header():
    s = make()
    assert s.greeting().startswith(b"220 mx.example.test ESMTP")
    out = talk(s, b"EHLO client.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>",
               b"DATA")
    assert codes(out) == [250, 250, 250, 354]
    out = s.feed(b"Subject: hi\r\n\r\n..stuffed\r\nline\r\n.\r\n")
    assert out.startswith(b"250 2.0.0 Ok: queued as TESTID")
    env, data = s.store[0]
    head, _, rest = data.partition(b"Subject")
    assert head.startswith(b"Received: from client.example (unknown [192.0.2.10])\n\tby mx.example.test (pymta) with ESMTP id ")
    assert b"for <user@example.test>;" in head
    assert rest == b": hi\n\n.stuffed\nline\n"
    assert env.sender == "a@b.example" and [r.address for r in env.recipients] == ["user@example.test"]
    assert env.protocol == "ESMTP" and env.helo == "client.example" and env.client_addr == "192.0.2.10"


def test_smtputf8_transaction_is_received_with_utf8smtp_and_the_next_is_esmtp():
    """RFC 6531 3.7.3: a transaction with SMTPUTF8 is "with UTF8SMTP" (S, A
    appended as for ESMTP), in the Received line, the qf and the log."""
    s = make()
    s.greeting()
    talk(s, b"EHLO client.example")
    out = talk(s, "MAIL FROM:<jos\u00e9@b.example> SMTPUTF8".encode(), b"RCPT TO:<user@example.test>",
               b"DATA")
    assert codes(out) == [250, 250, 354]
    assert s.feed(b"Subject: u\r\n\r\nx\r\n.\r\n").startswith(b"250 ")
    out = talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    assert s.feed(b"Subject: a\r\n\r\nx\r\n.\r\n").startswith(b"250 ")
    (env1, data1), (env2, data2) = s.store
    assert b") with UTF8SMTP id " in data1.split(b"Subject")[0]
    assert env1.protocol == "UTF8SMTP" and env1.smtputf8
    assert b") with ESMTP id " in data2.split(b"Subject")[0]
    assert env2.protocol == "ESMTP"


def test_sequence_errors_are_503_and_unknown_is_500():
    s = make()
    assert codes(talk(s, b"MAIL FROM:<a@b.example>")) == [503]
    assert codes(talk(s, b"EHLO x", b"RCPT TO:<user@example.test>", b"DATA")) == [250, 503, 503]
    assert codes(talk(s, b"MAIL FROM:<a@b.example>", b"MAIL FROM:<a@b.example>", b"DATA")) == [250, 503, 503]
    assert codes(talk(s, b"FOO bar", b"EHLO")) == [500, 501]


def test_every_reply_carries_an_enhanced_code_except_greeting_and_ehlo():
    s = make()
    out = talk(s, b"EHLO x", b"NOOP", b"RSET", b"VRFY user", b"EXPN list", b"HELP", b"QUIT")
    lines = out.split(b"\r\n")
    assert b"252 2.0.0" in out and b"502 5.5.1" in out and b"214 2.0.0" in out and b"221 2.0.0" in out
    assert all(re.match(rb"^\d{3}[ -]\d\.\d+\.\d+ ", ln) for ln in lines if ln and not ln.startswith(b"250-") and ln != b"250 SMTPUTF8")
    assert s.closed


def test_postmaster_in_any_case_and_quoted_is_accepted():
    s = make(recipient_check=lambda a: Reply(550, "5.1.1", "User unknown"))
    out = talk(s, b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<Postmaster>", b'RCPT TO:<"POSTMASTER">',
               b"RCPT TO:<PostMaster@example.test>", b"RCPT TO:<nobody-here@example.test>")
    assert codes(out) == [250, 250, 250, 250, 250, 550]
    assert b"550 5.1.1 <nobody-here@example.test>: User unknown" in out


def test_relay_is_refused_from_outside_mynetworks_and_allowed_inside():
    s = make(client="192.0.2.10")
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@elsewhere.example>")
    assert out.endswith(b"554 5.7.1 <x@elsewhere.example>: Relay access denied\r\n")
    s = make(client="127.0.0.1")
    assert codes(talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@elsewhere.example>")) == [250, 250, 250]


@pytest.mark.parametrize("rcpt", [b"<user%elsewhere.example@example.test>", b"<elsewhere.example!user@example.test>",
                                  b'<"user@elsewhere.example"@example.test>',
                                  b"<@example.test:user@elsewhere.example>"])
def test_routing_tricks_never_relay_from_outside(rcpt):
    s = make(client="192.0.2.10", recipient_check=lambda a: None)
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:" + rcpt)
    assert codes(out)[-1] == 554


def test_relay_domains_are_accepted_from_anyone():
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                           relay_domains="relayed.example", mynetworks="127.0.0.0/8", queue_minfree=0)
    s = make(cfg, client="192.0.2.10")
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<u@relayed.example>",
               b"RCPT TO:<u@sub.relayed.example>")
    assert codes(out) == [250, 250, 250, 250]


def test_size_limits_at_mail_and_after_data():
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                           message_size_limit=10000, queue_minfree=1000)
    s = make(cfg, free_space=lambda: 5000)
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example> SIZE=10001", b"MAIL FROM:<a@b.example> SIZE=4500")
    assert b"552 5.3.4" in out and b"452 4.3.1" in out
    out = talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    out = s.feed(b"x" * 20000 + b"\r\n.\r\n")
    assert out.startswith(b"552 5.3.4")
    assert s.writers[-1].aborted and not s.store


def test_recipient_limit_gives_452():
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                           smtpd_recipient_limit=2)
    s = make(cfg)
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", *[b"RCPT TO:<user@example.test>"] * 3)
    assert codes(out) == [250, 250, 250, 250, 452] and b"452 4.5.3" in out


def test_hop_count_limit():
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test", hopcount_limit=3)
    s = make(cfg)
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    out = s.feed(b"Received: a\r\nReceived: b\r\nreceived: c\r\nSubject: x\r\n\r\nReceived: body\r\n.\r\n")
    assert out.startswith(b"554 5.4.6")
    assert not s.store


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"])
def test_smuggled_endings_do_not_end_data_and_the_message_is_refused(ending):
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    out = s.feed(b"Subject: x\r\n\r\nbody" + ending + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n")
    assert out.startswith(b"550 5.6.0")
    assert codes(out) == [550]
    assert not s.store and s.writers[0].aborted


def test_dot_line_split_across_reads_ends_data():
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    out = b""
    for piece in (b"Subject: x\r\n\r\nline\r", b"\n", b".", b"\r", b"\n"):
        out += s.feed(piece)
    assert out.startswith(b"250 2.0.0")
    assert s.store[0][1].endswith(b"Subject: x\n\nline\n")


def test_long_lines_are_kept_whole_by_default_and_refused_with_reject():
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    line = b"y" * 300000
    out = s.feed(b"Subject: x\r\n\r\n" + line[:100000]) + s.feed(line[100000:] + b"\r\n.\r\n")
    assert out.startswith(b"250")
    assert s.store[0][1].endswith(b"\n\n" + line + b"\n")
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                           smtpd_long_line_action="reject")
    s = make(cfg)
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    assert s.feed(b"ok\r\n" + b"z" * 999 + b"\r\n.\r\n").startswith(b"550 5.6.0")
    talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    assert s.feed(b"ok\r\n" + b"z" * 998 + b"\r\n.\r\n").startswith(b"250")


def test_commit_failure_gives_451_or_452_and_nothing_is_kept():
    s = make(fail_commit=SpoolError("disk", Reply(452, "4.3.1", "Insufficient system storage")))
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    assert s.feed(b"x\r\n.\r\n").startswith(b"452 4.3.1")
    assert s.writers[0].aborted
    s = make(fail_commit=SpoolError("io"))
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    assert s.feed(b"x\r\n.\r\n").startswith(b"451 4.3.0")


def test_close_mid_data_aborts_the_writer():
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    s.feed(b"half a message\r\n")
    s.close()
    assert s.writers[0].aborted and not s.store


def test_dsn_parameters_are_stored_in_the_envelope():
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME",
         b"RCPT TO:<user@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;user+40example.test",
         b"RCPT TO:<root@example.test> NOTIFY=NEVER", b"DATA")
    s.feed(b"x\r\n.\r\n")
    env = s.store[0][0]
    assert env.ret == "HDRS" and env.envid == "abc+def" and env.body_type == "8BITMIME"
    assert env.recipients[0].flags == "pSD" and env.recipients[0].orcpt == "rfc822;user@example.test"
    assert env.recipients[1].flags == "pN"


def test_unknown_mail_parameter_is_555_and_bad_path_501():
    s = make()
    out = talk(s, b"EHLO x", b"MAIL FROM:<a@b.example> FOO=1", b"MAIL FROM:a@b.example",
               b"MAIL FROM:<" + b"a" * 65 + b"@b.example>")
    assert codes(out) == [250, 555, 501, 501]


def test_command_line_over_512_is_500_and_the_session_continues():
    s = make()
    out = talk(s, b"NOOP " + b"x" * 600, b"NOOP")
    assert codes(out) == [500, 250] and b"500 5.5.2" in out


def test_too_many_errors_closes_with_421():
    s = make()
    out = s.feed(b"BAD\r\n" * 25)
    assert codes(out)[-1] == 421 and s.closed


def test_unadvertised_pipelining_before_ehlo_is_refused():
    s = make()
    out = talk(s, b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>")
    assert b"554 5.5.0" in out


def test_starttls_stops_processing_and_tls_resets_state():
    s = make(tls_available=True)
    out = talk(s, b"EHLO x", b"STARTTLS", b"MAIL FROM:<a@b.example>")
    assert b"250-STARTTLS" in out and out.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert s.starttls_wanted
    s.tls_started("TLSv1.3")
    assert codes(talk(s, b"MAIL FROM:<a@b.example>")) == [503]
    out = talk(s, b"EHLO x", b"STARTTLS")
    assert b"STARTTLS" not in out.split(b"\r\n")[0] and out.endswith(b"503 5.5.1 Error: TLS already active\r\n")


def test_encrypt_level_requires_starttls_before_mail():
    cfg = config.from_dict(myhostname="mx.example.test", smtpd_tls_security_level="encrypt")
    s = make(cfg, tls_available=True)
    assert b"530 5.7.0" in talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>")


def test_auth_plain_and_login_only_under_tls():
    users = {"alice": "secret"}
    verify = lambda u, p: users.get(u) == p  # noqa: E731
    s = make(auth_verify=verify, tls_available=True, client="192.0.2.10")
    out = talk(s, b"EHLO x", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    assert b"AUTH" not in out.split(b"538")[0] and b"538 5.7.11" in out
    s.feed(b"STARTTLS\r\n")
    s.tls_started()
    out = talk(s, b"EHLO x")
    assert b"250-AUTH PLAIN LOGIN" in out
    assert b"535 5.7.8" in talk(s, b"AUTH PLAIN AGFsaWNlAHdyb25n")
    assert s.hold == 1          # the server waits smtpd_sasl_failure_delay, then releases
    assert s.release() == b""
    assert b"235 2.7.0" in talk(s, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    out = talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@elsewhere.example>", b"DATA")
    assert codes(out) == [250, 250, 354]
    s.feed(b"x\r\n.\r\n")
    assert s.store[0][0].protocol == "ESMTPSA" and s.store[0][0].auth_user == "alice"
    s2 = make(auth_verify=verify, tls_available=True)
    s2.feed(b"STARTTLS\r\n")
    s2.tls_started()
    out = talk(s2, b"EHLO x", b"AUTH LOGIN", b"YWxpY2U=", b"c2VjcmV0")
    assert out.endswith(b"235 2.7.0 Authentication successful\r\n") and b"334 VXNlcm5hbWU6" in out


def test_submission_requires_auth_before_mail():
    s = make(submission=True, client="127.0.0.1")
    assert b"530 5.7.0 Authentication required" in talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>")


def test_draining_session_answers_421_at_next_command():
    stopping = []
    s = make(draining=lambda: bool(stopping))
    talk(s, b"EHLO x")
    stopping.append(1)
    assert talk(s, b"NOOP").startswith(b"421 4.3.2") and s.closed


def test_local_bs_caller_may_relay_and_is_recorded_by_uid():
    s = make(client="", local_uid=1234, local_user="joe")
    talk(s, b"HELO me", b"MAIL FROM:<joe@example.test>", b"RCPT TO:<x@elsewhere.example>", b"DATA")
    assert s.feed(b"hi\r\n.\r\n").startswith(b"250")
    env, data = s.store[0]
    assert env.uid == 1234 and env.protocol == "SMTP" and b"(joe@localhost uid=1234)" in data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=200),
                          st.sampled_from([b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n",
                                           b"RCPT TO:<user@example.test>\r\n", b"DATA\r\n",
                                           b"\r\n.\r\n", b"AUTH LOGIN\r\n", b"RSET\r\n", b".\r\n",
                                           b"STARTTLS\r\n", b"\n.\n"])), max_size=30))
def test_any_bytes_give_well_formed_replies(chunks):
    s = make(tls_available=True, auth_verify=lambda u, p: False)
    out = s.greeting()
    for c in chunks:
        if s.closed:
            break
        if s.starttls_wanted:
            s.tls_started()
        out += s.feed(c)
    s.close()
    pos = 0
    while pos < len(out):
        m = REPLY_RE.match(out, pos)
        assert m, out[pos:pos + 80]
        assert 200 <= int(m.group(1)) < 600
        pos = m.end()


# -- BDAT (RFC 3030)
def bdat_open(s=None):
    s = s or make()
    assert codes(talk(s, b"EHLO c", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>")) \
        == [250, 250, 250]
    return s


def test_chunking_is_offered_and_bdat_chunks_make_one_message_unstuffed():
    s = make()
    assert b"250-CHUNKING\r\n" in talk(s, b"EHLO c")
    bdat_open(s)
    one, two = b"Subject: hi\r\n\r\n..x", b"\r\nline\r\n.\r\n"
    out = s.feed(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(one), one, len(two), two))
    assert out.startswith(b"250 2.0.0 Ok: 18 octets received\r\n250 2.0.0 Ok: queued as TESTID")
    env, data = s.store[0]
    assert data.endswith(b"Subject: hi\n\n..x\nline\n.\n")     # no dot-unstuffing in BDAT
    assert data.startswith(b"Received: ") and b"for <user@example.test>" in data
    assert [r.address for r in env.recipients] == ["user@example.test"]


def test_a_smuggled_transaction_inside_a_chunk_stays_message_data():
    s = bdat_open()
    chunk = b"Subject: a\r\n\r\nx\r\n.\r\nMAIL FROM:<evil@b.example>\r\nRCPT TO:<root@example.test>\r\nDATA\r\n"
    out = s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert codes(out) == [250] and len(s.store) == 1
    assert s.store[0][1].endswith(b"x\n.\nMAIL FROM:<evil@b.example>\nRCPT TO:<root@example.test>\nDATA\n")


def test_a_chunk_split_across_reads_and_a_crlf_split_across_chunks():
    s = bdat_open()
    out = b""
    for piece in (b"BDAT 11\r\nSubj", b"ect: y\r", b"BDAT 9 LAST\r\n", b"\n\r\nbody\r\n"):
        out += s.feed(piece)
    assert codes(out) == [250, 250]
    assert s.store[0][1].endswith(b"Subject: y\n\nbody\n")


@pytest.mark.parametrize("chunk", [b"Subject: a\n\nbare lf\r\n", b"Subject: a\r\n\r\nbare\rcr\r\n",
                                   b"Subject: a\r\n\r\nends in cr\r"])
def test_bare_cr_or_lf_in_bdat_is_refused_like_data(chunk):
    s = bdat_open()
    out = s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert out.startswith(b"550 5.6.0") and s.store == [] and s.writers[0].aborted


def test_bdat_out_of_order_reads_and_drops_its_chunk():
    s = make()
    talk(s, b"EHLO c")
    out = s.feed(b"BDAT 6\r\nRSET\r\nNOOP\r\n")
    assert codes(out) == [503, 250]          # the chunk's RSET was data, not a command
    assert codes(talk(s, b"MAIL FROM:<a@b.example>")) == [250]
    out = s.feed(b"BDAT 6 LAST\r\nQUIT\r\n")
    assert codes(out) == [503] and not s.closed and s.store == []


def test_data_after_bdat_is_refused_and_rset_drops_the_chunks():
    s = bdat_open()
    assert codes(s.feed(b"BDAT 3\r\nabc")) == [250]
    assert codes(talk(s, b"DATA")) == [503]
    assert codes(talk(s, b"RSET")) == [250] and s.writers[0].aborted
    talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>")
    assert codes(s.feed(b"BDAT 0 LAST\r\n")) == [250] and s.store[0][1].startswith(b"Received:")


def test_bdat_syntax_errors_and_size_limit():
    s = bdat_open()
    assert codes(talk(s, b"BDAT", b"BDAT x", b"BDAT 5 NOTLAST")) == [501, 501, 501]
    cfg = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                           queue_minfree=0, message_size_limit=1000)
    s = bdat_open(make(cfg))
    out = s.feed(b"BDAT 2000 LAST\r\n" + b"x" * 1998 + b"\r\n")
    assert out.startswith(b"552 5.3.4") and s.store == []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([b"a", b".", b" ", b"\r\n", b"..", b"xyz", b"\r\n.\r\n"]),
                max_size=60),
       st.lists(st.integers(min_value=0, max_value=30), max_size=8),
       st.integers(min_value=1, max_value=40))
def test_bdat_stores_the_same_message_however_it_is_chunked_and_read(parts, cuts, read):
    message = b"Subject: p\r\n\r\n" + b"".join(parts)
    points = sorted({min(c, len(message)) for c in cuts})
    chunks = [message[a:b] for a, b in zip([0] + points, points + [len(message)])]
    wire = b"".join(b"BDAT %d%s\r\n%s" % (len(c), b" LAST" if i == len(chunks) - 1 else b"", c)
                    for i, c in enumerate(chunks))
    s = bdat_open()
    out = b"".join(s.feed(wire[i:i + read]) for i in range(0, len(wire), read))
    assert codes(out) == [250] * len(chunks)
    stored = s.store[0][1]
    assert stored[stored.index(b"Subject: p"):] == message.replace(b"\r\n", b"\n")


def test_next_step_stops_at_a_complete_message_until_its_commit_is_done():
    store = []
    s = smtpd_session.Session(make().cfg, begin_message=lambda: Writer(store), client_addr="127.0.0.1",
                             recipient_check=lambda a: None)
    assert s.next_step() is READ
    out = talk(s, b"EHLO c.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>",
               b"DATA", b"x", b".", b"NOOP")
    assert codes(out) == [250, 250, 250, 354]      # the NOOP waits behind the commit
    assert s.next_step() is COMMIT and not store
    writer, env = s.message()
    assert env.sender == "a@b.example"
    out = s.committed(writer.commit(env))
    assert codes(out) == [250, 250] and b"queued as TESTID" in out and len(store) == 1
    assert s.next_step() is READ
    talk(s, b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA", b"y", b".")
    writer, env = s.message()
    out = s.committed(SpoolError("disk on fire"))        # a failed commit: 4xx, message removed
    assert codes(out) == [451] and writer.aborted and len(store) == 1
    assert talk(s, b"QUIT").startswith(b"221") and s.next_step() is smtpd_session.CLOSE


def test_sasl_exchanges_give_credentials_challenges_or_refusals():
    import base64
    from pymta import smtpd_sasl as sasl

    def b64(text):
        return base64.b64encode(text.encode()).decode()
    x = sasl.Exchange("PLAIN")
    assert x.start() == (sasl.CHALLENGE, "")
    assert x.respond(b64("\0bob\0pw")) == (sasl.CREDENTIALS, ("bob", "pw", "bob"))
    assert sasl.Exchange("PLAIN").start(b64("eve\0bob\0pw")) == (sasl.CREDENTIALS, (None, None, "bob"))
    assert sasl.Exchange("PLAIN").start(b64("bob\0pw")) == (sasl.ERROR, sasl.R_MALFORMED)
    x = sasl.Exchange("LOGIN")
    assert x.start() == (sasl.CHALLENGE, "VXNlcm5hbWU6")
    assert x.respond(b64("bob")) == (sasl.CHALLENGE, "UGFzc3dvcmQ6")
    assert x.respond(b64("pw")) == (sasl.CREDENTIALS, ("bob", "pw", "bob"))
    assert sasl.Exchange("LOGIN").respond("*") == (sasl.ERROR, sasl.R_CANCELLED)
    assert sasl.Exchange("LOGIN").start("not base64!") == (sasl.ERROR, sasl.R_UNDECODABLE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from([b"a", b".", b"..", b" ", b"xyz", b"From "]), max_size=6),
                max_size=40),
       st.integers(min_value=1, max_value=50))
def test_data_stores_the_same_message_however_it_is_read(lines, read):
    # Lines that begin with dots, dot-stuffed on the wire as RFC 5321 says;
    # the message is followed by a pipelined command in the same reads.
    body = [b"".join(parts) for parts in lines]
    wire = b"Subject: p\r\n\r\n" + b"".join((b"." + ln if ln[:1] == b"." else ln) + b"\r\n"
                                            for ln in body) + b".\r\nNOOP\r\n"
    s = make()
    talk(s, b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<user@example.test>", b"DATA")
    out = b"".join(s.feed(wire[i:i + read]) for i in range(0, len(wire), read))
    assert codes(out) == [250, 250]
    stored = s.store[0][1]
    assert stored[stored.index(b"Subject: p"):] == b"Subject: p\n\n" + b"".join(ln + b"\n" for ln in body)
