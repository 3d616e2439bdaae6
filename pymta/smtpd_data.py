"""The DATA stream of an SMTP session, decoded chunk by chunk.

Only CRLF.CRLF ends the data. Whole chunks are handled with bytes
operations (find, count, replace), never a Python loop per line: dot-
unstuffing and CRLF -> LF are two ``bytes.replace`` calls. A bare CR or LF
anywhere marks the message as refused (SMTP smuggling); the caller decides
the reply once the real end has come.
"""

import re

from . import headers
from .status import PymtaError, Reply

DATA_SPLIT = 64 * 1024
_RECEIVED_RE = re.compile(rb"^received:", re.I | re.M)
_FIELD_RE = re.compile(rb"[!-9;-~]+:")   # a field name and its colon
_DOT_LINE = re.compile(rb"\n\.")    # its search is twice as quick as `in` here


class DataReceiver:
    """Turns the DATA stream into the stored message, chunk by chunk.

    ``feed(buf)`` consumes what it can and returns the number of bytes used
    and whether the final ``.`` line was seen. Stored bytes are unstuffed
    and have LF line ends.
    """

    def __init__(self, writer, size_limit, line_limit, header_limit, header_filter=None):
        self.writer = writer
        # header_filter(bytes) -> bytes: the header section is held back
        # until it ends (at most header_limit bytes), passed through it,
        # then written; the body streams as before.
        self.header_filter = header_filter
        self.held = bytearray() if header_filter is not None else None
        self.size_limit = size_limit
        self.line_limit = line_limit    # 0: long lines are kept as they are
        self.header_limit = header_limit
        self.at_bol = True
        self.line_len = 0          # bytes of the current unfinished line
        self.size = 0              # bytes stored (after conversion)
        self.received = 0          # raw bytes consumed
        self.bare = False
        self.long_line = False
        self.too_big = False
        self.error = None          # a Reply from a failed write
        self.header = bytearray()  # the header section, for the hop count
        self.in_header = True
        self._hpos = 0             # where the next unread header line starts
        self.header_too_big = False

    @property
    def failed(self):
        return (self.bare or self.long_line or self.too_big or self.header_too_big
                or self.error is not None)

    def feed(self, buf):
        if self.at_bol:
            if buf[:3] == b".\r\n":
                self._release_header()
                self.received += 3
                return 3, True
            if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                return 0, False
        # One search tells both whether the end is here and whether any
        # line (but the first) is dot-stuffed: both need a CRLF and a dot.
        dot = _DOT_LINE.search(buf)
        dot = dot.start() if dot is not None else -1
        if dot >= 0:
            end = buf.find(b"\r\n.\r\n", max(dot - 1, 0))
            if end >= 0:
                used = end + 5
                self._segment(_prefix(buf, end + 2), dots=dot + 1 < end + 2)
                self._release_header()
                self.received += used
                return used, True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            used = cut + 2
            mid_line = False
        elif len(buf) > DATA_SPLIT:
            # A long line without CRLF: store all but the last byte, which
            # may be the CR of a CRLF.
            used = len(buf) - 1
            mid_line = True
        else:
            return 0, False
        self._segment(_prefix(buf, used), mid_line, dots=0 <= dot and dot + 1 < used)
        self.received += used
        return used, False

    def _segment(self, seg, mid_line=False, stuffed=True, dots=None):
        """Store ``seg`` (whole lines, unless ``mid_line``). ``dots``: whether
        a line after its first may begin with a dot (None: not known)."""
        # CRLF to LF (split and join beat bytes.replace by a third); what is
        # left of CR, or is more LF than there were CRLFs, is a bare line end.
        parts = seg.split(b"\r\n")
        data = b"\n".join(parts)
        crlf = len(parts) - 1
        if b"\r" in data or data.count(b"\n") != crlf:
            self.bare = True
        if self.line_limit and not self.failed:
            self._check_lines(seg)
        if self.failed:
            self.at_bol = not mid_line
            return
        if stuffed:
            if self.at_bol and data[:1] == b".":
                data = data[1:]
            if dots or (dots is None and _DOT_LINE.search(data)):
                data = data.replace(b"\n.", b"\n")
        self.at_bol = not mid_line
        if self.in_header:
            self._scan_header(data)
        self.size += len(data)
        if self.size_limit and self.size > self.size_limit:
            self.too_big = True
            return
        if self.held is not None:
            self.held += data
            if not self.in_header:
                self._release_header()
            return
        self._write(data)

    def _release_header(self):
        """Write what was held back: the header section through the filter,
        and what came after it."""
        if self.held is None:
            return
        held, self.held = bytes(self.held), None
        if self.failed:
            return
        n = len(self.header)        # the header section as _scan_header cut it
        head, rest = held[:n], held[n:]
        try:
            head = self.header_filter(head)
        except Exception:   # noqa: BLE001 - a table problem never loses the message
            pass
        self._write(head + rest)

    def _write(self, data):
        try:
            self.writer.write(data)
        except PymtaError as e:
            self.error = e.reply
        except OSError:
            self.error = Reply(451, "4.3.0", "Error: queue file write error")

    def _check_lines(self, seg):
        longest = self.line_limit - 2   # the limit counts the CRLF
        first = seg.find(b"\n")
        if first < 0:
            self.line_len += len(seg)
        else:
            last = seg.rfind(b"\n")
            if self.line_len + first - 1 > longest or (
                    last > first and re.search(rb"[^\r\n]{%d}" % (longest + 1), seg[first:last])):
                self.long_line = True
            self.line_len = len(seg) - last - 1
        if self.line_len > longest:
            self.long_line = True

    def _scan_header(self, data):
        """Keep the header section (for the hop count) and measure it: it
        ends at an empty line or at the first line that is neither a field
        nor a continuation (which begins the body), as sendmail reads it.
        A longer section than header_size_limit fails the message, as
        sendmail refuses it."""
        self.header += data
        h = self.header
        pos = self._hpos
        while True:
            nl = h.find(b"\n", pos)
            if nl < 0:
                break
            line = h[pos:nl]
            if not line or not (line[:1] in (b" ", b"\t") and pos > 0
                                or _FIELD_RE.match(line)):
                del h[pos:]
                self.in_header = False
                return
            pos = nl + 1
        self._hpos = pos
        if len(h) > self.header_limit:
            self.header_too_big = True
            self.in_header = False

    def hops(self):
        return len(_RECEIVED_RE.findall(bytes(self.header)))

    def message_id(self):
        """The Message-ID header's value (unfolded, at most 998 characters),
        or "" (for the log's msgid=, as sendmail writes it)."""
        return header_value(bytes(self.header), b"message-id")


