"""``sendmail -bd`` and ``-bD``: the SMTP daemon and its queue runs.

The master binds every ``smtpd_listen``, ``submissions_listen`` and
``submission_listen`` address, then starts the listeners, which drop to
``mail_owner`` (when started as root) and speak SMTP; one that dies is
restarted. The master stays root because local delivery must become each
recipient: it makes the queue runs (every ``-q`` interval, else
``queue_run_delay``), picks up the maildrop every second, and delivers at
once each message a listener accepted, whose queue id the listener
writes, one line each, into a pipe to the master.

The master has threads (hand-offs, queue runs, showq, the log pump) and
never forks: before its first thread it starts a fork server
(pymta.forkserver), and every later child (listeners and their restarts,
delivery workers, |command children, .forward readers) is forked by that
single-threaded process on request. A listener's exit status comes back
from it; if the fork server dies, the daemon stops (EX_SOFTWARE): its
listeners stop too (their parent is gone) and none could be restarted.
See HACKING for every process and who forks it.

SIGHUP: both re-read the configuration (and, through a new router, the
aliases); the master reads the TLS certificate and key, which the listener
may not be able to read, and hands them to it through a pipe first.
SIGTERM: the master closes its copies of the listening sockets at once (new
connections are refused) and passes the signal on; the listener stops
accepting, answers 421 to idle sessions, lets a DATA in progress finish its
commit and exits (within LISTENER_GRACE seconds, else it is killed: nothing
it had not acknowledged is lost). No new delivery starts; those in progress
get DELIVERY_GRACE seconds, then their connections are shut down (a tarpit
or a blackhole holds nothing up) and their messages stay queued as they
were; the master removes the pidfile and exits 0.
"""

import errno
import logging
import os
import pwd
import select
import signal
import sys
import threading
import time

from . import config as C
from . import forkserver, maillog, queue_attempt, queue_maildrop, queue_run, smtpd_common, workers
from .queue_dir import Spool
from .queue_id import valid_id
from .status import ConfigError, EX_CANTCREAT, EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, READ_SIZE

log = logging.getLogger("pymta")

HANDOFF_BACKLOG = 2000  # hand-offs waiting for a delivery thread before the pipes are left unread
LISTENER_GRACE = 10.0   # a DATA in progress at SIGTERM may finish within this
DELIVERY_GRACE = 2.0    # deliveries in progress at SIGTERM may finish within this


