"""A queue run: list the due messages and deliver them, in parallel.

One pass (``sendmail -q``, the daemon's interval, cron, ``pymta flush``)
picks up the maildrop, sweeps orphans, then hands every due message, one at
a time, to up to delivery_process_limit forked delivery processes (threads
would serialise on the GIL: Python work per message is what a queue run
spends), each with a few threads that wait on the network side by side. A
process takes the message's lock (a locked message is someone else's:
skipped) and makes one attempt (queue_attempt.Deliverer). A message whose
destination has no free connection slot (pymta.sched) goes back to the
parent, which hands it out again when the destination has room, to
whichever process is free: no process sits on messages while another's
threads are idle. The processes report their counts (PassStats) through a
pipe.

Whether a message is due is read from its ``Y`` line in the qf's first
bytes, so an idle pass costs one small read per queued message, not a parse.
A delivery process that dies leaves its message locked for nobody and
queued for the next pass; what an attempt records, and when, is in
queue_attempt's docstring.
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

from . import forkserver, queue_maildrop, workers
from .queue_attempt import STOP, Deliverer
from .queue_dir import Spool
from .queue_file import matches
from .status import EX_NOPERM, EX_OK, READ_SIZE, SpoolCorrupt


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



def _read_available(fd):
    """What a non-blocking descriptor has now (b"" at end-of-file too)."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


@dataclass
class PassStats:
    """What one pass did (sendmail -v -q prints it; pymta flush sums it up)."""

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


