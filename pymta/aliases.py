"""The aliases(5) file: parse it, build its database (newaliases), look names up.

Syntax (see man/aliases.5)::

    # comment
    name: target, target, ...
        continued target, ...          (a line starting with white space)
    "quoted name": "|/usr/bin/prog arg", /var/log/file, :include:/etc/list, \\user

Names are folded to lower case. A parse error is reported as
``file:line: message``; the other entries still load.

The database is one file, ``<source>.pymta.json`` (JSON text: not named
``.db``, which Postfix's and sendmail's tools would try to open as a
Berkeley DB file), written to a temporary
name, fsync'd and renamed over the old one (os.replace), so a lookup never
sees a half-built map. Its form::

    {"format": "pymta-aliases 1", "source": "/etc/aliases",
     "aliases": {"name": ["target", ...], ...}}

A lookup uses the database unless the source is newer (or the database is
missing): then it logs that and reads the source itself. Each lookup
checks the files' modification times, except within a
:meth:`AliasMaps.scope` (the routing of one message's recipients): there
each file is checked at its first lookup only, so a message is routed
with one state of the aliases and a newaliases is seen by the next.
"""

from dataclasses import dataclass, field
import json
import logging
import os
import re
import sys
import threading

from . import address
from .status import AddressError, EX_DATAERR, EX_OK, EX_CANTCREAT, EX_NOINPUT

DB_FORMAT = "pymta-aliases 1"
DB_SUFFIX = ".pymta.json"
OLD_SUFFIX = ".db"        # what pymta 0.1 named it; removed by newaliases
_MAP_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*:(?=/|\$|\.)")


@dataclass
class Alias:
    name: str
    targets: list
    lineno: int = 0
    rhs: str = ""          # the right-hand side as written (for the byte counts)


@dataclass
class ParseError:
    path: str
    lineno: int
    message: str
    warning: bool = False

    def __str__(self):
        kind = "warning: " if self.warning else ""
        return f"{self.path}:{self.lineno}: {kind}{self.message}"


@dataclass
class AliasFile:
    path: str
    aliases: dict = field(default_factory=dict)     # name -> Alias
    errors: list = field(default_factory=list)      # ParseError (warnings too)

    @property
    def bad(self):
        return [e for e in self.errors if not e.warning]


def map_paths(items):
    """alias_maps / alias_database items -> file paths ('hash:/etc/aliases' -> '/etc/aliases')."""
    return [_MAP_TYPE_RE.sub("", item) for item in items if item]


def _split_outside_quotes(text, sep=","):
    """Split on ``sep`` outside double quotes; raises ValueError on an open quote."""
    parts, cur, inq, i = [], [], False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == '"':
            inq = not inq
        if c == sep and not inq:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if inq:
        raise ValueError("unbalanced quote")
    parts.append("".join(cur))
    return parts


def parse_target(text):
    """One target as written -> its canonical text; raises ValueError.

    Canonical forms: ``|command``, ``/path``, ``:include:/path``, ``\\user``,
    ``user``, ``user@domain``.
    """
    t = text.strip()
    if t.startswith("<") and t.endswith(">"):
        t = t[1:-1].strip()
    if not t:
        raise ValueError("empty target")
    if t.startswith('"') and t.endswith('"') and len(t) >= 2:
        inner = re.sub(r'\\(["\\])', r"\1", t[1:-1])
        if inner[:1] in ("|", "/") or inner.lower().startswith(":include:"):
            t = inner
    if t.startswith("|"):
        if not t[1:].strip():
            raise ValueError("empty command after |")
        return "|" + t[1:].strip()
    if t.startswith("/"):
        if any(c in t for c in "\n\0"):
            raise ValueError("bad file name")
        return t
    if t.lower().startswith(":include:"):
        path = t[9:].strip()
        if not path.startswith("/"):
            raise ValueError(f":include: needs an absolute path, not {path!r}")
        return ":include:" + path
    backslash = t.startswith("\\")
    if backslash:
        t = t[1:]
    try:
        norm = address.check_mailbox(t, require_domain=False)
    except AddressError as e:
        raise ValueError(f"bad address {text.strip()!r}: {e}") from None
    return ("\\" if backslash else "") + norm


