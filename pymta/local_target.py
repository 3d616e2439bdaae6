"""A local target, and what every local delivery shares.

Target says where a delivery goes (a mailbox, a Maildir, a file, a
command) and as whom; route.py makes them, local.py delivers to them. The
rest is shared by the target modules (local_mbox, local_maildir,
local_command): the Return-Path:, Delivered-To: and From_ lines a
delivered copy starts with (Postfix's mail_copy), the walk from the
user's home down to a mailbox or Maildir as the user, one directory at a
time without following a symbolic link, and an OSError as the Reply a
delivery ends with.
"""

from dataclasses import dataclass
import errno
import os
import time

from . import safefile as _safefile
from .status import DeliveryError, Reply

LINE_CHUNK = 64 * 1024     # the most of one message line held at once


@dataclass
class Target:
    """Where a local delivery goes.

    kind: "mailbox" (mbox file ``path``), "maildir" (directory ``path``),
    "file" (append to ``path``) or "command" (``command`` via /bin/sh -c).
    ``uid``/``gid``/``user``/``home`` are whose privileges it runs with.
    """

    kind: str
    user: str = ""
    uid: int = -1
    gid: int = -1
    home: str = "/"
    path: str = ""
    command: str = ""
    shell: str = "/bin/sh"


def target_key(target):
    """What makes two local targets one delivery: the same mailbox, Maildir
    or file (by path), or the same command run as the same user."""
    if target.kind == "command":
        return ("command", target.command, target.uid)
    if target.kind == "file":
        return ("file", target.path, target.uid)
    return (target.kind, target.path)


def os_reply(e, what):
    """An OSError during delivery as a Reply: storage and quota problems defer."""
    text = f"{what}: {e.strerror or e}"
    if e.errno == errno.EFBIG:
        return Reply(552, "5.2.2", f"Mailbox full: {text}")
    if e.errno == errno.EDQUOT:
        return Reply(452, "4.2.2", f"Mailbox full: {text}")
    if e.errno == errno.ENOSPC:
        return Reply(452, "4.3.1", f"Insufficient system storage: {text}")
    return Reply(451, "4.3.0", f"Cannot deliver: {text}")


def recipient(rcpt):
    """The address a delivery is for: a |cmd's or /file's is the address whose
    alias, .forward or include named it (Postfix's RECIPIENT, Delivered-To)."""
    to = rcpt.address
    if to[:1] in ("|", "/"):
        to = rcpt.via or rcpt.parent or to
    return to


def prefix(env, rcpt):
    """The Return-Path: and Delivered-To: lines final delivery adds."""
    to = recipient(rcpt)
    return (f"Return-Path: <{env.sender}>\nDelivered-To: {to}\n"
            .encode("utf-8", "surrogateescape"))


def from_line(env):
    """The mbox From_ line as Postfix's local(8) writes it: the envelope sender
    (MAILER-DAEMON for <>), two spaces, the local time in asctime() form."""
    sender = env.sender or "MAILER-DAEMON"
    return f"From {sender}  {time.asctime()}\n".encode("utf-8", "surrogateescape")


def home_part(target):
    """The mailbox path of ``target`` relative to its home, or None when it
    is not below the home."""
    home = (target.home or "").rstrip("/")
    if home and target.path.startswith(home + "/"):
        return target.path[len(home) + 1:]
    return None


def beneath_home(target):
    """(dir fd, path) for a mailbox below the user's home (home_mailbox):
    the directories from the home down are opened one at a time as the user
    with O_NOFOLLOW (safefile.open_dir_beneath), and the mailbox is then
    reached through /proc/self/fd/N, its directory's descriptor, so that no
    symbolic link the user controls is followed. (None, path) elsewhere.
    Raises DeliveryError (450 4.2.0) for a symbolic link on the way."""
    rel = home_part(target)
    if rel is None:
        return None, target.path
    parent, _, name = rel.rpartition("/")
    try:
        dfd = _safefile.open_dir_beneath(target.home, parent)
    except _safefile.Refused as e:
        raise DeliveryError(Reply(450, "4.2.0", f"Mailbox {target.path} {e}")) from None
    except OSError as e:
        raise DeliveryError(os_reply(e, f"open {os.path.dirname(target.path)}")) from None
    return dfd, f"/proc/self/fd/{dfd}/{name}"
