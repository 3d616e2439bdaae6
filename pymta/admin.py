"""pymta: the administrator's queue control and log report.

sendmail has no command to delete or hold one message; Postfix has postsuper
and Exim -Mrm/-Mf. ``pymta hold|release|delete|flush|bounce|requeue|show``
give the same, each under the message's lock (the flock on its df that every
delivery holds), so never on a message being delivered: without ``--wait``
they say so and exit 75. Ids are checked against the queue id syntax before
any path is built from them, so no file outside the queue directory is ever
touched. Every change is logged to the mail log ("ID: held by root").
``pymta report`` is the maillog summary of logreport.py.

Exit codes (sysexits): 0 done; 64 usage; 65 malformed queue id; 67 no such
message; 69 nothing to do for that message (held, when flushing); 70 the
delivery modules are missing; 75 the message is locked; 77 permission
denied. With several ids, each is tried and the first failure's code is
returned.
"""

import argparse
import logging
import os
import pwd
import sys

from . import envelope as E
from . import mailq
from .queue_dir import Spool
from .queue_id import valid_id
from .status import (EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, EX_NOPERM, EX_NOUSER, EX_OK,
                     EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, PymtaError, SpoolCorrupt,
                     run_program)

PROG = "pymta"
BOUNCE_REPLY = ("5.0.0", "Message bounced by the administrator")


class Refused(PymtaError):
    """An action that cannot be done on one message: what to say, which exit code."""

    def __init__(self, message, code):
        super().__init__(message, exit_code=code)


def _user():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


