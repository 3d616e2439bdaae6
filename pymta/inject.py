"""sendmail's submission path: a message on stdin becomes a queued message.

The header section (bounded by header_size_limit) is held in memory to be
fixed up and, with -t, searched for recipients; the body is streamed from
stdin to the df in blocks, so a message of any size needs little memory.
CRLF and LF input are both stored with LF line ends. The message enters the
queue by Spool's one commit (root and mail_owner), or through the maildrop
(everyone else); exit 0 means it is durable. See sendmail(8).
"""

import os
import pwd
import sys
import time

from . import address as A
from . import envelope as E
from . import headers
from .maillog import full_logging, log
from .queue_dir import Spool
from .status import (EX_DATAERR, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE,
                     EX_USAGE, PymtaError, AddressError)

BLOCK = 64 * 1024
# No regular expressions: importing re would cost every sendmail run (its
# latency) a third of its time.
_FIELD_NAME_CHARS = bytes(range(0x21, 0x7f))     # ftext, and ':' ends the name
_CONTROLS_TO_SPACE = dict.fromkeys(map(ord, A.CONTROLS), " ")
_SPECIALS = frozenset('()<>[]:;@\\,."')


def _is_field_line(line):
    """Does ``line`` (bytes) start with a field name and its colon?"""
    k = line.find(b":")
    return k > 0 and not line[:k].translate(None, _FIELD_NAME_CHARS)


def format_from(name, address):
    """email.utils.formataddr((name, address)); non-ASCII names take the
    email package's RFC 2047 encoding."""
    if not name.isascii():
        from email.utils import formataddr
        return formataddr((name, address))
    if not _SPECIALS.isdisjoint(name):
        name = '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')
    return f"{name} <{address}>"


class InjectError(PymtaError):
    """A submission refused before commit; ``exit_code`` is its sysexits code."""

    exit_code = EX_USAGE


class Input:
    """stdin as LF-terminated bytes, ending at EOF or, unless ``ignore_dots``,
    at a line holding only '.' (sendmail's rule; no other dot is removed).

    A CR before LF is dropped; a CR split from its LF by a read boundary is
    held back so the pair is still seen. A trailing '.' is held back likewise.
    """

    def __init__(self, f, ignore_dots):
        self.f = f
        self.ignore_dots = ignore_dots
        self.buf = b""       # normalized bytes not yet consumed
        self.tail = b""      # raw bytes held back for the next read
        self.bol = True      # the last byte handed on ended a line
        self.done = False    # no more input will come

    def _read(self):
        read1 = getattr(self.f, "read1", None)
        return read1(BLOCK) if read1 else self.f.read(BLOCK)

    def _fill(self):
        """Append more normalized input to ``buf``; False when there is none."""
        while not self.done:
            raw = self._read()
            eof = not raw
            data = self.tail + raw
            self.tail = b""
            if not eof and data.endswith(b"\r"):
                self.tail, data = b"\r", data[:-1]
            data = data.replace(b"\r\n", b"\n")
            if not self.ignore_dots:
                prefix = b"\n" if self.bol else b""
                s = prefix + data
                i = s.find(b"\n.\n")
                if i >= 0:
                    data, eof = s[len(prefix):i + 1], True
                elif s.endswith(b"\n."):
                    data = s[len(prefix):-1]  # a lone '.' at EOF ends input too
                    if not eof:
                        self.tail = b"." + self.tail
            if eof:
                self.done = True
            if data:
                self.bol = data.endswith(b"\n")
                self.buf += data
                return True
        return False

    def readline(self, limit):
        """One line (with its LF) of at most ``limit`` bytes; b"" at the end."""
        while True:
            i = self.buf.find(b"\n", 0, limit)
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            if len(self.buf) >= limit or not self._fill():
                line, self.buf = self.buf[:limit], self.buf[limit:]
                return line

    def blocks(self):
        """The rest of the input, in blocks."""
        while True:
            if self.buf:
                data, self.buf = self.buf, b""
                yield data
            if not self._fill():
                return