def parse_targets(text):
    """A comma-separated target list -> (targets, [error messages])."""
    targets, errors = [], []
    try:
        parts = _split_outside_quotes(text)
    except ValueError as e:
        return [], [str(e)]
    for part in parts:
        if not part.strip():
            continue
        try:
            targets.append(parse_target(part))
        except ValueError as e:
            errors.append(str(e))
    return targets, errors


def _parse_name(line):
    """'name: rest' -> (name, rest); raises ValueError."""
    if line.startswith('"'):
        m = re.match(r'"((?:[^"\\]|\\.)*)"\s*:', line)
        if not m:
            raise ValueError("bad quoted name (expected \"name\":)")
        name = re.sub(r"\\(.)", r"\1", m.group(1))
        return name, line[m.end():]
    name, colon, rest = line.partition(":")
    name = name.strip()
    if not colon:
        raise ValueError("missing colon (expected 'name: target, ...')")
    if not name:
        raise ValueError("empty alias name")
    if re.search(r"\s", name):
        raise ValueError(f"white space in alias name {name!r} (quote it)")
    if "@" in name:
        raise ValueError(f"alias name {name!r} has a domain (only local names are aliased)")
    return name, rest


def logical_lines(text):
    """Yield (lineno, text) entries: continuation lines joined, comments dropped."""
    cur = None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if not stripped:
            if cur:
                yield tuple(cur)
            cur = None
            continue
        if line[0] in " \t":
            if cur is None:
                yield (lineno, None)      # continuation of nothing
                continue
            cur[1] += " " + stripped
            continue
        if cur:
            yield tuple(cur)
        cur = [lineno, line.rstrip()]
    if cur:
        yield tuple(cur)


def parse(text, path="<aliases>"):
    """Parse aliases text into an AliasFile (entries plus per-line errors)."""
    af = AliasFile(path)
    for lineno, line in logical_lines(text):
        if line is None:
            af.errors.append(ParseError(path, lineno, "continuation line with nothing to continue"))
            continue
        try:
            name, rest = _parse_name(line)
        except ValueError as e:
            af.errors.append(ParseError(path, lineno, str(e)))
            continue
        targets, errors = parse_targets(rest)
        for msg in errors:
            af.errors.append(ParseError(path, lineno, f"{name}: {msg}"))
        if errors:
            continue
        if not targets:
            af.errors.append(ParseError(path, lineno, f"{name}: no targets"))
            continue
        key = name.lower()
        if key in af.aliases:
            first = af.aliases[key].lineno
            af.errors.append(ParseError(
                path, lineno, f"duplicate alias name {key} (first at line {first}); this one is used",
                warning=True))
        af.aliases[key] = Alias(key, targets, lineno, rest.strip())
    return af


def read(path):
    """Parse an aliases file; raises OSError."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read(), path)


def stats(af):
    """sendmail's counts: (aliases, longest right-hand side, total bytes)."""
    n = len(af.aliases)
    longest = max((len(a.rhs.encode("utf-8", "surrogateescape")) for a in af.aliases.values()),
                  default=0)
    total = sum(len(a.name.encode("utf-8", "surrogateescape"))
                + len(a.rhs.encode("utf-8", "surrogateescape")) for a in af.aliases.values())
    return n, longest, total


