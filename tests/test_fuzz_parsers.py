"""Property tests of the parsers not fuzzed elsewhere: the aliases(5) parser,
sendmail's stdin reader, and the SMTP DATA stream cut at arbitrary read
boundaries (the address parser, the qf format and the session's replies
have their own fuzzing in test_address, test_qf_fuzz, test_smtpd_session).

Any input gives a result or a clear error, never an exception; what is
parsed survives a write and a re-read; how the bytes are split into reads
never changes what is stored.
"""

import io
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from pymta import aliases, config, inject
from pymta.smtpd_session import COMMIT, Session
import pytest

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- aliases(5) ------------------------------------------------------------------

alias_chars = st.sampled_from(list("abc:,\"\\|/ \t\n#@.-+") + [":include:", "\x00", "é", "\r"])
alias_text = st.lists(alias_chars, max_size=120).map("".join)

names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}(\.[a-z0-9]{1,4})?", fullmatch=True)
labels = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
simple_targets = st.one_of(
    names,
    st.builds(lambda u, d: f"{u}@{d}.test", names, labels),
    st.builds(lambda c: "|" + c, st.from_regex(r"/bin/[a-z]{1,6}( -[a-z]{1,3}){0,2}", fullmatch=True)),
    st.builds(lambda p: "/var/" + p, names),
    st.builds(lambda p: ":include:/etc/" + p, names),
    st.builds(lambda u: "\\" + u, names),
)


def _write_target(t):
    """A target as a file would carry it: programs and paths quoted."""
    if t.startswith(("|", "/", ":include:")):
        return '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return t


@FUZZ
@given(alias_text)
def test_any_aliases_text_parses_to_entries_and_numbered_errors(text):
    af = aliases.parse(text, "fuzz")
    nlines = max(1, len(text.splitlines()))
    for e in af.errors:
        assert 1 <= e.lineno <= nlines and str(e).startswith(f"fuzz:{e.lineno}: ")
    for key, a in af.aliases.items():
        assert key == key.lower() and a.targets
        for t in a.targets:
            assert aliases.parse_target(_write_target(t)) == t    # canonical: a fixed point


@settings(FUZZ, max_examples=80)
@given(st.dictionaries(names, st.lists(simple_targets, min_size=1, max_size=4, unique=True),
                       min_size=1, max_size=6),
       st.booleans())
def test_written_aliases_read_back_the_same_through_the_database(tmp_path_factory, table, fold):
    lines = []
    for name, targets in table.items():
        written = [_write_target(t) for t in targets]
        if fold and len(written) > 1:
            lines.append(f"{name}: {written[0]},")
            lines.extend(f"\t{w}," for w in written[1:-1])
            lines.append(f"  {written[-1]}")
        else:
            lines.append(f"{name}: {', '.join(written)}")
    path = tmp_path_factory.getbasetemp() / "fuzz.aliases"
    path.write_text("# fuzz\n" + "\n".join(lines) + "\n")
    af = aliases.read(str(path))
    assert af.bad == []
    assert {k: a.targets for k, a in af.aliases.items()} == table
    db = aliases.write_db(af)
    assert aliases.read_db(db) == table


# -- sendmail's stdin -------------------------------------------------------------

class Chunks(io.RawIOBase):
    """stdin that returns the given pieces, one per read."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def readable(self):
        return True

    def read1(self, n=-1):
        return self.pieces.pop(0) if self.pieces else b""

    read = read1


def _split(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return [p for p in out if p]


def _read_all(pieces, ignore_dots):
    inp = inject.Input(Chunks(pieces), ignore_dots)
    return b"".join(inp.blocks())


def _model(data, ignore_dots):
    """sendmail's rule on the whole input: CRLF -> LF; unless -i, a line of
    a single '.' ends the message."""
    s = data.replace(b"\r\n", b"\n")
    if ignore_dots:
        return s
    if s.startswith(b".\n") or s == b".":
        return b""
    i = s.find(b"\n.\n")
    if i >= 0:
        return s[:i + 1]
    return s[:-1] if s.endswith(b"\n.") else s


stdin_bytes = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\n.\n",
                                        b"\x00", b" "]), max_size=60).map(b"".join)


@FUZZ
@given(stdin_bytes, st.lists(st.integers(0, 200), max_size=12), st.booleans())
def test_stdin_reader_is_the_same_however_the_reads_fall(data, cuts, ignore_dots):
    whole = _read_all([data], ignore_dots)
    assert whole == _model(data, ignore_dots)
    assert _read_all(_split(data, cuts), ignore_dots) == whole
    assert _read_all([bytes([b]) for b in data], ignore_dots) == whole


# -- SMTP DATA cut at arbitrary reads -----------------------------------------------

class Writer:
    """The session's injected writer (queue_commit.MessageWriter's interface), in memory."""

    def __init__(self, store):
        self.id, self.size, self.data, self.store = "FUZZ00000000001", 0, bytearray(), store

    def write(self, b):
        self.data += b
        self.size += len(b)

    def commit(self, env):
        self.store.append(bytes(self.data))
        return self.id

    def abort(self):
        pass


CFG = config.from_dict(myhostname="mx.example.test", mydestination="example.test",
                       mynetworks="127.0.0.0/8", queue_minfree=0)
REPLY_CODE = re.compile(rb"^(\d{3})[ -]", re.M)


def _converse(pieces):
    store = []
    s = Session(CFG, begin_message=lambda: Writer(store), client_addr="127.0.0.1",
                recipient_check=lambda a: None, clock=lambda: 0)
    out = s.greeting()
    for p in pieces:
        if s.closed:
            break
        out += s.feed(p)
        while s.next_step() is COMMIT:     # as the blocking pump does
            out += s.commit()
    s.close()
    return [int(c) for c in REPLY_CODE.findall(out)], store


body_bytes = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x", b"\r\n.\r\n",
                                       b"\r\n..\r\n", b"MAIL FROM:<e@v.il>\r\n", b"\x00"]),
                      max_size=40).map(b"".join)


@FUZZ
@given(body_bytes, st.lists(st.integers(0, 400), max_size=15))
def test_smtp_data_is_stored_the_same_however_the_reads_fall(body, cuts):
    talk = (b"EHLO c.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
            + body + b"\r\n.\r\nRSET\r\nQUIT\r\n")
    whole = _converse([talk])
    assert _converse(_split(talk, cuts)) == whole
    codes, store = whole
    assert codes[:4] == [220, 250, 250, 250] and codes[-1] in (221, 421)   # 421: too many errors
    for data in store:       # CRLF became LF; a bare CR or LF refuses the whole message
        assert b"\r" not in data
    # A message is stored only where the client really sent CRLF.CRLF.
    assert len(store) <= talk.count(b"\r\n.\r\n")
