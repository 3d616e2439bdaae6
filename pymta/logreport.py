"""pymta report: a pflogsumm-style summary of the mail log.

It reads the maillog lines pymta writes (through syslog or maillog_file),
each behind a syslog prefix ``Mon DD HH:MM:SS host pymta[pid]: ``:

    ID: from=<sender>, size=N, ..., nrcpts=N, ...        a message received
    ID: uid=N from=<sender>, size=N, ... (maildrop)      one picked up from the maildrop
    ID: to=<rcpt>, delay=D+HH:MM:SS, ..., dsn=X.Y.Z, stat=Sent (...)|Deferred: ...|...
    ID: NEWID: DSN: <rcpt> 5.1.1, ...                     a bounce was sent
    reject: CMD from host[ip]: 550 5.1.1 text; from=<..> to=<..> ...
    ID: held by USER: reason / ID: removed by USER        administration
    ID: quarantine: reason / ID: released                 sendmail -Q[reason]

and prints totals, rejections by reason, top senders and recipients (by
count and bytes), delivery delay percentiles and per-hour counts. The
optional chart is an SVG written by hand (no dependency); PNG needs
matplotlib, the ``plot`` extra, and is never required.
"""

import gzip
import re
import sys
from collections import Counter, defaultdict

from .status import EX_NOINPUT, EX_OK, EX_UNAVAILABLE

_SYSLOG = re.compile(
    r"^(?:(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)"
    r"|(?P<iso>\d{4}-\d\d-\d\dT(?P<ihms>\d\d:\d\d:\d\d)\S*))"
    r" (?P<host>\S+) (?P<prog>[^\s\[:]+)(?:\[\d+\])?: (?P<msg>.*)$")
_ID = r"(?P<id>[0-9A-Za-x]{9}[0-9]{6,10})"
# "ID: uid=N from=<...>, ...": a message picked up from the maildrop.
_FROM = re.compile(_ID + r": (?:uid=\d+ )?from=<(?P<addr>[^>]*)>, size=(?P<size>\d+)(?P<rest>.*)$")
_TO = re.compile(_ID + r": to=<(?P<addr>[^>]*)>, (?P<rest>.*)$")
_DSN_SENT = re.compile(_ID + r": (?P<new>[0-9A-Za-x]{9}[0-9]{6,10}): "
                       r"(?P<kind>DSN|delay warning|postmaster notify): (?P<rest>.*)$")
_REJECT = re.compile(r"^reject: (?P<cmd>\S+) from (?P<peer>[^:]*): (?P<reply>[^;]*)(?:;(?P<rest>.*))?$")
_ADMIN = re.compile(_ID + r": (?P<what>held|released|removed|requeued|bounced|flushed) by (?P<user>\S+?)(?::.*)?$")
_RUNNER_HOLD = re.compile(_ID + r": (?:(?P<held>quarantine): .*|(?P<released>released))$")
_FIELD = re.compile(r"(\w+)=(<[^>]*>|[^,]*)")
_DELAY = re.compile(r"^(?:(\d+)\+)?(\d+):(\d\d):(\d\d)$")
_ADDR_IN_TEXT = re.compile(r"<[^>]*>")

PERCENTILES = (50, 90, 95, 99)


def parse_delay(text):
    """sendmail's delay (``D+HH:MM:SS``) in seconds, or None."""
    m = _DELAY.match(text.strip())
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, -(-p * len(sorted_values) // 100) - 1))
    return sorted_values[k]


def fmt_seconds(s):
    if s is None:
        return "-"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n):
    """1536 -> '1.5k' (pflogsumm's style)."""
    if n < 1024:
        return str(n)
    for unit in "kmgt":
        n /= 1024
        if n < 1024 or unit == "t":
            return f"{n:.1f}{unit}"


