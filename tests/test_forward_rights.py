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


# -- a .forward that points at a file its user cannot read (item 2)

SECRET = "victim:$6$Zq9SECRETHASHx1$abcdefghijklmnop:19700:0:99999:7:::"


def _root_only_secret(near):
    """A shadow-like file only root can read, in a 0700 root directory on
    the same file system as ``near`` (so that a hard link can be made)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="ptsecret-", dir=os.path.dirname(near))
    os.chmod(d, 0o700)
    path = os.path.join(d, "shadow")
    with open(path, "w") as f:
        f.write(f"root:*:19700:0:99999:7:::\n{SECRET}\n")
    os.chmod(path, 0o600)
    return d, path


def _leaks(top, *more):
    """Files under ``top`` (and ``more``) holding a piece of the secret."""
    found = []
    for path in more:
        if os.path.exists(path) and "SECRETHASH" in open(path, errors="replace").read():
            found.append(path)
    for dirpath, _, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                with open(p, "rb") as f:
                    if b"SECRETHASH" in f.read():
                        found.append(p)
            except OSError:
                pass
    return found


import pytest  # noqa: E402
import shutil  # noqa: E402


@pytest.mark.parametrize("how", ["symlink", "hardlink", "dir-symlink"])
def test_forward_pointing_at_a_root_only_file_leaks_nothing(make_user, shared_dir, how):
    mallory = make_user("ptm")
    secret_dir, secret = _root_only_secret(mallory.pw_dir)
    try:
        forward_path = "$home/.forward"
        if how == "symlink":
            os.symlink(secret, os.path.join(mallory.pw_dir, ".forward"))
            os.lchown(os.path.join(mallory.pw_dir, ".forward"), mallory.pw_uid, mallory.pw_gid)
            why = ".forward is a symbolic link; ignored"
        elif how == "hardlink":
            try:
                os.link(secret, os.path.join(mallory.pw_dir, ".forward"))
            except OSError as e:
                pytest.skip(f"no hard link across {e}")
            why = ".forward is root's and has other hard links; ignored"
        else:
            # forward_path below a directory the user replaced by a symlink
            # to a root directory holding a file of that name.
            forward_path = "$home/.config/shadow"
            link = os.path.join(mallory.pw_dir, ".config")
            os.symlink(secret_dir, link)
            os.lchown(link, mallory.pw_uid, mallory.pw_gid)
            why = ".config/shadow is reached through a symbolic link (.config); ignored"
        inst = Instance(shared_dir, forward_path=forward_path)
        r = inst.sendmail("-odi", "-f", f"{mallory.pw_name}@mx.example.test", mallory.pw_name,
                          input=b"Subject: x\n\nbody\n")
        assert r.returncode == 0, r.stderr
        log = inst.maillog()
        assert why in log, log
        # Her mail goes to her mailbox as if there were no .forward; nothing
        # of the file is anywhere she or the log can see (no bounce either).
        assert b"body" in inst.mailbox(mallory.pw_name)
        assert _leaks(shared_dir) == []
        assert b"SECRETHASH" not in r.stdout + r.stderr
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_bad_forward_line_is_logged_by_number_only(make_user, shared_dir):
    mallory = make_user("ptm")
    fwd = os.path.join(mallory.pw_dir, ".forward")
    with open(fwd, "w") as f:
        f.write(f"# mine\n{SECRET}\n\\{mallory.pw_name}\n")
    os.chown(fwd, mallory.pw_uid, mallory.pw_gid)
    inst = Instance(shared_dir)
    r = inst.sendmail("-odi", mallory.pw_name, input=b"Subject: x\n\nbody\n")
    assert r.returncode == 0, r.stderr
    log = inst.maillog()
    assert f"{fwd}:2: not an address" in log, log
    assert _leaks(shared_dir) == []
    assert b"body" in inst.mailbox(mallory.pw_name)


def test_forward_fifo_is_ignored_without_waiting(make_user, shared_dir):
    import time
    mallory = make_user("ptm")
    fwd = os.path.join(mallory.pw_dir, ".forward")
    os.mkfifo(fwd, 0o644)
    os.chown(fwd, mallory.pw_uid, mallory.pw_gid)
    inst = Instance(shared_dir)
    t0 = time.monotonic()
    r = inst.sendmail("-odi", mallory.pw_name, input=b"Subject: x\n\nbody\n", timeout=30)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 8
    assert ".forward is not a regular file; ignored" in inst.maillog()
    assert b"body" in inst.mailbox(mallory.pw_name)


# -- :include: of files that are not plain, or too big (item 3)

def test_forward_include_of_a_fifo_does_not_wait(make_user, shared_dir):
    import time
    mallory = make_user("ptm")
    fifo = os.path.join(mallory.pw_dir, "list")
    os.mkfifo(fifo, 0o644)
    os.chown(fifo, mallory.pw_uid, mallory.pw_gid)
    fwd = os.path.join(mallory.pw_dir, ".forward")
    with open(fwd, "w") as f:
        f.write(f":include:{fifo}\n")
    os.chown(fwd, mallory.pw_uid, mallory.pw_gid)
    inst = Instance(shared_dir)
    t0 = time.monotonic()
    inst.sendmail("-odi", mallory.pw_name, input=b"Subject: x\n\nbody\n", timeout=30)
    assert time.monotonic() - t0 < 8        # the include deadline is 10 s
    assert f"cannot open :include:{fifo}: is not a regular file" in inst.maillog()


def test_alias_include_of_fifo_device_and_big_file_refused(tmp_path):
    import time
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_text("root\n" * 400)           # 2000 bytes
    small = tmp_path / "small"
    small.write_text("root\n")
    inst = Instance(tmp_path, forward_include_size_limit=1000)
    with open(os.path.join(inst.root, "aliases"), "w") as f:
        f.write(f"postmaster: root\nf: :include:{fifo}\nz: :include:/dev/zero\n"
                f"b: :include:{big}\ns: :include:{small}\n")
    t0 = time.monotonic()
    for name in ("f", "z", "b", "s"):
        inst.sendmail("-odi", name, input=b"Subject: x\n\nbody\n", timeout=30)
    assert time.monotonic() - t0 < 20
    log = inst.maillog()
    assert f"cannot open :include:{fifo}: is not a regular file" in log, log
    assert "cannot open :include:/dev/zero: is not a regular file" in log
    assert f"cannot open :include:{big}: is larger than 1000 bytes" in log
    assert inst.mailbox("root").count(b"Subject: x") >= 1


def test_alias_include_symlinked_by_its_owner_gives_only_the_owners_rights(make_user, shared_dir):
    # /etc/aliases names a list file in a user's home; the user replaces it
    # with a symlink to a root-only file, or to another user's list: it is
    # read with the list owner's rights and runs as the list owner.
    owner, alice = make_user("pto"), make_user("pta")
    secret_dir, secret = _root_only_secret(owner.pw_dir)
    os.chmod(shared_dir, 0o777)
    marker = os.path.join(shared_dir, "ran")
    try:
        with open(secret, "a") as f:
            f.write("secretlocalpartxyz\n")
        members = os.path.join(owner.pw_dir, "members")
        os.symlink(secret, members)
        os.lchown(members, owner.pw_uid, owner.pw_gid)
        alices = os.path.join(alice.pw_dir, "list")
        with open(alices, "w") as f:
            f.write(f"|/usr/bin/touch {marker}\n")
        os.chown(alices, alice.pw_uid, alice.pw_gid)
        os.chmod(alices, 0o644)
        os.chmod(alice.pw_dir, 0o755)
        other = os.path.join(owner.pw_dir, "other")
        os.symlink(alices, other)
        os.lchown(other, owner.pw_uid, owner.pw_gid)
        inst = Instance(shared_dir)
        with open(os.path.join(inst.root, "aliases"), "w") as f:
            f.write(f"postmaster: root\nlist: :include:{members}\nother: :include:{other}\n")
        inst.sendmail("-odi", "-f", "root", "list", input=b"Subject: x\n\nbody\n")
        inst.sendmail("-odi", "other", input=b"Subject: y\n\nbody\n")
        log = inst.maillog()
        assert f"cannot open :include:{members}: Permission denied" in log, log
        assert "secretlocalpartxyz" not in log and _leaks(shared_dir) == []
        assert os.path.exists(marker), log
        assert os.stat(marker).st_uid == owner.pw_uid      # not alice's
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