def read_header(inp, limit):
    """Read the header section: ([field bytes, ...], first body bytes).

    A field keeps its continuation lines. The section ends at an empty line
    (consumed), at EOF, or at the first line that is not a header, which then
    begins the body. A leading Unix "From " line is dropped. Bare CRs become
    spaces, so no header can be made of one.
    """
    fields, size, first = [], 0, True
    while True:
        line = inp.readline(limit - size + 1)
        if not line:
            return fields, b""
        size += len(line)
        if size > limit or not line.endswith(b"\n") and not inp.done:
            raise InjectError(f"message header section exceeds header_size_limit ({limit} bytes)",
                              exit_code=EX_DATAERR)
        if not line.endswith(b"\n"):
            line += b"\n"
        if first and line.startswith(b"From "):
            first = False
            continue
        first = False
        if line == b"\n":
            return fields, b""
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += _clean(line)
        elif _is_field_line(line):
            fields.append(_clean(line))
        else:
            return fields, line


def _clean(line):
    return line[:-1].replace(b"\r", b" ").replace(b"\x00", b"") + b"\n"


def field_name(field):
    return field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")


def field_value(field):
    """The unfolded value of a header field, as text."""
    value = field.split(b":", 1)[1].decode("utf-8", "surrogateescape")
    return value.replace("\n", "").strip()


def _after_quoted(text, i):
    """The index after the quoted string that opens at ``text[i]`` (quoted
    pairs allowed), or -1 when it never closes."""
    j, n = i + 1, len(text)
    while j < n and text[j] != '"':
        j += 2 if text[j] == "\\" else 1
    return j + 1 if j < n else -1


def _after_comment(text, i):
    """The index after the RFC 5322 comment that opens at ``text[i]`` (nested
    comments and quoted pairs allowed), or -1 when it never closes."""
    depth, i, n = 1, i + 1, len(text)
    while i < n and depth:
        if text[i] == "\\":
            i += 1
        elif text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
        i += 1
    return -1 if depth else i


def split_addresses(text):
    """RFC 5322 address list -> addr-specs: display names, comments and group
    names are dropped; raises ValueError on unbalanced quotes or brackets."""
    items, cur, angle = [], [], None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = _after_quoted(text, i)
            if j < 0:
                raise ValueError("unbalanced quote")
            (angle if angle is not None else cur).append(text[i:j])
            i = j
            continue
        if c == "(":
            i = _after_comment(text, i)
            if i < 0:
                raise ValueError("unbalanced parenthesis")
            cur.append(" ")
            continue
        if angle is not None:
            if c == ">":
                items.append("".join(angle).strip())
                angle, cur = None, [None]   # None: this item is done
            else:
                angle.append(c)
        elif c == "<":
            angle = []
        elif c == ">":
            raise ValueError("unbalanced >")
        elif c in ",;":
            _flush(items, cur)
            cur = []
        elif c == ":" and None not in cur and "@" not in "".join(cur):
            cur = []                        # "group name:" is dropped
        else:
            cur.append(c)
        i += 1
    if angle is not None:
        raise ValueError("missing >")
    _flush(items, cur)
    return items


# Address fields whose bare names a local submission qualifies with myorigin
# (Postfix's cleanup: append_at_myorigin for local mail).
ADDRESS_FIELDS = frozenset(("from", "to", "cc", "reply-to", "sender", "resent-from",
                            "resent-to", "resent-cc", "resent-sender"))