class Admin:
    """The queue operations, on one spool; each returns a line to print."""

    def __init__(self, cfg, log=None, wait=False, out=None):
        self.cfg = cfg
        self.spool = Spool.from_config(cfg)
        self.log = log or logging.getLogger("pymta")
        self.wait = wait
        self.out = out or sys.stdout
        self.user = _user()

    # -- locking and reading
    def _exists(self, qid, prefixes=("qf", "hf")):
        return any(os.path.exists(self.spool.path(p, qid)) for p in prefixes)

    def _check(self, qid):
        """Refuse a malformed id, or a queue this user may not read."""
        if not valid_id(qid):
            raise Refused(f"{qid!r}: not a queue id", EX_DATAERR)
        try:
            os.listdir(self.spool.dir)
        except PermissionError:
            raise Refused(f"{self.spool.dir}: Permission denied", EX_NOPERM) from None

    def locked(self, qid):
        """The message's lock (waiting for it with --wait); raises Refused."""
        self._check(qid)
        lock = self.spool.lock(qid, wait=self.wait)
        if lock is not None:
            return lock
        if self._exists(qid):
            raise Refused(f"{qid}: message is being delivered, try again (or use --wait)",
                          EX_TEMPFAIL)
        if self._exists(qid, ("Qf",)):
            raise Refused(f"{qid}: control file is corrupt (Qf{qid}); only delete and show "
                          "work on it", EX_UNAVAILABLE)
        raise Refused(f"{qid}: no such message in the queue", EX_NOUSER)

    def _read(self, qid):
        try:
            return self.spool.read(qid)
        except FileNotFoundError:
            raise Refused(f"{qid}: no such message in the queue", EX_NOUSER) from None
        except SpoolCorrupt as e:
            raise Refused(f"{qid}: unreadable control file: {e}", EX_DATAERR) from None

    # -- the operations (the caller catches Refused)
    def hold(self, qid, reason=""):
        with self.locked(qid):
            env = self._read(qid)
            if env.held:
                return f"{qid}: already held"
            reason = reason or f"held by {self.user}"
            self.spool.hold(env, reason)
        self.log.info(f"{qid}: held by {self.user}: {reason}")
        return f"{qid}: held"

    def release(self, qid):
        with self.locked(qid):
            env = self._read(qid)
            if not env.held:
                return f"{qid}: not held"
            self.spool.release(env)
        self.log.info(f"{qid}: released by {self.user}")
        return f"{qid}: released"

    def delete(self, qid):
        if valid_id(qid) and not self._exists(qid) and self._exists(qid, ("Qf",)):
            return self._delete_lost(qid)
        with self.locked(qid):
            self.spool.remove(qid)
        self.log.info(f"{qid}: removed by {self.user}")
        return f"{qid}: removed"

    def _delete_lost(self, qid):
        """A Qf (corrupt) message has no qf, so it is locked by its df alone
        (or not at all, if the df is gone too)."""
        lock = self.spool.lock(qid, wait=self.wait, control=())
        if lock is None and os.path.exists(self.spool.path("df", qid)):
            raise Refused(f"{qid}: message is being worked on, try again", EX_TEMPFAIL)
        try:
            for prefix in ("Qf", "tf", "df"):
                try:
                    os.unlink(self.spool.path(prefix, qid))
                except FileNotFoundError:
                    pass
        finally:
            if lock is not None:
                lock.release()
        self.log.info(f"{qid}: removed by {self.user} (corrupt control file)")
        return f"{qid}: removed"

    def requeue(self, qid):
        with self.locked(qid):
            env = self._read(qid)
            env.next_try = 0
            env.attempts = 0
            self.spool.rewrite(env)
        self.log.info(f"{qid}: requeued by {self.user}")
        return f"{qid}: requeued" + (" (still held)" if env.held else "")

    def _deliverer(self):
        from . import queue_attempt
        return queue_attempt.Deliverer(self.cfg, log=self.log)

    def flush(self, qid):
        with self.locked(qid) as lock:
            env = self._read(qid)
            if env.held:
                raise Refused(f"{qid}: message is held; release it first", EX_UNAVAILABLE)
            self.log.info(f"{qid}: flushed by {self.user}")
            summ = self._deliverer().deliver_locked(lock)
        return f"{qid}: {_summary_text(summ)}"

    def flush_all(self):
        """Deliver every queued message now with the queue run's scheduler
        (per-destination slots, connections kept for the next message),
        after clearing the dead-destination marks, as Postfix's flush does."""
        try:
            os.listdir(self.spool.dir)
        except PermissionError:
            raise Refused(f"{self.spool.dir}: Permission denied", EX_NOPERM) from None
        from . import queue_run, sched
        sched.Scheduler(self.cfg, self.log).clear_all_dead()
        self.log.info(f"queue flushed by {self.user}")
        st = queue_run.Runner(self.cfg, log=self.log).run_pass(force=True)
        if not (st.tried or st.locked or st.quarantined):
            return [], EX_OK
        line = f"{st.tried} message(s) tried: {st.removed} done, {st.deferred} still queued"
        if st.locked:
            line += f"; {st.locked} being delivered, skipped"
        if st.quarantined:
            line += f"; {st.quarantined} set aside as corrupt"
        return [line], (EX_TEMPFAIL if st.locked else EX_OK)

    def bounce(self, qid):
        """Fail every pending recipient now; the runner sends the one report."""
        with self.locked(qid) as lock:
            env = self._read(qid)
            pending = env.pending
            if not pending:
                return f"{qid}: no pending recipient"
            if env.held:
                self.spool.release(env)
            dsn, text = BOUNCE_REPLY
            for r in pending:
                r.set_state(E.FAILED, dsn, f"550 {dsn} {text} ({self.user})")
            self.spool.rewrite(env)
            self.log.info(f"{qid}: bounced by {self.user}: "
                          + ", ".join(f"<{r.address}>" for r in pending))
            self._deliverer().deliver_locked(lock)
        return f"{qid}: bounced to <{env.sender}>" if env.sender else f"{qid}: bounced"

    def show(self, qid, header_limit=64 * 1024):
        """The envelope, each recipient's state and the message header (no lock:
        reading is safe while a delivery runs, and shows what it last wrote)."""
        self._check(qid)
        lines = []
        lost = not self._exists(qid) and self._exists(qid, ("Qf",))
        if lost:
            lines.append(f"Queue-ID: {qid}")
            lines.append(f"State: corrupt control file Qf{qid}, never delivered; its text:")
            with open(self.spool.path("Qf", qid), "rb") as f:
                lines.extend("  " + x for x in f.read(header_limit).decode(
                    "utf-8", "replace").splitlines())
        else:
            env = self._read(qid)
            locked = self.spool.is_locked(qid)
            lines.extend(_envelope_lines(env, locked))
        lines.append("")
        try:
            with self.spool.open_data(qid) as f:
                size = 0
                for raw in f:
                    if raw in (b"\n", b"\r\n") or size > header_limit:
                        break
                    size += len(raw)
                    lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        except FileNotFoundError:
            lines.append("(no data file)")
        return "\n".join(lines)


