"""Client TLS levels, implicit TLS and SMTP AUTH as a client, against test
SMTP servers on 127.0.0.x with certificates from test CAs made here, names
from the test DNS server."""

import os

import pytest

from pymta import remote

from dnsserver import DNSServer
from smtpsink import SMTPSink
from testca import TestCA, server_context
from test_remote import MSG, make_cfg, queue

SMTP_NAME = "smtp.example.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca1, ca2 = TestCA(d / "ca1", "Test CA 1"), TestCA(d / "ca2", "Test CA 2")

    class P:
        pass
    p = P()
    p.ca1, p.ca2 = ca1, ca2
    p.good = server_context(*ca1.issue(SMTP_NAME))
    p.other_name = server_context(*ca1.issue("other.example.test"))
    p.expired = server_context(*ca1.issue(SMTP_NAME, expired=True))
    p.mx_hosting = server_context(*ca1.issue("mx.hosting.test"))
    p.mx_own = server_context(*ca1.issue("mx1.remote.test"))
    p.wildcard = server_context(*ca1.issue("x", dns=["*.example.test"]))
    return p


@pytest.fixture
def dns():
    zone = {
        SMTP_NAME: {"A": ["127.0.0.2"]},
        "remote.test": {"MX": [(10, "mx1.remote.test")]},
        "mx1.remote.test": {"A": ["127.0.0.2"]},
        "hosted.test": {"MX": [(10, "mx.hosting.test")]},
        "mx.hosting.test": {"A": ["127.0.0.2"]},
    }
    with DNSServer(zone) as server:
        yield server


@pytest.fixture(autouse=True)
def no_dead_hosts():
    remote.dead_hosts.clear()
    yield
    remote.dead_hosts.clear()


def cfg_for(tmp_path, dns, sink, **kw):
    params = dict(relayhost=f"[{SMTP_NAME}]:{sink.port}", dns_nameservers=dns.address)
    params.update(kw)
    return make_cfg(tmp_path, **params)


def send(cfg, rcpt="bob@remote.test", domain="remote.test"):
    env = queue(cfg, MSG, [rcpt])
    return remote.deliver(cfg, env, env.recipients, domain)[rcpt]


def nothing_sent(sink):
    return sink.transactions == [] and not any(c.upper().startswith(("MAIL", "AUTH"))
                                               for c in sink.commands)


# -- certificate verification -------------------------------------------------

@pytest.mark.parametrize("level", ["verify", "secure"])
def test_verified_certificate_delivers(tmp_path, dns, pki, level):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level=level,
                      smtp_tls_CAfile=pki.ca1.cert)
        reply = send(cfg)
        assert reply.code == 250, reply
        assert sink.delivered[0].tls


@pytest.mark.parametrize("level", ["verify", "secure"])
def test_certificate_from_another_ca_defers_and_nothing_is_sent(tmp_path, dns, pki, level):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level=level,
                      smtp_tls_CAfile=pki.ca2.cert)
        reply = send(cfg)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert "certificate not verified" in reply.text
        assert nothing_sent(sink)
        # no plain-text retry either: one connection, STARTTLS its last command
        assert sink.connections == 1 and sink.commands[-1].upper() == "STARTTLS"


def test_certificate_for_another_name_defers(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.other_name) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level="verify",
                      smtp_tls_CAfile=pki.ca1.cert)
        reply = send(cfg)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert "other.example.test" in reply.text and SMTP_NAME in reply.text
        assert nothing_sent(sink)


def test_expired_certificate_defers(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.expired) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level="verify",
                      smtp_tls_CAfile=pki.ca1.cert)
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and "expired" in reply.text, reply
        assert nothing_sent(sink)


def test_wildcard_certificate_matches_one_label(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.wildcard) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level="verify",
                      smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg).code == 250


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_below_verify_an_untrusted_certificate_is_used(tmp_path, dns, pki, level):
    with SMTPSink("127.0.0.2", tls_context=pki.other_name) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level=level,
                      smtp_tls_CAfile=pki.ca2.cert)
        assert send(cfg).code == 250
        assert sink.delivered[0].tls


