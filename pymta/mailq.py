"""mailq, sendmail -bp and -bP: the queue listing, in sendmail's exact format.

Scripts and monitoring tools (Nagios' check_mailq, cron reports) parse
sendmail's text, so the text listing copies sendmail 8.14's print_single_queue()
byte for byte: the header line, a row per message (id, a mark, size, arrival,
sender), a QUARANTINE: line for a held message, the body type and status
line, the pending recipients indented below, and "Total requests: N".
``--json`` gives the same facts, and more, to programs.

Listing never takes a message's lock: locked messages are found through
/proc/locks (one read for the whole queue) and confirmed with a shared-lock
probe of those few only, so mailq never makes a queue runner skip a message.
A control file that cannot be read or parsed is listed as such.
"""

import errno
import json
import os
import sys
import time

from . import envelope as E
from .queue_dir import Spool, read_file
from .queue_file import matches, parse_control
from .queue_id import valid_id
from .status import EX_NOPERM, EX_OK, EX_OSFILE, EX_USAGE, READ_SIZE, SpoolCorrupt

HEADER = "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------\n"
HEADER_V = "-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------\n"

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

STATE_NAMES = {E.QUEUED: "queued", E.DEFERRED: "deferred", E.SENT: "sent",
               E.FAILED: "failed", E.BOUNCED: "bounced", E.EXPANDED: "expanded"}


class Entry:
    """One queued message as mailq sees it: the envelope, or why there is none."""

    __slots__ = ("id", "env", "error", "locked", "held", "lost", "size")

    def __init__(self, qid, env=None, error="", held=False, lost=False, size=-1):
        self.id, self.env, self.error = qid, env, error
        self.held, self.lost, self.size = held, lost, size
        self.locked = False


# -- reading the queue --------------------------------------------------------

def _proc_locked_inodes():
    """Inodes with a flock held somewhere, from /proc/locks; None if unknown."""
    try:
        with open("/proc/locks", "rb") as f:
            data = f.read()
    except OSError:
        return None
    inodes = set()
    for line in data.split(b"\n"):
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1835009 0 EOF" (with "->" for waiters)
        if len(parts) >= 6 and parts[1] == b"FLOCK" and parts[0] != b"->":
            dev_ino = parts[5].rsplit(b":", 1)
            if len(dev_ino) == 2 and dev_ino[1].isdigit():
                inodes.add(int(dev_ino[1]))
    return inodes


CHUNK = 10000       # the most control-file ids held at once: mailq's memory is flat


def _controls(spool, after="", limit=None):
    """(the number of control files, {id: prefix} of the ``limit`` first
    ids above ``after``): one pass over the queue directory holding at most
    twice ``limit`` ids. A qf and an hf for one id cannot both exist (hold
    is a rename); should it happen, the qf wins, as Spool.read() does."""
    limit = limit or CHUNK
    n = 0
    control = {}
    bound = None            # ids from this one up are not among the first ``limit``
    with os.scandir(spool.dir) as it:      # not listdir: the df names are never all kept
        for e in it:
            name = e.name
            prefix, qid = name[:2], name[2:]
            if prefix not in ("qf", "hf", "Qf") or not valid_id(qid):
                continue
            n += 1
            if qid <= after or bound is not None and qid > bound:
                continue
            if prefix == "qf" or qid not in control or control[qid] == "Qf":
                control[qid] = sys.intern(prefix)
                if len(control) >= 2 * limit:
                    keep = sorted(control)[:limit]
                    bound = keep[-1]
                    control = {q: control[q] for q in keep}
    if len(control) > limit:
        control = {q: control[q] for q in sorted(control)[:limit]}
    return n, control


def count(spool):
    """The number of messages (qf, hf and Qf control files), reading none."""
    return _controls(spool, limit=1)[0]


def scan(spool, filters=(), include_lost=True):
    """Entries of every message in ``spool`` (oldest first) that match ``filters``.

    Raises PermissionError when the queue directory cannot be read and
    FileNotFoundError when it does not exist.
    """
    return list(iter_scan(spool, filters, include_lost)[1])