def _summary_text(summ):
    if getattr(summ, "skipped", ""):
        return f"not delivered ({summ.skipped})"
    return (f"{getattr(summ, 'sent', 0)} sent, {getattr(summ, 'deferred', 0)} deferred, "
            f"{getattr(summ, 'failed', 0)} failed")


def _fmt_time(t):
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else "-"


def _envelope_lines(env, locked):
    state = "held" if env.held else "queued"
    if locked:
        state += ", being delivered (locked)"
    out = [
        f"Queue-ID: {env.id}",
        f"State: {state}",
        f"Sender: <{env.sender}>",
        f"Arrival: {_fmt_time(env.created)}",
        f"Size: {env.size}",
        f"Attempts: {env.attempts}",
        f"Last-Attempt: {_fmt_time(env.last_attempt)}",
        f"Next-Try: {_fmt_time(env.next_try) if env.next_try else 'next queue run'}",
    ]
    if env.status:
        out.append(("Hold-Reason: " if env.held else "Status: ") + env.status)
    for label, val in (("Protocol", env.protocol), ("Client", env.client_addr),
                       ("Client-Name", env.client_name), ("HELO", env.helo),
                       ("Auth", env.auth_user), ("Body-Type", env.body_type),
                       ("Envelope-ID", env.envid), ("DSN-Ret", env.ret)):
        if val:
            out.append(f"{label}: {val}")
    if env.uid >= 0:
        out.append(f"Submitted-By-Uid: {env.uid}")
    out.append("Recipients:")
    for r in env.recipients:
        line = f"  <{r.address}> {mailq.STATE_NAMES.get(r.state, r.state)}"
        if r.dsn:
            line += f" {r.dsn}"
        if r.text:
            line += f" ({r.text})"
        if r.relay:
            line += f" relay={r.relay}"
        if r.parent:
            line += f" parent=<{r.parent}>"
        out.append(line)
    return out