@pytest.mark.parametrize("level", ["verify", "secure"])
def test_verify_levels_defer_when_starttls_is_not_offered(tmp_path, dns, level):
    with SMTPSink("127.0.0.2") as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level=level)
        reply = send(cfg)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.4"), reply
        assert nothing_sent(sink)


def test_verify_matches_the_mx_name_secure_the_next_hop(tmp_path, dns, pki):
    """An MX host's certificate names that host: enough for verify; secure
    wants the recipient domain or a name under it."""
    with SMTPSink("127.0.0.2", tls_context=pki.mx_hosting) as sink:
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=str(sink.port),
                       smtp_tls_security_level="verify", smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg, "bob@hosted.test", "hosted.test").code == 250
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=str(sink.port),
                       smtp_tls_security_level="secure", smtp_tls_CAfile=pki.ca1.cert)
        reply = send(cfg, "bob@hosted.test", "hosted.test")
        assert reply.enhanced == "4.7.5" and "*.hosted.test" in reply.text, reply
    with SMTPSink("127.0.0.2", tls_context=pki.mx_own) as sink:
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=str(sink.port),
                       smtp_tls_security_level="secure", smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg, "bob@remote.test", "remote.test").code == 250


def test_unreadable_ca_file_defers(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_security_level="verify",
                      smtp_tls_CAfile=str(tmp_path / "missing.pem"))
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and "smtp_tls_CAfile" in reply.text
        assert sink.connections == 0


# -- implicit TLS (smtp_tls_wrappermode) --------------------------------------

def test_wrappermode_speaks_tls_from_the_first_byte(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, implicit_tls=True) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_wrappermode="yes",
                      smtp_tls_security_level="secure", smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg).code == 250
        assert sink.delivered[0].tls and "STARTTLS" not in [c.upper() for c in sink.commands]


def test_wrappermode_with_an_untrusted_certificate_defers_without_a_dead_mark(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, implicit_tls=True) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_wrappermode="yes",
                      smtp_tls_security_level="verify", smtp_tls_CAfile=pki.ca2.cert)
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and "certificate not verified" in reply.text
        assert sink.commands == [] and sink.transactions == []
        send(cfg)
        assert sink.connections == 2       # a TLS failure is not a dead host


def test_wrappermode_at_level_may_still_requires_tls(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.other_name, implicit_tls=True) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_wrappermode="yes")
        assert send(cfg).code == 250 and sink.delivered[0].tls
    with SMTPSink("127.0.0.2") as plain:
        cfg = cfg_for(tmp_path, dns, plain, smtp_tls_wrappermode="yes")
        reply = send(cfg)
        assert reply.code // 100 == 4 and plain.transactions == []


# -- SMTP AUTH as a client ----------------------------------------------------

def password_file(tmp_path, text, mode=0o600):
    path = tmp_path / "sasl_passwd"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mechs", ["PLAIN LOGIN", "LOGIN"])
def test_auth_over_starttls_with_the_relayhost_as_written(tmp_path, dns, pki, mechs):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"relay-user": "s3cret:x y"},
                  auth_after_tls=True, auth_mechanisms=mechs) as sink:
        pw = password_file(tmp_path, f"# provider\n{SMTP_NAME} wrong:wrong\n"
                                     f"[{SMTP_NAME}]:{sink.port}   relay-user:s3cret:x y\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes",
                      smtp_sasl_password_maps=f"hash:{pw}", smtp_tls_security_level="secure",
                      smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg).code == 250
        assert sink.logins == [("relay-user", "s3cret:x y", True)]
        assert sink.delivered[0].auth == "relay-user"


def test_auth_keyed_by_host_name_and_over_implicit_tls(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, implicit_tls=True,
                  auth={"u": "p"}) as sink:
        pw = password_file(tmp_path, f"other.test x:y\n{SMTP_NAME.upper()} u:p\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_tls_wrappermode="yes",
                      smtp_sasl_password_maps=pw, smtp_tls_CAfile=pki.ca1.cert,
                      smtp_tls_security_level="verify")
        assert send(cfg).code == 250
        assert sink.delivered[0].auth == "u"