def write_db(af, db_path=None):
    """Write af's database atomically (temp file, fsync, rename); returns its path."""
    db_path = db_path or af.path + DB_SUFFIX
    data = {"format": DB_FORMAT, "source": af.path,
            "aliases": {k: af.aliases[k].targets for k in sorted(af.aliases)}}
    tmp = f"{db_path}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(data, f, indent=0, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            st = os.stat(af.path)
            os.chown(tmp, st.st_uid, st.st_gid) if os.geteuid() == 0 else None
        except OSError:
            pass
        os.replace(tmp, db_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return db_path


def read_db(db_path):
    """The name -> targets dict of a database file; raises OSError/ValueError."""
    with open(db_path, encoding="utf-8", errors="surrogateescape") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != DB_FORMAT:
        raise ValueError(f"{db_path}: not a {DB_FORMAT} database")
    return {k: list(v) for k, v in data["aliases"].items()}


class AliasMaps:
    """Lookups in the alias_maps files, database first, source when newer."""

    def __init__(self, paths, log=None):
        self.paths = list(paths)
        self.log = log or logging.getLogger("pymta")
        self._cache = {}      # path -> (key, dict)
        self._warned = set()
        self._scope = threading.local()     # .tables: path -> dict, within a scope()

    @classmethod
    def from_config(cls, cfg, log=None):
        return cls(map_paths(cfg.alias_maps), log)

    def _load(self, path):
        db = path + DB_SUFFIX
        try:
            src_m = os.stat(path).st_mtime_ns
        except OSError:
            src_m = None
        try:
            db_m = os.stat(db).st_mtime_ns
        except OSError:
            db_m = None
        key = (src_m, db_m)
        hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        table = {}
        if db_m is not None and (src_m is None or db_m >= src_m):
            try:
                table = read_db(db)
            except (OSError, ValueError) as e:
                self.log.warning(f"alias database {db} unreadable ({e}); using {path}")
                db_m = None
        if db_m is None or (src_m is not None and src_m > db_m):
            if src_m is None:
                table = {}
            else:
                if db_m is not None and (path, key) not in self._warned:
                    self._warned.add((path, key))
                    self.log.warning(f"alias database {db} is out of date "
                                     f"(run newaliases); using {path}")
                try:
                    af = read(path)
                except OSError as e:
                    self.log.warning(f"cannot read aliases {path}: {e.strerror}")
                    af = AliasFile(path)
                for err in af.bad:
                    if (path, key, str(err)) not in self._warned:
                        self._warned.add((path, key, str(err)))
                        self.log.warning(str(err))
                table = {k: a.targets for k, a in af.aliases.items()}
        self._cache[path] = (key, table)
        return table

    def scope(self):
        """A context in which this thread's lookups check each file once
        (at the first lookup in it): the routing of one message."""
        return _Scope(self._scope)

    def _table(self, path):
        tables = getattr(self._scope, "tables", None)
        if tables is None:
            return self._load(path)
        table = tables.get(path)
        if table is None:
            table = tables[path] = self._load(path)
        return table

    def lookup(self, name):
        """The targets of alias ``name`` (folded to lower case), or None."""
        name = name.lower()
        for path in self.paths:
            targets = self._table(path).get(name)
            if targets is not None:
                return targets
        return None


class _Scope:
    def __init__(self, local):
        self.local = local

    def __enter__(self):
        self.outer = getattr(self.local, "tables", None)
        self.local.tables = {} if self.outer is None else self.outer
        return self

    def __exit__(self, *exc):
        self.local.tables = self.outer


def _remove_old_db(path):
    """An older pymta's database, <source>.db, is removed, and only when it
    is pymta's (JSON of our format): another MTA's aliases.db is left alone."""
    old = path + OLD_SUFFIX
    try:
        read_db(old)
    except (OSError, ValueError):
        return
    try:
        os.unlink(old)
        print(f"newaliases: removed {old} (made by an older pymta; now {path}{DB_SUFFIX})")
    except OSError:
        pass


def newaliases_main(cfg, opts):
    """``newaliases`` / ``sendmail -bi``: check and rebuild each alias_database file."""
    status = EX_OK
    for path in map_paths(cfg.alias_database):
        try:
            af = read(path)
        except FileNotFoundError:
            print(f"newaliases: {path}: no such file", file=sys.stderr)
            status = status or EX_NOINPUT
            continue
        except OSError as e:
            print(f"newaliases: {path}: {e.strerror}", file=sys.stderr)
            status = status or EX_NOINPUT
            continue
        for err in af.errors:
            print(str(err), file=sys.stderr)
        if af.bad:
            print(f"newaliases: {path}: {len(af.bad)} bad line(s); database not rebuilt",
                  file=sys.stderr)
            status = EX_DATAERR
            continue
        try:
            write_db(af)
        except OSError as e:
            print(f"newaliases: {path}{DB_SUFFIX}: {e.strerror}", file=sys.stderr)
            status = status or EX_CANTCREAT
            continue
        _remove_old_db(path)
        n, longest, total = stats(af)
        print(f"{path}: {n} aliases, longest {longest} bytes, {total} bytes total")
        logging.getLogger("pymta").info(
            f"alias database {path}{DB_SUFFIX} rebuilt by {os.getuid()}: {n} aliases")
    return status