def missing_fields(header, hostname, qid, now=None):
    """Date: and Message-ID: for a header section (bytes, LF line ends)
    that lacks them, as Postfix's cleanup adds them for trusted clients."""
    import time
    have = {line.split(b":", 1)[0].strip().lower() for line in header.split(b"\n")
            if line[:1] not in (b" ", b"\t") and b":" in line}
    out = []
    now = time.time() if now is None else now
    if b"date" not in have:
        out.append(f"Date: {headers.date(now)}\n")
    if b"message-id" not in have:
        if not qid:
            import os
            qid = os.urandom(6).hex().upper()
        out.append(f"Message-ID: {headers.message_id(qid, hostname, now)}\n")
    return "".join(out).encode()


def header_value(header, name):
    """The first ``name:`` field of a header section (bytes, lowercase
    ``name``), unfolded and stripped, as text; "" when absent."""
    lines = header.split(b"\n")
    for i, line in enumerate(lines):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            parts = [value]
            for more in lines[i + 1:]:
                if more[:1] in (b" ", b"\t"):
                    parts.append(more)
                else:
                    break
            text = b" ".join(p.strip() for p in parts).strip().decode("utf-8", "replace")
            return text[:998]
    return ""


class ChunkReceiver(DataReceiver):
    """The message of a BDAT transaction (RFC 3030): chunks of raw octets,
    neither dot-stuffed nor ended by a dot, stored as DATA's are (CRLF ->
    LF) with the same checks: a bare CR or LF refuses the message. A CRLF
    split between two chunks is one line end; the message may end without
    one."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.tail = b""

    def feed_chunk(self, data):
        self.received += len(data)
        buf = self.tail + data
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            used, mid_line = cut + 2, False
        elif len(buf) > DATA_SPLIT:
            used, mid_line = len(buf) - 1, True
        else:
            self.tail = buf
            return
        self._segment(buf[:used], mid_line, stuffed=False)
        self.tail = buf[used:]

    def finish(self):
        """The last chunk is in: store what is left of the last line."""
        if self.tail:
            self._segment(self.tail, True, stuffed=False)
            self.tail = b""
        self._release_header()


def _prefix(buf, n):
    """The first ``n`` bytes of ``buf`` as bytes, copied once at most."""
    if n == len(buf) and type(buf) is bytes:
        return buf
    with memoryview(buf) as view, view[:n] as part:
        return bytes(part)
