"""One message's delivery attempt: lock held, route, deliver, record, bounce.

The caller (a queue run's delivery process, the daemon for a message a
listener just accepted, ``sendmail -odi``, ``pymta flush``) holds the
message's lock. Deliverer reads the qf, routes each pending recipient
(route.py) and delivers: local targets through local.deliver(), remote
ones grouped by next hop, one SMTP transaction per hop (remote.py). It then
rewrites the qf atomically with each recipient's outcome, the attempt
count, the next try (exponential back-off between minimal_backoff_time and
maximal_backoff_time) and the ``M`` status that mailq shows. Failed
recipients get one RFC 3464 report (bounce.py), as do delays past
delay_warning_time and NOTIFY=SUCCESS; a message with no pending recipient
left is removed, qf first, then df. Messages made during the attempt
(reports, owner- copies) are delivered at once, under their own locks.

A Deliverer keeps what its attempts share: the router (alias maps), the
resolver and the idle SMTP connections, each made on first use, so that
``sendmail -odi`` and local-only work never import dnspython or smtplib,
and bounce.py is imported only when a report is due.

Crash safety: a message whose qf records its df's length and CRC-32 (the
event loop's commit) has its df checked before the first attempt after a
restart of the system (Spool.verify_data): a df torn by that crash is
quarantined, never delivered. A qf is rewritten before the next step
that depends on it (an owner- list's clone, once queued, before anything
else); a crash between a delivery and the rewrite that records it means
that recipient is tried again: at least once, never lost. A plain alias or .forward
expansion is not written before its children are delivered: after a crash
the parent is expanded again and the children tried again, which is what
a recorded expansion would have led to as well, so the attempt's one
rewrite (or the removal) records it.
"""

import logging
import sys
import threading
import time
from dataclasses import dataclass, field

from . import envelope as E
from .queue_dir import Spool
from .queue_file import matches
from .status import (EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, MESSAGE_BLOCK, Outcome, PymtaError,
                     Reply, SpoolCorrupt)

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


@dataclass
class Summary:
    """How one delivery attempt of one message went."""

    id: str = ""
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: str = ""       # why nothing was tried ("locked", "not due", "held"...)
    busy: str = ""          # a destination that had no free connection slot: try again soon

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


@dataclass
class _Attempt:
    """One message's attempt in progress: what its steps share."""

    env: E.Envelope
    summary: Summary
    now: float                  # when it started: every outcome is recorded at this time
    later: list = field(default_factory=list)     # locks of messages made here (reports,
                                                  # owner- copies), delivered after it
    success: dict = field(default_factory=dict)   # action -> recipients whose NOTIFY=SUCCESS
                                                  # asks for a report
    verified: bool = False      # the df was checked after a system crash: a rewrite records it


