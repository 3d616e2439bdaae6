"""make install / make uninstall into a temporary DESTDIR: the file list, the
modes, the queue layout, config files kept, and a working installed mailq."""

import os
import stat
import subprocess
import sys
import time

import pytest


from conftest import TOP

ARGS = ["--prefix", "/usr", "--sbindir", "/usr/sbin", "--bindir", "/usr/bin",
        "--mandir", "/usr/share/man", "--sysconfdir", "/etc/pymta"]


def install(dest, *more):
    r = subprocess.run([sys.executable, "-m", "pymta.install", "--destdir", str(dest), *ARGS,
                        "--python", sys.executable, *more],
                       cwd=TOP, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def tree(dest):
    out = set()
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(root, name)
            if "__pycache__" not in path:
                out.add(os.path.relpath(path, dest))
    return out


def test_install_puts_every_file_in_its_debian_place(tmp_path):
    out = install(tmp_path)
    files = tree(tmp_path)
    for expected in ("usr/sbin/sendmail", "usr/sbin/pymta", "usr/bin/mailq", "usr/bin/newaliases",
                     "usr/lib/sendmail", "usr/lib/pymta/pymta/cli.py",
                     "usr/lib/pymta/pymta/queue_commit.py", "usr/lib/pymta/pymta/admin.py",
                     "usr/share/man/man8/sendmail.8", "usr/share/man/man5/pymta.conf.5",
                     "etc/pymta/pymta.conf", "etc/aliases",
                     "var/spool/pymta/queue", "var/spool/pymta/maildrop"):
        assert expected in files, expected
    sources = {f for f in os.listdir(os.path.join(TOP, "pymta")) if f.endswith(".py")}
    assert {f for f in os.listdir(tmp_path / "usr/lib/pymta/pymta")} >= sources
    for page in os.listdir(os.path.join(TOP, "man")):
        section = page.rsplit(".", 1)[1]
        assert f"usr/share/man/man{section}/{page}" in files
    assert not [f for f in files if not f.startswith(("usr", "etc", "var"))]
    # every action is printed
    assert f"install -m 755 {tmp_path}/usr/sbin/sendmail" in out
    assert f"ln -s ../sbin/sendmail {tmp_path}/usr/bin/mailq" in out


def test_launchers_links_and_modes(tmp_path):
    install(tmp_path)
    sendmail = tmp_path / "usr/sbin/sendmail"
    assert stat.S_IMODE(sendmail.stat().st_mode) == 0o755
    text = sendmail.read_text()
    assert text.startswith(f"#!{sys.executable} -S\n")
    # What the site module would have added, found at install time:
    site_line = next(line for line in text.splitlines() if line.startswith("sys.path.extend("))
    assert any("site-packages" in d or "dist-packages" in d for d in eval(site_line[16:-1]))
    assert "sys.path.insert(0, '/usr/lib/pymta')" in text
    for link in ("usr/bin/mailq", "usr/bin/newaliases", "usr/lib/sendmail"):
        p = tmp_path / link
        assert p.is_symlink() and os.readlink(p) == "../sbin/sendmail"
        assert os.path.realpath(p) == str(sendmail)
    assert "from pymta.admin import main" in (tmp_path / "usr/sbin/pymta").read_text()
    queue = tmp_path / "var/spool/pymta"
    assert stat.S_IMODE(queue.stat().st_mode) == 0o755
    assert stat.S_IMODE((queue / "queue").stat().st_mode) == 0o700
    assert stat.S_IMODE((queue / "maildrop").stat().st_mode) == 0o1733
    if os.geteuid() == 0:
        import pwd
        try:
            mail = pwd.getpwnam("mail")
        except KeyError:
            mail = None
        if mail:
            assert (queue / "queue").stat().st_uid == mail.pw_uid


def test_installed_programs_run(tmp_path):
    install(tmp_path)
    lib = str(tmp_path / "usr/lib/pymta")
    probe = subprocess.run([sys.executable, "-s", "-c",
                            f"import sys; sys.path.insert(0, {lib!r}); import pymta.cli, "
                            "pymta.admin, pymta.mailq; print(pymta.cli.__file__)"],
                           capture_output=True, timeout=30)
    assert probe.stdout.decode().startswith(lib), probe.stderr
    conf = tmp_path / "etc/pymta/pymta.conf"
    qdir = tmp_path / "var/spool/pymta"
    # The launchers look in /usr/lib/pymta; here it is under DESTDIR.
    env = dict(os.environ, PYTHONPATH=lib)
    r = subprocess.run([str(tmp_path / "usr/bin/mailq"), "-C", str(conf),
                        "-O", f"queue_directory={qdir}", "-O", "maillog_file="],
                       capture_output=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{qdir} is empty\n\t\tTotal requests: 0\n".encode()
    r = subprocess.run([str(tmp_path / "usr/sbin/pymta"), "-C", str(conf),
                        "-O", f"queue_directory={qdir}", "show", "kASHWR000001001"],
                       capture_output=True, timeout=30, env=env)
    assert r.returncode == 67


def test_reinstall_keeps_edited_configuration(tmp_path):
    install(tmp_path)
    conf = tmp_path / "etc/pymta/pymta.conf"
    conf.write_text("myhostname = edited.example.test\n")
    (tmp_path / "etc/aliases").write_text("root: admin\n")
    out = install(tmp_path)
    assert conf.read_text() == "myhostname = edited.example.test\n"
    assert (tmp_path / "etc/aliases").read_text() == "root: admin\n"
    assert f"keep {conf}" in out


def test_a_foreign_sendmail_is_kept_and_put_back(tmp_path):
    sbin = tmp_path / "usr/sbin"
    sbin.mkdir(parents=True)
    (sbin / "sendmail").write_text("#!/bin/sh\necho exim\n")
    install(tmp_path)
    assert (sbin / "sendmail.pre-pymta").read_text() == "#!/bin/sh\necho exim\n"
    assert "pymta launcher" in (sbin / "sendmail").read_text()
    install(tmp_path, "--uninstall")
    assert (sbin / "sendmail").read_text() == "#!/bin/sh\necho exim\n"
    assert not (sbin / "sendmail.pre-pymta").exists()


def test_uninstall_leaves_configuration_and_queue(tmp_path):
    install(tmp_path)
    msg = tmp_path / "var/spool/pymta/queue/dfkASHWR000001001"
    msg.write_text("keep")
    out = install(tmp_path, "--uninstall")
    left = tree(tmp_path)
    assert not [f for f in left if f.startswith("usr/") and not os.path.isdir(tmp_path / f)]
    assert "etc/pymta/pymta.conf" in left and "etc/aliases" in left
    assert msg.read_text() == "keep"
    assert f"rm {tmp_path}/usr/sbin/sendmail" in out


def test_relative_paths_are_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pymta.install", "--destdir", str(tmp_path),
                        "--prefix", "usr"], cwd=TOP, capture_output=True, timeout=30)
    assert r.returncode == 2
    assert b"absolute" in r.stderr


