"""The client's tables (smtp_sasl_password_maps, smtp_tls_policy_maps) in
the syntax of :mod:`pymta.tables` (pymta-tables(5)), read more strictly:
a table that cannot be read is an error that defers the mail, never an
empty table (a missing TLS policy would lower the security asked for, a
missing password send mail without the login), and a ``secret`` table is
opened without following a symbolic link and refused when every user may
read it. The file is read at each use, so a change is seen by the next
delivery.
"""

import os
import stat

from . import tables
from .config import table_paths
from .status import TableError

MAX_SIZE = 1 << 20


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


def lookup(items, param, keys, secret=False):
    """(key, value) of the first of ``keys`` found in the tables ``items``
    (each key in every table, in order, before the next key, as Postfix's
    maps do), or None. Raises TableError."""
    try:
        paths = table_paths(items)
    except TableError as e:
        raise TableError(f"{param}: {e}") from None
    found = [tables.parse(read(path, param, secret), path) for path in paths]
    for key in keys:
        for table in found:
            if key in table:
                return key, table[key]
    return None