class Stats:
    """Everything counted from the log lines."""

    def __init__(self):
        self.lines = self.matched = 0
        self.received = 0
        self.received_bytes = 0
        self.sizes = {}                      # id -> size
        self.delivered = self.deferred = self.bounced = 0
        self.deferred_ids = set()
        self.bounce_reports = self.delay_warnings = 0
        self.rejected = 0
        self.reject_reasons = Counter()
        self.senders = Counter()
        self.sender_bytes = Counter()
        self.recipients = Counter()
        self.recipient_bytes = Counter()
        self.delays = []
        self.admin = Counter()
        self.hours = defaultdict(Counter)    # hour -> Counter(received, delivered, ...)
        self.hour_delays = defaultdict(list)
        self.first = self.last = None

    # -- reading
    def feed(self, line, program="pymta"):
        self.lines += 1
        m = _SYSLOG.match(line.rstrip("\n"))
        if not m:
            return
        prog = m.group("prog")
        if prog != program and not prog.startswith(program + "/"):
            return
        self.matched += 1
        stamp = m.group("hms") or m.group("ihms")
        hour = int(stamp[:2])
        when = m.group("iso") or f"{m.group('mon')} {int(m.group('day')):2d} {stamp}"
        if self.first is None:
            self.first = when
        self.last = when
        msg = m.group("msg")
        if msg.startswith("reject: "):
            self._reject(msg, hour)
            return
        mt = _TO.match(msg)
        if mt:
            self._to(mt, hour)
            return
        mf = _FROM.match(msg)
        if mf:
            size = int(mf.group("size"))
            qid = mf.group("id")
            if qid not in self.sizes:
                self.received += 1
                self.received_bytes += size
                sender = mf.group("addr") or "<>"
                self.senders[sender] += 1
                self.sender_bytes[sender] += size
                self.hours[hour]["received"] += 1
            self.sizes[qid] = size
            return
        md = _DSN_SENT.match(msg)
        if md:
            if md.group("kind") == "delay warning":
                self.delay_warnings += 1
            else:
                self.bounce_reports += 1
            return
        ma = _ADMIN.match(msg)
        if ma:
            self.admin[ma.group("what")] += 1
            return
        mh = _RUNNER_HOLD.match(msg)     # sendmail -qI... -Q[reason]
        if mh:
            self.admin["held" if mh.group("held") else "released"] += 1

    def _to(self, mt, hour):
        fields = dict(_FIELD.findall(mt.group("rest")))
        stat = mt.group("rest").split("stat=", 1)[1] if "stat=" in mt.group("rest") else ""
        dsn = fields.get("dsn", "")
        rcpt = mt.group("addr")
        qid = mt.group("id")
        if stat.startswith("Sent") or dsn.startswith("2"):
            self.delivered += 1
            self.recipients[rcpt] += 1
            self.recipient_bytes[rcpt] += self.sizes.get(qid, 0)
            self.hours[hour]["delivered"] += 1
            delay = parse_delay(fields.get("delay", ""))
            if delay is not None:
                self.delays.append(delay)
                self.hour_delays[hour].append(delay)
        elif stat.startswith("Deferred") or dsn.startswith("4"):
            self.deferred += 1
            self.deferred_ids.add(qid)
            self.hours[hour]["deferred"] += 1
        else:
            self.bounced += 1
            self.hours[hour]["bounced"] += 1

    def _reject(self, msg, hour):
        m = _REJECT.match(msg)
        self.rejected += 1
        self.hours[hour]["rejected"] += 1
        reason = m.group("reply").strip() if m else msg[len("reject: "):]
        self.reject_reasons[_ADDR_IN_TEXT.sub("<>", reason)] += 1


def read_files(paths, program="pymta"):
    """Stats over the named log files ('-' is stdin; .gz files are read too)."""
    st = Stats()
    for path in paths:
        if path == "-":
            for line in sys.stdin:
                st.feed(line, program)
            continue
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                st.feed(line, program)
    return st


# -- the text report ---------------------------------------------------------------

