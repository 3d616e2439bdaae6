"""Prepare a pymta instance described by a config file: ``make dev-setup``.

``python -m pymta.devsetup CONF`` creates the queue (queue/ for root and
mail_owner, maildrop/ for everyone else), the mailbox directory and, when
missing, the aliases file (a copy of etc/aliases, plus ``root: USER`` when
run by an ordinary user so that mail to root reaches them), then runs
newaliases when pymta has it. It says what it did and is safe to run again.
"""

import os
import pwd
import shutil
import sys

from . import config
from .options import Options
from .spool import Spool

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_ALIASES = os.path.join(TOP, "etc", "aliases")


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
    mail_dir = cfg.mail_spool_directory
    if not os.path.isdir(mail_dir):
        os.makedirs(mail_dir, exist_ok=True)
        os.chmod(mail_dir, 0o1777)
        say(f"mailboxes: {mail_dir} (mode 1777, so deliveries as each user can create their mbox)")
    else:
        say(f"mailboxes: {mail_dir} [already there]")
    path = alias_file(cfg)
    user = _invoking_user()
    if path:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            shutil.copyfile(SAMPLE_ALIASES, path)
            say(f"aliases: copied {SAMPLE_ALIASES} to {path}")
        else:
            say(f"aliases: {path} [already there]")
        if user and user != "root" and not _has_root_alias(path):
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"\n# Added by make dev-setup: mail to root goes to you.\nroot: {user}\n")
            say(f"aliases: added 'root: {user}' to {path}")
        _newaliases(cfg, say)
    return 0


def _newaliases(cfg, say):
    try:
        from . import aliases
    except ModuleNotFoundError as e:
        if e.name != "pymta.aliases":
            raise
        say("newaliases: not available in this build; skipped")
        return
    if not hasattr(aliases, "newaliases_main"):
        say("newaliases: not available in this build; skipped")
        return
    rc = aliases.newaliases_main(cfg, Options(program="newaliases", mode="i"))
    say(f"newaliases: exit {rc}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pymta.devsetup CONFIG", file=sys.stderr)
        return 64
    try:
        cfg = config.load(argv[0])
    except config.ConfigError as e:
        print(f"devsetup: fatal: {e}", file=sys.stderr)
        return 78
    return setup(cfg)


if __name__ == "__main__":
    sys.exit(main())
