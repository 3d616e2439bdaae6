"""Local delivery: mbox, Maildir, |command and /file, as the recipient.

Every delivery runs in a forked child that drops to the target's uid and
gids before it opens the mailbox or runs the command (when pymta is root);
the child sends its Reply back through a pipe. mbox delivery follows dma and
Postfix: dot-lock plus fcntl lock, remember the size, append, fsync, and on
any error truncate back so that no partial message is ever left behind.
"""

from dataclasses import dataclass


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
