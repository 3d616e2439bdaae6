"""Postfix-style plain lookup tables (smtp_sasl_password_maps,
smtp_tls_policy_maps): ``key value`` lines, ``#`` comments, a line that
starts with white space continues the one before. A ``hash:`` (or
``texthash:``) prefix names the same plain file: there is no postmap and no
.db. Keys are matched without regard to case. The file is read at each
use, so a change is seen by the next delivery.
"""

import os
import stat

MAX_SIZE = 1 << 20


class TableError(Exception):
    """The table cannot be used; the text says why."""


def path_of(item, param):
    for prefix in ("hash:", "texthash:"):
        if item.startswith(prefix):
            return item[len(prefix):]
    if ":" in item.split("/", 1)[0]:
        raise TableError(f"{param}: unsupported table type {item.split(':', 1)[0]!r} "
                         "(a plain file, or hash: naming the same file)")
    return item


def read(path, param, secret=False):
    """The file's text. A ``secret`` file is opened without following a
    symbolic link and refused when every user may read it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if secret else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise TableError(f"cannot open {param} file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TableError(f"{param} file {path} is not a regular file")
        if secret and st.st_mode & 0o004:
            raise TableError(f"{param} file {path} is readable by every user "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0600")
        data = f.read(MAX_SIZE)
    return data.decode("utf-8", "replace")


def parse(text):
    """{key (lowercased): value} from the table text; the first line of a
    key wins."""
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and lines:
            lines[-1] += " " + line.strip()
            continue
        lines.append(line.strip())
    entries = {}
    for line in lines:
        parts = line.split(None, 1)
        if len(parts) == 2:
            entries.setdefault(parts[0].lower(), parts[1].strip())
    return entries


def lookup(items, param, keys, secret=False):
    """The value of the first of ``keys`` found in the tables ``items``
    (each key in every table, in order, before the next key, as Postfix's
    maps do), or None. Raises TableError."""
    tables = [parse(read(path_of(item, param), param, secret)) for item in items]
    for key in keys:
        for table in tables:
            if key in table:
                return table[key]
    return None