def iter_scan(spool, filters=(), include_lost=True):
    """(number of control files, generator of their entries oldest first,
    those that match ``filters``): one entry in memory at a time, and the
    ids CHUNK at a time (a queue larger than that is read again for each
    further CHUNK: memory stays flat as the queue grows; a message queued
    meanwhile may be listed, one removed meanwhile is not).

    Raises PermissionError or FileNotFoundError at once, as scan() does."""
    chunk = CHUNK
    n, first = _controls(spool, limit=chunk)
    locked_inodes = _proc_locked_inodes()

    def entries():
        control = first
        while control:
            for qid in sorted(control):
                prefix = control[qid]
                if prefix == "Qf":
                    if not include_lost:
                        continue
                    entry = Entry(qid, error="lost: control file could not be parsed", lost=True)
                else:
                    entry = _read_entry(spool, qid, prefix)
                if filters and not matches(qid, entry.env, filters):
                    continue
                try:
                    st = os.stat(spool.path("df", qid))
                except OSError:
                    st = None
                if st is not None:
                    entry.size = st.st_size
                    if locked_inodes is None or st.st_ino in locked_inodes:
                        entry.locked = spool.is_locked(qid)
                yield entry
            if len(control) < chunk:
                return
            try:
                control = _controls(spool, after=max(control), limit=chunk)[1]
            except OSError:
                return
    return n, entries()


def _read_entry(spool, qid, prefix):
    held = prefix == "hf"
    try:
        raw = read_file(spool.path(prefix, qid))
    except FileNotFoundError:
        return Entry(qid, error="job completed", held=held)
    except PermissionError:
        return Entry(qid, error="permission denied", held=held)
    except OSError as e:
        return Entry(qid, error=e.strerror or str(e), held=held)
    try:
        env = parse_control(raw.decode("utf-8", "surrogateescape"), qid)
    except SpoolCorrupt as e:
        return Entry(qid, error=f"unreadable control file: {e}", held=held)
    env.held = held
    return Entry(qid, env=env, held=held)


# -- text output ----------------------------------------------------------------

def ctime16(t, verbose=False):
    """ctime(3)'s first 16 characters ("Sat Nov 28 17:23"), locale-free, local time."""
    tm = time.localtime(t)
    text = f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}"
    return text[4:] if verbose else text


def wrap(text, width):
    """``text`` in lines of at most ``width`` columns, cut at spaces where it can."""
    lines = []
    while len(text) > width:
        cut = text.rfind(" ", 0, width + 1)
        if cut <= 0:
            cut = width
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    lines.append(text)
    return lines


def prtstr(s, limit):
    """sendmail's prtstr(): at most ``limit`` columns, backslash doubled, control
    characters as \\ooo. Printable non-ASCII characters (UTF-8 addresses) are kept."""
    if s.isascii() and s.isprintable() and "\\" not in s:
        return s[:limit]        # the common case: each character one column
    out = []
    left = limit
    for ch in s:
        if left <= 0:
            break
        if ch == "\\":
            left -= 1
            if left > 0:
                out.append("\\\\")
                left -= 1
        elif ch.isprintable():
            out.append(ch)
            left -= 1
        else:
            left -= 1
            for b in ch.encode("utf-8", "surrogateescape"):
                left -= 3
                if left > 0:
                    out.append("\\%03o" % b)
    return "".join(out)


def sender_text(env):
    return f"<{env.sender}>" if env.sender else "<>"


def mark(entry, now):
    """The character after the id: * locked, ? lost, X held, - not yet due."""
    if entry.locked:
        return "*"
    if entry.lost:
        return "?"
    if entry.held:
        return "X"
    if entry.env is not None and entry.env.next_try > now:
        return "-"
    return " "


def status_text(env):
    """The status shown under the sender: the M line, else a pending recipient's text."""
    if env.status and not env.held:
        return env.status
    if env.held:
        return ""
    for r in env.pending:
        if r.text:
            return r.text
    return ""


