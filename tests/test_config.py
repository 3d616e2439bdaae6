"""pymta.conf: syntax, expansion, errors naming file, line and parameter."""

import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import TOP

from pymta import config, confdoc
from pymta.status import ConfigError, TableError


def load_text(tmp_path, text, overrides=()):
    p = tmp_path / "pymta.conf"
    p.write_text(text)
    return config.load(str(p), overrides)


@pytest.mark.unit
def test_defaults_without_a_file(tmp_path):
    cfg = config.load(str(tmp_path / "missing.conf"), must_exist=False)
    assert cfg.smtp_port == 25 and cfg.maximal_queue_lifetime == 5 * 86400
    assert cfg.myorigin == cfg.myhostname


@pytest.mark.unit
def test_syntax_comments_and_continuations(tmp_path):
    cfg = load_text(tmp_path, "# comment\n\nmydestination = a.example,\n"
                              "    b.example\n\t c.example\n  # indented comment\n"
                              "mail_name=Foo # not a comment\n")
    assert cfg.mydestination == ("a.example", "b.example", "c.example")
    assert cfg.mail_name == "Foo # not a comment"


@pytest.mark.unit
def test_dollar_expansion(tmp_path):
    cfg = load_text(tmp_path, "myhostname = mx.example.com\nmydomain = example.com\n"
                              "mydestination = $myhostname, localhost.${mydomain}\n")
    assert cfg.mydestination == ("mx.example.com", "localhost.example.com")
    assert cfg.myorigin == "mx.example.com"
    assert cfg.raw["myorigin"] == "$myhostname"
    assert cfg.forward_path == ("$home/.forward",)


@pytest.mark.unit
def test_config_directory(tmp_path):
    cfg = load_text(tmp_path, "queue_directory = $config_directory/spool\n")
    assert cfg.queue_directory == f"{tmp_path}/spool"


@pytest.mark.unit
def test_time_units(tmp_path):
    cfg = load_text(tmp_path, "maximal_queue_lifetime = 4h\nsmtpd_timeout = 30\n"
                              "delay_warning_time = 2\nminimal_backoff_time = 1w\n")
    assert cfg.maximal_queue_lifetime == 4 * 3600
    assert cfg.smtpd_timeout == 30
    assert cfg.delay_warning_time == 2 * 3600
    assert cfg.minimal_backoff_time == 7 * 86400


@pytest.mark.unit
def test_O_overrides(tmp_path):
    cfg = load_text(tmp_path, "smtp_port = 26\n", ["smtp_port=2525", "relayhost = [mx]:587"])
    assert cfg.smtp_port == 2525 and cfg.relayhost == "[mx]:587"
    assert {"smtp_port", "relayhost"} <= cfg.explicit