def _top(counter, by_bytes, n):
    rows = []
    for key, count in counter.most_common(n):
        rows.append(f"  {count:8d} {fmt_bytes(by_bytes.get(key, 0)):>8}  {key}")
    return rows or ["  none"]


def _top_bytes(by_bytes, counter, n):
    rows = []
    for key, size in sorted(by_bytes.items(), key=lambda kv: (-kv[1], kv[0]))[:n]:
        rows.append(f"  {fmt_bytes(size):>8} {counter.get(key, 0):8d}  {key}")
    return rows or ["  none"]


def format_report(st, top=10):
    out = ["pymta mail log report", "=====================", ""]
    if st.first:
        out += [f"Period: {st.first} to {st.last}", ""]
    out += ["Grand totals", "------------",
            f"  {st.received:8d}  received ({fmt_bytes(st.received_bytes)} bytes)",
            f"  {st.delivered:8d}  delivered",
            f"  {st.deferred:8d}  deferred ({len(st.deferred_ids)} distinct messages)",
            f"  {st.bounced:8d}  bounced (failed deliveries)",
            f"  {st.bounce_reports:8d}  bounce reports sent",
            f"  {st.delay_warnings:8d}  delay warnings sent",
            f"  {st.rejected:8d}  rejected"]
    for what in ("held", "released", "removed", "requeued", "bounced", "flushed"):
        if st.admin[what]:
            out.append(f"  {st.admin[what]:8d}  {what} by an administrator")
    out += ["", "Rejections by reason", "--------------------"]
    out += [f"  {n:8d}  {reason}" for reason, n in st.reject_reasons.most_common(top)] or ["  none"]
    delays = sorted(st.delays)
    out += ["", "Delivery delays", "---------------"]
    if delays:
        out.append("  " + "  ".join(f"p{p}={fmt_seconds(percentile(delays, p))}"
                                    for p in PERCENTILES)
                   + f"  max={fmt_seconds(delays[-1])}  ({len(delays)} deliveries)")
    else:
        out.append("  none")
    out += ["", "Top senders by count", "--------------------", "     count    bytes  sender"]
    out += _top(st.senders, st.sender_bytes, top)
    out += ["", "Top senders by size", "-------------------", "     bytes    count  sender"]
    out += _top_bytes(st.sender_bytes, st.senders, top)
    out += ["", "Top recipients by count", "-----------------------",
            "     count    bytes  recipient"]
    out += _top(st.recipients, st.recipient_bytes, top)
    out += ["", "Top recipients by size", "----------------------", "     bytes    count  recipient"]
    out += _top_bytes(st.recipient_bytes, st.recipients, top)
    out += ["", "Per-hour traffic", "----------------",
            "  hour  received delivered  deferred   bounced  rejected  median delay"]
    for h in range(24):
        c = st.hours.get(h, Counter())
        med = percentile(sorted(st.hour_delays.get(h, [])), 50)
        out.append(f"  {h:02d}:00 {c['received']:9d} {c['delivered']:9d} {c['deferred']:9d} "
                   f"{c['bounced']:9d} {c['rejected']:9d}  {fmt_seconds(med):>12}")
    return "\n".join(out) + "\n"


# -- charts ------------------------------------------------------------------------