# -- the command line --------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(
        prog=PROG, description="pymta queue control and mail log report; see pymta(8).")
    p.add_argument("-C", dest="config", metavar="FILE", help="configuration file")
    p.add_argument("-O", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a configuration parameter")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name, help_, ids="+"):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--wait", action="store_true",
                       help="wait for a message being delivered instead of refusing")
        if ids:
            s.add_argument("ids", nargs=ids, metavar="ID")
        return s

    s = cmd("hold", "hold messages (delivery skips them)")
    s.add_argument("-r", "--reason", default="", help="why (shown by mailq)")
    cmd("release", "release held messages")
    s = cmd("delete", "delete messages", ids="*")
    s.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    s.add_argument("--sender", metavar="SUBSTR", help="every message whose sender contains SUBSTR")
    s.add_argument("--recipient", metavar="SUBSTR",
                   help="every message with a recipient containing SUBSTR")
    cmd("flush", "deliver messages now (all when no ID is given)", ids="*")
    cmd("bounce", "return messages to their senders now")
    cmd("requeue", "reset attempts and next try, so the next queue run tries them")
    cmd("show", "show envelope, recipient states and header")
    s = sub.add_parser("map", help="look a key up in lookup tables, or check them (like postmap)")
    s.add_argument("-q", dest="query", metavar="KEY", help="print the value of KEY (exit 1: none)")
    s.add_argument("tables", nargs="+", metavar="TABLE", help="a table file (hash:/path or /path)")
    s = sub.add_parser("dkim-keygen", help="make a DKIM key and print its DNS TXT record")
    s.add_argument("-s", "--selector", help="the selector (default: dkim_selector)")
    s.add_argument("-d", "--domain", help="the domain (default: the first of dkim_domains)")
    s.add_argument("-b", "--bits", type=int, default=2048, help="key size (default 2048)")
    s.add_argument("--show", action="store_true",
                   help="print the record of the existing key instead of making one")
    s.add_argument("keyfile", nargs="?", metavar="FILE",
                   help="where the key goes (default: dkim_private_key_file)")
    s = sub.add_parser("check", help="check the installation, the configuration and the "
                       "queue, and repair what is safe to (like postfix check)")
    s.add_argument("-n", "--no-fix", action="store_true",
                   help="report only: create and change nothing")
    s = sub.add_parser("config", add_help=False,
                       help="print the configuration, like postconf: every "
                       "parameter, or the NAMEs, with $name expanded")
    s.add_argument("--help", action="help", help="show this help message and exit")
    s.add_argument("-n", dest="explicit", action="store_true",
                   help="only the parameters set in the file (or by -O)")
    s.add_argument("-d", dest="defaults", action="store_true", help="the default values")
    s.add_argument("-h", dest="values_only", action="store_true",
                   help="the values only, without 'name = '")
    s.add_argument("-r", "--raw", action="store_true",
                   help="the values as written, $name not expanded")
    s.add_argument("names", nargs="*", metavar="NAME")
    s = sub.add_parser("report", help="summary of mail log files")
    s.add_argument("--svg", metavar="FILE", help="also write an SVG chart of hourly volume and delays")
    s.add_argument("--png", metavar="FILE", help="also write a PNG chart (needs matplotlib)")
    s.add_argument("--top", type=int, default=10, metavar="N", help="lines in each top list")
    s.add_argument("logfiles", nargs="*", metavar="LOGFILE")
    return p


def _confirm(prompt):
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def run(cfg, args, out=None):
    """Carry out parsed ``args``; returns the exit code."""
    out = out or sys.stdout
    log = logging.getLogger("pymta")
    if args.command in ("check", "config"):
        for text in cfg.warnings:
            print(f"{PROG}: warning: {text}", file=sys.stderr)
    if args.command == "check":
        from . import check
        return check.main(cfg, fix=not args.no_fix, out=out)
    if args.command == "config":
        from . import config
        try:
            out.write(config.dump(cfg, only_explicit=args.explicit, names=args.names,
                                  expand=not args.raw, values_only=args.values_only,
                                  defaults=args.defaults))
        except KeyError as e:
            print(f"{PROG}: {e.args[0]}: unknown parameter", file=sys.stderr)
            return EX_USAGE
        return EX_OK
    if args.command == "report":
        from . import logreport
        return logreport.main(cfg, args, out=out)
    if args.command == "map":
        from . import tables
        return tables.map_main(args.tables, args.query, out=out)
    if args.command == "dkim-keygen":
        return dkim_keygen(cfg, args, out)
    adm = Admin(cfg, log=log, wait=args.wait, out=out)
    code = EX_OK
    lines = []
    if args.command == "flush" and not args.ids:
        lines, code = adm.flush_all()
        if not lines:
            lines = ["nothing to flush"]
        out.write("\n".join(lines) + "\n")
        return code
    ids = list(args.ids)
    if args.command == "delete" and (args.sender or args.recipient):
        if ids:
            print(f"{PROG}: delete: give ids or --sender/--recipient, not both", file=sys.stderr)
            return EX_USAGE
        filters = []
        if args.sender:
            filters.append(("S", args.sender, False))
        if args.recipient:
            filters.append(("R", args.recipient, False))
        try:
            entries = mailq.scan(adm.spool, filters, include_lost=False)
        except PermissionError:
            print(f"{PROG}: {adm.spool.dir}: Permission denied", file=sys.stderr)
            return EX_NOPERM
        ids = [e.id for e in entries]
        if not ids:
            out.write("no message matches\n")
            return EX_OK
        if not args.force:
            for e in entries:
                out.write(f"{e.id} <{e.env.sender}> -> "
                          + ", ".join(f"<{r.address}>" for r in e.env.pending) + "\n")
            out.flush()
            if not _confirm(f"{PROG}: delete these {len(ids)} message(s)? [y/N] "):
                out.write("nothing deleted\n")
                return 1
    elif args.command == "delete" and not ids:
        print(f"{PROG}: delete: no message id given", file=sys.stderr)
        return EX_USAGE
    op = {"hold": lambda q: adm.hold(q, args.reason), "release": adm.release,
          "delete": adm.delete, "flush": adm.flush, "bounce": adm.bounce,
          "requeue": adm.requeue, "show": adm.show}[args.command]
    for i, qid in enumerate(ids):
        try:
            text = op(qid)
        except Refused as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            code = code or e.exit_code
            continue
        except PermissionError as e:
            print(f"{PROG}: {qid}: {e.strerror}: {e.filename}", file=sys.stderr)
            code = code or EX_NOPERM
            continue
        if args.command == "show" and i:
            out.write("\n")
        out.write(text + "\n")
        out.flush()
    return code