def _owner(cfg):
    """(name, uid, gid) to switch the listener to, or None for no switch."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(cfg.mail_owner)
    except KeyError:
        raise ConfigError(f"mail_owner {cfg.mail_owner!r}: no such user", cfg.path,
                          param="mail_owner") from None
    if pw.pw_uid == 0:
        return None
    return pw.pw_name, pw.pw_uid, pw.pw_gid


# Modules the listener may import late (reloads, lookups, TLS), loaded while
# the master can still read every file of the Python installation.
_PRELOAD = ("json", "email.utils", "ssl", "encodings.idna", "getpass", "hashlib", "base64",
            "ipaddress", "tempfile", "concurrent.futures", "logging.handlers")


def _preload():
    import importlib
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in ("route", "aliases", "auth", "smtpd_session", "smtpd_common", "smtpd_pump",
                 "smtpd_loop", "smtpd_threads"):
        importlib.import_module(f"pymta.{name}")


def _drop_privileges(owner):
    # The mail log may be a root-owned file: open it while we still can
    # (unless its lines go through the master, which reopens it on SIGHUP).
    for h in log.handlers:
        if isinstance(h, logging.FileHandler) and h.stream is None and \
                not getattr(h, "forwarded", False):
            h.acquire()
            try:
                h.stream = h._open()
            finally:
                h.release()
    name, uid, gid = owner
    os.setgroups([])
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)


def listener_count(cfg):
    """smtpd_listeners, or by default one per CPU but one (kept for the
    master's deliveries), at least two (one on a one-CPU machine), at most
    four. Two on two CPUs: big messages make one listener CPU-bound, and
    with small ones a second costs nothing measurable (bench/RESULTS.md)."""
    n = cfg.smtpd_listeners
    cpus = os.cpu_count() or 1
    return n if n > 0 else max(min(2, cpus), min(4, cpus - 1))


def _bind_all(cfg, copies=1):
    """For each listener process, its list of (socket, submission, spec):
    with several, each address has a SO_REUSEPORT socket per process.
    ``submission`` is False, True (port 587) or "tls" (465, implicit TLS)."""
    sets = [[] for _ in range(copies)]
    for specs, port, submission in ((cfg.smtpd_listen, 25, False), (cfg.submission_listen, 587, True),
                                    (cfg.submissions_listen, 465, "tls")):
        for spec in specs:
            try:
                socks = _bind_retry(spec, port, copies)
            except ValueError as e:
                raise ConfigError(str(e), cfg.path, param="smtpd_listen") from None
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {spec}: {e.strerror}") from None
            for i, sock in enumerate(socks):
                sets[i].append((sock, submission, spec))
    return sets


def _bind_retry(spec, port, copies, wait=5.0):
    """bind_copies, trying again for a few seconds while the address is in
    use: after a kill -9 of the master its listeners keep the sockets until
    they notice (within half a second) and stop. No other daemon holds the
    pid file by now, so the address is about to be free."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return smtpd_common.bind_copies(spec, port, copies)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _reload_config(cfg, opts):
    """The configuration read again (SIGHUP), or None, logged, if it is bad:
    the daemon then keeps the one it has."""
    try:
        return C.load(cfg.path, opts.overrides)
    except ConfigError as e:
        log.error(f"reload failed, keeping the old configuration: {e}")
        return None


class Listener:
    """The listener process: SMTP on the inherited sockets, as mail_owner."""

    def __init__(self, cfg, opts, socks, notify_fd, share=1, control_fd=None):
        self.cfg, self.opts, self.socks, self.notify_fd = cfg, opts, socks, notify_fd
        self.share = share
        self.reload = False
        self.services = None
        self.control_fd = control_fd     # the master's TLS certificate and key at reloads
        self._control = b""

    def _handed_pem(self):
        """The last certificate-and-key PEM the master wrote before its
        SIGHUP (a length, then the bytes), or None."""
        if self.control_fd is None:
            return None
        pem = None
        deadline = time.monotonic() + 2
        while True:
            try:
                more = os.read(self.control_fd, READ_SIZE)
            except BlockingIOError:
                more = None
            except OSError:
                return pem
            if more == b"":
                return pem
            self._control += more or b""
            while len(self._control) >= 4:
                n = int.from_bytes(self._control[:4], "big")
                if len(self._control) < 4 + n:
                    break
                pem, self._control = self._control[4:4 + n], self._control[4 + n:]
            if not self._control or time.monotonic() > deadline:
                return pem
            select.select([self.control_fd], [], [], 0.1)   # the rest of a frame

    def notify(self, qid):
        """Hand ``qid`` to the master; False when its hand-off pipe is full
        (deliveries fall behind: the session then waits in_flow_delay)."""
        try:
            os.write(self.notify_fd, qid.encode("ascii", "replace") + b"\n")
        except BlockingIOError:
            return False    # the next queue run delivers it (the master runs one soon)
        except OSError:
            pass   # the master is gone: the next queue run delivers it
        return True

    def run(self):
        stopping = smtpd_common.STOPPING
        stopping.clear()
        threading.stack_size(1 << 20)   # many idle sessions must not cost 8 MB each
        signal.signal(signal.SIGTERM, lambda *a: stopping.set())
        signal.signal(signal.SIGINT, lambda *a: stopping.set())
        signal.signal(signal.SIGHUP, lambda *a: setattr(self, "reload", True))
        services = self.services or smtpd_common.Services(self.cfg, log, notify=self.notify)
        model = smtpd_common.driver(self.cfg)
        servers = [model.Server(sock, services, sub) for sock, sub, _ in self.socks]
        for s in servers:
            s.share = self.share
        for _, submission, spec in self.socks:
            log.info(f"daemon listening on {spec}" + (" (submissions, implicit TLS)" if submission == "tls"
                                                      else " (submission)" if submission else ""))
            if submission == "tls" and services.ssl_ctx is None:
                log.error(f"error: {spec}: submissions_listen needs smtpd_tls_cert_file and "
                          "smtpd_tls_key_file; its connections are closed")
        try:
            os.write(self.notify_fd, f"+ready {os.getpid()}\n".encode())
        except OSError:
            pass

        master = os.getppid()
        next_check = [0.0]

        def tick():
            # Called at every turn of the event loop: the reload flag is
            # looked at each time, the master twice a second.
            now = time.monotonic()
            if now >= next_check[0] and not stopping.is_set():
                next_check[0] = now + 0.5
                if os.getppid() != master:
                    # The master is gone (kill -9, the OOM killer): stop taking
                    # mail so that a restarted daemon can bind the port again.
                    log.error("listener: master process gone, stopping")
                    stopping.set()
            if not self.reload:
                return
            self.reload = False
            cfg = _reload_config(self.cfg, self.opts)
            if cfg is None:
                return
            self.cfg = cfg
            pem = self._handed_pem()
            new = smtpd_common.Services(cfg, log, notify=self.notify, pem=pem,
                                  previous=servers[0].services if servers else None)
            if pem is not None and new.ssl_ctx is not None and \
                    new.ssl_ctx is not getattr(servers[0].services, "ssl_ctx", None):
                log.info("listener: TLS certificate and key loaded again (read by the master)")
            for s in servers:
                s.services = new
            log.info("listener: configuration reloaded")

        model.serve(servers, tick=tick)
        return 0


def _listener_main(fds, cfg, opts, specs, share, owner, forwarded_log):
    """A listener's life, in a child of the fork server: ``fds`` are the
    hand-off pipe, the TLS key pipe, the log pipe (with ``forwarded_log``)
    and the listening sockets, whose (submission, spec) are ``specs``."""
    notify_fd, control_fd, *rest = fds
    code = EX_SOFTWARE
    try:
        os.set_blocking(control_fd, False)
        if forwarded_log:
            # The log file is root's and is reopened on SIGHUP (after a
            # rotation) by the master: this listener's lines go to it.
            handler = next(h for h in log.handlers if isinstance(h, logging.FileHandler))
            handler.stream = os.fdopen(rest.pop(0), "a", encoding="utf-8", errors="replace")
            handler.forwarded = True
        else:
            # The fork server's copy of the log file may be one the master
            # has reopened since (a rotation): open it by its name again.
            from . import maillog
            maillog.reopen()
        import socket
        socks = [(socket.socket(fileno=fd), sub, spec) for fd, (sub, spec) in zip(rest, specs)]
        from .proctitle import set_name
        set_name("pymta: smtpd")
        listener = Listener(cfg, opts, socks, notify_fd, share=share, control_fd=control_fd)
        # Built before the switch: the router, the TLS context and the
        # modules they import may live where mail_owner cannot read.
        listener.services = smtpd_common.Services(cfg, log, notify=listener.notify)
        if owner:
            _drop_privileges(owner)
        code = listener.run()
    except BaseException as e:   # noqa: BLE001 - tell the master why, then exit
        log.exception("listener failed")
        try:
            text = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            os.write(notify_fd, f"! {os.getpid()} {text}\n".encode("utf-8", "replace"))
        except OSError:
            pass
    finally:
        logging.shutdown()
    return code


class Master:
    """The privileged parent: listener supervision, handoffs, queue runs."""

    def __init__(self, cfg, opts, sock_sets):
        self.cfg, self.opts, self.sock_sets = cfg, opts, sock_sets
        self.stop = False
        self.reload = False
        self.children = {}          # listener pid -> its slot
        self.procs = {}             # listener pid -> its forkserver.ServedChild
        self.forks = None           # the fork server: every child of the master comes from it
        self.pid_file = None        # the PidFile, closed in the fork server
        self.control = {}           # listener pid -> the pipe that hands it TLS keys
        self.owner = _owner(cfg)
        self.deliverer = None     # for the messages the listeners hand over
        self.notify_fds = ()
        self.pool = None
        self.run_thread = None
        self.ready_fd = None        # -bd: where to tell the waiting command "ok" or why not
        self.ready = set()          # listener pids that reported ready
        self.errors = {}            # listener pid -> the error it reported before dying
        self.failures = 0           # listeners in a row that died before serving
        self.deaths = []            # times of listener deaths (for the too-often rule)
        self.exit_code = 0
        self.log_pipe = None        # (read fd, write fd, file handler): the listeners' log lines
        self.showq = None           # the showq socket (mailq for every user)
        self.stop_time = None
        self.wake_r = self.wake_w = -1  # the signal wake-up pipe of the main loop
        self.busy_ids = []          # handoffs that found their destination's slots taken
        self.locked_ids = []        # (id, tries): handoffs that found the message locked
        self.busy_lock = threading.Lock()
        self.abandoned = False

    def _spawn(self, slot):
        """Start the listener of ``slot`` through the fork server."""
        cr, cw = os.pipe()
        socks = self.sock_sets[slot]
        fds = [self.wfd, cr] + ([self.log_pipe[1]] if self.log_pipe else [])
        try:
            proc = self.forks.spawn(
                _listener_main, (self.cfg, self.opts, [(sub, spec) for _, sub, spec in socks],
                                 self.nlisteners, self.owner, bool(self.log_pipe)),
                fds + [sock.fileno() for sock, _, _ in socks], close_fds=False)
        except BaseException:
            os.close(cw)
            raise
        finally:
            os.close(cr)
        os.set_blocking(cw, False)
        self.children[proc.pid] = slot
        self.procs[proc.pid] = proc
        self.control[proc.pid] = cw
        return proc.pid

    def _not_for_children(self):
        """The descriptors the fork server closes: the listening sockets
        (refused at SIGTERM once the master closes its own), the pid file's
        lock and the pipe to the waiting `sendmail -bd`."""
        fds = [sock.fileno() for socks in self.sock_sets for sock, _, _ in socks]
        if self.ready_fd is not None:
            fds.append(self.ready_fd)
        if self.pid_file is not None and self.pid_file.fd is not None:
            fds.append(self.pid_file.fd)
        return fds

    def _prepare_spool(self):
        spool = Spool.from_config(self.cfg)
        if self.owner:
            _, uid, gid = self.owner
            spool.create(uid, gid)
            st = os.stat(spool.dir)
            if st.st_uid != uid:
                os.chown(spool.dir, uid, gid)
        else:
            spool.create()
        self.spool = spool

    def run(self):
        cfg = self.cfg
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.getuid()).pw_name
            log.info(f"not started as root: everything runs as {me} in one process tree")
        elif self.owner is None:
            log.info(f"mail_owner is {cfg.mail_owner}: the listener keeps root privileges")
        from .proctitle import set_name
        set_name("pymta: master")
        self._prepare_spool()
        _preload()
        # Before the first thread: every later child comes from the fork server.
        forkserver.strict()
        self.forks = forkserver.start(close=self._not_for_children())
        self._start_showq()
        self.rfd, self.wfd = os.pipe()
        self.pending_ids = b""
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        try:
            owner = self.owner[1:] if self.owner else (None, None)
            self.notify_fds = self.spool.open_notify(*owner)
        except OSError as e:
            log.warning(f"cannot open {self.spool.notify_path} ({e.strerror}): sendmail "
                        "submissions are delivered by their own background process")
            self.notify_fds = ()
        # Signals wake the main loop at once (not at its next second): a
        # SIGHUP reaches the listeners before a SIGTERM that follows it.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *a: setattr(self, "reload", True))
        self._start_log_pump()
        from .smtpd_loop import Pool
        self.pool = Pool(max(1, cfg.delivery_thread_limit), None, "pymta-handoff")
        self.nlisteners = len(self.sock_sets)
        pids = [self._spawn(slot) for slot in range(self.nlisteners)]
        log.info(f"daemon started (pid {os.getpid()}), "
                 + ", ".join(f"listener pid {pid}" for pid in pids)
                 + (f" as {self.owner[0]}" if self.owner else ""))
        problem = self._wait_ready(pids)
        if problem:
            log.error(f"fatal: {problem}")
            self._tell(f"{EX_SOFTWARE} {problem}")
            self.stop = True
            self.exit_code = EX_SOFTWARE
            return self._shutdown()
        self._tell("ok")
        interval = self.opts.queue_interval or cfg.queue_run_delay
        next_run = time.monotonic() + 1
        next_pickup = 0
        pending = {self.rfd: self.pending_ids}
        if self.notify_fds:
            pending[self.notify_fds[0]] = b""
        throttled = False
        next_reap = 0
        while not self.stop:
            # A bounded hand-off: with HANDOFF_BACKLOG messages waiting for a
            # delivery thread the pipes are not read; they fill and the
            # listeners slow their clients down (in_flow_delay). Once the
            # backlog is down to half, a queue run takes what was not handed.
            backlog = self.pool.waiting()
            if backlog >= HANDOFF_BACKLOG and not throttled:
                throttled = True
                log.warning(f"warning: {backlog} hand-offs wait for delivery: "
                            "slowing down the listeners")
            elif throttled and backlog <= HANDOFF_BACKLOG // 2:
                throttled = False
                next_run = time.monotonic()
            # A listener's exit status comes on its socket from the fork
            # server: that, or a second gone by, has the listeners reaped
            # (not every wake-up: two selects and a waitpid each time).
            exits = [p.sock for p in self.procs.values() if p.sock is not None]
            try:
                ready, _, _ = select.select(([] if throttled else list(pending)) + [self.wake_r]
                                           + exits, [], [], 0.2 if throttled else 1.0)
            except InterruptedError:
                ready = []
            reap = False
            for fd in ready:
                if fd == self.wake_r:
                    _read_available(fd)
                elif fd in pending:
                    pending[fd] = self._read_ids(fd, pending[fd])
                else:
                    reap = True
            now = time.monotonic()
            if now >= next_pickup:
                next_pickup = now + 1
                self._pickup()
                with self.busy_lock:
                    busy, self.busy_ids = self.busy_ids, []
                    locked, self.locked_ids = self.locked_ids, []
                for qid in busy:
                    self.pool.submit(lambda qid=qid: self._deliver(qid))
                for qid, tries in locked:
                    self.pool.submit(lambda qid=qid, tries=tries: self._deliver(qid, tries))
            if interval and now >= next_run and \
                    (self.run_thread is None or not self.run_thread.is_alive()):
                next_run = now + interval
                self.run_thread = threading.Thread(target=self._queue_run, name="pymta-qrun",
                                                   daemon=True)
                self.run_thread.start()
            if reap or now >= next_reap:
                next_reap = now + 1
                self._reap()
            if self.reload:
                self.reload = False
                self._reload()
        return self._shutdown()

    def _on_stop(self, *args):
        if self.stop:
            return
        self.stop = True
        self.stop_time = time.monotonic()
        # Stop accepting at once: the kernel queues connections for a
        # listening socket as long as any process holds it open.
        for socks in self.sock_sets:
            for sock, _, _ in socks:
                try:
                    sock.close()
                except OSError:
                    pass
        for child in self.children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        queue_attempt.STOP.set()    # no new delivery starts

    def _start_showq(self):
        """queue_directory/public/showq: mailq for the users who cannot read
        the queue (authorized_mailq_users), answered by this process."""
        from . import mailq
        try:
            self.showq = mailq.open_showq(self.cfg)
        except OSError as e:
            log.warning(f"warning: cannot listen on {mailq.SHOWQ} under "
                        f"{self.cfg.queue_directory} ({e.strerror}): mailq works only for "
                        f"root and {self.cfg.mail_owner}")
            return
        threading.Thread(target=mailq.serve_showq, args=(self.cfg, self.spool, self.showq, log),
                         name="pymta-showq", daemon=True).start()

    def _start_log_pump(self):
        """With a log file and a listener that drops privileges, the
        listener's lines come through a pipe and the master writes them:
        only root can reopen the file after a rotation."""
        handler = next((h for h in log.handlers if isinstance(h, logging.FileHandler)), None)
        if handler is None or not self.owner:
            return
        rfd, wfd = os.pipe()
        self.log_pipe = (rfd, wfd, handler)
        threading.Thread(target=_log_pump, args=(handler, rfd), name="pymta-log",
                         daemon=True).start()

    def _tell(self, text):
        """The start's outcome to the `sendmail -bd` that waits for it (-bD:
        an error goes to stderr)."""
        if self.ready_fd is None:
            if text != "ok":
                print(f"sendmail: fatal: {text.split(' ', 1)[1]}", file=sys.stderr)
            return
        try:
            os.write(self.ready_fd, (text + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
        os.close(self.ready_fd)
        self.ready_fd = None

    def _wait_ready(self, pids, timeout=60):
        """None once every listener serves, else why one cannot."""
        deadline = time.monotonic() + timeout
        while not self.ready.issuperset(pids):
            if self.stop:
                return "stopped while starting"
            try:
                ready, _, _ = select.select([self.rfd], [], [], 0.1)
            except InterruptedError:
                ready = []
            if ready:
                self.pending_ids = self._read_ids(self.rfd, self.pending_ids)
            for pid in pids:
                if pid in self.ready:
                    continue
                status = self._exited(pid)
                if status is not None:
                    self.children.pop(pid, None)
                    self._read_ids(self.rfd, b"")
                    why = self.errors.get(pid) or _status_text(status)
                    return f"the SMTP listener could not start: {why}"
            if time.monotonic() > deadline:
                return f"the SMTP listener did not start in {timeout} seconds"
        return None

    def _read_ids(self, fd, pending):
        """Queue ids from the listener's pipe or queue/notify, one a line."""
        try:
            pending += os.read(fd, READ_SIZE)
        except BlockingIOError:
            return pending
        *lines, rest = pending.split(b"\n")
        for line in lines:
            qid = line.decode("ascii", "replace").strip()
            if qid[:1] in ("+", "!") and fd == self.rfd:
                self._listener_says(line.decode("utf-8", "replace"))
                continue
            if valid_id(qid):
                self.pool.submit(lambda qid=qid: self._deliver(qid))
        return rest

    def _listener_says(self, line):
        """'+ready PID' or '! PID error' from a listener."""
        word, _, rest = line.partition(" ")
        pid, _, text = rest.partition(" ")
        if not pid.isdigit():
            return
        if word == "+ready":
            self.ready.add(int(pid))
            self.failures = 0
        elif word == "!":
            self.errors[int(pid)] = text.strip()

    def _deliverer(self):
        """One Deliverer for the handoffs (its router, alias map, resolver and
        idle connections are kept between messages); a new one after a reload."""
        deliverer = self.deliverer
        if deliverer is None or deliverer.cfg is not self.cfg:
            deliverer = self.deliverer = queue_attempt.Deliverer(self.cfg, log=log)
        return deliverer

    # A message handed over while another process holds its lock for a
    # moment (pymta hold, a queue runner's look at it) is tried again a
    # second later, this many times, before it is left to the queue runs.
    LOCKED_TRIES = 3

    def _deliver(self, qid, tries=0):
        if queue_attempt.STOP.is_set():
            return          # stopping: it stays queued for the next start
        try:
            # The df's lock alone: the attempt reads the qf next, and a
            # message that has gone meanwhile is skipped there ("gone").
            lock = self.spool.lock(qid, control=())
            if lock is None:
                if tries < self.LOCKED_TRIES and self.spool.is_locked(qid):
                    with self.busy_lock:
                        self.locked_ids.append((qid, tries + 1))
                return
            with lock:
                summ = self._deliverer().deliver_locked(lock, keep_connections=True)
            if summ.skipped == "busy":
                with self.busy_lock:
                    self.busy_ids.append(qid)   # its destination's turn comes later
        except Exception as e:
            log.exception(f"{qid}: delivery attempt failed: {e}")

    def _pickup(self):
        if self.deliverer is not None:
            self.deliverer.close_connections()   # idle SMTP connections live ~1 s
        try:
            ids = queue_maildrop.pickup(self.spool, self.cfg, log=log.info)
        except OSError as e:
            log.error(f"maildrop pickup failed: {e}")
            return
        for qid in ids:
            self.pool.submit(lambda qid=qid: self._deliver(qid))

    def _queue_run(self):
        try:
            # Threads, not forked processes: this process has other threads,
            # whose locks a fork would copy held.
            queue_run.Runner(self.cfg, log=log, processes=False).run_pass()
        except Exception as e:
            log.exception(f"queue run failed: {e}")

    # A listener that dies before it serves this many times in a row, or
    # that dies this many times in a minute, stops the daemon (Postfix's
    # master: "process exits too often"): a restart loop serves no one.
    FAILURE_LIMIT = 5
    DEATH_LIMIT = 10

    def _exited(self, pid):
        """The wait status of listener ``pid`` once it has exited, else None."""
        status = self.procs[pid].poll()
        if status is not None:
            self.procs.pop(pid).close()
        return status

    def _reap(self):
        if self.forks.gone() and not self.stop:
            # Its children noticed it going (their parent changed) and stop;
            # no other could be started.
            log.critical("fatal: the fork server died; stopping the daemon")
            self.stop = True
            self.exit_code = EX_SOFTWARE
        for child in list(self.children):
            status = self._exited(child)
            if status is None:
                continue
            pid = child
            slot = self.children.pop(child)
            fd = self.control.pop(child, None)
            if fd is not None:
                os.close(fd)
            if self.stop:
                continue
            self._read_ids(self.rfd, b"")
            why = self.errors.pop(child, None) or _status_text(status)
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < 60] + [now]
            if child not in self.ready:
                self.failures += 1
            self.ready.discard(child)
            if self.failures >= self.FAILURE_LIMIT or len(self.deaths) >= self.DEATH_LIMIT:
                log.critical(f"fatal: listener pid {pid} died ({why}); the listener has died "
                             f"{len(self.deaths)} times in the last minute, "
                             f"{self.failures} in a row before serving: stopping the daemon")
                self.stop = True
                self.exit_code = EX_SOFTWARE
                return
            log.error(f"listener pid {pid} died ({why}); restarting it")
            time.sleep(min(1 << self.failures, 16) if self.failures else 1)
            new = self._spawn(slot)
            log.info(f"listener pid {new} started")

    def _reload(self):
        from . import maillog
        if maillog.reopen():
            log.info("mail log reopened")
        cfg = _reload_config(self.cfg, self.opts)
        if cfg is None:
            return
        self.cfg = cfg
        # The listeners run as mail_owner: the key, which only root may
        # read, is read here and handed to them before their SIGHUP.
        try:
            pem = smtpd_common.tls_pem(cfg)
        except OSError as e:
            log.warning(f"warning: reload: cannot read TLS certificate or key: "
                        f"{e.strerror or e}: {e.filename}; the listeners keep theirs")
            pem = None
        frame = len(pem).to_bytes(4, "big") + pem if pem is not None else b""
        for child in self.children:
            if frame and child in self.control:
                try:
                    done = os.write(self.control[child], frame)
                except OSError as e:
                    done, why = 0, str(e)
                else:
                    why = "its pipe is full"
                if done < len(frame):
                    # A part of a frame would spoil the next: this listener
                    # gets no more keys (it keeps the one it has).
                    log.warning(f"warning: reload: cannot hand the TLS key to listener {child}: "
                                f"{why}")
                    if done:
                        os.close(self.control.pop(child))
            try:
                os.kill(child, signal.SIGHUP)
            except ProcessLookupError:
                pass
        log.info("configuration reloaded")

    def _shutdown(self):
        log.info("stopping: no new connections; waiting for sessions and deliveries")
        start = self.stop_time or time.monotonic()
        self._wait_listeners(start + LISTENER_GRACE)
        # Handoffs still in the pipes are not started: a queue run delivers them.
        for fd in self.notify_fds:
            os.close(fd)
        deadline = start + DELIVERY_GRACE
        if not self._wait_deliveries(deadline):
            log.info("stopping: shutting down the connections of deliveries in progress; "
                     "their messages stay queued")
            queue_attempt.stop()
            if not self._wait_deliveries(time.monotonic() + 1.0):
                # Threads stuck anyway are abandoned: main() ends the process
                # without waiting for them (their messages' locks go with it).
                self.abandoned = True
                log.warning("stopping: abandoning deliveries still in progress; "
                            "their messages stay queued")
        if self.showq is not None:
            from . import mailq
            try:
                os.unlink(os.path.join(self.cfg.queue_directory, mailq.SHOWQ))
            except OSError:
                pass
            self.showq.close()
        # The idle workers see their end-of-file and exit; the fork server
        # reaps them and whatever else ends within its grace, then exits.
        workers.POOL.close_all()
        forkserver.stop()
        log.info("daemon stopped")
        return self.exit_code

    def _wait_listeners(self, deadline):
        """Wait for the listeners until ``deadline``, then kill them."""
        while self.children:
            for child in list(self.children):
                if self._exited(child) is not None:
                    del self.children[child]
            if not self.children:
                break
            if time.monotonic() >= deadline:
                for child in self.children:
                    log.warning(f"stopping: listener pid {child} still busy; killed")
                    self.procs[child].kill(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)

    def _wait_deliveries(self, deadline):
        """True once no delivery thread is busy, False at ``deadline``."""
        while True:
            busy = self.pool.busy() or (self.run_thread is not None and self.run_thread.is_alive())
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _log_pump(handler, fd):
    """Whole lines from the listeners' log pipe into the master's log file."""
    buf = b""
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except InterruptedError:
            continue
        except OSError:
            return
        if not chunk:
            return
        lines, nl, buf = (buf + chunk).rpartition(b"\n")
        if not nl:
            buf = lines
            continue
        maillog.write_lines(handler, (lines + b"\n").decode("utf-8", "replace").encode("utf-8"))


def _read_available(fd):
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _status_text(status):
    if status < 0:
        return "its fork server is gone"
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _preserved_fds(sock_sets):
    fds = [s.fileno() for socks in sock_sets for s, _, _ in socks]
    for h in log.handlers:
        for attr in ("stream", "socket"):
            obj = getattr(h, attr, None)
            try:
                fds.append(obj.fileno())
            except (AttributeError, OSError, ValueError):
                pass
    return fds


def _announce_log(cfg, opts):
    """Without maillog_file and without a syslog socket the log goes to the
    default file: say so where the administrator looks at start."""
    from . import maillog
    path = maillog.log_file(cfg, foreground=opts.mode == "D")
    if path and not cfg.maillog_file:
        text = (f"no syslog socket ({maillog.SYSLOG_SOCKET}) and maillog_file is not set: "
                f"the mail log goes to {path}")
        print(f"sendmail: warning: {text}", file=sys.stderr)
        log.warning(f"warning: {text}")
    if path:
        try:
            maillog.open_log(path).close()
        except OSError as e:
            print(f"sendmail: warning: cannot open the mail log {path}: {e.strerror}",
                  file=sys.stderr)


def _start_check(cfg):
    """``pymta check`` at start (creating what is missing): each finding is
    logged; the errors also go to stderr. Returns the exit code."""
    from . import check
    report = check.run(cfg, fix=True)
    for kind, text in report.lines:
        if kind == "error":
            log.error(f"fatal: {text}")
            print(f"sendmail: fatal: {text}", file=sys.stderr)
        elif kind == "warning":
            log.warning(f"warning: {text}")
        else:
            log.info(text)
    return report.code


def main(cfg, opts):
    """-bd (detached) and -bD (foreground): returns the exit code.

    Nothing is bound before the pid file, the check and the configuration
    say the daemon can serve; `sendmail -bd` returns once the listeners
    serve (0), or says on stderr why the daemon could not start (non-zero)."""
    from .pidfile import AlreadyRunning, PidFile, running_pid
    if not os.path.isabs(cfg.path) and os.path.exists(cfg.path):
        cfg = C.load(os.path.abspath(cfg.path), opts.overrides)   # for reloads after chdir
    pid = running_pid(cfg.pid_file)
    if pid:
        print(f"sendmail: fatal: daemon already running (pid {pid}, {cfg.pid_file})",
              file=sys.stderr)
        return EX_TEMPFAIL
    _announce_log(cfg, opts)
    code = _start_check(cfg)
    if code:
        return code
    try:
        socks = _bind_all(cfg, listener_count(cfg))
    except OSError as e:
        print(f"sendmail: fatal: {e.strerror or e}", file=sys.stderr)
        log.error(f"fatal: {e.strerror or e}")
        return EX_OSERR
    pf = PidFile(cfg.pid_file)
    master = Master(cfg, opts, socks)
    if opts.mode == "d":
        return _detach(cfg, master, pf, socks)
    try:
        pf.acquire()
    except AlreadyRunning as e:
        print(f"sendmail: fatal: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as e:
        print(f"sendmail: fatal: {cfg.pid_file}: {e.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    master.pid_file = pf
    try:
        code = master.run()
    finally:
        pf.release()
    _exit_if_abandoned(master, code)
    return code


def _exit_if_abandoned(master, code):
    """End the process now when deliveries were abandoned: the interpreter
    would otherwise wait for their threads at exit."""
    if master.abandoned:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _detach(cfg, master, pf, socks):
    """-bd: the daemon runs detached (python-daemon); this process waits for
    its first word on a pipe: "ok" once it serves, else a code and why."""
    rfd, wfd = os.pipe()

    def detached():
        os.close(rfd)
        try:
            return _run_detached(cfg, master, pf, socks, wfd)
        except BaseException as e:
            log.exception("daemon failed")
            try:
                os.write(wfd, f"{EX_SOFTWARE} {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
            except OSError:
                pass
            raise
        finally:
            logging.shutdown()

    sys.stdout.flush()
    sys.stderr.flush()
    child = forkserver.fork_child(detached)
    os.close(wfd)
    for socks_ in socks:
        for sock, _, _ in socks_:
            sock.close()
    data = b""
    deadline = time.monotonic() + 120
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([rfd], [], [], 1.0)
        if ready:
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            data += chunk
    os.close(rfd)
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass
    word = data.decode("utf-8", "replace").split("\n", 1)[0].strip()
    if word == "ok":
        return 0
    code, _, why = word.partition(" ")
    if not code.isdigit():
        print("sendmail: fatal: the daemon exited while starting; see the mail log",
              file=sys.stderr)
        return EX_SOFTWARE
    print(f"sendmail: fatal: {why}", file=sys.stderr)
    return int(code)


def _run_detached(cfg, master, pf, socks, wfd):
    """The -bd daemon, in the child: detach, take the pid file, serve."""
    from .pidfile import AlreadyRunning
    import daemon as pydaemon
    ctx = pydaemon.DaemonContext(files_preserve=_preserved_fds(socks) + [wfd], umask=0o022,
                                 working_directory="/", signal_map={}, prevent_core=True)
    ctx.open()
    try:
        pf.acquire()
    except AlreadyRunning as e:
        os.write(wfd, f"{EX_TEMPFAIL} {e}\n".encode())
        return EX_TEMPFAIL
    except OSError as e:
        os.write(wfd, f"{EX_CANTCREAT} {cfg.pid_file}: {e.strerror}\n".encode())
        return EX_CANTCREAT
    master.ready_fd = wfd
    master.pid_file = pf
    try:
        return master.run()
    finally:
        pf.release()