def qualify_list(text, origin):
    """``text`` (an RFC 5322 address list) with each address that has no
    domain given @origin, everything else (display names, comments, groups,
    folding) kept as written. Unparseable text comes back unchanged."""
    out, i, n = [], 0, len(text)
    item_start = 0
    angle_open = None
    spans = []            # (start, end) of each item's top-level text
    while i < n:
        c = text[i]
        if c == '"':
            i = _after_quoted(text, i)
            if i < 0:
                return text
            continue
        if c == "(":
            i = _after_comment(text, i)
            if i < 0:
                return text
            continue
        if c == "<":
            angle_open = i
        elif c == ">":
            if angle_open is None:
                return text
            inner = text[angle_open + 1:i]
            if inner.strip() and "@" not in inner and ":" not in inner:
                out.append((i, "@" + origin))
            angle_open = None
        elif c in ",;:" and angle_open is None:
            spans.append((item_start, i, c))
            item_start = i + 1
        i += 1
    if angle_open is not None:
        return text
    spans.append((item_start, n, ""))
    for start, end, sep in spans:
        if sep == ":":
            continue              # "name:" opens a group: the next items are its members
        item = text[start:end]
        if "<" not in item:
            word = _bare_word(item)
            if word is not None:
                pos = start + word[1]
                out.append((pos, "@" + origin))
    if not out:
        return text
    pieces, last = [], 0
    for pos, ins in sorted(out):
        pieces.append(text[last:pos])
        pieces.append(ins)
        last = pos
    pieces.append(text[last:])
    return "".join(pieces)


def _bare_word(item):
    """(word, end offset) when ``item`` outside its comments is one word
    without @ (an unqualified address), else None."""
    depth, start, end, words = 0, None, None, 0
    for k, c in enumerate(item):
        if depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
            continue
        if c == "(":
            depth = 1
            if start is not None and end is None:
                end = k
            continue
        if c.isspace():
            if start is not None and end is None:
                end = k
            continue
        if start is None or end is not None:
            if end is not None:
                return None       # a second word: a display name without <>, leave it
            start = k
            words += 1
    if start is None:
        return None
    end = end if end is not None else len(item.rstrip())
    word = item[start:end]
    if "@" in word or '"' in word or not word:
        return None
    return word, end


def _flush(items, cur):
    if None in cur:
        if "".join(c for c in cur if c).strip():
            raise ValueError("text after >")
        return
    word = "".join(cur).strip()
    if word:
        items.append(word)


def parse_recipient(text, origin, exit_code):
    """One recipient as typed -> (address, flags); refuses programs and files."""
    if not A.CONTROLS.isdisjoint(text):
        raise InjectError(f"control character in recipient address {text!r}", exit_code=exit_code)
    addr, flags = text.strip(), E.PRIMARY
    if addr.startswith("\\"):
        addr, flags = addr[1:], flags + E.NO_ALIAS
    bare = A.unquote_local(addr) if addr.startswith('"') and addr.endswith('"') else addr
    if bare.startswith(("|", "/")) or bare.lower().startswith(":include:"):
        raise InjectError(f"{text}: programs, files and :include: are not allowed as "
                          "recipients of a submission (only in the aliases file)",
                          exit_code=EX_NOUSER)
    if addr.endswith("@") or not addr:
        raise InjectError(f"{text!r}: bad recipient address syntax", exit_code=exit_code)
    try:
        addr = A.check_mailbox(addr, require_domain=False)
    except AddressError as e:
        raise InjectError(f"{text!r}: bad recipient address syntax ({e})",
                          exit_code=exit_code) from None
    return A.qualify(addr, origin), flags