def dkim_keygen(cfg, args, out):
    """``pymta dkim-keygen``: a new key (never over an existing file) and the
    TXT record to publish, or with --show the record of the existing key."""
    from . import dkimsign
    path = args.keyfile or cfg.dkim_private_key_file
    selector = args.selector or cfg.dkim_selector
    domain = args.domain or (cfg.dkim_domains[0] if cfg.dkim_domains else "")
    if not path or not selector or not domain:
        print(f"{PROG}: dkim-keygen: give the key file, selector and domain (or set "
              "dkim_private_key_file, dkim_selector and dkim_domains)", file=sys.stderr)
        return EX_USAGE
    try:
        import dkim.crypto  # noqa: F401 - dkimpy reads the key
    except ImportError:
        print(f"{PROG}: dkim-keygen: dkimpy is not installed", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if args.show:
            with open(path, "rb") as f:
                pem = f.read(64 * 1024)
        else:
            if not 1024 <= args.bits <= 8192:
                print(f"{PROG}: dkim-keygen: --bits must be 1024 to 8192", file=sys.stderr)
                return EX_USAGE
            pem = dkimsign.keygen(path, args.bits)
        record = dkimsign.public_record(pem)
    except FileExistsError:
        print(f"{PROG}: dkim-keygen: {path} exists; remove it first, or use --show",
              file=sys.stderr)
        return EX_CANTCREAT
    except OSError as e:
        print(f"{PROG}: dkim-keygen: {path}: {e.strerror or e}", file=sys.stderr)
        return EX_CANTCREAT if not args.show else EX_NOINPUT
    except Exception as e:   # noqa: BLE001 - dkimpy's parse errors
        print(f"{PROG}: dkim-keygen: {path}: not a PEM RSA private key ({e})", file=sys.stderr)
        return EX_DATAERR
    if not args.show:
        out.write(f"wrote {path} (mode 0600: make it readable by root only)\n")
    out.write(f"Publish this TXT record:\n{dkimsign.zone_record(selector, domain, record)}\n")
    return EX_OK


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EX_USAGE if e.code else EX_OK
    return run_program(PROG, _run, args)


def _run(args):
    from . import config
    from .maillog import setup_logging
    cfg = config.load(args.config, args.overrides)
    if args.command not in ("check", "config"):
        setup_logging(cfg)
    return run(cfg, args)

if __name__ == "__main__":
    sys.exit(main())
