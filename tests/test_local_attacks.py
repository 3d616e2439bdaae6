"""Local users attacking the queue's maildrop, as real throwaway users."""

import os
import textwrap

from conftest import Instance
from users import TESTPY, run_as


def _forge(user, inst, installed, sender, body):
    """Write a maildrop file directly as ``user`` (no sendmail): any envelope
    it likes. Returns the file's name."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(installed.prefix, "lib", "pymta")!r})
        from pymta import envelope as E, queue_dir, queue_maildrop
        env = E.Envelope(sender={sender!r})
        env.add_recipient("root", flags="p")
        print(queue_maildrop.drop(queue_dir.Spool({inst.params["queue_directory"]!r}), env, [{body!r}]))
        """)
    r = run_as(user, [os.path.join(TESTPY, "bin", "python"), "-c", script])
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def test_forged_maildrop_sender_gets_an_authentication_warning(make_user, shared_dir,
                                                               pymta_for_users):
    mallory = make_user("ptm")
    inst = Instance(shared_dir, trusted_users="root")
    _forge(mallory, inst, pymta_for_users, "ceo@bank.example",
           b"Subject: pay\nX-Authentication-Warning: nothing to see\n\nforged\n")
    _forge(mallory, inst, pymta_for_users, f"{mallory.pw_name}@mx.example.test",
           b"Subject: mine\n\nhonest\n")
    r = inst.sendmail("-q")
    assert r.returncode == 0, r.stderr
    box = inst.mailbox("root").decode()
    forged, honest = (m for m in box.split("\nFrom ") if "Subject: pay" in m or "Subject: mine" in m)
    if "Subject: mine" in forged:
        forged, honest = honest, forged
    assert (f"X-Authentication-Warning: mx.example.test: {mallory.pw_name} set sender to "
            f"ceo@bank.example using -f") in forged, box
    assert "X-Authentication-Warning" not in honest


def test_sendmail_f_by_a_user_warns_once(make_user, shared_dir, pymta_for_users):
    mallory = make_user("ptm")
    inst = Instance(shared_dir, trusted_users="root")
    r = run_as(mallory, [pymta_for_users.sendmail, "-C", inst.conf_path, "-f", "ceo@bank.example",
                         "root"], input=b"Subject: x\n\nbody\n")
    assert r.returncode == 0, r.stderr
    assert inst.sendmail("-q").returncode == 0
    assert inst.mailbox("root").count(b"X-Authentication-Warning:") == 1


def test_symlink_planted_in_maildrop_is_removed(make_user, shared_dir):
    mallory = make_user("ptm")
    inst = Instance(shared_dir)
    link = os.path.join(inst.spool.maildrop, "planted")
    r = run_as(mallory, ["/bin/ln", "-s", "/etc/passwd", link])
    assert r.returncode == 0, r.stderr
    assert inst.sendmail("-q").returncode == 0
    assert not os.path.lexists(link)
    assert "maildrop/planted: not a plain file, removed" in inst.maillog()