class Submission:
    """Everything known about a submission before its data is written."""

    def __init__(self, cfg, opts):
        self.cfg, self.opts = cfg, opts
        self.uid = os.getuid()
        try:
            pw = pwd.getpwuid(self.uid)
            self.login, gecos = pw.pw_name, pw.pw_gecos.split(",")[0]
            gecos = gecos.replace("&", self.login.capitalize())
        except KeyError:
            self.login, gecos = f"uid{self.uid}", ""
        self.trusted = self.login in cfg.trusted_users
        full = opts.fullname if opts.fullname is not None else gecos
        self.fullname = " ".join(full.translate(_CONTROLS_TO_SPACE).split())
        self.own_address = A.qualify(self.login, cfg.myorigin)
        self.sender = self._sender(opts.sender)
        if opts.dsn_envid and (len(opts.dsn_envid) > 100
                               or any(not 33 <= ord(c) <= 126 for c in opts.dsn_envid)):
            raise InjectError("-V: an envelope id is 1 to 100 printable ASCII characters")
        self.recipients = []      # [(address, flags)]
        self._seen = set()
        self.rewriter = None
        if any((cfg.canonical_maps, cfg.sender_canonical_maps, cfg.recipient_canonical_maps,
                cfg.masquerade_domains)):
            from . import rewrite      # only when configured: sendmail's start-up is its latency
            self.rewriter = rewrite.Rewriter(cfg)
        for arg in opts.recipients:
            self.add_list(arg, EX_USAGE)

    def _sender(self, given):
        if given is None:
            return self.own_address
        if not A.CONTROLS.isdisjoint(given):
            raise InjectError(f"control character in sender address {given!r}")
        s = given.strip()
        if s.startswith("<") and s.endswith(">"):
            s = s[1:-1].strip()
        if s == "":
            return ""
        try:
            s = A.check_mailbox(s, require_domain=False)
        except AddressError as e:
            raise InjectError(f"-f {given!r}: bad sender address syntax ({e})") from None
        return A.qualify(s, self.cfg.myorigin)

    def add_list(self, text, exit_code):
        if exit_code == EX_USAGE and not A.CONTROLS.isdisjoint(text):
            raise InjectError(f"control character in recipient address {text!r}")
        try:
            items = split_addresses(text)
        except ValueError as e:
            raise InjectError(f"{text!r}: bad recipient address syntax ({e})",
                              exit_code=exit_code) from None
        for item in items:
            addr, flags = parse_recipient(item, self.cfg.myorigin, exit_code)
            local, domain = A.split(addr)
            key = f"{local}@{domain.lower()}"
            if key not in self._seen:
                self._seen.add(key)
                self.recipients.append((addr, flags))

    def notify_flags(self):
        n = self.opts.dsn_notify
        if not n:
            return ""
        if n == "never":
            return E.NOTIFY_NEVER
        return "".join({"success": "S", "failure": "F", "delay": "D"}[w] for w in n.split(","))

    def envelope(self, body_type):
        env = E.Envelope(sender=self.sender, protocol="local", uid=self.uid,
                         body_type=self.opts.body_type or body_type,
                         envid=self.opts.dsn_envid or "", ret=self.opts.dsn_ret or "")
        notify = self.notify_flags()
        for addr, flags in self.recipients:
            env.add_recipient(addr, flags=flags + notify)
        if self.rewriter is not None:
            self.rewriter.envelope(env)
        env.smtputf8 = not env.sender.isascii() or not all(r.address.isascii()
                                                           for r in env.recipients)
        return env

    def fix_header(self, fields, qid, warn=True):
        """The header section to store: Received first, Return-Path and Bcc
        gone, Date, From and Message-ID added when missing. ``warn=False``
        (a maildrop file): the X-Authentication-Warning: for -f is left to
        pickup, which writes it from the file's owner."""
        cfg = self.cfg
        now = time.time()
        names = {field_name(f) for f in fields}
        out = []
        if qid:
            out.append(headers.received(qid, cfg.myhostname, cfg.mail_name,
                                        f"(from {self.login}@localhost)", t=now))
        if warn and self.opts.sender is not None and not self.trusted \
                and self.sender not in (self.own_address, self.login):
            out.append(headers.auth_warning(cfg.myhostname, self.login, self.sender))
        drop = {"return-path", "bcc", "resent-bcc"}
        for f in fields:
            name = field_name(f)
            if name in drop:
                continue
            if name in ADDRESS_FIELDS:
                f = _qualified_field(f, cfg.myorigin)
            out.append(f)
        if "date" not in names:
            out.append(f"Date: {headers.date(now)}\n".encode())
        if "from" not in names:
            from_ = format_from(self.fullname, self.own_address) if self.fullname \
                else self.own_address
            out.append(f"From: {from_}\n".encode("utf-8", "surrogateescape"))
        self.msgid = ""
        for f in fields:
            if field_name(f) == "message-id":
                self.msgid = field_value(f)
                break
        else:
            token = qid or os.urandom(6).hex().upper()
            self.msgid = headers.message_id(token, cfg.myhostname, now)
            out.append(f"Message-ID: {self.msgid}\n".encode())
        if self.rewriter is not None:
            out = [self.rewriter.header_field(f) for f in out]
        return b"".join(out) + b"\n"


