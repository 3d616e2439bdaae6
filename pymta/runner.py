"""The queue runner: scan, lock, route, deliver, record, retry, expire, bounce.

One pass (``sendmail -q``, the daemon's interval, cron) picks up the
maildrop, sweeps orphans, then hands every due message, one at a time, to
up to delivery_process_limit forked delivery processes (threads would
serialise on the GIL: Python work per message is what a queue run spends).
A process takes the message's lock (a locked message is someone
else's: skipped), reads the qf, routes each pending recipient and delivers:
local targets through local.deliver(), remote ones grouped by next hop, one
SMTP transaction per hop. It then rewrites the qf atomically with each
recipient's outcome, the attempt count, the next try (exponential back-off
between minimal_backoff_time and maximal_backoff_time) and the ``M`` status
that mailq shows. Failed recipients get one RFC 3464 report; a message
with no pending recipient left is removed, qf first, then df.

Whether a message is due is read from its ``Y`` line in the qf's first
bytes, so an idle pass costs one small read per queued message, not a parse.
Crash safety: a qf is rewritten before the next step that depends on it
(an owner- list's clone, once queued, before anything else); a crash
between a delivery and the rewrite that records it means that recipient is
tried again: at least once, never lost. A plain alias or .forward
expansion is not written before its children are delivered: after a crash
the parent is expanded again and the children tried again, which is what
a recorded expansion would have led to as well, so the attempt's one
rewrite (or the removal) records it.
"""

import collections
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
import importlib
from . import envelope as E
from .address import domain_of
from .spool import Spool
from .status import (EX_NOPERM, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, Outcome, PymtaError, Reply,
                     SpoolCorrupt)