def test_install_makes_the_mail_spool_debian_style(tmp_path):
    import grp
    out = install(tmp_path)
    st = os.stat(tmp_path / "var/mail")
    if os.geteuid() == 0:
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == \
            (0o2775, 0, grp.getgrnam("mail").gr_gid)
        assert "(mode 2775, root:mail;" in out
    else:
        assert stat.S_IMODE(st.st_mode) == 0o755
    out = install(tmp_path)
    assert f"mailboxes: {tmp_path}/var/mail [already there]" in out


def test_postfix_files_are_moved_aside_kept_on_upgrade_and_put_back(tmp_path):
    """Postfix's sendmail, and its mailq, newaliases and /usr/lib/sendmail
    links to ../sbin/sendmail: none is pymta's, whatever they point at."""
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/sbin/sendmail").write_text("#!/bin/sh\necho postfix\n")
    for link in ("usr/bin/mailq", "usr/bin/newaliases", "usr/lib/sendmail"):
        os.symlink("../sbin/sendmail", tmp_path / link)
    before = tree(tmp_path)
    out = install(tmp_path)
    for name in ("usr/sbin/sendmail", "usr/bin/mailq", "usr/bin/newaliases", "usr/lib/sendmail"):
        assert f"mv {tmp_path}/{name} {tmp_path}/{name}.pre-pymta" in out
    assert (tmp_path / "usr/sbin/sendmail.pre-pymta").read_text() == "#!/bin/sh\necho postfix\n"
    out = install(tmp_path)       # the upgrade: pymta's own files are not moved aside
    assert ".pre-pymta  (not pymta's" not in out
    assert (tmp_path / "usr/sbin/sendmail.pre-pymta").read_text() == "#!/bin/sh\necho postfix\n"
    manifest = (tmp_path / "usr/lib/pymta/MANIFEST").read_text()
    assert "moved /usr/bin/mailq" in manifest and "link /usr/bin/mailq" in manifest
    assert all(line.split(" ", 1)[1].startswith("/") for line in manifest.splitlines()[1:])
    out = install(tmp_path, "--uninstall")
    left = {f for f in tree(tmp_path) if not f.startswith(("etc", "var"))}
    assert left == before
    assert (tmp_path / "usr/sbin/sendmail").read_text() == "#!/bin/sh\necho postfix\n"
    for link in ("usr/bin/mailq", "usr/bin/newaliases", "usr/lib/sendmail"):
        assert os.readlink(tmp_path / link) == "../sbin/sendmail"