class Runner:
    """Runs passes over the queue. ``now`` is the clock (tests move it);
    ``processes`` False keeps the deliveries in threads of this process
    (the daemon's master, which has other threads, never forks for them)."""

    def __init__(self, cfg, log=None, now=time.time, verbose=False, processes=True):
        self.cfg = cfg
        self.processes = processes
        self.force = False      # a flush: messages not yet due are delivered too
        self.log = log or logging.getLogger("pymta")
        self.now = now
        self.spool = Spool.from_config(cfg)
        self.deliverer = Deliverer(cfg, log=self.log, now=now, verbose=verbose)
        self._stats_lock = threading.Lock()

    # -- a pass over the queue
    def run_pass(self, filters=(), force=False):
        """Deliver every due message once (every message with ``force``:
        a flush); returns PassStats."""
        st = PassStats()
        st.picked_up = len(queue_maildrop.pickup(self.spool, self.cfg, log=self.log.info))
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
            self.deliverer.close_connections()
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
                summ = self._one(qid, filters, st)
                if summ is None or summ.skipped != "busy":
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
                    self.deliverer.close_connections()   # no other process waits on ours
                    STOP.wait(pause)
                    pause = min(pause * 2, 1.0)

        if nthreads <= 1:
            work()
            return
        # Deliveries as other users fork (workers, |command children): with
        # threads, a fork server does it (the daemon's master has its own).
        with forkserver.scope() as scope:
            _in_threads(work, nthreads)
            if scope.started:
                workers.POOL.close_all()    # its workers end with it

    # -- several delivery processes
    def _run_forked(self, due, filters, st, count, threads=1):
        """Deliver ``due`` with ``count`` forked children of ``threads``
        threads each, that take ids one at a time from a shared
        SOCK_SEQPACKET socket (so a slow message holds up one thread only)
        and report their PassStats through a pipe. Threads in one process
        would serialise on the GIL for the Python work of every message;
        threads within each process wait on the network side by side.

        The socket carries notes back: each id handed out comes back once,
        done or busy (its destination had no free connection slot, with the
        destination's name). A busy one waits here, in the parent, and goes
        out again, to whichever thread takes it, when its destination has a
        free slot (pymta.sched: the limit, less the slots held, less the
        ones already sent back out) or is marked dead: no process keeps
        messages that another's idle threads could deliver, and nothing is
        tried while its destination is full. The end marks go when nothing
        is out and nothing waits.

        Returns False, nothing done, if no child could be started; a child
        that dies leaves its message locked for nobody and queued for the
        next pass."""
        self.deliverer.preload()
        feed, feed_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rfd, wfd = os.pipe()
        pids = []
        try:
            def body():
                feed.close()
                os.close(rfd)
                return self._child(feed_child, wfd, filters, threads)

            for _ in range(count):
                try:
                    pids.append(forkserver.fork_child(body))
                except OSError as e:
                    self.log.warning(f"queue run: cannot fork a delivery process: {e.strerror}")
                    break
        finally:
            feed_child.close()
            os.close(wfd)
        if not pids:
            feed.close()
            os.close(rfd)
            return False
        os.set_blocking(rfd, False)
        data = bytearray()
        try:
            self._feed(feed, due, len(pids) * threads, pids, rfd, data)
        finally:
            feed.close()
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

    def _feed(self, feed, due, ends, pids, rfd, data):
        """The parent's side of _run_forked: hand out ``due``, keep the busy
        ones until their destination has room, then ``ends`` end marks; read
        the children's count lines into ``data`` until every child is gone
        (not until end-of-file: a process forked meanwhile by another thread
        holds copies of both descriptors)."""
        from . import sched
        sch = sched.for_config(self.cfg, self.log)
        feed.setblocking(False)
        todo = collections.deque(due)       # to send: new ids, and busy ones given room
        waiting = {}                        # destination -> deque of busy ids
        resent = collections.Counter()      # destination -> its ids sent back out
        resent_of = {}                      # id sent back out -> its destination
        hold, pause = {}, {}                # destination -> no resending before; its wait
        out = 0                             # ids sent and not yet reported
        left = set(pids)
        lost = False                        # a child died: its ids never come back
        last_wait = 0.0
        while left:
            # Notes from the children: b"d<id>" done, b"b<id> <destination>" busy.
            while True:
                try:
                    note = feed.recv(512)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    note = b""
                if not note:
                    break
                out -= 1
                qid, _, hop = note[1:].decode("ascii", "replace").partition(" ")
                was = resent_of.pop(qid, None)
                if was is not None:
                    resent[was] -= 1
                    if note[:1] == b"b":
                        # Sent back out and busy again: the slots are held
                        # elsewhere (another queue run, idle connections).
                        pause[was] = min(pause.get(was, 0.025) * 2, 0.25)
                        hold[was] = time.monotonic() + pause[was]
                    else:
                        pause.pop(was, None)
                if note[:1] == b"b" and not STOP.is_set():
                    waiting.setdefault(hop, collections.deque()).append(qid)
            # Busy ids go out again while their destination has room: up to
            # its limit in flight (less the ones out already), all of them
            # once it is marked dead.
            now = time.monotonic()
            for hop in list(waiting):
                ids = waiting[hop]
                if hold.get(hop, 0) > now:
                    continue
                if sch.dead(hop) is not None:
                    room = len(ids)
                else:
                    limit = sch.limit_for(hop)
                    room = len(ids) if limit <= 0 else limit - resent[hop]
                for _ in range(min(room, len(ids))):
                    qid = ids.popleft()
                    resent[hop] += 1
                    resent_of[qid] = hop
                    todo.append(qid)
                if not ids:
                    del waiting[hop]
            if STOP.is_set():
                todo.clear()
                waiting.clear()
            while todo:
                try:
                    feed.send(todo[0].encode("ascii"))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:     # every child is gone: the rest waits for the next pass
                    self.log.error(f"queue run: delivery processes gone ({e.strerror}); "
                                   "the remaining messages stay queued")
                    todo.clear()
                    waiting.clear()
                    ends = 0
                    break
                todo.popleft()
                out += 1
            if not todo and not waiting and (out <= 0 or lost):
                while ends > 0:
                    try:
                        feed.send(_END)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        ends = 0
                        break
                    ends -= 1
            data += _read_available(rfd)
            if now - last_wait >= 0.05:
                last_wait = now
                for pid in list(left):
                    try:
                        done, status = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        done, status = pid, 0
                    if done:
                        left.discard(pid)
                        if status:
                            lost = True
                            self.log.error(f"queue run: delivery process {pid} ended abnormally "
                                           f"(status {status:#x}); its messages stay queued")
            if left:
                select.select([feed, rfd], [feed] if todo or (ends and not waiting and
                                                              (out <= 0 or lost)) else [], [],
                              0.02 if waiting else 0.05)
        data += _read_available(rfd)

    def _child(self, sock, wfd, filters, threads=1):
        """A delivery process's loop: ids from ``sock`` until an end mark
        (one a thread), a note back for each. A thread that has waited a
        moment for an id closes the process's idle connections that another
        delivery waits for (pymta.sched's wants) or that have been idle for
        sched.IDLE_TIME, so that their slots serve the other processes; the
        others are kept for the next message to their destination."""
        self.deliverer.forget_connections()
        st = PassStats()
        sock.settimeout(0.05)

        def work():
            while not STOP.is_set():
                try:
                    data = sock.recv(256)
                except TimeoutError:
                    # Idle connections hold their destination's slots:
                    # they go when a delivery elsewhere waits for one.
                    self.deliverer.close_unwanted_connections()
                    continue
                except OSError:
                    return
                if not data or data == _END:
                    return
                qid = data.decode("ascii", "replace")
                summ = self._one(qid, filters, st)
                busy = summ is not None and summ.skipped == "busy"
                note = (f"b{qid} {summ.busy}" if busy else f"d{qid}").encode("ascii", "replace")
                while True:     # the parent counts on every note
                    try:
                        sock.send(note)
                        break
                    except TimeoutError:
                        continue
                    except OSError:
                        return
        try:
            if threads <= 1:
                work()
            else:
                _in_threads(work, threads)
        finally:
            self.deliverer.close_connections()
            counts = {k: getattr(st, k) for k in _COUNTS}
            os.write(wfd, json.dumps(counts).encode() + b"\n")
            for h in self.log.handlers:
                try:
                    h.flush()
                except Exception:   # noqa: BLE001 - exiting anyway
                    pass
        return EX_OK

    @staticmethod
    def _id_selected(filters, qid):
        """The I filters, before the qf is read."""
        return matches(qid, None, [f for f in filters if f[0] == "I"])

    def _one(self, qid, filters, st):
        """One attempt at ``qid`` if its lock is free; its Summary, or None
        when nothing was attempted."""
        if STOP.is_set():
            return None
        lock = self.spool.lock(qid)
        if lock is None:
            # The commit makes the df before the qf and removal unlinks the qf
            # first, so a qf without its df is damage: kept aside, not "locked".
            if not os.path.exists(self.spool.path("df", qid)) and self.spool.quarantine(qid):
                self.log.error(f"{qid}: control file without data file, quarantined as Qf{qid}")
                with self._stats_lock:
                    st.quarantined += 1
                return None
            with self._stats_lock:
                st.locked += 1
            return None
        with lock:
            try:
                summ = self.deliverer.deliver(lock, filters=filters,
                                              honour_next_try=not self.force)
            except Exception as e:  # one bad message must not stop the pass
                self.log.exception(f"{qid}: delivery attempt failed: {e}")
                return None
        if summ.skipped == "busy":
            return summ
        with self._stats_lock:
            if summ.skipped == "corrupt":
                st.quarantined += 1
            elif not summ.skipped:
                st.tried += 1
                if summ.deferred:
                    st.deferred += 1
                else:
                    st.removed += 1
        return summ


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
            if not matches(qid, env, opts.queue_filters):
                continue
            if reason:
                spool.hold(env, reason)
                log.info(f"{qid}: quarantine: {reason}")
            else:
                spool.release(env)
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


def _in_threads(work, n):
    """Run ``work`` in ``n`` delivery threads and wait for them all."""
    ts = [threading.Thread(target=work, name=f"pymta-deliver-{i}", daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