def _qualified_field(field, origin):
    """A header field (bytes, folded as written) with its bare addresses qualified."""
    name, colon, value = field.partition(b":")
    text = value.decode("utf-8", "surrogateescape")
    new = qualify_list(text, origin)
    if new == text:
        return field
    return name + colon + new.encode("utf-8", "surrogateescape")


def recipients_from_header(sub, fields):
    """-t: To, Cc and Bcc (or only the Resent- ones when there are any)."""
    names = [field_name(f) for f in fields]
    resent = any(n in ("resent-to", "resent-cc", "resent-bcc") for n in names)
    wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
    for f, name in zip(fields, names):
        if name in wanted:
            sub.add_list(field_value(f), EX_DATAERR)


class _Body:
    """The message's bytes on their way to the spool: counted, checked
    against message_size_limit, 8-bit detected, copied to -X."""

    def __init__(self, head, first, inp, limit, traffic):
        self.head, self.first, self.inp = head, first, inp
        self.limit, self.traffic = limit, traffic
        self.size = 0
        self.eight_bit = False

    def __iter__(self):
        yield self._pass(self.head)
        if self.first:
            yield self._pass(self.first)
        for block in self.inp.blocks():
            yield self._pass(block)

    def _pass(self, data):
        self.size += len(data)
        if self.limit and self.size > self.limit:
            raise InjectError(f"message exceeds message_size_limit ({self.limit} bytes)",
                              exit_code=EX_DATAERR)
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        if self.traffic:
            self.traffic.write(data)
        return data


def main(cfg, opts):
    """Submit stdin as a message; the exit code follows sysexits.h."""
    try:
        return _main(cfg, opts)
    except PymtaError as e:
        if opts.error_mode != "q":
            print(f"sendmail: {e}", file=sys.stderr)
        return e.exit_code


def _main(cfg, opts):
    sub = Submission(cfg, opts)
    if not opts.read_recipients and not sub.recipients:
        raise InjectError("Recipient names must be specified (or use -t to read them "
                          "from the message header)")
    spool = Spool.from_config(cfg)
    if not spool.exists():
        raise InjectError(f"queue directory {spool.dir} does not exist", exit_code=EX_TEMPFAIL)
    if cfg.queue_minfree and spool.free_space() < cfg.queue_minfree:
        raise InjectError("insufficient disk space in the queue; try again later",
                          exit_code=EX_TEMPFAIL)
    inp = Input(getattr(sys.stdin, "buffer", sys.stdin), opts.ignore_dots)
    fields, first = read_header(inp, cfg.header_size_limit)
    if opts.read_recipients:
        recipients_from_header(sub, fields)
        if not sub.recipients:
            raise InjectError("No recipient addresses found in header")
    hops = opts.hop_count + sum(1 for f in fields if field_name(f) == "received")
    if hops > cfg.hopcount_limit:
        raise InjectError(f"too many hops ({hops} > hopcount_limit {cfg.hopcount_limit})",
                          exit_code=EX_DATAERR)
    traffic = _open_traffic(opts.traffic_file, sub)
    try:
        if spool.writable():
            return _commit(cfg, opts, sub, spool, fields, first, inp, traffic)
        return _drop(cfg, opts, sub, spool, fields, first, inp, traffic)
    finally:
        if traffic:
            traffic.close()


def _open_traffic(path, sub):
    if not path:
        return None
    try:
        f = open(path, "ab")
    except OSError as e:
        raise InjectError(f"-X {path}: {e.strerror}", exit_code=73) from None
    rcpts = "".join(f"RCPT TO:<{a}>\n" for a, _ in sub.recipients)
    f.write(f"{os.getpid()} === {time.strftime('%Y-%m-%d %H:%M:%S')} submission\n"
            f"MAIL FROM:<{sub.sender}>\n{rcpts}DATA\n".encode("utf-8", "surrogateescape"))
    return f