def _esc(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def svg_chart(st):
    """Two panels: messages received/delivered per hour, and the median and
    95th percentile delivery delay per hour. Plain SVG 1.1 text."""
    W, H, left, right, top_, panel, gap = 760, 520, 60, 20, 40, 180, 70
    plot_w = W - left - right
    bw = plot_w / 24
    rec = [st.hours.get(h, Counter())["received"] for h in range(24)]
    dlv = [st.hours.get(h, Counter())["delivered"] for h in range(24)]
    p50 = [percentile(sorted(st.hour_delays.get(h, [])), 50) or 0 for h in range(24)]
    p95 = [percentile(sorted(st.hour_delays.get(h, [])), 95) or 0 for h in range(24)]
    vmax = max(rec + dlv + [1])
    dmax = max(p95 + [1])
    y1, y2 = top_ + panel, top_ + panel + gap + panel
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           '<title>pymta: hourly mail volume and delivery delay</title>',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">Messages per hour (received, delivered)</text>',
           f'<text x="{left}" y="{y1 + gap - 18}" font-size="14">'
           'Delivery delay per hour (median, 95th percentile), seconds</text>']
    for base, scale_max in ((y1, vmax), (y2, dmax)):
        out.append(f'<line x1="{left}" y1="{base}" x2="{W - right}" y2="{base}" stroke="black"/>')
        out.append(f'<line x1="{left}" y1="{base - panel}" x2="{left}" y2="{base}" stroke="black"/>')
        out.append(f'<text x="{left - 6}" y="{base - panel + 4}" text-anchor="end">{scale_max}</text>')
        out.append(f'<text x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>')
        for h in range(0, 24, 3):
            out.append(f'<text x="{left + h * bw + bw / 2:.1f}" y="{base + 14}" '
                       f'text-anchor="middle">{h:02d}</text>')
    for h in range(24):
        x = left + h * bw
        for i, (vals, colour, mx, base) in enumerate(((rec, "#4e79a7", vmax, y1),
                                                      (dlv, "#59a14f", vmax, y1),
                                                      (p50, "#f28e2b", dmax, y2),
                                                      (p95, "#e15759", dmax, y2))):
            hgt = panel * vals[h] / mx
            xo = x + 2 + (i % 2) * (bw - 4) / 2
            out.append(f'<rect x="{xo:.1f}" y="{base - hgt:.1f}" width="{(bw - 4) / 2:.1f}" '
                       f'height="{hgt:.1f}" fill="{colour}"><title>{h:02d}:00 {vals[h]}</title></rect>')
    legend = (("received", "#4e79a7"), ("delivered", "#59a14f"), ("median delay", "#f28e2b"),
              ("p95 delay", "#e15759"))
    for i, (name, colour) in enumerate(legend):
        x = left + i * 150
        out.append(f'<rect x="{x}" y="{H - 22}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{H - 13}">{_esc(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png_chart(st, path):
    """The same chart through matplotlib; raises ImportError without it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hours = list(range(24))
    rec = [st.hours.get(h, Counter())["received"] for h in hours]
    dlv = [st.hours.get(h, Counter())["delivered"] for h in hours]
    p50 = [percentile(sorted(st.hour_delays.get(h, [])), 50) or 0 for h in hours]
    p95 = [percentile(sorted(st.hour_delays.get(h, [])), 95) or 0 for h in hours]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6))
    a.bar([h - 0.2 for h in hours], rec, 0.4, label="received")
    a.bar([h + 0.2 for h in hours], dlv, 0.4, label="delivered")
    a.set_title("Messages per hour")
    a.legend()
    b.bar([h - 0.2 for h in hours], p50, 0.4, label="median delay")
    b.bar([h + 0.2 for h in hours], p95, 0.4, label="p95 delay")
    b.set_title("Delivery delay per hour (s)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(cfg, args, out=None):
    """``pymta report [--svg F] [--png F] [--top N] [logfile...]``."""
    out = out or sys.stdout
    from .maillog import log_file
    paths = list(args.logfiles) or [log_file(cfg) or "/var/log/mail.log"]
    try:
        st = read_files(paths, cfg.syslog_name)
    except OSError as e:
        print(f"pymta: report: {e.filename}: {e.strerror}", file=sys.stderr)
        return EX_NOINPUT
    out.write(format_report(st, top=args.top))
    if args.svg:
        with open(args.svg, "w", encoding="utf-8") as f:
            f.write(svg_chart(st))
    if args.png:
        try:
            png_chart(st, args.png)
        except ImportError:
            print("pymta: report: --png needs matplotlib (pip install '.[plot]'); "
                  "--svg needs nothing", file=sys.stderr)
            return EX_UNAVAILABLE
    return EX_OK