@pytest.mark.parametrize("text,lineno,param,what", [
    ("relayhost = [host:abc\n", 1, "relayhost", "bad relayhost"),
    ("relayhost = mail.example:abc\n", 1, "relayhost", "bad relayhost"),
    ("relayhost = a b\n", 1, "relayhost", "bad relayhost"),
    ("mynetworks = 127.0.0.0/8, 10.0.0.0/33\n", 1, "mynetworks", "bad network '10.0.0.0/33'"),
    ("mynetworks = localnet\n", 1, "mynetworks", "bad network"),
    ("\nmyhostname = mail..example\n", 2, "myhostname", "bad host name"),
    ("myhostname = mail example\n", 1, "myhostname", "bad host name"),
    ("default_privs = root\n", 1, "default_privs", "must not be root"),
    ("default_privs = no body\n", 1, "default_privs", "bad user name"),
    ("smtpd_listen = 127.0.0.1:smtp\n", 1, "smtpd_listen", "bad port"),
    ("dns_nameservers = ns.example\n", 1, "dns_nameservers", "bad IP address"),
    ("queue_directory = var/spool\n", 1, "queue_directory", "not an absolute path"),
    ("alias_maps = dbm:/etc/aliases\n", 1, "alias_maps", "bad map type"),
    ("canonical_maps = ldap:/etc/ldap.cf\n", 1, "canonical_maps", "unsupported table type"),
    ("smtp_generic_maps = hash:generic\n", 1, "smtp_generic_maps", "not an absolute path"),
    ("masquerade_domains = !ex..ample.com\n", 1, "masquerade_domains", "bad domain"),
    ("syslog_facility = mial\n", 1, "syslog_facility", "bad syslog facility"),
    ("smtp_sasl_password_maps = ldap:/etc/pymta/ldap.cf\n", 1, "smtp_sasl_password_maps",
     "unsupported table type"),
    ("smtp_tls_policy_maps = hash:tls_policy\n", 1, "smtp_tls_policy_maps", "not an absolute path"),
    ("smtp_tls_CAfile = ca.pem\n", 1, "smtp_tls_CAfile", "not an absolute path"),
    ("data_directory = var/lib\n", 1, "data_directory", "not an absolute path"),
    ("mydestination = $myhostname, bad/domain\n", 1, "mydestination", "bad domain"),
    ("\n\nsmtp_port = many\n", 3, "smtp_port", "bad number"),
    ("maximal_queue_lifetime = 5x\n", 1, "maximal_queue_lifetime", "bad time"),
    ("smtpd_peername_lookup = maybe\n", 1, "smtpd_peername_lookup", "bad boolean"),
    ("smtpd_process_model = spawn\n", 1, "smtpd_process_model", "bad value"),
    ("myorigin = $mydomain\nmydomain = $myorigin\n", None, None, "recursive"),
    ("   continued\n", 1, None, "continuation"),
    ("just words\n", 1, None, "expected 'name = value'"),
])
@pytest.mark.unit
def test_errors_name_file_line_and_parameter(tmp_path, text, lineno, param, what):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert what in msg
    if lineno:
        assert f"{tmp_path}/pymta.conf:{lineno}:" in msg
    if param:
        assert f"{param}:" in msg


def sendmail(*args, env=None):
    full = dict(os.environ)
    full.pop("PYMTA_CONFIG", None)
    full.update(env or {})
    return subprocess.run([sys.executable, os.path.join(TOP, "bin", "sendmail"), *args],
                          input=b"", capture_output=True, env=full, timeout=60)


def test_sendmail_exits_78_naming_file_line_and_parameter(inst):
    with open(inst.conf_path, "a") as f:
        f.write("bounce_queue_lifetime = 3 days\n")
    n = len(open(inst.conf_path).read().splitlines())
    r = inst.sendmail("-d0")
    assert r.returncode == 78
    assert f"{inst.conf_path}:{n}: bounce_queue_lifetime: bad time value".encode() in r.stderr