def _commit(cfg, opts, sub, spool, fields, first, inp, traffic):
    with spool.new_message() as w:
        body = _Body(sub.fix_header(fields, w.id), first, inp, cfg.message_size_limit, traffic)
        for data in body:
            w.write(data)
        env = sub.envelope("8BITMIME" if body.eight_bit else "")
        qid = w.commit(env)
        _log_accept(sub, qid, body.size)
        mode = opts.delivery_mode or cfg.delivery_mode[0]
        if opts.verbose:
            print(f"{qid}: queued", file=sys.stderr)
        if mode == "q":
            return EX_OK
        lock = w.handoff()
    if mode == "i":
        full_logging()
        return _deliver_now(cfg, opts, lock, sub.sender)
    # A running daemon delivers it (told through queue/notify); else a
    # background child does. The lock goes first, so the daemon can take it.
    nfd = spool.notify_open()
    if nfd is not None:
        qid = lock.id
        lock.release()
        if spool.notify_send(nfd, qid):
            return EX_OK
        lock = spool.lock(qid)
        if lock is None:       # someone else is on it already
            return EX_OK
    # The delivery code is imported in the background child, not here: its
    # import is not the submitter's to wait for.
    return _deliver_background(cfg, lock)


def _drop(cfg, opts, sub, spool, fields, first, inp, traffic):
    """Unprivileged: the whole submission goes into maildrop/ as one file."""
    body = _Body(sub.fix_header(fields, "", warn=False), first, inp, cfg.message_size_limit,
                 traffic)
    env = sub.envelope("")
    from . import queue_maildrop      # not imported by the submissions that commit
    name = queue_maildrop.drop(spool, env, body)
    log.info(f"maildrop/{name}: uid={sub.uid} from=<{sub.sender}>, size={body.size}, "
             f"nrcpts={len(sub.recipients)}, msgid={sub.msgid}")
    if opts.verbose:
        print(f"maildrop/{name}: queued for pickup", file=sys.stderr)
    return EX_OK


def _log_accept(sub, qid, size):
    log.info(f"{qid}: from=<{sub.sender}>, size={size}, class=0, nrcpts={len(sub.recipients)}, "
             f"msgid={sub.msgid}, relay={sub.login}@localhost")


def _deliver_now(cfg, opts, lock, sender):
    """-odi: deliver in the foreground; a permanent failure is reported."""
    from . import queue_attempt
    from .status import Outcome
    try:
        outcome = queue_attempt.Deliverer(cfg).deliver_locked(lock).outcome
    finally:
        lock.release()
    if outcome == Outcome.PERMFAIL:
        if opts.error_mode != "q":
            told = f"a bounce went to <{sender}>" if sender else "no bounce to <>"
            print(f"sendmail: {lock.id}: delivery to some recipients failed ({told}); "
                  "see the mail log", file=sys.stderr)
        return EX_UNAVAILABLE if opts.error_mode in ("p", "q") else EX_OK
    if outcome == Outcome.TEMPFAIL and opts.verbose:
        print(f"{lock.id}: deferred; it stays queued", file=sys.stderr)
    return EX_OK


def _deliver_background(cfg, lock):
    """-odb: a detached grandchild delivers while holding the message's lock."""
    from .forkserver import fork_child

    def deliver():
        fd = os.open(os.devnull, os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(fd, n)
        try:
            full_logging()
            from . import queue_attempt
            queue_attempt.Deliverer(cfg).deliver_locked(lock)
        except BaseException as e:  # noqa: BLE001 - the queue run retries
            log.error(f"{lock.id}: background delivery failed: {e!r}")
        lock.release()

    def detach():
        os.setsid()
        fork_child(deliver)

    sys.stdout.flush()
    sys.stderr.flush()
    os.waitpid(fork_child(detach), 0)
    lock.release()   # our descriptor only: the grandchild still holds the flock
    return EX_OK
