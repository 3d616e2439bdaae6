"""Prepare a pymta instance described by a config file: ``make dev-setup``.

``python -m pymta.devsetup CONF`` creates the queue (queue/ for root and
mail_owner, maildrop/ for everyone else), the mailbox directory and, when
missing, the aliases file (a copy of etc/aliases, plus ``root: USER`` when
run by an ordinary user so that mail to root reaches them), then runs
newaliases when pymta has it. It says what it did and is safe to run again.
"""

import grp
import os
import pwd
import shutil
import stat
import sys

from . import config
from .options import Options
from .queue_dir import Spool
from .status import EX_CONFIG, EX_OK, EX_USAGE

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(name):
    """A sample file of etc/: beside the package in a source tree, else
    where ``pip install .`` put it (share/pymta under the prefix), else
    where ``make install`` and Debian put documentation."""
    for d in (os.path.join(TOP, "etc"), os.path.join(sys.prefix, "share", "pymta"),
              os.path.join(sys.base_prefix, "share", "pymta"), "/usr/local/share/pymta",
              "/usr/share/pymta"):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


SAMPLE_ALIASES = sample("aliases")

# Written when no sample is found: the names RFC 5321 and RFC 2142 require.
MINIMAL_ALIASES = ("# aliases for pymta; see aliases(5). Run newaliases after editing.\n"
                   "postmaster: root\nMAILER-DAEMON: postmaster\nabuse: postmaster\n")


def alias_file(cfg):
    """The first aliases file named by alias_maps, without its hash: prefix."""
    for item in cfg.alias_maps:
        return item.split(":", 1)[1] if item.startswith("hash:") else item
    return None


def _owner(cfg):
    try:
        pw = pwd.getpwnam(cfg.mail_owner)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return None, None


def _invoking_user():
    name = os.environ.get("SUDO_USER") if os.getuid() == 0 else None
    if name:
        return name
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


MAIL_GROUP = "mail"


def mail_spool(path, say=print, shown=None):
    """Create the mailbox directory with Debian's layout, 2775 root:mail:
    only root and group mail write it, so no user can plant a mailbox, a
    FIFO or a lock for another; each new mbox is made by the delivery
    process running as its recipient with group mail added (pymta.local),
    mode 0600, group mail. Without a mail group: 0755 root, where root makes
    each new mbox (O_EXCL, O_NOFOLLOW) and hands it to the recipient. Not
    root (a development instance, delivering as its own user): 0755. An
    existing directory is left alone, with a warning when any user may
    write it. ``shown``: the name to print (install's DESTDIR-less one)."""
    shown = shown or path
    if os.path.isdir(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o002:
            say(f"warning: mailboxes: {shown} is world-writable (mode {mode:o}): any user can "
                f"create files there; pymta delivers only into mailboxes owned by their "
                f"recipient, but a file or lock planted for another user defers that user's "
                f"mail. Debian's layout is 2775 root:{MAIL_GROUP} (see pymta(8), SECURITY)")
        else:
            say(f"mailboxes: {shown} [already there]")
        return
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o755)
        say(f"mailboxes: {shown} (mode 0755: deliveries run as {_invoking_user() or 'you'})")
        return
    try:
        gid = grp.getgrnam(MAIL_GROUP).gr_gid
    except KeyError:
        os.chown(path, 0, 0)
        os.chmod(path, 0o755)
        say(f"mailboxes: {shown} (mode 0755, root: no group {MAIL_GROUP}; root creates each mbox)")
        return
    os.chown(path, 0, gid)
    os.chmod(path, 0o2775)
    say(f"mailboxes: {shown} (mode 2775, root:{MAIL_GROUP}; each mbox is created by its "
        f"recipient's delivery with group {MAIL_GROUP})")


def _has_root_alias(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.split(":", 1)[0].strip().lower() == "root"
                   for line in f if ":" in line and not line.lstrip().startswith("#"))


def setup(cfg, say=print):
    spool = Spool.from_config(cfg)
    existed = spool.exists()
    uid, gid = _owner(cfg) if os.geteuid() == 0 else (None, None)
    spool.create(uid, gid)
    owner = f", owner {cfg.mail_owner}" if uid is not None and not existed else ""
    say(f"queue: {spool.dir} (mode 0700{owner}), maildrop: {spool.maildrop} (mode 1733)"
        + (" [already there]" if existed else ""))
    mail_spool(cfg.mail_spool_directory, say)
    path = alias_file(cfg)
    user = _invoking_user()
    if path:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if SAMPLE_ALIASES:
                shutil.copyfile(SAMPLE_ALIASES, path)
                say(f"aliases: copied {SAMPLE_ALIASES} to {path}")
            else:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(MINIMAL_ALIASES)
                say(f"aliases: wrote {path} (postmaster, MAILER-DAEMON, abuse)")
        else:
            say(f"aliases: {path} [already there]")
        if user and user != "root" and not _has_root_alias(path):
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"\n# Added by make dev-setup: mail to root goes to you.\nroot: {user}\n")
            say(f"aliases: added 'root: {user}' to {path}")
        _newaliases(cfg, say)
    return EX_OK


def _newaliases(cfg, say):
    from . import aliases
    rc = aliases.newaliases_main(cfg, Options(program="newaliases", mode="i"))
    say(f"newaliases: exit {rc}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pymta.devsetup CONFIG", file=sys.stderr)
        return EX_USAGE
    try:
        cfg = config.load(argv[0])
    except config.ConfigError as e:
        print(f"devsetup: fatal: {e}", file=sys.stderr)
        return EX_CONFIG
    return setup(cfg)


if __name__ == "__main__":
    sys.exit(main())