def test_uninstall_removes_only_what_install_made(tmp_path):
    (tmp_path / "usr/share/man/man8").mkdir(parents=True)
    (tmp_path / "usr/share/man/man8/other.8").write_text("another package's page")
    before = tree(tmp_path)
    install(tmp_path)
    (tmp_path / "usr/sbin/local-tool").write_text("the admin's own")
    install(tmp_path, "--uninstall")
    left = {f for f in tree(tmp_path) if not f.startswith(("etc", "var"))}
    # usr/sbin stays: it holds a file install did not make.
    assert left == before | {"usr/sbin", "usr/sbin/local-tool"}


def test_the_launchers_interpreter_is_remembered_by_an_upgrade(tmp_path):
    venv_python = os.path.realpath(sys.executable)
    other = os.path.join(str(tmp_path), "py", "bin", "python3")
    os.makedirs(os.path.dirname(other))
    os.symlink(venv_python, other)
    subprocess.run([sys.executable, "-m", "pymta.install", "--destdir", str(tmp_path), *ARGS,
                    "--python", other], cwd=TOP, capture_output=True, check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "pymta.install", "--destdir", str(tmp_path), *ARGS],
                         cwd=TOP, capture_output=True, text=True, check=True, timeout=60).stdout
    assert f"python {other}  (as the last install)" in out
    assert (tmp_path / "usr/sbin/sendmail").read_text().startswith(f"#!{other} -S\n")
    assert f"python {other}\n" in (tmp_path / "usr/lib/pymta/MANIFEST").read_text()


