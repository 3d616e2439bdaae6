"""The sendmail command line: sendmail's flag syntax, personalities, usage errors."""

import os

import pytest

from pymta.cli import UsageError, parse_args


@pytest.mark.parametrize("argv,attrs", [
    (["-t", "-i"], dict(read_recipients=True, ignore_dots=True, mode="m")),
    (["-ti"], dict(read_recipients=True, ignore_dots=True)),
    (["-oi"], dict(ignore_dots=True)),
    (["-fa@b", "x"], dict(sender="a@b", recipients=["x"])),
    (["-f", "a@b", "x"], dict(sender="a@b", recipients=["x"])),
    (["-r", "a@b"], dict(sender="a@b")),
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     dict(fullname="CronDaemon", ignore_dots=True, body_type="8BITMIME", error_mode="m",
          recipients=["root"])),
    (["-i", "--", "-user"], dict(recipients=["-user"])),
    (["-odi"], dict(delivery_mode="i")),
    (["-odb"], dict(delivery_mode="b")),
    (["-odq"], dict(delivery_mode="q")),
    ([], dict(delivery_mode=None, error_mode="p")),
    (["-oeq"], dict(error_mode="q")),
    (["-N", "success,delay", "-R", "hdrs", "-V", "id1"],
     dict(dsn_notify="success,delay", dsn_ret="HDRS", dsn_envid="id1")),
    (["-v", "-L", "tag", "-X", "/tmp/x", "-h", "3", "-n"],
     dict(verbose=True, log_tag="tag", traffic_file="/tmp/x", hop_count=3, no_alias=True)),
    (["-C", "/etc/x.conf", "-O", "a=b", "-Oc=d"],
     dict(config_path="/etc/x.conf", overrides=["a=b", "c=d"])),
    (["-bs"], dict(mode="s")),
    (["-bd", "-q30m"], dict(mode="d", queue_interval=1800)),
    (["-bD", "-q", "15"], dict(mode="D")),
    (["-bp"], dict(mode="p")),
    (["-bP"], dict(mode="P", count_only=True)),
    (["-bi"], dict(mode="i")),
    (["-bv", "a@b"], dict(mode="v", recipients=["a@b"])),
    (["-q"], dict(mode="q", queue_interval=0)),
    (["-q1h"], dict(mode="q", queue_interval=3600)),
    (["-qIabc", "-qR!foo"], dict(mode="q", queue_filters=[("I", "abc", False), ("R", "foo", True)])),
    (["-Qreason", "-qSbob"], dict(mode="q", queue_hold="reason")),
    (["-d0"], dict(mode="d0")),
    (["-oQ/tmp/q"], dict(overrides=["queue_directory=/tmp/q"])),
    (["-m", "-oL9", "-Am", "-U", "x"], dict(recipients=["x"])),
])
@pytest.mark.unit
def test_flags(argv, attrs):
    opts = parse_args(argv)
    for k, v in attrs.items():
        assert getattr(opts, k) == v, k


@pytest.mark.parametrize("argv", [["-Z"], ["-bz"], ["-odx"], ["-oez"], ["-B", "binary"],
                                  ["-N", "sometimes"], ["-N", "never,success"], ["-R", "all"],
                                  ["-f"], ["-h", "x"], ["-q5x"], ["-ox"]])
@pytest.mark.unit
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


@pytest.mark.unit
def test_personality_from_program_name():
    assert parse_args([], "mailq").mode == "p"
    assert parse_args([], "newaliases").mode == "i"
    assert parse_args(["-c"], "mailq").count_only


def test_unknown_flag_exits_64_with_usage(inst):
    r = inst.sendmail("-Y")
    assert r.returncode == 64
    assert b"unknown option -Y" in r.stderr and b"usage: sendmail" in r.stderr


def test_program_name_selects_the_role(inst):
    r = inst.run("newaliases")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(os.path.join(os.path.dirname(__file__), "..", "bin", "mailq"))