class Deliverer:
    """Makes delivery attempts, one message at a time (from several threads
    too), and keeps what they share. ``now`` is the clock (tests move it)."""

    def __init__(self, cfg, log=None, now=time.time, verbose=False):
        self.cfg = cfg
        self.log = log or logging.getLogger("pymta")
        self.now = now
        self.verbose = verbose
        self.spool = Spool.from_config(cfg)
        self._resolver = None
        self._cache = None
        self._router = None
        self._router_lock = threading.Lock()

    @property
    def cache(self):
        """Idle SMTP connections for reuse, made on first use."""
        if self._cache is None:
            from . import remote
            self._cache = remote.ConnectionCache(per_destination=max(1, self.cfg.delivery_thread_limit))
        return self._cache

    def close_connections(self):
        """Close the idle SMTP connections kept for the next message."""
        if self._cache is not None:
            self._cache.close_all()

    def close_unwanted_connections(self):
        """Close the idle connections someone else waits for, or idle too long."""
        if self._cache is not None:
            from . import sched
            self._cache.close_unwanted_idle(sched.for_config(self.cfg, self.log), sched.IDLE_TIME)

    def forget_connections(self):
        """In a forked child: the parent's idle connections are not ours."""
        self._cache = None

    @property
    def resolver(self):
        """The DNS resolver, made on first use: local-only work never needs it."""
        if self._resolver is None:
            from . import mx
            self._resolver = mx.make_resolver(self.cfg)
        return self._resolver

    @property
    def router(self):
        """The router (alias maps, tables), made on first use."""
        with self._router_lock:
            if self._router is None:
                from . import route
                self._router = route.Router(self.cfg, log=self.log)
            return self._router

    def preload(self):
        """Load what every forked delivery process needs once, in the parent:
        the router (alias maps), local delivery and the SMTP client modules."""
        self.router     # noqa: B018 - made here, shared by the children
        from . import local, remote  # noqa: F401 - the import itself is the point

    def deliver_locked(self, lock, keep_connections=False):
        """Deliver the message whose MessageLock the caller holds (and keeps:
        the caller releases it). Returns a Summary; ``.exit_code`` suits
        ``sendmail -odi``. ``keep_connections`` leaves idle SMTP connections
        in the cache for the next message (the daemon closes them)."""
        try:
            return self.deliver(lock)
        finally:
            if not keep_connections:
                self.close_connections()

    def deliver(self, lock, filters=(), honour_next_try=False):
        """One attempt at the message of ``lock`` (held by the caller), unless
        it is held, not due (with ``honour_next_try``) or not selected by the
        -q ``filters``; returns a Summary. Idle connections stay cached."""
        qid = lock.id
        summ = Summary(id=qid)
        try:
            env = self.spool.read(qid, data_fd=lock.fd)
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
        if filters and not matches(qid, env, filters):
            summ.skipped = "filtered"
            return summ
        try:
            verified = self.spool.verify_data(env)     # after a system crash, once
        except SpoolCorrupt as e:
            self.spool.quarantine(qid)
            self.log.error(f"{qid}: {e}; quarantined as Qf{qid}, not delivered")
            summ.skipped = "corrupt"
            return summ
        a = _Attempt(env, summ, now, verified=verified)
        try:
            self._attempt(a)
        finally:
            for new_lock in a.later:
                with new_lock:
                    try:
                        self.deliver(new_lock)
                    except Exception as e:
                        self.log.exception(f"{new_lock.id}: delivery attempt failed: {e}")
        return summ

    def _attempt(self, a):
        cfg, env, summ, now = self.cfg, a.env, a.summary, a.now
        lifetime = cfg.bounce_queue_lifetime if env.is_bounce else cfg.maximal_queue_lifetime
        expired = now - env.created >= lifetime
        if expired:
            for r in env.pending:
                last = r.text
                self._record(a, r, Reply(554, "4.4.7", f"Message expired after "
                                         f"{fmt_delay(now - env.created)}; last error: "
                                         f"{last or 'no attempt made'}"),
                             now, "", relay=r.relay, state=E.FAILED)
                # The log says why; the report's Diagnostic-Code is the last
                # reply really received, or none: no server said 554 4.4.7.
                r.text = last
        else:
            self._route_and_deliver(a)
            if STOP.is_set() and not (summ.sent or summ.failed):
                # Cut short by a stop: the qf stays as it was, due as before.
                summ.skipped = "stopping"
                return
            if summ.busy:
                # A destination had no free connection: what was done is
                # recorded, and the message stays due, without a back-off,
                # for its turn at that destination.
                self._notify(a)
                if summ.sent or summ.failed or summ.deferred or a.verified:
                    self.spool.rewrite(env)
                summ.skipped = "busy"
                return
        self._notify(a)
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

    def _notify(self, a):
        """Bounce F recipients (then mark them B); report successes asked
        for with NOTIFY=SUCCESS; send a delay warning once."""
        env, now = a.env, a.now
        success, a.success = a.success, {}
        for action, rcpts in success.items():
            self._report(a, rcpts, action, "success notice")
        failed = [r for r in env.recipients if r.state == E.FAILED]
        if failed:
            if not self._report(a, failed, "failed", "bounce"):
                return
            for r in failed:
                r.state = E.BOUNCED
            if env.pending:
                self.spool.rewrite(env)
        dwt = self.cfg.delay_warning_time
        if dwt and not env.warned and not env.is_bounce and now - env.created >= dwt:
            delayed = [r for r in env.pending if r.state == E.DEFERRED]
            if delayed and self._report(a, delayed, "delayed", "delay warning"):
                env.warned = True

    def _report(self, a, rcpts, action, what):
        """Queue one RFC 3464 report (bounce.py, imported only when a report
        is due), to be delivered after this message. False when it could not
        be queued."""
        from . import bounce
        try:
            lock = bounce.report(self.cfg, a.env, rcpts, action, now=a.now, log=self.log,
                                 spool=self.spool)
        except PymtaError as e:
            self.log.error(f"{a.env.id}: could not queue the {what}: {e}")
            return False
        if lock is not None:
            a.later.append(lock)
        return True

    # -- routing
    def _route_and_deliver(self, a):
        env = a.env
        done_targets = {}     # one delivery per final target of the message
        for _ in range(MAX_EXPANSION_ROUNDS):
            pending = [r for r in env.recipients if r.pending]
            if not pending:
                return
            router = self.router
            groups = {}
            locals_ = []
            expanded = cloned = False
            routes = []
            with router.aliases.scope():    # the alias files checked once for the round
                for r in pending:
                    try:
                        routes.append((r, router.route(r, env)))
                    except PymtaError as e:
                        routes.append((r, e))
            for r, rt in routes:
                if isinstance(rt, PymtaError):
                    self._record(a, r, rt.reply, a.now, "local")
                elif rt.kind == "fail":
                    self._record(a, r, rt.reply, a.now, "local")
                elif rt.kind == "local":
                    locals_.append((r, rt.target))
                elif rt.kind == "remote":
                    groups.setdefault(rt.domain, []).append((r, rt.address))
                elif rt.kind == "expand":
                    cloned = self._expand(a, r, rt) or cloned
                    expanded = True
            if cloned:
                # The clone is queued: the parent must not make another one.
                self.spool.rewrite(env)
            for r, target in locals_:
                self._deliver_local(a, r, target, done_targets)
            for domain, items in groups.items():
                self._deliver_remote(a, domain, items)
            if not expanded:
                return
        for r in env.pending:
            if r.state == E.QUEUED:
                self._record(a, r, Reply(554, "5.4.6", "alias expansion too deep"), a.now, "local")

    def _expand(self, a, parent, rt):
        """Mark ``parent`` expanded and add its children, or queue them as a
        new message (owner- lists): then returns True."""
        env, now = a.env, a.now
        children = list(rt.children)
        parent.set_state(E.EXPANDED, "2.0.0", f"expanded to {len(children)} recipient(s)",
                         now=now)
        if not children:
            return False
        if len(children) > 1 and parent.notify(E.NOTIFY_SUCCESS):
            # RFC 3461 6.2.7.3: one "expanded" report for the list, none
            # for each member (whom the sender is not to learn of).
            self._success(a, parent, "expanded")
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
                    chunk = f.read(MESSAGE_BLOCK)
                    if not chunk:
                        break
                    w.write(chunk)
                qid = w.commit(new)
                a.later.append(w.handoff())
            self.log.info(f"{env.id}: {qid}: clone: owner={rt.sender}, "
                          f"{len(children)} recipient(s) of <{parent.address}>")
        else:
            seen = {r.address.lower() for r in env.recipients if r.state != E.EXPANDED}
            for c in children:
                if c.address.lower() not in seen:
                    env.recipients.append(c)
                    seen.add(c.address.lower())
        return bool(rt.sender)

    def _deliver_local(self, a, r, target, done_targets):
        """Deliver to one local target, once per message: recipients that end
        at the same mailbox, file or command (``DAEMON`` and ``daemon@host``,
        a user named directly and through a list) share the first one's
        delivery and its outcome."""
        from . import local
        from .local_target import target_key
        env = a.env
        t0 = self.now()
        mailer = {"command": "prog", "file": "file"}.get(target.kind, "local")
        key = target_key(target)
        first = done_targets.get(key)
        if first is not None:
            first_rcpt, reply = first
            reply = Reply(reply.code, reply.enhanced,
                          f"{reply.text} (duplicate of <{first_rcpt}>, delivered once)")
            self._record(a, r, reply, t0, mailer, relay="local")
            self._success(a, r, "delivered")
            return
        try:
            reply = local.deliver(self.cfg, env, r, target, log=self.log)
        except PymtaError as e:
            reply = e.reply
        done_targets[key] = (r.address, reply)
        self._record(a, r, reply, t0, mailer, relay="local")
        self._success(a, r, "delivered")

    def _deliver_remote(self, a, domain, items):
        """One SMTP transaction for the recipients routed to ``domain``."""
        from . import remote
        env = a.env
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
        except remote.Busy as e:
            a.summary.busy = str(e)     # nothing tried: those recipients stay as they are
            return
        except PymtaError as e:
            results = remote.Results({x.address: e.reply for x in rcpts})
        for (r, _), sent_as in zip(items, rcpts):
            reply = results.get(sent_as.address,
                                Reply(451, "4.3.0", "no result from remote delivery"))
            self._record(a, r, reply, t0, "esmtp", relay=results.relay)
            if sent_as.address in results.without_dsn:
                # A server with DSN reports success itself (NOTIFY went on).
                self._success(a, r, "relayed")

    @staticmethod
    def _success(a, r, action):
        """Note a recipient whose NOTIFY=SUCCESS asks for a report (sent by _notify)."""
        if r.state in (E.SENT, E.EXPANDED) and r.notify(E.NOTIFY_SUCCESS):
            a.success.setdefault(action, []).append(r)

    def _record(self, a, r, reply, t0, mailer, relay="", state=None):
        """Set a recipient's outcome, count it and write its maillog line
        (``t0``: when this delivery started, for xdelay)."""
        env, summ = a.env, a.summary
        if state is None:
            state = {"ok": E.SENT, "tempfail": E.DEFERRED, "permfail": E.FAILED}[reply.outcome.value]
        r.set_state(state, reply.dsn, str(reply), relay=relay, now=a.now)
        if state == E.SENT:
            summ.sent += 1
        elif state == E.DEFERRED:
            summ.deferred += 1
        else:
            summ.failed += 1
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