def format_entry(entry, now, verbose=False):
    out = ["%13s" % entry.id, mark(entry, now)]
    env = entry.env
    if env is None:
        out.append(f" ({entry.error})\n")
        return "".join(out)
    if verbose:
        out.append("%8d %10d%c%.12s " % (entry.size, env.priority, "+" if env.warned else " ",
                                        ctime16(env.created, True)))
        out.append(prtstr(sender_text(env), 78))
    else:
        out.append("%8d %.16s " % (entry.size, ctime16(env.created)))
        out.append(prtstr(sender_text(env), 39))
    width = 100 if verbose else 60
    if env.held:
        out.append("\n     QUARANTINE: %s" % prtstr(env.status or "held", width))
    status = status_text(env)
    if status or env.body_type:
        out.append("\n    %10.10s" % env.body_type)
        if status:
            # The whole reason, on as many lines as it takes (as Postfix's
            # mailq does): the end of it (what the server said) is the news.
            lines = wrap(prtstr(status, 8 * width), width)
            out.append("   (%s)" % ("\n" + " " * 18).join(lines))
    for r in env.recipients:
        if not r.pending:
            continue
        if verbose:
            out.append("\n\t\t\t\t\t\t" + prtstr(f"<{r.address}>", 71))
        else:
            out.append("\n\t\t\t\t\t " + prtstr(f"<{r.address}>", 38))
    out.append("\n")
    return "".join(out)


def format_listing(qdir, entries, now, verbose=False):
    n = len(entries)
    parts = []
    if n == 0:
        parts.append(f"{qdir} is empty\n")
    else:
        parts.append(f"\t\t{qdir} ({n} request{'' if n == 1 else 's'})\n")
        parts.append(HEADER_V if verbose else HEADER)
        for entry in entries:
            parts.append(format_entry(entry, now, verbose))
    parts.append(f"\t\tTotal requests: {n}\n")
    return "".join(parts)


def write_listing(out, qdir, n, entries, now, verbose=False):
    """format_listing() for ``n`` entries from an iterator, written to
    ``out`` a few hundred at a time."""
    if n == 0:
        out.write(f"{qdir} is empty\n")
    else:
        out.write(f"\t\t{qdir} ({n} request{'' if n == 1 else 's'})\n")
        out.write(HEADER_V if verbose else HEADER)
        parts = []
        for entry in entries:
            parts.append(format_entry(entry, now, verbose))
            if len(parts) >= 500:
                out.write("".join(parts))
                parts.clear()
        out.write("".join(parts))
    out.write(f"\t\tTotal requests: {n}\n")


def format_count(qdir, n):
    """sendmail -bP style: the number of entries only."""
    head = f"{qdir} is empty\n" if n == 0 else f"{qdir}: entries={n}\n"
    return head + f"\t\tTotal requests: {n}\n"


# -- JSON output -----------------------------------------------------------------

def entry_dict(entry):
    """The machine-readable form of one entry (the schema is in mailq(1))."""
    d = {"id": entry.id, "size": entry.size, "locked": entry.locked, "held": entry.held,
         "lost": entry.lost}
    env = entry.env
    if env is None:
        d["error"] = entry.error
        return d
    d.update({
        "arrival": env.created,
        "sender": env.sender,
        "attempts": env.attempts,
        "last_attempt": env.last_attempt,
        "next_try": env.next_try,
        "priority": env.priority,
        "status": env.status,
        "hold_reason": env.status if env.held else "",
        "body_type": env.body_type,
        "envid": env.envid,
        "protocol": env.protocol,
        "client_addr": env.client_addr,
        "warned": env.warned,
        "recipients": [{
            "address": r.address,
            "state": STATE_NAMES.get(r.state, r.state),
            "dsn": r.dsn,
            "text": r.text,
            "orcpt": r.orcpt,
            "parent": r.parent,
            "relay": r.relay,
            "updated": r.updated,
        } for r in env.recipients],
    })
    return d


def format_json(qdir, entries, count_only=False):
    doc = {"queue_directory": qdir, "requests": len(entries)}
    if not count_only:
        doc["messages"] = [entry_dict(e) for e in entries]
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


# -- the command -------------------------------------------------------------------

SHOWQ = os.path.join("public", "showq")     # under queue_directory: the daemon's socket


def render(cfg, spool, count_only=False, filters=(), as_json=False, verbose=False):
    """The listing's text; raises what scan() raises."""
    if count_only and not filters:
        entries = [None] * count(spool)
    else:
        entries = scan(spool, filters)
    qdir = cfg.queue_directory
    if as_json:
        return format_json(qdir, entries, count_only)
    if count_only:
        return format_count(qdir, len(entries))
    return format_listing(qdir, entries, time.time(), verbose=verbose)


