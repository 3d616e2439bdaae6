"""Shared fixtures: a private pymta instance (config file, queue, mailboxes)
in a temporary directory, and a way to run bin/sendmail against it."""

import os
import socket as _socket
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(TOP, "bin")
sys.path.insert(0, TOP)

from pymta import config as _config  # noqa: E402
from pymta.queue_dir import Spool  # noqa: E402


class Instance:
    """A pymta installation under one directory, driven as a user would."""

    def __init__(self, root, **params):
        self.root = str(root)
        self.conf_path = os.path.join(self.root, "pymta.conf")
        self.params = {
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "mydestination": "$myhostname, localhost, example.test",
            "queue_directory": os.path.join(self.root, "spool"),
            "mail_spool_directory": os.path.join(self.root, "mail"),
            "alias_maps": "hash:" + os.path.join(self.root, "aliases"),
            "pid_file": os.path.join(self.root, "pymta.pid"),
            "maillog_file": os.path.join(self.root, "maillog"),
            "smtpd_peername_lookup": "no",
            "smtpd_listen": "127.0.0.1:0",
            "queue_minfree": "0",
            "dns_nameservers": "127.0.0.1:1",
            # One listener, whatever the CPUs: tests that look at "the"
            # listener (its syncers, its memory) must get their connections
            # there. The tests of several listeners ask for them.
            "smtpd_listeners": "1",
        }
        self.params.update({k: str(v) for k, v in params.items()})
        os.makedirs(os.path.join(self.root, "mail"), exist_ok=True)
        if not os.path.exists(os.path.join(self.root, "aliases")):
            with open(os.path.join(self.root, "aliases"), "w") as f:
                f.write("postmaster: root\nMAILER-DAEMON: postmaster\n")
        self.write_config()
        self.spool = Spool(self.params["queue_directory"])
        self.spool.create()

    def write_config(self, **more):
        self.params.update({k: str(v) for k, v in more.items()})
        with open(self.conf_path, "w") as f:
            for k, v in self.params.items():
                f.write(f"{k} = {v}\n")

    @property
    def cfg(self):
        return _config.load(self.conf_path)

    def run(self, program, *args, input=b"", env=None, timeout=60, **kw):
        """Run bin/<program> -C <conf> args...; returns CompletedProcess."""
        cmd = [sys.executable, os.path.join(BIN, program), "-C", self.conf_path, *args]
        full_env = dict(os.environ)
        full_env.pop("PYMTA_CONFIG", None)
        if env:
            full_env.update(env)
        return subprocess.run(cmd, input=input, capture_output=True, env=full_env,
                              timeout=timeout, **kw)

    def sendmail(self, *args, **kw):
        return self.run("sendmail", *args, **kw)

    def maillog(self):
        try:
            with open(self.params["maillog_file"]) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mailbox(self, user="root"):
        """The bytes of the user's mbox under mail/ (b"" when there is none)."""
        try:
            with open(os.path.join(self.root, "mail", user), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""


@pytest.fixture
def inst(tmp_path):
    """A fresh pymta instance under tmp_path."""
    return Instance(tmp_path)


@pytest.fixture
def make_instance(tmp_path_factory):
    """Factory: make_instance(**params) -> Instance in a new directory."""
    def make(**params):
        return Instance(tmp_path_factory.mktemp("pymta"), **params)
    return make


# Throwaway users and a pymta they can run: see tests/users.py.
from users import make_user, pymta_for_users, shared_dir  # noqa: E402,F401



# A test marked ``unit`` is a pure unit: it starts no process and opens no
# socket (files in its tmp_path are fine). `make test-fast` runs only these;
# this fixture makes a test that breaks the rule fail, so the mark stays true.
def _not_in_a_unit_test(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test marked unit may not {what}: mark it otherwise")
    return refuse


@pytest.fixture(autouse=True)
def _unit_is_pure(request, monkeypatch):
    if request.node.get_closest_marker("unit") is not None:
        monkeypatch.setattr(os, "fork", _not_in_a_unit_test("fork"))
        monkeypatch.setattr(subprocess.Popen, "_execute_child", _not_in_a_unit_test("start a process"))
        monkeypatch.setattr(_socket.socket, "__init__", _not_in_a_unit_test("open a socket"))
    yield


def pytest_collection_modifyitems(items):
    # Tests that make throwaway users need root: mark them so that
    # `-m "not users"` leaves them out on a developer's unprivileged machine.
    for item in items:
        if {"make_user", "pymta_for_users"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.users)