class _LazyModule:
    """A module imported on first use: `sendmail -odi` and local-only queue
    runs never pay for dnspython, smtplib and email."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name, __package__), attr)


bounce, mx, remote = _LazyModule(".bounce"), _LazyModule(".mx"), _LazyModule(".remote")

MAX_EXPANSION_ROUNDS = 10

STOP = threading.Event()
"""Set when the mail system stops (the daemon's SIGTERM): no message is
started any more, and a message whose delivery was cut short keeps its qf
as it was."""


def stop():
    """Stop delivering in this process: nothing new starts, and open SMTP
    connections (those waiting on a tarpit or a blackhole too) are shut
    down, so that every delivery in progress returns within moments."""
    STOP.set()
    mod = sys.modules.get(__package__ + ".remote")
    if mod is not None:
        mod.abort_connections()


def fmt_delay(seconds):
    """sendmail's delay format: HH:MM:SS, with a D+ prefix past a day."""
    seconds = max(0, int(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}+" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def backoff(cfg, attempts):
    """Seconds to wait after the ``attempts``-th failed try: doubling from
    minimal_backoff_time, capped at maximal_backoff_time."""
    lo, hi = cfg.minimal_backoff_time, max(cfg.minimal_backoff_time, cfg.maximal_backoff_time)
    return min(hi, lo * (2 ** min(max(attempts - 1, 0), 30)))


def read_next_try(path):
    """The Y value of a qf from its first bytes (0 when absent), or None if
    the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        head = os.read(fd, 512)
    finally:
        os.close(fd)
    i = head.find(b"\nY")
    if i < 0:
        return 0
    j = head.find(b"\n", i + 1)
    try:
        return int(head[i + 2:j if j > 0 else None])
    except ValueError:
        return 0


@dataclass
class Summary:
    """How one delivery attempt of one message went."""

    id: str = ""
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: str = ""       # why nothing was tried ("locked", "not due", "held"...)
    busy: bool = False      # a destination had no free connection slot: try again soon

    @property
    def outcome(self):
        """PERMFAIL if any recipient failed (a bounce went out), else
        TEMPFAIL if any was deferred (or waits for a busy destination), else OK."""
        if self.failed:
            return Outcome.PERMFAIL
        if self.deferred or self.busy:
            return Outcome.TEMPFAIL
        return Outcome.OK

    @property
    def exit_code(self):
        """0 all sent; EX_UNAVAILABLE (69) some failed; EX_TEMPFAIL (75)
        some deferred and none failed."""
        return {Outcome.OK: EX_OK, Outcome.TEMPFAIL: EX_TEMPFAIL,
                Outcome.PERMFAIL: EX_UNAVAILABLE}[self.outcome]


def _read_available(fd):
    """What a non-blocking descriptor has now (b"" at end-of-file too)."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


@dataclass
class PassStats:
    messages: int = 0
    tried: int = 0
    removed: int = 0
    deferred: int = 0
    locked: int = 0
    not_due: int = 0
    quarantined: int = 0
    picked_up: int = 0


_COUNTS = ("tried", "removed", "deferred", "locked", "quarantined")
_END = b"."                 # to a delivery process: no more ids (never a queue id)


def matches(filters, qid, env):
    """sendmail's -qI/-qR/-qS/-qQ selection: filters of one kind are OR'ed,
    kinds are AND'ed; '!' negates; R and S ignore case."""
    by_kind = {}
    for kind, sub, negate in filters:
        by_kind.setdefault(kind, []).append((sub, negate))
    for kind, items in by_kind.items():
        if kind == "I":
            values = [qid]
        elif kind == "R":
            values = [r.address.lower() for r in env.recipients if not r.done]
        elif kind == "S":
            values = [env.sender.lower()]
        else:  # Q: the hold (quarantine) reason
            values = [env.status.lower()] if env.held else []
        ok = False
        for sub, negate in items:
            s = sub if kind == "I" else sub.lower()
            hit = any(s in v for v in values)
            if hit != negate:
                ok = True
        if not ok:
            return False
    return True


class Runner:
    """Delivers queued messages. ``now`` is the clock (tests move it)."""

    def __init__(self, cfg, log=None, now=time.time, verbose=False, processes=True):
        self.cfg = cfg
        self.processes = processes
        self.force = False      # a flush: messages not yet due are delivered too
        self.log = log or logging.getLogger("pymta")
        self.now = now
        self.verbose = verbose
        self.spool = Spool.from_config(cfg)
        self._resolver = None
        self._cache = None
        self._router = None
        self._router_lock = threading.Lock()
        self._stats_lock = threading.Lock()

    @property
    def cache(self):
        """Idle SMTP connections for reuse, made on first use."""
        if self._cache is None:
            self._cache = remote.ConnectionCache(per_destination=max(1, self.cfg.delivery_thread_limit))
        return self._cache

    def _close_connections(self):
        if self._cache is not None:
            self._cache.close_all()

    @property
    def resolver(self):
        """The DNS resolver, made on first use: local-only work never needs it."""
        if self._resolver is None:
            self._resolver = mx.make_resolver(self.cfg)
        return self._resolver

    # -- a pass over the queue
    def run_pass(self, filters=(), force=False):
        """Deliver every due message once (every message with ``force``:
        a flush); returns PassStats."""
        st = PassStats()
        st.picked_up = len(self.spool.pickup(log=self.log.info, hostname=self.cfg.myhostname,
                                                   mail_name=self.cfg.mail_name))
        self.spool.sweep(self.cfg.queue_sweep_age, now=self.now(), log=self.log.info)
        now = self.now()
        due = []
        for qid in self.spool.ids("qf"):
            st.messages += 1
            if not self._id_selected(filters, qid):
                continue
            if not force:
                y = read_next_try(self.spool.path("qf", qid))
                if y is None:
                    continue
                if y > now:
                    st.not_due += 1
                    continue
            due.append(qid)
        self.force = force
        threads = max(1, self.cfg.delivery_thread_limit)
        procs = min(max(1, self.cfg.delivery_process_limit), threads, len(due))
        try:
            if len(due) <= 1:
                self._drain(iter(due).__next__, filters, st, 1)
            elif not self.processes or procs <= 1 or \
                    not self._run_forked(due, filters, st, procs, -(-threads // procs)):
                self._drain(iter(due).__next__, filters, st, min(threads, len(due)))
        finally:
            self._close_connections()
        return st

    def _drain(self, take, filters, st, nthreads):
        """Deliver the ids ``take()`` returns (StopIteration or None: no more)
        with ``nthreads`` threads. A message whose destination has no free
        connection slot is put aside; a thread that finds no new message
        takes the put-aside ones again, round after round (with a short,
        growing wait after a round where none could go), until each one's
        destination frees a slot or is marked dead. A thread that waits
        closes this process's idle connections first, so that two processes
        never wait for each other's."""
        lock = threading.Lock()
        later = collections.deque()
        state = {"more": True, "misses": 0}

        def next_id():
            with lock:
                if state["more"]:
                    try:
                        qid = take()
                    except StopIteration:
                        qid = None
                    if qid is not None:
                        return qid, False
                    state["more"] = False
                return (later.popleft(), True) if later else (None, False)

        def work():
            pause = 0.05
            while not STOP.is_set():
                qid, again = next_id()
                if qid is None:
                    return
                if self._one(qid, filters, st) != "busy":
                    if again:
                        with lock:
                            state["misses"] = 0
                    pause = 0.05
                    continue
                with lock:
                    later.append(qid)
                    # A whole round of the put-aside messages without one
                    # going out: wait a little before the next round.
                    state["misses"] += again
                    stuck = state["misses"] >= len(later)
                    if stuck:
                        state["misses"] = 0
                if stuck:
                    self._close_connections()   # no other process waits on ours
                    STOP.wait(pause)
                    pause = min(pause * 2, 1.0)

        if nthreads <= 1:
            work()
            return
        ts = [threading.Thread(target=work, name=f"pymta-deliver-{i}", daemon=True)
              for i in range(nthreads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    # -- several delivery processes
    def _run_forked(self, due, filters, st, count, threads=1):
        """Deliver ``due`` with ``count`` forked children of ``threads``
        threads each, that take ids one at a time from a shared
        SOCK_SEQPACKET socket (so a slow message holds up one thread only)
        and report their PassStats through a pipe. Threads in one process
        would serialise on the GIL for the Python work of every message;
        threads within each process wait on the network side by side.
        Returns False, nothing done, if no child could be started; a child
        that dies leaves its message locked for nobody and queued for the
        next pass."""
        self._before_fork()
        feed, feed_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rfd, wfd = os.pipe()
        pids = []
        try:
            for _ in range(count):
                try:
                    pid = os.fork()
                except OSError as e:
                    self.log.warning(f"queue run: cannot fork a delivery process: {e.strerror}")
                    break
                if pid == 0:
                    code = 1
                    try:
                        feed.close()
                        os.close(rfd)
                        code = self._child(feed_child, wfd, filters, threads)
                    finally:
                        os._exit(code)
                pids.append(pid)
        finally:
            feed_child.close()
            os.close(wfd)
        if not pids:
            feed.close()
            os.close(rfd)
            return False
        try:
            for qid in due:
                feed.send(qid.encode("ascii"))
            # One end mark a thread, not end-of-file: a process forked meanwhile
            # by another thread holds a copy of ``feed`` and of ``wfd``, and
            # would keep both open.
            for _ in range(len(pids) * threads):
                feed.send(_END)
        except OSError as e:     # every child is gone: the rest waits for the next pass
            self.log.error(f"queue run: delivery processes gone ({e.strerror}); "
                           "the remaining messages stay queued")
        finally:
            feed.close()
        # Wait for the children, reading their lines meanwhile (many children
        # could fill the pipe); then what is left, without waiting for an
        # end-of-file (see above).
        os.set_blocking(rfd, False)
        data = bytearray()
        left = set(pids)
        try:
            while True:
                data += _read_available(rfd)
                for pid in list(left):
                    try:
                        done, status = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        done, status = pid, 0
                    if done:
                        left.discard(pid)
                        if status:
                            self.log.error(f"queue run: delivery process {pid} ended abnormally "
                                           f"(status {status:#x}); its messages stay queued")
                if not left:
                    break
                select.select([rfd], [], [], 0.05)
            data += _read_available(rfd)
        finally:
            os.close(rfd)
        for line in data.splitlines():
            try:
                counts = json.loads(line)
            except ValueError:
                continue
            for k, v in counts.items():
                if k in _COUNTS:
                    setattr(st, k, getattr(st, k) + int(v))
        return True

    def _before_fork(self):
        """Load what every child needs once, in the parent: the router (alias
        maps) and the SMTP client modules."""
        self._get_router()
        remote.deliver   # noqa: B018 - the import itself is the point

    def _child(self, sock, wfd, filters, threads=1):
        """A delivery process's loop: ids from ``sock`` until an end mark
        (one a thread)."""
        self._cache = None       # the parent's idle connections are not ours
        st = PassStats()

        def take():
            data = sock.recv(256)
            if not data or data == _END:
                return None
            return data.decode("ascii", "replace")
        try:
            self._drain(take, filters, st, threads)
        finally:
            self._close_connections()
            counts = {k: getattr(st, k) for k in _COUNTS}
            os.write(wfd, json.dumps(counts).encode() + b"\n")
            for h in self.log.handlers:
                try:
                    h.flush()
                except Exception:   # noqa: BLE001 - exiting anyway
                    pass
        return 0

    @staticmethod
    def _id_selected(filters, qid):
        ids = [(s, n) for k, s, n in filters if k == "I"]
        return not ids or any((s in qid) != n for s, n in ids)

    def _one(self, qid, filters, st):
        if STOP.is_set():
            return
        lock = self.spool.lock(qid)
        if lock is None:
            # The commit makes the df before the qf and removal unlinks the qf
            # first, so a qf without its df is damage: kept aside, not "locked".
            if not os.path.exists(self.spool.path("df", qid)) and self.spool.quarantine(qid):
                self.log.error(f"{qid}: control file without data file, quarantined as Qf{qid}")
                with self._stats_lock:
                    st.quarantined += 1
                return
            with self._stats_lock:
                st.locked += 1
            return
        with lock:
            try:
                summ = self._deliver(lock, filters=filters,
                                     honour_next_try=not getattr(self, "force", False))
            except Exception as e:  # one bad message must not stop the pass
                self.log.exception(f"{qid}: delivery attempt failed: {e}")
                return
        if summ.skipped == "busy":
            return "busy"
        with self._stats_lock:
            if summ.skipped == "corrupt":
                st.quarantined += 1
            elif not summ.skipped:
                st.tried += 1
                if summ.deferred:
                    st.deferred += 1
                else:
                    st.removed += 1

    def deliver_locked(self, lock, keep_connections=False):
        """Deliver the message whose MessageLock the caller holds (and keeps:
        the caller releases it). Returns a Summary; ``.exit_code`` suits
        ``sendmail -odi``. ``keep_connections`` leaves idle SMTP connections
        in the cache for the next message (the daemon closes them)."""
        try:
            return self._deliver(lock)
        finally:
            if not keep_connections:
                self._close_connections()

    # -- one message
    def _deliver(self, lock, filters=(), honour_next_try=False):
        qid = lock.id
        summ = Summary(id=qid)
        try:
            env = self.spool.read(qid)
        except FileNotFoundError:
            summ.skipped = "gone"
            return summ
        except SpoolCorrupt as e:
            self.spool.quarantine(qid)
            self.log.error(f"{qid}: unreadable control file, quarantined as Qf{qid}: {e}")
            summ.skipped = "corrupt"
            return summ
        now = self.now()
        if env.held:
            summ.skipped = "held"
            return summ
        if honour_next_try and env.next_try > now:
            summ.skipped = "not due"
            return summ
        if filters and not matches(filters, qid, env):
            summ.skipped = "filtered"
            return summ
        later = []      # locks of messages made here (bounces, owner- copies)
        try:
            self._attempt(env, summ, now, later)
        finally:
            for new_lock in later:
                with new_lock:
                    try:
                        self._deliver(new_lock)
                    except Exception as e:
                        self.log.exception(f"{new_lock.id}: delivery attempt failed: {e}")
        return summ

    def _attempt(self, env, summ, now, later):
        cfg = self.cfg
        env.tally = summ
        lifetime = cfg.bounce_queue_lifetime if env.is_bounce else cfg.maximal_queue_lifetime
        expired = now - env.created >= lifetime
        if expired:
            for r in env.pending:
                last = r.text
                self._record(env, r, Reply(554, "4.4.7", f"Message expired after "
                                           f"{fmt_delay(now - env.created)}; last error: "
                                           f"{last or 'no attempt made'}"),
                             now, now, "", relay=r.relay, state=E.FAILED)
                # The log says why; the report's Diagnostic-Code is the last
                # reply really received, or none: no server said 554 4.4.7.
                r.text = last
        else:
            self._route_and_deliver(env, now, later)
            if STOP.is_set() and not (summ.sent or summ.failed):
                # Cut short by a stop: the qf stays as it was, due as before.
                summ.skipped = "stopping"
                return
            if summ.busy:
                # A destination had no free connection: what was done is
                # recorded, and the message stays due, without a back-off,
                # for its turn at that destination.
                self._notify(env, now, later)
                if summ.sent or summ.failed or summ.deferred:
                    self.spool.rewrite(env)
                summ.skipped = "busy"
                return
        self._notify(env, now, later)
        # A recipient still F means its bounce could not be queued (a full
        # disk): the message stays, and the next pass tries the bounce again.
        if not env.pending and not any(r.state == E.FAILED for r in env.recipients):
            self.spool.remove(env.id)
            self.log.info(f"{env.id}: done")
            return
        env.attempts += 1
        env.last_attempt = int(now)
        env.next_try = int(now + backoff(cfg, env.attempts))
        deferred = [r for r in env.pending if r.text]
        env.status = f"Deferred: {deferred[-1].text}" if deferred else env.status
        self.spool.rewrite(env)

    def _notify(self, env, now, later):
        """Bounce F recipients (then mark them B); report successes asked
        for with NOTIFY=SUCCESS; send a delay warning once."""
        for action, rcpts in env.__dict__.pop("success", {}).items():
            try:
                lock = bounce.report(self.cfg, env, rcpts, action, now=now, log=self.log,
                                     spool=self.spool)
            except PymtaError as e:
                self.log.error(f"{env.id}: could not queue the success notice: {e}")
                continue
            if lock is not None:
                later.append(lock)
        failed = [r for r in env.recipients if r.state == E.FAILED]
        if failed:
            try:
                lock = bounce.report(self.cfg, env, failed, "failed", now=now, log=self.log,
                                     spool=self.spool)
            except PymtaError as e:
                self.log.error(f"{env.id}: could not queue the bounce: {e}")
                return
            if lock is not None:
                later.append(lock)
            for r in failed:
                r.state = E.BOUNCED
            if env.pending:
                self.spool.rewrite(env)
        dwt = self.cfg.delay_warning_time
        if dwt and not env.warned and not env.is_bounce and now - env.created >= dwt:
            delayed = [r for r in env.pending if r.state == E.DEFERRED]
            if delayed:
                try:
                    lock = bounce.report(self.cfg, env, delayed, "delayed", now=now,
                                         log=self.log, spool=self.spool)
                except PymtaError as e:
                    self.log.error(f"{env.id}: could not queue the delay warning: {e}")
                    return
                env.warned = True
                if lock is not None:
                    later.append(lock)

    # -- routing
    def _get_router(self):
        with self._router_lock:
            if self._router is None:
                try:
                    from . import route
                except ImportError:
                    return None
                self._router = route.Router(self.cfg, log=self.log)
            return self._router

    def _route_and_deliver(self, env, now, later):
        done_targets = {}     # one delivery per final target of the message
        for _ in range(MAX_EXPANSION_ROUNDS):
            pending = [r for r in env.recipients if r.pending]
            if not pending:
                return
            router = self._get_router()
            groups = {}
            locals_ = []
            expanded = cloned = False
            for r in pending:
                if router is None:
                    if self.cfg.is_local_domain(domain_of(r.address)) or not domain_of(r.address):
                        self.log.error(f"{env.id}: <{r.address}>: local delivery unavailable "
                                       "(pymta.route is not installed)")
                        self._record(env, r, Reply(451, "4.3.5", "local delivery unavailable"),
                                     now, now, "local")
                        continue
                    groups.setdefault(remote.next_hop(self.cfg, r.address), []).append((r, r.address))
                    continue
                try:
                    rt = router.route(r, env)
                except PymtaError as e:
                    self._record(env, r, e.reply, now, now, "local")
                    continue
                if rt.kind == "fail":
                    self._record(env, r, rt.reply, now, now, "local")
                elif rt.kind == "local":
                    locals_.append((r, rt.target))
                elif rt.kind == "remote":
                    groups.setdefault(rt.domain, []).append((r, getattr(rt, "address", r.address)))
                elif rt.kind == "expand":
                    cloned = self._expand(env, r, rt, now, later) or cloned
                    expanded = True
            if cloned:
                # The clone is queued: the parent must not make another one.
                self.spool.rewrite(env)
            for r, target in locals_:
                self._deliver_local(env, r, target, now, done_targets)
            for domain, items in groups.items():
                self._deliver_remote(env, domain, items, now)
            if not expanded:
                return
        for r in env.pending:
            if r.state == E.QUEUED:
                self._record(env, r, Reply(554, "5.4.6", "alias expansion too deep"), now, now, "local")

    def _expand(self, env, parent, rt, now, later):
        """Mark ``parent`` expanded and add its children, or queue them as a
        new message (owner- lists): then returns True."""
        children = list(rt.children)
        parent.set_state(E.EXPANDED, "2.0.0", f"expanded to {len(children)} recipient(s)",
                         now=now)
        if not children:
            return False
        if len(children) > 1 and parent.notify(E.NOTIFY_SUCCESS):
            # RFC 3461 6.2.7.3: one "expanded" report for the list, none
            # for each member (whom the sender is not to learn of).
            self._success(env, parent, "expanded")
            for c in children:
                c.flags = c.flags.replace(E.NOTIFY_SUCCESS, "")
                if not any(f in c.flags for f in "SFDN"):
                    c.flags = E.NOTIFY_NEVER + c.flags
        if rt.sender:
            # owner-LIST: the list's copy becomes its own message, so that
            # its bounces go to the owner.
            new = E.Envelope(sender=rt.sender, created=env.created, body_type=env.body_type,
                             smtputf8=env.smtputf8, envid=env.envid, ret=env.ret,
                             protocol=env.protocol, helo=env.helo, client_addr=env.client_addr,
                             client_name=env.client_name, auth_user=env.auth_user, uid=env.uid,
                             trusted=env.trusted)
            new.recipients = children
            with self.spool.new_message() as w, self.spool.open_data(env.id) as f:
                while True:
                    chunk = f.read(256 * 1024)
                    if not chunk:
                        break
                    w.write(chunk)
                qid = w.commit(new)
                later.append(w.handoff())
            self.log.info(f"{env.id}: {qid}: clone: owner={rt.sender}, "
                          f"{len(children)} recipient(s) of <{parent.address}>")
        else:
            seen = {r.address.lower() for r in env.recipients if r.state != E.EXPANDED}
            for c in children:
                if c.address.lower() not in seen:
                    env.recipients.append(c)
                    seen.add(c.address.lower())
        return bool(rt.sender)

    def _deliver_local(self, env, r, target, now, done_targets):
        """Deliver to one local target, once per message: recipients that end
        at the same mailbox, file or command (``DAEMON`` and ``daemon@host``,
        a user named directly and through a list) share the first one's
        delivery and its outcome."""
        from . import local
        t0 = self.now()
        kind = getattr(target, "kind", "")
        mailer = {"command": "prog", "file": "file"}.get(kind, "local")
        key = local.target_key(target)
        first = done_targets.get(key)
        if first is not None:
            first_rcpt, reply = first
            reply = Reply(reply.code, reply.enhanced,
                          f"{reply.text} (duplicate of <{first_rcpt}>, delivered once)")
            self._record(env, r, reply, now, t0, mailer, relay="local")
            self._success(env, r, "delivered")
            return
        try:
            reply = local.deliver(self.cfg, env, r, target, log=self.log)
        except PymtaError as e:
            reply = e.reply
        done_targets[key] = (r.address, reply)
        self._record(env, r, reply, now, t0, mailer, relay="local")
        self._success(env, r, "delivered")

    def _deliver_remote(self, env, domain, items, now):
        t0 = self.now()
        rcpts = []
        for r, addr in items:
            if addr and addr != r.address:
                copy = E.Recipient(addr, flags=r.flags, orcpt=r.orcpt or f"rfc822;{r.address}")
                rcpts.append(copy)
            else:
                rcpts.append(r)
        # An address literal (a bracketed relayhost) needs no resolver, nor dnspython.
        literal = remote.destination(self.cfg, domain)[0].startswith("[")
        try:
            results = remote.deliver(self.cfg, env, rcpts, domain, log=self.log,
                                     resolver=None if literal else self.resolver, cache=self.cache,
                                     verbose=self.verbose)
        except remote.Busy:
            env.tally.busy = True       # nothing tried: those recipients stay as they are
            return
        except PymtaError as e:
            results = remote.Results({x.address: e.reply for x in rcpts})
        for (r, _), sent_as in zip(items, rcpts):
            reply = results.get(sent_as.address,
                                Reply(451, "4.3.0", "no result from remote delivery"))
            self._record(env, r, reply, now, t0, "esmtp", relay=results.relay)
            if sent_as.address in getattr(results, "without_dsn", ()):
                # A server with DSN reports success itself (NOTIFY went on).
                self._success(env, r, "relayed")

    @staticmethod
    def _success(env, r, action):
        """Note a recipient whose NOTIFY=SUCCESS asks for a report (sent by _notify)."""
        if r.state in (E.SENT, E.EXPANDED) and r.notify(E.NOTIFY_SUCCESS):
            env.__dict__.setdefault("success", {}).setdefault(action, []).append(r)

    def _record(self, env, r, reply, now, t0, mailer, relay="", state=None):
        """Set a recipient's outcome and write its maillog line."""
        if state is None:
            state = {"ok": E.SENT, "tempfail": E.DEFERRED, "permfail": E.FAILED}[reply.outcome.value]
        r.set_state(state, reply.dsn, str(reply), relay=relay, now=now)
        tally = getattr(env, "tally", None)
        if tally is not None:
            if state == E.SENT:
                tally.sent += 1
            elif state == E.DEFERRED:
                tally.deferred += 1
            else:
                tally.failed += 1
        end = self.now()
        if state == E.SENT:
            stat = f"Sent ({reply.text if reply.code == 250 else reply})"
        elif state == E.DEFERRED:
            stat = f"Deferred: {reply}"
        else:
            stat = str(reply)
        parts = [f"to=<{r.address}>"]
        if r.parent:
            parts.append(f"ctladdr=<{r.parent}>")
        parts += [f"delay={fmt_delay(end - env.created)}", f"xdelay={fmt_delay(end - t0)}"]
        if mailer:
            parts.append(f"mailer={mailer}")
        parts.append(f"pri={env.priority}")
        if relay:
            parts.append(f"relay={relay}")
        parts += [f"dsn={reply.dsn}", f"stat={stat}"]
        self.log.info(f"{env.id}: " + ", ".join(parts))


def _hold_or_release(cfg, opts, log):
    """-Q[reason] with -q filters: hold the selected messages with the
    reason (M text), or release them when the reason is empty."""
    spool = Spool.from_config(cfg)
    reason = opts.queue_hold
    prefix = "qf" if reason else "hf"
    count = 0
    for qid in spool.ids(prefix):
        lock = spool.lock(qid, wait=False)
        if lock is None:
            print(f"{qid}: locked, skipped", file=sys.stderr)
            continue
        with lock:
            try:
                env = spool.read(qid)
            except (FileNotFoundError, SpoolCorrupt):
                continue
            if not matches(opts.queue_filters, qid, env):
                continue
            if reason:
                spool.hold(env)
                env.status = reason
                spool.rewrite(env)
                log.info(f"{qid}: quarantine: {reason}")
            else:
                spool.release(env)
                env.status = ""
                env.next_try = 0
                spool.rewrite(env)
                log.info(f"{qid}: released")
            count += 1
    what = "held" if reason else "released"
    print(f"{count} message(s) {what}")
    return EX_OK


def main(cfg, opts):
    """``sendmail -q[...]``: one pass (or one per interval, in the
    foreground, when an interval is given without -bd)."""
    log = logging.getLogger("pymta")
    if opts.verbose:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    spool = Spool.from_config(cfg)
    for path in (spool.dir, spool.maildrop):
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            print(f"sendmail: cannot run the queue: {path}: Permission denied (only root "
                  f"and {cfg.mail_owner} may)", file=sys.stderr)
            return EX_NOPERM
    if opts.queue_hold is not None:
        return _hold_or_release(cfg, opts, log)
    runner = Runner(cfg, log=log, verbose=opts.verbose)
    interval = opts.queue_interval or 0
    while True:
        st = runner.run_pass(opts.queue_filters)
        if opts.verbose:
            print(f"queue run: {st.messages} queued, {st.tried} tried, {st.removed} done, "
                  f"{st.deferred} deferred, {st.locked} locked, {st.not_due} not due")
        if not interval:
            return EX_OK
        time.sleep(interval)
