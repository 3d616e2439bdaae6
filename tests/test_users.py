"""The throwaway-user fixtures themselves (tests/users.py)."""

import os

from conftest import Instance
from users import TESTPY, run_as


def test_throwaway_user_runs_installed_sendmail(make_user, shared_dir, pymta_for_users):
    alice = make_user()
    assert os.path.isdir(alice.pw_dir) and os.stat(alice.pw_dir).st_uid == alice.pw_uid
    # TESTPY is readable and runnable by everyone, and nobody else can change it.
    st = os.stat(TESTPY)
    assert st.st_mode & 0o755 == 0o755 and not st.st_mode & 0o022
    inst = Instance(shared_dir)
    r = run_as(alice, [pymta_for_users.sendmail, "-C", inst.conf_path, "-bv", alice.pw_name])
    assert r.returncode == 0, r.stderr
    assert f"user {alice.pw_name}" in r.stdout.decode()
    r = run_as(alice, [pymta_for_users.sendmail, "-C", inst.conf_path, "-odq", "root"],
               input=b"Subject: hi\n\nhello\n")
    assert r.returncode == 0, r.stderr
    names = os.listdir(os.path.join(inst.params["queue_directory"], "maildrop"))
    owners = {os.stat(os.path.join(inst.params["queue_directory"], "maildrop", n)).st_uid
              for n in names}
    assert owners == {alice.pw_uid}
    r = run_as(alice, ["/usr/bin/id", "-u"])
    assert r.stdout.decode().strip() == str(alice.pw_uid)

