"""``pymta check``: what must hold before the daemon can serve, like ``postfix check``.

Run by the administrator, by ``make install`` at its end, and by the daemon
at start (``sendmail -bd``/``-bD``), which refuses to start on an error. It
verifies, and as root repairs where a repair is safe:

- the interpreter imports every dependency (pymta/deps.py) at its minimum
  version or later, and every pymta module;
- the configuration loads with every value valid (done by config.load
  before this runs) and the users it names exist: mail_owner, default_privs;
- the queue directory, queue/ and maildrop/ exist with their owners and
  modes (created, chowned, chmodded when not), and mail_owner can reach
  queue/ (every directory above it searchable by that user);
- the mailbox directory (mail_spool_directory) and the directories of
  pid_file and maillog_file exist (created when missing);
- the aliases files exist and their compiled forms are not older.

Each finding is a line: ``warning: ...``, ``error: ...`` or what was
repaired. The exit code is 0 with no error, else 78 (EX_CONFIG), or 69
(EX_UNAVAILABLE) when a dependency is missing.
"""

import grp
import importlib
import os
import pwd
import stat

from .status import EX_CONFIG, EX_OK, EX_UNAVAILABLE

# pymta modules that are not part of running the mail system (tools run
# from the source tree or by hand): not imported by the check.
_NOT_RUNTIME = {"__init__", "install", "devsetup", "confdoc", "check"}


class Report:
    def __init__(self):
        self.lines = []      # (kind, text): kind is "error", "warning" or "fixed"
        self.code = EX_OK

    def error(self, text, code=EX_CONFIG):
        self.lines.append(("error", text))
        if self.code == EX_OK:
            self.code = code

    def warning(self, text):
        self.lines.append(("warning", text))

    def fixed(self, text):
        self.lines.append(("fixed", text))

    @property
    def errors(self):
        return [t for k, t in self.lines if k == "error"]

    def text(self, prog="pymta"):
        out = []
        for kind, t in self.lines:
            out.append(f"{prog}: {t}" if kind == "fixed" else f"{prog}: {kind}: {t}")
        return "\n".join(out) + ("\n" if out else "")


def _version_tuple(text):
    out = []
    for part in text.split("."):
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def check_dependencies(report, cfg=None):
    from . import deps
    from importlib import metadata
    for dist, minimum, module, debian, needed_by in deps.REQUIRES:
        try:
            importlib.import_module(module)
        except Exception as e:   # noqa: BLE001 - any failure to import is the finding
            text = (f"this interpreter cannot import {module} ({dist} {minimum} or later; "
                    f"on Debian: apt install {debian}): {type(e).__name__}: {e}")
            if needed_by and not (cfg is not None and cfg.get(needed_by)):
                report.warning(f"{text}; needed only when {needed_by} is set")
            else:
                report.error(text, EX_UNAVAILABLE)
            continue
        try:
            have = metadata.version(dist)
        except Exception:   # noqa: BLE001 - no metadata (a copied module): nothing to compare
            have = ""
        if have and _version_tuple(have) < _version_tuple(minimum):
            report.error(f"{dist} {have} is older than {minimum}, the oldest pymta works with",
                         EX_UNAVAILABLE)


def check_modules(report):
    pkg = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(pkg)):
        mod, ext = os.path.splitext(name)
        if ext != ".py" or mod in _NOT_RUNTIME:
            continue
        try:
            importlib.import_module(f"pymta.{mod}")
        except Exception as e:   # noqa: BLE001 - any failure to import is the finding
            report.error(f"cannot import pymta.{mod} from {pkg}: {type(e).__name__}: {e}",
                         EX_UNAVAILABLE)


def _user(report, cfg, param):
    name = cfg.get(param)
    try:
        return pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        report.error(f"{param} = {name}: no such user")
        return None


def _groups(pw):
    gids = {pw.pw_gid}
    for g in grp.getgrall():
        if pw.pw_name in g.gr_mem:
            gids.add(g.gr_gid)
    return gids


def _can_search(st, uid, gids):
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def unreachable(path, pw):
    """The first directory on the way to ``path`` (itself included) that the
    user ``pw`` cannot search, with its mode, or None."""
    gids = _groups(pw)
    path = os.path.abspath(path)
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        step = "/".join(parts[:i]) or "/"
        try:
            st = os.stat(step)
        except OSError:
            return None
        if not _can_search(st, pw.pw_uid, gids):
            owner = _name(st.st_uid)
            return f"{step} is {stat.S_IMODE(st.st_mode):04o} {owner}"
    return None


def _name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _mkdir(report, path, mode, fix, what):
    if os.path.isdir(path):
        return True
    if os.path.lexists(path):
        report.error(f"{what} {path} is not a directory")
        return False
    if not fix:
        report.error(f"{what} {path} does not exist")
        return False
    try:
        os.makedirs(path, mode)
        os.chmod(path, mode)
    except OSError as e:
        report.error(f"{what} {path}: cannot create it: {e.strerror}")
        return False
    report.fixed(f"created {what} {path} ({mode:04o})")
    return True