def main(cfg, opts, out=None):
    """mailq / sendmail -bp / -bP. Exit 0; 77 if the queue may not be read
    (and no daemon lists it for this user); 72 if the queue directory does
    not exist."""
    out = out or sys.stdout
    prog = opts.program
    spool = Spool.from_config(cfg)
    request = dict(count_only=opts.count_only, filters=[list(f) for f in opts.queue_filters],
                   as_json=bool(opts.json), verbose=bool(opts.verbose))
    stream = not (opts.json or opts.count_only or opts.queue_filters)
    try:
        if stream:
            # The whole queue, written as it is read: memory stays flat however
            # long the queue (the count in the heading is that of its files).
            n, entries = iter_scan(spool)
            write_listing(out, cfg.queue_directory, n, entries, time.time(),
                          verbose=opts.verbose)
            out.flush()
            return EX_OK
        text = render(cfg, spool, **request)
    except FileNotFoundError:
        print(f"{prog}: queue directory {spool.dir} does not exist", file=sys.stderr)
        return EX_OSFILE
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        # Not root nor mail_owner: the daemon lists the queue for us (as
        # Postfix's showq does), if authorized_mailq_users lets us.
        answer = ask_daemon(cfg, request)
        if answer is None:
            print(f"{prog}: {spool.dir}: Permission denied: only root and {cfg.mail_owner} "
                  f"may read the queue, and no daemon answers on "
                  f"{os.path.join(cfg.queue_directory, SHOWQ)}", file=sys.stderr)
            return EX_NOPERM
        code, text = answer
        if code != EX_OK:
            print(f"{prog}: {text.strip()}", file=sys.stderr)
            return code
    out.write(text)
    out.flush()
    return EX_OK


def ask_daemon(cfg, request, timeout=60):
    """(exit code, text) from the daemon's showq socket, or None when no
    daemon answers."""
    import json
    import socket
    path = os.path.join(cfg.queue_directory, SHOWQ)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = bytearray()
            while True:
                chunk = sock.recv(READ_SIZE)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, nl, body = bytes(data).partition(b"\n")
    if not nl or not head.isdigit():
        return None
    return int(head), body.decode("utf-8", "replace")


def _authorized(cfg, uid):
    if uid == 0:
        return True
    try:
        import pwd
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    allowed = [x.lower() for x in cfg.authorized_mailq_users]
    return "static:anyone" in allowed or name.lower() in allowed or name == cfg.mail_owner


def serve_showq(cfg, spool, sock, log):
    """The daemon's side (a thread of the master, as root): one listing per
    connection, for a user that authorized_mailq_users admits (the peer's
    uid from the kernel, SO_PEERCRED). A request is one JSON line."""
    import json
    import socket
    import struct
    import threading
    slots = threading.BoundedSemaphore(4)

    def one(conn):
        try:
            conn.settimeout(10)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            line = bytearray()
            while b"\n" not in line and len(line) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                line += chunk
            if not _authorized(cfg, uid):
                conn.sendall(b"%d\npermission denied: authorized_mailq_users does not "
                             b"admit uid %d\n" % (EX_NOPERM, uid))
                return
            try:
                req = json.loads(bytes(line).split(b"\n", 1)[0] or b"{}")
                filters = [(str(k), str(v), bool(n)) for k, v, n in req.get("filters", [])
                           if str(k) in ("I", "R", "S", "Q")]
                text = render(cfg, spool, count_only=bool(req.get("count_only")),
                              filters=filters, as_json=bool(req.get("as_json")),
                              verbose=bool(req.get("verbose")))
            except (ValueError, TypeError, AttributeError):
                conn.sendall(b"%d\nbad request\n" % EX_USAGE)
                return
            conn.sendall(b"0\n" + text.encode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            conn.close()
            slots.release()

    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return          # the socket was closed: the daemon stops
        if not slots.acquire(blocking=False):
            conn.close()     # four listings at once already
            continue
        threading.Thread(target=one, args=(conn,), name="pymta-showq", daemon=True).start()


def open_showq(cfg):
    """The listening socket at queue_directory/public/showq (0666 in a 0755
    directory of root's), or None (logged by the caller) when it cannot be made."""
    import socket
    path = os.path.join(cfg.queue_directory, SHOWQ)
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    try:
        if os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock
