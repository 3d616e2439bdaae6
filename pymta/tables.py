"""Lookup tables: Postfix's address maps in their plain-text form.

A table is a text file as postmap(1) reads it::

    # comment
    key     value
    key2    value that goes on
            on the next line (a line starting with white space continues)

Keys are folded to lower case; the value is the rest of the line, white
space squeezed. A parameter names one or more tables, separated by commas or
white space, each ``type:path`` or a bare path; ``hash:``, ``btree:`` and
``texthash:`` all mean the same text file. There is no compiled database: a
table is read when first used and again whenever the file changes (inode,
size and modification time), so `postmap` is not needed and an edit takes
effect at the next lookup.

Address lookups follow Postfix's order (virtual(5), canonical(5)), first
match wins: ``user+ext@domain``, ``user@domain``, then, only where the domain
is this host's own (``myorigin`` or ``mydestination``), ``user+ext`` and
``user``, then ``@domain``. A match on a key without the ``+ext`` passes the
extension on to a single-address result (Postfix's
propagate_unmatched_extensions); a result ``@other`` keeps the local part
(``user@other``); an unqualified result gets ``@$myorigin``.
"""

import logging
import os

from . import address
from .config import table_paths
from .status import TableError

def parse(text, path="<table>", errors=None):
    """``{key: value}`` of a table's text; bad lines go to ``errors`` as
    ``(path, lineno, message)`` (no text of the line)."""
    table = {}
    cur = None
    lines = text.splitlines()
    entries = []
    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if not stripped:
                cur = None
            continue
        if line[0] in " \t":
            if cur is None:
                if errors is not None:
                    errors.append((path, lineno, "continuation line with nothing to continue"))
                continue
            cur[2] += " " + stripped
            continue
        cur = [lineno, None, stripped]
        entries.append(cur)
    for lineno, _, text_ in entries:
        parts = text_.split(None, 1)
        key = parts[0]
        value = " ".join(parts[1].split()) if len(parts) > 1 else ""
        if not value:
            if errors is not None:
                errors.append((path, lineno, "key without a value"))
            continue
        table.setdefault(key.lower(), value)
    return table


class Table:
    """One table file, read again when it changes."""

    def __init__(self, path, log=None):
        self.path = path
        self.log = log or logging.getLogger("pymta")
        self._stamp = None
        self._data = {}

    def data(self):
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            stamp = ("missing", e.errno)
        if stamp != self._stamp:
            self._data = self._read()
            self._stamp = stamp
        return self._data

    def _read(self):
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except FileNotFoundError:
            self.log.warning(f"warning: table {self.path} does not exist; it is taken as empty")
            return {}
        except OSError as e:
            self.log.warning(f"warning: cannot read table {self.path}: {e.strerror}")
            return {}
        errors = []
        table = parse(text, self.path, errors)
        for path, lineno, msg in errors:
            self.log.warning(f"warning: {path}:{lineno}: {msg}")
        return table

    def get(self, key):
        return self.data().get(key.lower())


class Maps:
    """The tables of one parameter, searched in order."""

    _cache = {}

    def __init__(self, items, log=None):
        self.paths = table_paths(items)
        self.tables = [Table(p, log) for p in self.paths]

    def __bool__(self):
        return bool(self.tables)

    def get(self, key):
        for t in self.tables:
            v = t.get(key)
            if v is not None:
                return v
        return None


def maps(cfg, name, log=None):
    """The Maps of parameter ``name`` of ``cfg``, kept per configuration so
    that every lookup does not stat again more than needed."""
    key = (id(cfg), name)
    hit = Maps._cache.get(key)
    if hit is None or hit[0] is not cfg:
        hit = (cfg, Maps(getattr(cfg, name), log))
        Maps._cache[key] = hit
    return hit[1]


def own_domain(cfg, domain):
    """Whether a bare ``user`` key may match an address in ``domain``."""
    d = domain.lower().rstrip(".")
    return d == "" or d == cfg.myorigin.lower().rstrip(".") or cfg.is_local_domain(d)