def test_an_unknown_parameter_warns_and_mail_flows(inst):
    """Postfix's "unused parameter": a typo must not stop the mail."""
    inst.write_config(smtpd_frobnicate="yes")
    n = len(open(inst.conf_path).read().splitlines())
    warning = f"{inst.conf_path}, line {n}: unused parameter: smtpd_frobnicate=yes"
    r = inst.sendmail("-odq", "root", input=b"Subject: flows\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""      # not on the stderr of every program that sends mail
    assert [n for n in os.listdir(inst.spool.dir) if n.startswith("qf")]
    assert f"warning: {warning}" in inst.maillog()
    r = inst.sendmail("-d0")
    assert r.returncode == 0 and f"sendmail: warning: {warning}".encode() in r.stderr
    assert b"smtpd_frobnicate" not in r.stdout


def test_O_with_an_unknown_parameter_is_still_an_error(inst):
    r = inst.sendmail("-O", "smtpd_frobnicate=yes", "-d0")
    assert r.returncode == 78 and b"smtpd_frobnicate: unknown parameter" in r.stderr


@pytest.mark.unit
def test_mydomain_defaults_to_myhostname_less_its_first_label(tmp_path):
    assert load_text(tmp_path, "myhostname = mx1.mail.example.org\n").mydomain == "mail.example.org"
    cfg = load_text(tmp_path, "myhostname = mx1.example.org\n")
    assert cfg.mydestination == ("mx1.example.org", "localhost.example.org", "localhost")
    assert load_text(tmp_path, "myhostname = single\n").mydomain == "localdomain"
    assert load_text(tmp_path, "myhostname = a.b.example\nmydomain = other.example\n"
                     ).mydomain == "other.example"


JUNK = ["[host:abc", "x y z", "-1", "$", "${", "99999999999999999999", "\u00e9", ":", "[", "/",
        "0", "", "a,b", "host:0", "[::1]:99999", "1.2.3.4/99", "root", "hash:", "/tmp/x y",
        "$nosuch", "[1.2.3.4", "\x01"]


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(config.PARAMS))
def test_no_value_of_any_parameter_ends_in_a_traceback(tmp_path, name):
    """Each value either fails at load, naming the file, line and parameter,
    or is taken by everything that reads it: the router, the SMTP server's
    services, the resolver, remote delivery, the queue runner, pymta check."""
    import logging
    from pymta import check, daemon, mx, queue_run, remote, route, smtpd_common
    log = logging.getLogger("pymta.test")
    path = tmp_path / "pymta.conf"
    for junk in JUNK:
        path.write_text(f"queue_directory = {tmp_path}/spool\n{name} = {junk}\n")
        try:
            cfg = config.load(str(path))
        except ConfigError as e:
            assert f"{path}:2: {name}:" in str(e) or "recursive" in str(e), (junk, str(e))
            continue
        route.Router(cfg, log=log)
        smtpd_common.Services(cfg, log)
        mx.make_resolver(cfg)
        remote.destination(cfg, "example.com")
        daemon.listener_count(cfg)
        queue_run.Runner(cfg, log=log, processes=False)
        check.run(cfg, fix=False, dependencies=False)


@pytest.mark.parametrize("line", ["relayhost = [host:abc", "mynetworks = 10.0.0.0/33",
                                  "myhostname = a..b", "default_privs = root"])
def test_bad_values_stop_every_program_with_78_and_no_traceback(inst, line):
    with open(inst.conf_path, "a") as f:
        f.write(line + "\n")
    for args in (["-bv", "user@remote.example"], ["-odi", "root"], ["-bp"], ["-bD"]):
        r = inst.sendmail(*args, input=b"Subject: x\n\nx\n")
        assert r.returncode == 78, (args, r.stderr)
        assert b"Traceback" not in r.stderr
        assert f"{inst.conf_path}:".encode() in r.stderr and line.split()[0].encode() in r.stderr


def test_bad_O_exits_78(inst):
    r = inst.sendmail("-O", "smtp_port=x", "-d0")
    assert r.returncode == 78 and b"smtp_port" in r.stderr


def test_missing_named_file_exits_78(tmp_path):
    r = sendmail("-C", str(tmp_path / "nope.conf"), "-d0")
    assert r.returncode == 78 and b"no such file" in r.stderr


def test_PYMTA_CONFIG_names_the_file(inst):
    r = sendmail("-d0", env={"PYMTA_CONFIG": inst.conf_path})
    assert r.returncode == 0
    assert b"myhostname = mx.example.test\n" in r.stdout


def test_d0_dumps_every_parameter_expanded(inst):
    r = inst.sendmail("-d0", "-O", "smtp_port=2525")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(config.PARAMS)
    assert "smtp_port = 2525" in lines and "myorigin = mx.example.test" in lines
    assert lines == sorted(lines)


def pymta_config(inst, *args):
    return subprocess.run([sys.executable, os.path.join(TOP, "bin", "pymta"), "-C", inst.conf_path,
                           "config", *args], capture_output=True, text=True, timeout=60)