def test_auth_offered_without_tls_gets_no_credentials(tmp_path, dns):
    with SMTPSink("127.0.0.2", auth={"u": "p"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:p\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        reply = send(cfg)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.0"), reply
        assert "without TLS" in reply.text
        assert nothing_sent(sink) and sink.logins == []


def test_rejected_login_defers_with_the_servers_reply(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "right"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:wrong\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        reply = send(cfg)
        assert reply.code // 100 == 4 and reply.enhanced == "4.7.8", reply
        assert "535 5.7.8 Error: authentication failed" in reply.text
        assert sink.transactions == []


def test_no_credentials_for_this_server_sends_without_auth(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "p"}) as sink:
        pw = password_file(tmp_path, "[elsewhere.test]:587 u:p\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        assert send(cfg).code == 250
        assert sink.logins == [] and sink.delivered[0].auth == ""


def test_auth_disabled_ignores_the_password_file(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "p"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:p\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_password_maps=pw)
        assert send(cfg).code == 250 and sink.logins == []


def test_world_readable_password_file_is_refused(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "p"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:p\n", mode=0o644)
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        reply = send(cfg)
        assert reply.code // 100 == 4 and "readable by every user" in reply.text, reply
        assert nothing_sent(sink) and sink.logins == []


def test_symlinked_password_file_is_refused(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "p"}) as sink:
        real = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:p\n")
        link = tmp_path / "link"
        os.symlink(real, link)
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes",
                      smtp_sasl_password_maps=str(link))
        reply = send(cfg)
        assert reply.code // 100 == 4 and "cannot open" in reply.text, reply
        assert sink.logins == []


# -- through the queue: mailq and the log say why -----------------------------

def test_queue_run_shows_a_refused_login_and_a_refused_certificate_in_mailq(
        make_instance, tmp_path, dns, pki):
    from test_runner import queue as queue_msg
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "right"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:wrong\n")
        inst = make_instance(relayhost=f"[{SMTP_NAME}]:{sink.port}", dns_nameservers=dns.address,
                             smtp_sasl_auth_enable="yes", smtp_tls_security_level="verify",
                             smtp_tls_CAfile=pki.ca1.cert, smtp_helo_timeout="5s",
                             smtp_sasl_password_maps=pw)
        queue_msg(inst, ["bob@remote.test"])
        assert inst.sendmail("-q").returncode == 0
        out = inst.run("mailq").stdout.decode()
        assert "Deferred: 454 4.7.8 SASL login refused: 535 5.7.8" in out, out
        log = inst.maillog()
        assert "535 5.7.8 Error: authentication failed" in log and "stat=Deferred" in log
        assert "right" not in log and "wrong" not in log
        assert sink.transactions == []
        inst = make_instance(relayhost=f"[{SMTP_NAME}]:{sink.port}", dns_nameservers=dns.address,
                             smtp_sasl_auth_enable="yes", smtp_tls_security_level="verify",
                             smtp_tls_CAfile=pki.ca2.cert, smtp_helo_timeout="5s",
                             smtp_sasl_password_maps=pw)
        queue_msg(inst, ["bob@remote.test"])
        assert inst.sendmail("-q").returncode == 0
        out = inst.run("mailq").stdout.decode()
        assert "4.7.5" in out and "certificate not verified" in out, out
        assert sink.transactions == [] and len(sink.logins) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_daemon_logs_in_from_the_root_side_with_a_root_only_password_file(dns, pki):
    """The listener runs as mail_owner and cannot read the password file;
    the master (root), which delivers, can and logs in."""
    import shutil
    import smtplib
    import subprocess
    import tempfile
    from conftest import Instance
    from helpers import daemon, wait_for
    top = tempfile.mkdtemp(prefix="pymta-sasl-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"relay": "pw"}) as sink:
            pw = os.path.join(top, "sasl_passwd")
            with open(pw, "w") as f:
                f.write(f"[{SMTP_NAME}]:{sink.port} relay:pw\n")
            os.chmod(pw, 0o600)
            as_mail = subprocess.run(["cat", pw], user="mail", capture_output=True)
            assert as_mail.returncode != 0 and b"Permission denied" in as_mail.stderr
            inst = Instance(top)
            with daemon(inst, mail_owner="mail", relayhost=f"[{SMTP_NAME}]:{sink.port}",
                        dns_nameservers=dns.address, smtp_sasl_auth_enable="yes",
                        smtp_sasl_password_maps=f"hash:{pw}", smtp_tls_security_level="secure",
                        smtp_tls_CAfile=pki.ca1.cert) as (p, port):
                with smtplib.SMTP("127.0.0.1", port) as c:
                    assert c.sendmail("a@example.test", ["bob@remote.test"],
                                      b"Subject: relayed\r\n\r\nx\r\n") == {}
                assert wait_for(lambda: sink.delivered, 20)
            assert sink.logins == [("relay", "pw", True)] and sink.delivered[0].auth == "relay"
            assert "stat=Sent" in inst.maillog()
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- smtp_tls_policy_maps -----------------------------------------------------

def policy_file(tmp_path, text):
    path = tmp_path / "tls_policy"
    path.write_text(text)
    return str(path)


def test_policy_entry_for_the_relayhost_raises_the_level(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        table = policy_file(tmp_path, f"# provider\n[{SMTP_NAME}]:{sink.port}  secure\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_policy_maps=f"hash:{table}",
                      smtp_tls_CAfile=pki.ca2.cert)
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and nothing_sent(sink), reply
        assert "certificate not verified" in reply.text
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_policy_maps=table, smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg).code == 250


def test_policy_entry_for_a_parent_domain_and_one_that_lowers_the_level(tmp_path, dns):
    with SMTPSink("127.0.0.2") as sink:
        dns.zone["sub.remote.test"] = {"MX": [(10, "mx1.remote.test")]}
        table = policy_file(tmp_path, ".remote.test encrypt\nremote.test none\n")
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=str(sink.port),
                       smtp_tls_policy_maps=table, smtp_tls_security_level="secure")
        reply = send(cfg, "bob@sub.remote.test", "sub.remote.test")
        assert reply.enhanced == "4.7.4" and nothing_sent(sink), reply
        assert send(cfg, "bob@remote.test", "remote.test").code == 250     # none: no TLS asked


def test_policy_match_attribute(tmp_path, dns, pki):
    """secure with match=hostname accepts the MX host's own certificate,
    which the default nexthop:dot-nexthop refuses (see above)."""
    with SMTPSink("127.0.0.2", tls_context=pki.mx_hosting) as sink:
        table = policy_file(tmp_path, "hosted.test secure match=hostname\n"
                                      "remote.test verify match=.example.test:mx.nowhere.test\n")
        cfg = make_cfg(tmp_path, dns_nameservers=dns.address, smtp_port=str(sink.port),
                       smtp_tls_policy_maps=table, smtp_tls_CAfile=pki.ca1.cert)
        assert send(cfg, "bob@hosted.test", "hosted.test").code == 250
        reply = send(cfg, "bob@remote.test", "remote.test")
        assert reply.enhanced == "4.7.5" and "*.example.test or mx.nowhere.test" in reply.text, reply


def test_unsupported_policy_level_defers_with_the_reason(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        table = policy_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} fingerprint match=AB:CD\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_policy_maps=table)
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and "unsupported TLS level 'fingerprint'" in reply.text
        assert sink.connections == 0


def test_missing_policy_table_defers_instead_of_lowering_the_level(tmp_path, dns, pki):
    with SMTPSink("127.0.0.2", tls_context=pki.good) as sink:
        cfg = cfg_for(tmp_path, dns, sink, smtp_tls_policy_maps=f"hash:{tmp_path}/no-such-table")
        reply = send(cfg)
        assert reply.enhanced == "4.7.5" and "cannot open smtp_tls_policy_maps" in reply.text
        assert sink.connections == 0


def test_verbose_queue_run_shows_the_dialogue_but_not_the_password(make_instance, tmp_path, dns, pki):
    import base64
    from test_runner import queue as queue_msg
    with SMTPSink("127.0.0.2", tls_context=pki.good, auth={"u": "Secr3tPass"}) as sink:
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:Secr3tPass\n")
        inst = make_instance(relayhost=f"[{SMTP_NAME}]:{sink.port}", dns_nameservers=dns.address,
                             smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        queue_msg(inst, ["bob@remote.test"])
        r = inst.sendmail("-q", "-v")
        out = (r.stdout + r.stderr).decode()
        assert sink.delivered and sink.delivered[0].auth == "u"
        assert "MAIL FROM" in out and "stat=Sent" in out
        secret = base64.b64encode(b"\0u\0Secr3tPass").decode()
        assert "Secr3tPass" not in out and secret not in out and secret[:12] not in out
        assert "Secr3tPass" not in inst.maillog()


def test_failed_handshake_at_may_falls_back_to_plain_text_except_with_credentials(tmp_path, dns, pki):
    """No plain-text retry where a login is configured: the mail would go
    without it, and the server could refuse it for good."""
    import ssl
    import warnings
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broken.load_cert_chain(*TestCA(tmp_path / "ca", "Old CA").issue(SMTP_NAME))
    with warnings.catch_warnings():                        # TLS 1.1 is deprecated: the point
        warnings.simplefilter("ignore", DeprecationWarning)
        broken.maximum_version = ssl.TLSVersion.TLSv1_1   # below what the client accepts
    with SMTPSink("127.0.0.2", tls_context=broken, auth={"u": "p"}) as sink:
        cfg = cfg_for(tmp_path, dns, sink)
        assert send(cfg).code == 250 and not sink.delivered[0].tls
        assert sink.connections == 2
        pw = password_file(tmp_path, f"[{SMTP_NAME}]:{sink.port} u:p\n")
        cfg = cfg_for(tmp_path, dns, sink, smtp_sasl_auth_enable="yes", smtp_sasl_password_maps=pw)
        reply = send(cfg)
        assert (reply.code // 100, reply.enhanced) == (4, "4.7.5"), reply
        assert sink.connections == 3 and len(sink.delivered) == 1 and sink.logins == []


# -- against pymta's own submission services ----------------------------------

@pytest.mark.parametrize("service", ["submission", "submissions"])
def test_relaying_through_pymtas_own_submission_service(make_instance, tmp_path, pki, service):
    """The client against a real server: a pymta daemon's submission
    (STARTTLS) or submissions (implicit TLS) listener, AUTH required, the
    certificate from the test CA; secure level; a wrong password is refused
    there and deferred here."""
    from pymta import auth
    from helpers import daemon, free_port, wait_for
    cert, key = pki.ca1.issue(SMTP_NAME)
    provider = make_instance()
    pwfile = os.path.join(provider.root, "passwd")
    tmp, _ = auth.set_password(pwfile, "me@example.test", "pass word:1")
    os.rename(tmp, pwfile)
    sub = free_port()
    listen = {f"{service}_listen": f"127.0.0.1:{sub}"}
    zone = {SMTP_NAME: {"A": ["127.0.0.1"]}}
    with DNSServer(zone) as dns, daemon(provider, smtpd_tls_cert_file=cert, smtpd_tls_key_file=key,
                                        smtpd_sasl_password_file=pwfile, **listen):
        assert wait_for(lambda: f"daemon listening on 127.0.0.1:{sub}" in provider.maillog())
        common = dict(relayhost=f"[{SMTP_NAME}]:{sub}", dns_nameservers=dns.address,
                      smtp_sasl_auth_enable="yes", smtp_tls_security_level="secure",
                      smtp_tls_CAfile=pki.ca1.cert, smtp_tls_wrappermode=
                      "yes" if service == "submissions" else "no")
        bad = password_file(tmp_path, f"[{SMTP_NAME}]:{sub} me@example.test:wrong\n")
        cfg = make_cfg(tmp_path, smtp_sasl_password_maps=bad, **common)
        reply = send(cfg, "root@example.test", "example.test")
        assert reply.code // 100 == 4 and "535" in reply.text, reply
        good = password_file(tmp_path, f"[{SMTP_NAME}]:{sub} me@example.test:pass word:1\n")
        cfg = make_cfg(tmp_path, smtp_sasl_password_maps=good, **common)
        reply = send(cfg, "root@example.test", "example.test")
        assert reply.code == 250, reply
        assert wait_for(lambda: b"line one" in provider.mailbox(), 20)
    log = provider.maillog()
    assert "sasl_method=PLAIN, sasl_username=me@example.test: authentication failure" in log
    assert "sasl_method=PLAIN, sasl_username=me@example.test\n" in log


@pytest.mark.unit
def test_tls_contexts_are_shared_and_may_loads_no_ca_store(tmp_path, pki):
    """Loading the system's CA store costs ~60 ms of CPU: once per process
    and period, not per connection; never at the levels that check nothing."""
    from pymta import config, tls_policy
    import shutil
    cfg = config.from_dict(queue_directory=str(tmp_path))
    may = tls_policy.client_context(cfg, tls_policy.Policy("may"))
    assert may is tls_policy.client_context(cfg, tls_policy.Policy("encrypt"))
    assert may.cert_store_stats()["x509_ca"] == 0
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.ca1.cert, ca)
    cfg = config.from_dict(queue_directory=str(tmp_path), smtp_tls_CAfile=str(ca))
    v1 = tls_policy.client_context(cfg, tls_policy.Policy("verify"))
    assert v1 is tls_policy.client_context(cfg, tls_policy.Policy("secure"))
    assert v1.cert_store_stats()["x509_ca"] == 1
    with open(ca, "a") as f, open(pki.ca2.cert) as g:     # the file changes: read again
        f.write(g.read())
    v2 = tls_policy.client_context(cfg, tls_policy.Policy("verify"))
    assert v2 is not v1 and v2.cert_store_stats()["x509_ca"] == 2


def test_address_literal_relayhost_at_verify_needs_the_address_in_the_certificate(tmp_path, pki):
    with_ip = server_context(*pki.ca1.issue(SMTP_NAME, ips=["127.0.0.2"]))
    for ctx, ok in ((with_ip, True), (pki.good, False)):
        with SMTPSink("127.0.0.2", tls_context=ctx) as sink:
            cfg = make_cfg(tmp_path, relayhost=f"[127.0.0.2]:{sink.port}",
                           smtp_tls_security_level="verify", smtp_tls_CAfile=pki.ca1.cert)
            reply = send(cfg)
            if ok:
                assert reply.code == 250, reply
            else:
                assert reply.enhanced == "4.7.5" and "not 127.0.0.2" in reply.text, reply
                assert nothing_sent(sink)


@pytest.mark.unit
def test_certificate_name_matching_rules():
    from pymta.tls_policy import name_matches
    san = {"subject": ((("commonName", "cn.example.test"),),),
           "subjectAltName": (("DNS", "*.example.test"), ("DNS", "MX.Other.test."),
                              ("DNS", "w*.partial.test"), ("IP Address", "192.0.2.7"))}
    assert name_matches(san, [("a.example.test", False)])
    assert not name_matches(san, [("a.b.example.test", False)])        # one label only
    assert not name_matches(san, [("example.test", False)])
    assert name_matches(san, [("mx.other.test", False)])
    assert not name_matches(san, [("www.partial.test", False)])        # no partial wildcards
    assert not name_matches(san, [("cn.example.test.x", False)])
    assert name_matches(san, [("example.test", True)])                 # dot-nexthop
    assert name_matches(san, [("other.test", True)])
    assert name_matches(san, [("192.0.2.7", False)]) and not name_matches(san, [("192.0.2.8", False)])
    cn_only = {"subject": ((("commonName", "Mail.Example.test"),),)}
    assert name_matches(cn_only, [("mail.example.test", False)])       # CN only without SANs
    assert not name_matches({"subject": san["subject"], "subjectAltName": (("DNS", "x.test"),)},
                            [("cn.example.test", False)])              # SANs present: CN ignored
