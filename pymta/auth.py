"""SMTP AUTH credentials: the smtpd_sasl_password_file and its salted hashes.

One ``user:hash`` line per account; ``#`` starts a comment. The hash is
``$scrypt$N$r$p$SALT$KEY`` (hashlib.scrypt, base64 salt and key), so the
file never holds a password. The SMTP server runs as mail_owner, so the file
should be mode 0640, owner root, group mail_owner's group; ``adduser`` below
sets that up when run as root. Admins manage it with::

    python3 -m pymta.auth [-C pymta.conf] [-f file] adduser USER   # password on stdin or prompted
    python3 -m pymta.auth [-C pymta.conf] [-f file] deluser USER
"""

import base64
import getpass
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import sys
import threading

N, R, P = 2 ** 14, 8, 1
_DUMMY = None


def hash_password(password, salt=None, n=N, r=R, p=P):
    salt = salt or secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt,
                         n=n, r=r, p=p, dklen=32, maxmem=256 * n * r)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"$scrypt${n}${r}${p}${b64(salt)}${b64(key)}"


def check_password(password, stored):
    """Whether ``password`` matches a ``$scrypt$...`` hash (constant time)."""
    try:
        _, kind, n, r, p, salt, key = stored.split("$")
        if kind != "scrypt":
            return False
        n, r, p = int(n), int(r), int(p)
        if n > 2 ** 20 or r > 32 or p > 16:
            return False
        want = base64.b64decode(key)
        got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"),
                             salt=base64.b64decode(salt), n=n, r=r, p=p,
                             dklen=len(want), maxmem=256 * n * r)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def read_file(path):
    users = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if sep:
                users[user] = stored
    return users


class PasswordFile:
    """The verifier the SMTP server calls: re-reads the file when it changes."""

    def __init__(self, path, log=None):
        self.path, self.log = path, log
        self._stamp, self._users = None, {}
        self._lock = threading.Lock()

    def _load(self):
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._users = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                self._users = read_file(self.path)
            except OSError as e:
                if self.log:
                    self.log.warning(f"warning: cannot read {self.path}: {e.strerror}")
                self._users = {}
            self._stamp = stamp

    def available(self):
        with self._lock:
            self._load()
            return bool(self._users)

    def __call__(self, user, password):
        global _DUMMY
        with self._lock:
            self._load()
            stored = self._users.get(user)
        if stored is None:
            # Spend the same time as for a real user: no user enumeration.
            _DUMMY = _DUMMY or hash_password("x")
            check_password(password, _DUMMY)
            return False
        return check_password(password, stored)


def set_password(path, user, password):
    """Add or replace ``user`` (password None: remove); atomic rewrite."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"bad user name {user!r}")
    lines = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        pass
    out = [ln for ln in lines if ln.partition(":")[0].strip() != user or ln.lstrip().startswith("#")]
    found = len(out) != len(lines)
    if password is not None:
        out.append(f"{user}:{hash_password(password)}")
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("\n".join(out) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp, found


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    conf = path = None
    while argv and argv[0] in ("-C", "-f") and len(argv) > 1:
        flag, value = argv.pop(0), argv.pop(0)
        conf, path = (value, path) if flag == "-C" else (conf, value)
    if len(argv) != 2 or argv[0] not in ("adduser", "deluser"):
        print("usage: python3 -m pymta.auth [-C pymta.conf] [-f file] adduser|deluser USER",
              file=sys.stderr)
        return 64
    from . import config
    cfg = config.load(conf)
    path = path or cfg.smtpd_sasl_password_file
    action, user = argv
    password = None
    if action == "adduser":
        if sys.stdin.isatty():
            password = getpass.getpass(f"Password for {user}: ")
            if getpass.getpass("Again: ") != password:
                print("passwords differ", file=sys.stderr)
                return 65
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("empty password refused", file=sys.stderr)
            return 65
    try:
        tmp, found = set_password(path, user, password)
        if os.geteuid() == 0:
            try:
                gid = pwd.getpwnam(cfg.mail_owner).pw_gid
            except KeyError:
                gid = grp.getgrnam("root").gr_gid
            os.chown(tmp, 0, gid)
        os.rename(tmp, path)
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 73
    if action == "deluser" and not found:
        print(f"{user}: no such user in {path}", file=sys.stderr)
        return 67
    print(f"{path}: {'updated' if found else 'added'} {user}" if password else f"{path}: removed {user}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