def check_queue(report, cfg, owner, fix):
    from .queue_dir import Spool
    spool = Spool.from_config(cfg)
    root = os.geteuid() == 0
    uid = owner.pw_uid if owner and root else None
    gid = owner.pw_gid if owner and root else None
    if not _mkdir(report, spool.top, 0o755, fix, "queue directory"):
        return
    subs = ((spool.dir, 0o700, uid), (spool.maildrop, 0o1733, 0 if root else None))
    missing = [sub for sub, _, _ in subs if not os.path.isdir(sub)]
    if missing and fix:
        try:
            spool.create(owner_uid=uid, owner_gid=gid)
        except OSError as e:
            report.error(f"{spool.top}: cannot create {', '.join(missing)}: {e.strerror}")
            return
    for sub, mode, want_uid in subs:
        if sub in missing:
            if not fix:
                report.error(f"{sub} does not exist")
            else:
                report.fixed(f"created {sub} ({mode:04o}"
                             + (f", {_name(want_uid)})" if want_uid is not None else ")"))
            continue
        st = os.stat(sub)
        if stat.S_IMODE(st.st_mode) != mode:
            if fix and root:
                os.chmod(sub, mode)
                report.fixed(f"chmod {mode:04o} {sub} (was {stat.S_IMODE(st.st_mode):04o})")
            else:
                report.warning(f"{sub} has mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}")
        if want_uid is not None and st.st_uid != want_uid:
            if fix and root:
                os.chown(sub, want_uid, gid if sub == spool.dir else 0)
                report.fixed(f"chown {_name(want_uid)} {sub} (was {_name(st.st_uid)})")
            else:
                report.warning(f"{sub} is owned by {_name(st.st_uid)}, not {_name(want_uid)}")
    st = os.stat(spool.top)
    if st.st_mode & 0o022:
        report.warning(f"{spool.top} is writable by others than its owner "
                       f"({stat.S_IMODE(st.st_mode):04o})")
    if owner is not None and owner.pw_uid != 0:
        where = unreachable(spool.dir, owner)
        if where:
            report.error(f"mail_owner {owner.pw_name} cannot reach the queue {spool.dir}: "
                         f"{where} (move queue_directory, or run the daemon as the user "
                         "that owns this tree)")


def check_files(report, cfg, fix):
    if not cfg.home_mailbox:
        path = cfg.mail_spool_directory
        if not os.path.isdir(path) and fix and not os.path.lexists(path):
            # As make install makes it: Debian's 2775 root:mail.
            from .devsetup import mail_spool
            try:
                mail_spool(path, say=report.fixed)
            except OSError as e:
                report.error(f"mailbox directory {path}: cannot create it: {e.strerror}")
        elif _mkdir(report, path, 0o755, fix, "mailbox directory (mail_spool_directory)"):
            st = os.stat(path)
            if st.st_mode & 0o002:
                report.warning(f"mailbox directory {path} is writable by every user (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): Debian's layout is 2775 root:mail")
    d = os.path.dirname(os.path.abspath(cfg.pid_file))
    _mkdir(report, d, 0o755, fix, "pid_file directory")
    if cfg.maillog_file:
        _mkdir(report, os.path.dirname(os.path.abspath(cfg.maillog_file)), 0o755, fix,
               "maillog_file directory")
    for item in cfg.alias_maps:
        path = item.split(":", 1)[1] if ":" in item.split("/", 1)[0] else item
        if not os.path.exists(path):
            report.warning(f"alias_maps: {path} does not exist (no aliases)")


def run(cfg, fix=True, dependencies=True):
    """A Report of every check on ``cfg`` (already loaded, so valid)."""
    report = Report()
    if dependencies:
        check_dependencies(report, cfg)
        check_modules(report)
    owner = _user(report, cfg, "mail_owner")
    if owner is not None and owner.pw_uid == 0:
        report.warning("mail_owner is root: the SMTP listener keeps root's privileges")
    privs = _user(report, cfg, "default_privs")
    if privs is not None and privs.pw_uid == 0:
        report.error("default_privs = root: deliveries to programs and files of the aliases "
                     "would run as root")
    check_queue(report, cfg, owner, fix)
    check_files(report, cfg, fix)
    return report


def main(cfg, fix=True, out=None, err=None):
    """``pymta check``: the findings on stderr (repairs on stdout); the exit code."""
    import sys
    report = run(cfg, fix=fix)
    out = out or sys.stdout
    err = err or sys.stderr
    for kind, text in report.lines:
        if kind == "fixed":
            out.write(f"pymta: {text}\n")
        else:
            err.write(f"pymta: {kind}: {text}\n")
    if report.code == EX_OK:
        out.write(f"pymta: {cfg.path}: ok\n")
    return report.code
