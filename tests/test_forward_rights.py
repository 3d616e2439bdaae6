"""Rights of .forward and :include: expansions, attacked by real local users."""

import os

from conftest import Instance


def test_forward_include_of_another_users_file_runs_nothing_as_her(make_user, shared_dir):
    alice, mallory = make_user("pta"), make_user("ptm")
    marker = os.path.join(shared_dir, "ran-as-alice")
    out = os.path.join(alice.pw_dir, "appended")
    notes = os.path.join(alice.pw_dir, "notes.txt")
    with open(notes, "w") as f:
        f.write(f"|/usr/bin/touch {marker}\n{out}\nsecret-line-of-alice\n")
    os.chown(notes, alice.pw_uid, alice.pw_gid)
    os.chmod(notes, 0o600)
    os.chmod(shared_dir, 0o777)
    fwd = os.path.join(mallory.pw_dir, ".forward")
    with open(fwd, "w") as f:
        f.write(f":include:{notes}\n")
    os.chown(fwd, mallory.pw_uid, mallory.pw_gid)
    inst = Instance(shared_dir)
    inst.sendmail("-odi", mallory.pw_name, input=b"Subject: x\n\nbody\n")
    # Nothing is left of the expansion: mallory's mail fails (and bounces).
    assert not os.path.exists(marker)
    assert not os.path.exists(out)
    log = inst.maillog()
    assert "secret-line-of-alice" not in log and "touch" not in log
    assert "cannot open :include:" in log


def test_forward_include_readable_file_runs_as_forward_owner(make_user, shared_dir):
    alice, mallory = make_user("pta"), make_user("ptm")
    os.chmod(shared_dir, 0o777)
    marker = os.path.join(shared_dir, "ran")
    notes = os.path.join(alice.pw_dir, "public.txt")
    with open(notes, "w") as f:
        f.write(f"|/usr/bin/touch {marker}\n")
    os.chown(notes, alice.pw_uid, alice.pw_gid)
    os.chmod(notes, 0o644)
    os.chmod(alice.pw_dir, 0o755)
    fwd = os.path.join(mallory.pw_dir, ".forward")
    with open(fwd, "w") as f:
        f.write(f":include:{notes}\n")
    os.chown(fwd, mallory.pw_uid, mallory.pw_gid)
    inst = Instance(shared_dir)
    r = inst.sendmail("-odi", mallory.pw_name, input=b"Subject: x\n\nbody\n")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(marker), inst.maillog()
    assert os.stat(marker).st_uid == mallory.pw_uid