def lookup_address(cfg, tables, addr):
    """Look ``addr`` up in ``tables`` (Maps) in Postfix's order. Returns
    ``(value, key, extension)`` where ``extension`` is the ``+ext`` the
    matched key lacked (to be passed on), or None when nothing matched."""
    local, domain = address.split(addr)
    local_l, domain_l = local.lower(), domain.lower().rstrip(".")
    delim = cfg.recipient_delimiter
    base, ext = local_l, ""
    if delim and delim in local_l and not local_l.startswith(delim):
        base, _, ext = local_l.partition(delim)
    keys = []
    if domain_l:
        keys.append((f"{local_l}@{domain_l}", ""))
        if ext:
            keys.append((f"{base}@{domain_l}", ext))
    if own_domain(cfg, domain_l):
        keys.append((local_l, ""))
        if ext:
            keys.append((base, ext))
    if domain_l:
        keys.append((f"@{domain_l}", ""))
    for key, missing in keys:
        value = tables.get(key)
        if value is not None:
            return value, key, missing
    return None


def _qualify(cfg, result, local, ext):
    """A table's result as a full address (see the module docstring)."""
    if result.startswith("@"):
        result = f"{local}{result}"
    elif "@" not in result:
        result = f"{result}@{cfg.myorigin}"
    if ext:
        rl, rd = address.split(result)
        delim = cfg.recipient_delimiter
        if delim and delim not in rl:
            result = f"{rl}{delim}{ext}@{rd}"
    return result


def split_targets(value):
    """The addresses of a table value (comma or white space separated,
    quoted local parts kept whole)."""
    from .aliases import _split_outside_quotes
    out = []
    for part in _split_outside_quotes(value):
        part = part.strip()
        if not part:
            continue
        if '"' in part:
            out.append(part)
        else:
            out.extend(p for p in part.split() if p)
    return out


def rewrite(cfg, tables, addr):
    """One-to-one rewriting (canonical, generic): the new address, or None.
    The null sender and addresses the tables do not match are left alone."""
    if not addr or not tables:
        return None
    found = lookup_address(cfg, tables, addr)
    if found is None:
        return None
    value, _, ext = found
    targets = split_targets(value)
    if len(targets) != 1:
        return None
    local = address.split(addr)[0]
    new = _qualify(cfg, targets[0], local, ext)
    return None if new.lower() == addr.lower() else new


def expand(cfg, tables, addr):
    """One-to-many expansion (virtual aliases) of one level: the list of
    addresses, or None when ``addr`` has no entry."""
    found = lookup_address(cfg, tables, addr)
    if found is None:
        return None
    value, _, ext = found
    targets = split_targets(value)
    local = address.split(addr)[0]
    return [_qualify(cfg, t, local, ext) for t in targets]


def domain_in(domain, items):
    """Whether ``domain`` is one of ``items`` (a domain list parameter)."""
    d = domain.lower().rstrip(".")
    return any(d == x.lower().rstrip(".") for x in items if x)


def map_main(items, query=None, out=None):
    """``pymta map [-q KEY] TABLE...``: with -q, print the value of KEY in
    the first table that has it (exit 0), or nothing (exit 1), as
    ``postmap -q`` does; without, check each table and say how many entries
    it has and which lines are wrong (exit 65 when any is)."""
    import sys
    from .status import EX_DATAERR, EX_NOINPUT, EX_USAGE
    out = out or sys.stdout
    try:
        paths = table_paths(items)
    except TableError as e:
        print(f"pymta: map: {e}", file=sys.stderr)
        return EX_USAGE
    if query is not None:
        for path in paths:
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    value = parse(f.read(), path).get(query.lower())
            except OSError as e:
                print(f"pymta: map: {path}: {e.strerror}", file=sys.stderr)
                return EX_NOINPUT
            if value is not None:
                out.write(value + "\n")
                return 0
        return 1
    code = 0
    for path in paths:
        errors = []
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                table = parse(f.read(), path, errors)
        except OSError as e:
            print(f"pymta: map: {path}: {e.strerror}", file=sys.stderr)
            return EX_NOINPUT
        for p, lineno, msg in errors:
            print(f"pymta: map: {p}:{lineno}: {msg}", file=sys.stderr)
        out.write(f"{path}: {len(table)} entries\n")
        if errors:
            code = EX_DATAERR
    return code