def test_pymta_config_all_set_one_and_as_written(inst):
    inst.write_config(smtpd_banner="$myhostname ready")
    r = pymta_config(inst)
    assert r.returncode == 0 and r.stdout == inst.sendmail("-d0").stdout.decode()
    assert "smtpd_banner = mx.example.test ready\n" in r.stdout
    r = pymta_config(inst, "-n")
    assert sorted(r.stdout.splitlines()) == sorted(
        f"{k} = {inst.cfg.expanded(k)}" for k in inst.params)
    r = pymta_config(inst, "smtpd_banner", "myorigin")
    assert r.stdout == "smtpd_banner = mx.example.test ready\nmyorigin = mx.example.test\n"
    assert pymta_config(inst, "-h", "pid_file").stdout == inst.params["pid_file"] + "\n"
    assert pymta_config(inst, "-r", "myorigin").stdout == "myorigin = $myhostname\n"
    assert pymta_config(inst, "-d", "smtp_port").stdout == "smtp_port = 25\n"
    r = pymta_config(inst, "no_such_parameter")
    assert r.returncode == 64 and "no_such_parameter: unknown parameter" in r.stderr


@pytest.mark.unit
def test_committed_sample_config_and_man_page_match_the_generator():
    """After changing config.PARAMS: python -m pymta.confdoc conf > etc/pymta.conf
    and python -m pymta.confdoc man > man/pymta.conf.5."""
    with open(os.path.join(TOP, "etc", "pymta.conf")) as f:
        assert f.read() == confdoc.conf(), "regenerate etc/pymta.conf"
    with open(os.path.join(TOP, "man", "pymta.conf.5")) as f:
        assert f.read() == confdoc.man(), "regenerate man/pymta.conf.5"


@pytest.mark.unit
def test_sample_config_loads_with_every_line_uncommented(tmp_path):
    import re
    text = re.sub(r"^#([A-Za-z_]+ =)", r"\1", confdoc.conf(), flags=re.M)
    cfg = load_text(tmp_path, text)
    assert cfg.explicit >= set(config.PARAMS) - {"config_directory"}


@pytest.mark.unit
def test_every_parameter_is_in_the_man_page():
    page = confdoc.man()
    for name in config.PARAMS:
        assert f"\n.B {name}\n" in page


@pytest.mark.unit
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(list("${}ab_91 -,\t.émsw")), max_size=30).map("".join))
def test_expansion_and_lists_agree_with_their_grammar(value):
    # Written without re (sendmail reads the configuration): the grammar, with it.
    def lookup(name, text):
        return "<" + name + ">" if name != "b" else text
    want = re.sub(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))",
                  lambda m: lookup(m.group(1) or m.group(2), m.group(0)), value)
    assert config.expand_refs(value, lookup) == want
    assert config.split_list(value) == [v for v in re.split(r"[\s,]+", value.strip()) if v]
    m = re.fullmatch(r"\s*([0-9]+)\s*([smhdw]?)\s*", value)
    try:
        got = config.parse_time(value, "m")
    except ValueError:
        got = None
    assert got == (int(m.group(1)) * {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
                   if m else None)


@pytest.mark.unit
def test_table_paths_are_read_without_regular_expressions():
    assert config.table_paths(["hash:/a, HASH:/b\ttexthash:/c", " /d ,cdb:/e/f:g"]) == \
        ["/a", "/b", "/c", "/d", "/e/f:g"]
    for bad in ("hashx:/e", "ldap:/etc/ldap.cf", "proxy:hash:/x"):
        with pytest.raises(TableError, match="unsupported table type"):
            config.table_paths([bad])


@pytest.mark.unit
def test_the_ipv4_check_without_the_socket_module_reads_addresses_as_inet_pton():
    import _socket
    import random

    def pton(text):
        try:
            _socket.inet_pton(_socket.AF_INET, text)
            return True
        except OSError:
            return False
    rnd = random.Random(4)
    parts = ["0", "00", "1", "01", "09", "255", "256", "999", "12", "", "x", "-1", "0x1", " 1", "\u0661"]
    cases = [".".join(rnd.choice(parts) for _ in range(rnd.choice([3, 4, 4, 4, 5]))) for _ in range(5000)]
    cases += ["1.2.3.4", "255.255.255.255", "0.0.0.0", "1.2.3.4 ", "1.2.3.4%eth0"]
    assert [c for c in cases if config._is_ipv4(c) != pton(c)] == []
    assert config.check_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    with pytest.raises(ValueError):
        config.check_hostport("127.0.0.256:25")