def test_make_install_needs_no_venv_and_no_download():
    r = subprocess.run(["make", "-n", "-C", TOP, "install", "PREFIX=/nonexistent"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "pip" not in r.stdout and ".venv" not in r.stdout and "pytest" not in r.stdout
    assert "-m pymta.install" in r.stdout


def test_uninstall_refuses_while_the_daemon_runs_and_names_queued_messages(tmp_path):
    prefix, etc, spool = tmp_path / "usr", tmp_path / "etc", tmp_path / "spool"
    etc.mkdir()
    pid_file = tmp_path / "pymta.pid"
    (etc / "pymta.conf").write_text(f"queue_directory = {spool}\npid_file = {pid_file}\n"
                                    f"alias_maps = hash:{etc}/aliases\nmail_owner = root\n"
                                    f"mail_spool_directory = {tmp_path}/mail\n")
    args = ["--prefix", str(prefix), "--sysconfdir", str(etc), "--python", sys.executable]
    r = subprocess.run([sys.executable, "-m", "pymta.install", *args], cwd=TOP,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pymta -C {etc}/pymta.conf check" in r.stdout and f"{etc}/pymta.conf: ok" in r.stdout
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from pymta.pidfile import PidFile\n"
                               f"PidFile({str(pid_file)!r}).acquire()\n"
                               "print('locked', flush=True)\ntime.sleep(60)"],
                              cwd=TOP, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        r = subprocess.run([sys.executable, "-m", "pymta.install", "--uninstall", *args], cwd=TOP,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert f"the daemon is running (pid {holder.pid}" in r.stdout and "nothing removed" in r.stdout
        assert (prefix / "sbin/sendmail").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    for qid in ("kASHWR000001001", "kASHWR000002002"):
        (spool / "queue" / f"qf{qid}").write_text("x")
    r = subprocess.run([sys.executable, "-m", "pymta.install", "--uninstall", *args], cwd=TOP,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert (f"The queue {spool} is kept with 2 message(s) not delivered: "
            "kASHWR000001001 kASHWR000002002") in r.stdout
    assert not (prefix / "sbin/sendmail").exists() and not prefix.exists()


def _pip_installed(tmp_path):
    """pymta as `pip install .` puts it: a wheel built from a copy of this
    tree (no download: this venv's setuptools and wheel), installed without
    its dependencies into a venv of Debian's python3, which then finds them
    in TESTPY (the minimum versions)."""
    from users import TESTPY
    if not os.access(os.path.join(TESTPY, "bin", "python"), os.X_OK):
        pytest.skip(f"no {TESTPY} (run `make testpy`)")
    import shutil
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pymta", "bin", "etc", "man"):
        shutil.copytree(os.path.join(TOP, name), src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README"):
        shutil.copy(os.path.join(TOP, name), src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = list((tmp_path / "dist").glob("pymta-*.whl"))
    venv = tmp_path / "v"
    base = os.path.realpath(os.path.join(TESTPY, "bin", "python"))
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run([os.path.join(TESTPY, "bin", "python"), "-m", "pip", "--python",
                        str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run([os.path.join(TESTPY, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies as if installed there (linked: no download), so that
    # launchers run with -S find them too.
    for name in os.listdir(deps):
        if name.split("-")[0].split(".")[0].lower() in ("dns", "dnspython", "daemon", "python_daemon",
                                                          "lockfile", "docutils"):
            os.symlink(os.path.join(deps, name), os.path.join(site, name))
    return venv, src


def test_pip_install_builds_a_wheel_whose_programs_work_and_start_fast(tmp_path):
    venv, src = _pip_installed(tmp_path)
    for name in ("sendmail", "mailq", "newaliases", "pymta"):
        assert (venv / "bin" / name).exists(), name
    assert "import re" not in (venv / "bin" / "sendmail").read_text()
    assert (venv / "share/pymta/aliases").exists() and (venv / "share/man/man8/pymta.8").exists()
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "pymta.conf"
    conf.write_text(f"queue_directory = {tmp_path}/spool\nmaillog_file = {tmp_path}/maillog\n"
                    f"alias_maps = hash:{etc}/aliases\nmail_owner = root\n"
                    f"mail_spool_directory = {tmp_path}/mail\npid_file = {tmp_path}/p.pid\n")
    # python -m pymta.devsetup from the installed package: the aliases sample
    # comes from share/pymta, not from a source tree beside the package.
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pymta.devsetup", str(conf)],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"copied {venv}/share/pymta/aliases to {etc}/aliases" in r.stdout
    assert (etc / "aliases").read_text().startswith(open(os.path.join(TOP, "etc", "aliases")).read())
    # The same pymta put by make install, with this venv's interpreter.
    r = subprocess.run([sys.executable, "-m", "pymta.install", "--prefix", str(tmp_path / "usr"),
                        "--sysconfdir", str(etc), "--python", str(venv / "bin" / "python")],
                       cwd=str(src), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    made = str(tmp_path / "usr/sbin/sendmail")
    piped = str(venv / "bin" / "sendmail")
    times = {made: [], piped: []}
    for _ in range(15):          # interleaved: the machine's load falls on both alike
        for exe in times:
            t = time.perf_counter()
            r = subprocess.run([exe, "-C", str(conf), "-odq", "root"], input=b"Subject: t\n\nx\n",
                               capture_output=True, timeout=60)
            times[exe].append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr
    best = {exe: min(v) for exe, v in times.items()}
    assert best[piped] <= 2 * best[made], {k: round(v * 1000, 1) for k, v in best.items()}
    r = subprocess.run([str(venv / "bin" / "mailq"), "-C", str(conf)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "Total requests: 30" in r.stdout, r.stdout + r.stderr


def test_manifest_names_only_paths_of_the_target_system(tmp_path):
    dest = tmp_path / "stage"            # made by the install itself
    install(dest)
    lines = (dest / "usr/lib/pymta/MANIFEST").read_text().splitlines()[1:]
    assert lines and all(line.split(" ", 1)[1].startswith("/") for line in lines), lines
    install(dest, "--uninstall")
    assert sorted(os.listdir(dest)) == ["etc", "var"]
