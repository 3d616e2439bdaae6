"""pymta.conf: syntax, expansion, errors naming file, line and parameter."""

import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import TOP

from pymta import config, confdoc
from pymta.status import ConfigError


def load_text(tmp_path, text, overrides=()):
    p = tmp_path / "pymta.conf"
    p.write_text(text)
    return config.load(str(p), overrides)


def test_defaults_without_a_file(tmp_path):
    cfg = config.load(str(tmp_path / "missing.conf"), must_exist=False)
    assert cfg.smtp_port == 25 and cfg.maximal_queue_lifetime == 5 * 86400
    assert cfg.myorigin == cfg.myhostname


def test_syntax_comments_and_continuations(tmp_path):
    cfg = load_text(tmp_path, "# comment\n\nmydestination = a.example,\n"
                              "    b.example\n\t c.example\n  # indented comment\n"
                              "mail_name=Foo # not a comment\n")
    assert cfg.mydestination == ("a.example", "b.example", "c.example")
    assert cfg.mail_name == "Foo # not a comment"


def test_dollar_expansion(tmp_path):
    cfg = load_text(tmp_path, "myhostname = mx.example.com\nmydomain = example.com\n"
                              "mydestination = $myhostname, localhost.${mydomain}\n")
    assert cfg.mydestination == ("mx.example.com", "localhost.example.com")
    assert cfg.myorigin == "mx.example.com"
    assert cfg.raw["myorigin"] == "$myhostname"
    assert cfg.forward_path == ("$home/.forward",)


def test_config_directory(tmp_path):
    cfg = load_text(tmp_path, "queue_directory = $config_directory/spool\n")
    assert cfg.queue_directory == f"{tmp_path}/spool"


def test_time_units(tmp_path):
    cfg = load_text(tmp_path, "maximal_queue_lifetime = 4h\nsmtpd_timeout = 30\n"
                              "delay_warning_time = 2\nminimal_backoff_time = 1w\n")
    assert cfg.maximal_queue_lifetime == 4 * 3600
    assert cfg.smtpd_timeout == 30
    assert cfg.delay_warning_time == 2 * 3600
    assert cfg.minimal_backoff_time == 7 * 86400


def test_O_overrides(tmp_path):
    cfg = load_text(tmp_path, "smtp_port = 26\n", ["smtp_port=2525", "relayhost = [mx]:587"])
    assert cfg.smtp_port == 2525 and cfg.relayhost == "[mx]:587"
    assert {"smtp_port", "relayhost"} <= cfg.explicit


@pytest.mark.parametrize("text,lineno,param,what", [
    ("mail_name = x\nno_such_thing = 1\n", 2, "no_such_thing", "unknown parameter"),
    ("\n\nsmtp_port = many\n", 3, "smtp_port", "bad number"),
    ("maximal_queue_lifetime = 5x\n", 1, "maximal_queue_lifetime", "bad time"),
    ("smtpd_peername_lookup = maybe\n", 1, "smtpd_peername_lookup", "bad boolean"),
    ("smtpd_process_model = spawn\n", 1, "smtpd_process_model", "bad value"),
    ("myorigin = $mydomain\nmydomain = $myorigin\n", None, None, "recursive"),
    ("   continued\n", 1, None, "continuation"),
    ("just words\n", 1, None, "expected 'name = value'"),
])
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


def test_sendmail_unknown_parameter_exits_78(inst):
    inst.write_config(smtpd_frobnicate="yes")
    r = inst.sendmail("root", input=b"\nx\n")
    assert r.returncode == 78 and b"smtpd_frobnicate: unknown parameter" in r.stderr
    assert os.listdir(inst.spool.dir) == []


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


def test_d0_dumps_every_parameter_unexpanded(inst):
    r = inst.sendmail("-d0", "-O", "smtp_port=2525")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(config.PARAMS)
    assert "smtp_port = 2525" in lines and "myorigin = $myhostname" in lines
    assert lines == sorted(lines)


def test_committed_sample_config_and_man_page_match_the_generator():
    """After changing config.PARAMS: python -m pymta.confdoc conf > etc/pymta.conf
    and python -m pymta.confdoc man > man/pymta.conf.5."""
    with open(os.path.join(TOP, "etc", "pymta.conf")) as f:
        assert f.read() == confdoc.conf(), "regenerate etc/pymta.conf"
    with open(os.path.join(TOP, "man", "pymta.conf.5")) as f:
        assert f.read() == confdoc.man(), "regenerate man/pymta.conf.5"


def test_sample_config_loads_with_every_line_uncommented(tmp_path):
    import re
    text = re.sub(r"^#([A-Za-z_]+ =)", r"\1", confdoc.conf(), flags=re.M)
    cfg = load_text(tmp_path, text)
    assert cfg.explicit >= set(config.PARAMS) - {"config_directory"}


def test_every_parameter_is_in_the_man_page():
    page = confdoc.man()
    for name in config.PARAMS:
        assert f"\n.B {name}\n" in page


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
