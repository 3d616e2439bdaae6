#!/usr/bin/env python3
"""make bench: pymta side by side with Postfix on this machine, in one run.

Cases (the reference table of the performance issue):
  accept-s20-5k   20 sessions, 2000 x 5 KB, delivered to a mailbox meanwhile
  accept-s1-5k    1 session, 2000 x 5 KB
  accept-s20-1M   20 sessions, 200 x 1 MB (also with smtpd_listeners=1)
  drain-5k        2000 x 5 KB already queued, flushed to an smtp-sink
  inject          200 sequential `sendmail -i rcpt` calls, 5 KB (median ms),
                  through make install's launcher and through the sendmail
                  of `pip install .` (a venv in the work directory)
  models          accept-s20-5k and accept-s20-1M for each smtpd_process_model
                  (loop, threads, fork), pymta alone
and, for pymta alone: mailq and an idle queue pass with 10,000 and 100,000
messages queued (10,000 only with --quick), and the peak RSS while a 100 MB message goes
through SMTP, sendmail injection and local delivery.
sched (issue 14), each beside Postfix: healthy mail beside a tarpit and a
blackhole, connection attempts deferring 10,000 to a relay that greets 421,
flush of 10,000 and of 100,000 (postqueue -f), 2000 messages to a server
that takes 2 connections and 421s a third, mailq at 100,000 (postqueue -p)
with pymta's peak RSS at 10,000 and 100,000, a drain to a sink taking 1 s a
message, the time from SIGTERM (postfix stop) to exit with deliveries
hanging on a tarpit.

Postfix runs when the peer scripts (../shared/peers, or $PYMTA_PEERS) and
postfix are installed; each case alternates pymta and Postfix for --reps
repetitions and reports medians. The load generator is Postfix's smtp-source
when present, else bench/loadgen.py (several processes).
The work directory is made in --work DIR, else in $TMPDIR, else in the
first of the system's temporary directory, /var/tmp and var/ where creating
a file takes under 60 us (a busy /tmp can make it 1 ms); before each
measured run the benchmark waits until creating a file there is that quick
again (the removals of the run before slow it for 20-30 s on this machine),
and times a Python loop there: the CPU's speed of the moment, which on a
shared virtual machine can change twofold within minutes (the results give
the range, to compare runs by).
Prints a table and writes it to bench/RESULTS.md.
"""

import argparse
import os
import platform
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, TOP)
PY = sys.executable
SENDMAIL = os.path.join(TOP, "bin", "sendmail")
PEERS = os.environ.get("PYMTA_PEERS") or os.path.normpath(os.path.join(TOP, "..", "shared", "peers"))
SMTP_SOURCE = shutil.which("smtp-source") or (os.path.exists("/usr/sbin/smtp-source") and "/usr/sbin/smtp-source")
SMTP_SINK = shutil.which("smtp-sink") or (os.path.exists("/usr/sbin/smtp-sink") and "/usr/sbin/smtp-sink")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def tree_hwm_kb(pid):
    """Peak RSS (VmHWM, kB) of pid and its live descendants, the largest one."""
    best = 0
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        best = max(best, int(line.split()[1]))
        except OSError:
            pass
    return best


class Pymta:
    """A private pymta instance under a temporary directory."""

    def __init__(self, root, port, **params):
        self.root, self.port = root, port
        os.chmod(root, 0o755)       # file deliveries run as nobody
        os.makedirs(os.path.join(root, "mail"), exist_ok=True)
        self.mbox = os.path.join(root, "mail", "catchall")
        with open(os.path.join(root, "aliases"), "w") as f:
            f.write(f"user: {self.mbox}\npostmaster: root\n")
        open(self.mbox, "a").close()
        if os.geteuid() == 0:
            import pwd
            nobody = pwd.getpwnam("nobody")
            os.chown(self.mbox, nobody.pw_uid, nobody.pw_gid)
        p = {
            "myhostname": "pymta-bench.localdomain",
            "mydestination": "$myhostname, localhost, example.test",
            "queue_directory": os.path.join(root, "spool"),
            "mail_spool_directory": os.path.join(root, "mail"),
            "alias_maps": "hash:" + os.path.join(root, "aliases"),
            "pid_file": os.path.join(root, "pymta.pid"),
            "maillog_file": os.path.join(root, "maillog"),
            "smtpd_listen": f"127.0.0.1:{port}",
            "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "none",
            "queue_minfree": "0",
            "message_size_limit": "204800000",
            "mailbox_size_limit": "0",
            "dns_nameservers": "127.0.0.1:1",
            "mail_owner": "root" if os.geteuid() == 0 else os.environ.get("USER", "root"),
            "smtpd_session_limit": "200",
        }
        p.update(params)
        self.conf = os.path.join(root, "pymta.conf")
        with open(self.conf, "w") as f:
            for k, v in p.items():
                f.write(f"{k} = {v}\n")
        self.proc = None
        from pymta.queue_dir import Spool
        Spool(p["queue_directory"]).create()
        self.run_cmd("-bi", check=True)

    def run_cmd(self, *args, input=b"", check=False):
        return subprocess.run([PY, SENDMAIL, "-C", self.conf, *args], input=input,
                              capture_output=True, check=check)

    def start(self, *extra):
        self.proc = subprocess.Popen([PY, SENDMAIL, "-C", self.conf, "-bD", *extra],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, "daemon.err"), "ab"),
                                     start_new_session=True)
        wait_port(self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def queue_count(self):
        try:
            return sum(1 for n in os.listdir(os.path.join(self.root, "spool", "queue")) if n.startswith("qf"))
        except FileNotFoundError:
            return 0

    def wait_empty(self, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            if self.queue_count() == 0:
                return True
            time.sleep(0.05)
        return False


def load(port, sessions, msgs, size):
    """Send msgs messages of size bytes over sessions parallel connections
    (one connection per message); returns msgs/s."""
    if SMTP_SOURCE:
        cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(msgs), "-l", str(size),
               "-f", "bench@example.test", "-t", "user@example.test", f"127.0.0.1:{port}"]
    else:
        cmd = [PY, os.path.join(HERE, "loadgen.py"), "-s", str(sessions), "-m", str(msgs),
               "-l", str(size), f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed: {r.stderr.decode()[-500:]}")
    return msgs / elapsed


class Postfix:
    def __init__(self, root, port, mode="maildir"):
        self.root, self.port, self.mode = root, port, mode

    @staticmethod
    def available():
        return os.path.exists(os.path.join(PEERS, "postfix-up.sh")) and shutil.which("postfix") is not None \
            and os.geteuid() == 0

    def start(self):
        subprocess.run([os.path.join(PEERS, "postfix-down.sh"), self.root, "--purge"], capture_output=True)
        subprocess.run([os.path.join(PEERS, "postfix-up.sh"), str(self.port), self.root, self.mode],
                       check=True, capture_output=True)

    def stop(self):
        subprocess.run([os.path.join(PEERS, "postfix-down.sh"), self.root, "--purge"], capture_output=True)

    def queue_count(self):
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.root, "spool", sub)):
                n += len(files)
        return n

    def wait_empty(self, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            if self.queue_count() == 0:
                return True
            time.sleep(0.02)
        return False


def create_cost_us(directory, n=200):
    """Median microseconds to create (and remove) an empty file in a new
    directory in ``directory``: 6-20 us on a healthy ext4 here, 150-370 us
    when the block group of the directory is short of free inodes (a /tmp
    full of test suites' leftovers), 70-2000 us while it holds many inodes
    freed in the last half minute (see work_dir), which pymta pays twice a
    message (qf and df) and Postfix once."""
    probe = tempfile.mkdtemp(prefix="create-probe-", dir=directory)
    times = []
    try:
        for i in range(n):
            path = os.path.join(probe, f"f{i}")
            t0 = time.perf_counter()
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            times.append((time.perf_counter() - t0) * 1e6)
            os.unlink(path)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(times)


SLOW_CREATE_US = 60
VAR = os.path.join(TOP, "var")


def _others_can_enter(path):
    """Whether every directory from / down to ``path`` lets other users
    through: pymta's file deliveries and Postfix's virtual(8) run as nobody."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def work_dir(given=None):
    """Make the benchmark's work directory (pymta-bench-*) and time a file
    create in it. In ``given`` (--work, else $TMPDIR) when set; else in the
    first of the system's temporary directory, /var/tmp and this tree's var/
    (make run's, ignored by git) where a create takes under SLOW_CREATE_US,
    or, if none does, in the quickest. A new file's inode comes from its
    directory's block group, and ext4 without a journal (this machine's
    root) passes over the inodes of the group freed recently, in CPU time:
    a group where other work creates and removes many files (a busy /tmp)
    makes every create 50-100 times dearer.
    Returns (path, microseconds a create, [(directory, what it gave)])."""
    bases = [given] if given else [tempfile.gettempdir(), "/var/tmp", VAR]
    best, tried = None, []
    for base in bases:
        if any(os.path.realpath(base) == os.path.realpath(b) for b, _ in tried):
            continue
        try:
            if base == VAR:
                os.makedirs(base, exist_ok=True)
            work = tempfile.mkdtemp(prefix="pymta-bench-", dir=base)
        except OSError as e:
            if given:
                raise SystemExit(f"cannot make a work directory in {base}: {e}") from None
            tried.append((base, e.strerror))
            continue
        os.chmod(work, 0o755)
        if not _others_can_enter(work):
            if given:
                print(f"warning: other users cannot reach {work}: deliveries as nobody will fail",
                      file=sys.stderr, flush=True)
            else:
                tried.append((base, "closed to other users"))
                shutil.rmtree(work, ignore_errors=True)
                continue
        cost = create_cost_us(work)
        tried.append((base, f"{cost:.0f} us"))
        if best is None or cost < best[1]:
            if best:
                shutil.rmtree(best[0], ignore_errors=True)
            best = (work, cost)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if cost < SLOW_CREATE_US:
            break
    if best is None:
        raise SystemExit("no work directory: " + ", ".join(f"{b}: {why}" for b, why in tried))
    return best[0], best[1], tried


SETTLE_S = 60
SETTLE_WAITS = []   # (case, seconds waited, settled) of every wait, for the results
_UNSETTLED = set()  # the cases that said so on stderr already


def _io_pressure():
    try:
        with open("/proc/pressure/io") as f:
            return f.readline().split()[1]     # some avg10=...
    except (OSError, IndexError):
        return "avg10=?"


CPU_PROBES = []     # cpu_probe_ms() before every measured run, for the results


def cpu_probe_ms():
    """The CPU's speed of the moment: ms for a Python loop of 3 million
    additions. Shared virtual machines have run it up to twice as slowly in
    one minute as in another; pymta, which spends CPU where Postfix waits on
    its disk, loses more of its lead in a slow one. The results give the
    range."""
    t0 = time.perf_counter()
    s = 0
    for i in range(3_000_000):
        s += i
    return (time.perf_counter() - t0) * 1000


def settle(work, case):
    """Wait before a measured load until creating a file in ``work`` is
    quick again (under SLOW_CREATE_US), at most SETTLE_S seconds: the
    removals of the run before (a queue emptied, a Postfix purged) make it
    1-2 ms for 20-30 s here (see work_dir), and pymta removes two files a
    message (qf, df) where Postfix removes one: without the wait, each run
    pays for the one before, Postfix's more. One probe of 50 creates (a
    millisecond) when the disk is quiet; when it does not settle in time,
    say so once per ``case``."""
    t0 = time.perf_counter()
    cost = create_cost_us(work, n=50)
    while cost >= SLOW_CREATE_US and time.perf_counter() - t0 < SETTLE_S:
        time.sleep(1)
        cost = create_cost_us(work, n=50)
    waited = time.perf_counter() - t0
    SETTLE_WAITS.append((case, waited, cost < SLOW_CREATE_US))
    CPU_PROBES.append(cpu_probe_ms())
    if cost >= SLOW_CREATE_US:
        if case not in _UNSETTLED:
            _UNSETTLED.add(case)
            print(f"  {case}: creating a file still takes {cost:.0f} us after {waited:.0f} s "
                  f"(I/O pressure {_io_pressure()}): measured anyway", file=sys.stderr, flush=True)
    elif waited >= 1:
        print(f"  {case}: {waited:.1f} s until creating a file took {cost:.0f} us", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# -- cases ---------------------------------------------------------------------

def case_accept(work, sessions, msgs, size, reps, with_postfix, deliver=True, **params):
    res = {"pymta": [], "postfix": [], "rss": 0}
    case = (f"accept-s{sessions}-" + (f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}k")
            + "".join(f" {k}={v}" for k, v in params.items()))
    for rep in range(reps):
        port = free_port()
        root = tempfile.mkdtemp(prefix="pymta-", dir=work)
        pm = Pymta(root, port, **params)
        pm.start("-q30m") if deliver else pm.start()
        try:
            settle(work, case)
            res["pymta"].append(load(port, sessions, msgs, size))
            if not pm.wait_empty(120):
                print(f"  pymta: {pm.queue_count()} messages still queued; see {root}/maillog",
                      file=sys.stderr)
            res["rss"] = max(res["rss"], tree_hwm_kb(pm.proc.pid))
        finally:
            pm.stop()
            shutil.rmtree(root, ignore_errors=True)
        if with_postfix:
            pf = Postfix(os.path.join(work, "pfx"), free_port())
            pf.start()
            try:
                settle(work, case)
                res["postfix"].append(load(pf.port, sessions, msgs, size))
                pf.wait_empty(300)
            finally:
                pf.stop()
    return res


def _fill_queue(pm, n, size, rcpt="user@example.test", next_try=0):
    """Put n messages straight into pymta's queue (no delivery)."""
    from pymta import envelope as E
    from pymta.queue_dir import Spool
    s = Spool(os.path.join(pm.root, "spool"), fsync=False)
    s.create()
    body = b"From: bench@example.test\nTo: %s\nSubject: bench\n\n" % rcpt.encode()
    line = b"La de da de da de da de da de da de da de da de da de da de da\n"
    body += (line * (size // len(line) + 1))[:size]
    for _ in range(n):
        with s.new_message() as w:
            w.write(body)
            env = E.Envelope(sender="bench@example.test", next_try=next_try)
            env.add_recipient(rcpt)
            w.commit(env)


def case_drain(work, n, size, reps, with_postfix):
    res = {"pymta": [], "postfix": []}
    if not SMTP_SINK:
        return None
    sink_port = free_port()
    sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(sink_port)
        for rep in range(reps):
            root = tempfile.mkdtemp(prefix="pymta-", dir=work)
            pm = Pymta(root, free_port(), relayhost=f"[127.0.0.1]:{sink_port}",
                       delivery_process_limit="20")
            _fill_queue(pm, n, size, rcpt="user@remote.test")
            settle(work, "drain")
            t0 = time.perf_counter()
            r = pm.run_cmd("-q")
            elapsed = time.perf_counter() - t0
            left = pm.queue_count()
            if left:
                print(f"  drain: {left} messages left in pymta's queue: {r.stderr.decode()[-300:]}", file=sys.stderr)
            res["pymta"].append((n - left) / elapsed)
            shutil.rmtree(root, ignore_errors=True)
            if with_postfix:
                # bench-relay.sh fills and drains in one go; its fill creates
                # and renames queue files but removes none, so the wait covers both.
                settle(work, "drain")
                pfx_sink = free_port()
                out = subprocess.run([os.path.join(PEERS, "bench-relay.sh"), str(free_port()),
                                      os.path.join(work, "pfxr"), str(pfx_sink), str(n), str(size)],
                                     capture_output=True, text=True).stdout
                # bench-relay.sh leaves its smtp-sink running: stop it.
                subprocess.run([os.path.join(PEERS, "sink.sh"), "stop", str(pfx_sink)], capture_output=True)
                for line in out.splitlines():
                    if line.startswith("drain:"):
                        res["postfix"].append(float(line.split()[1]))
                subprocess.run([os.path.join(PEERS, "postfix-down.sh"), os.path.join(work, "pfxr"), "--purge"],
                               capture_output=True)
    finally:
        os.killpg(sink.pid, signal.SIGTERM)
        sink.wait()
    return res


def _inject_median(cmd, n, size):
    line = b"La de da de da de da de da de da de da de da de da de da de da\n"
    body = (line * (size // len(line) + 1))[:size]
    lat = []
    for i in range(n):
        msg = b"From: bench@example.test\nTo: user@example.test\nSubject: inject %d\n\n" % i + body
        t0 = time.perf_counter()
        subprocess.run(cmd, input=msg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        lat.append((time.perf_counter() - t0) * 1000)
    return median(lat)


# The interpreter and flag `make install` writes into the launchers (-S: no
# site module; the launcher adds the directories itself, as bin/sendmail
# adds the tree's .venv); the venv's python elsewhere. pymta's injection runs
# with its default delivery mode (background) and its daemon up, as the
# reference case `sendmail -i rcpt` runs Postfix's.
INSTALLED_PY = ["/usr/bin/python3", "-S"] if os.path.exists("/usr/bin/python3") else [PY]


def pip_installed_sendmail(work):
    """The sendmail that `pip install .` puts in a new virtual environment:
    a wheel built from this tree (with the venv's setuptools and wheel, no
    download), installed without its dependencies (injection imports none of
    them) into a venv of this interpreter. None, said on stderr, if that
    cannot be done here."""
    venv, wheels = os.path.join(work, "pip-venv"), os.path.join(work, "wheels")
    src = os.path.join(work, "pip-src")     # setuptools builds in the source tree: a copy's
    try:
        for name in ("pymta", "bin", "etc", "man"):
            shutil.copytree(os.path.join(TOP, name), os.path.join(src, name), symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("setup.py", "pyproject.toml", "README"):
            shutil.copy(os.path.join(TOP, name), src)
        subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", wheels, src], check=True, capture_output=True)
        subprocess.run([PY, "-m", "venv", "--without-pip", venv], check=True, capture_output=True)
        wheel, = [os.path.join(wheels, w) for w in os.listdir(wheels) if w.startswith("pymta-")]
        subprocess.run([PY, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install",
                        "-q", "--no-deps", "--no-index", wheel], check=True, capture_output=True)
    except (subprocess.CalledProcessError, ValueError) as e:
        err = getattr(e, "stderr", b"") or b""
        print(f"  inject: no pip-installed sendmail ({err.decode(errors='replace').strip()[-300:] or e})",
              file=sys.stderr)
        return None
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return os.path.join(venv, "bin", "sendmail")


def case_inject(work, n, size, reps, with_postfix):
    """sendmail -i rcpt through each way pymta is installed, and Postfix's:
    {"launcher": res, "pip": res or None}, the Postfix figures shared."""
    pip_sendmail = pip_installed_sendmail(work)
    ways = {"launcher": [*INSTALLED_PY, SENDMAIL]}
    if pip_sendmail:
        ways["pip"] = [pip_sendmail]
    res = {way: {"pymta": [], "postfix": []} for way in ways}
    for rep in range(reps):
        root = tempfile.mkdtemp(prefix="pymta-", dir=work)
        pm = Pymta(root, free_port())
        pm.start()      # as Postfix's daemons run: sendmail hands each message to it
        try:
            for way, cmd in ways.items():
                settle(work, "inject")
                res[way]["pymta"].append(_inject_median([*cmd, "-C", pm.conf, "-f", "a@example.test",
                                                         "-i", "user@example.test"], n, size))
                pm.wait_empty(120)
        finally:
            pm.stop()
        shutil.rmtree(root, ignore_errors=True)
        if with_postfix:
            pf = Postfix(os.path.join(work, "pfxi"), free_port(), "discard")
            pf.start()
            try:
                settle(work, "inject")
                t = _inject_median(["/usr/sbin/sendmail.postfix", "-C", os.path.join(pf.root, "etc"),
                                    "-f", "a@example.test", "-i", "user@example.test"], n, size)
                for way in ways:
                    res[way]["postfix"].append(t)
            finally:
                pf.stop()
    return {"launcher": res["launcher"], "pip": res.get("pip")}


def case_queue_scale(work, counts):
    out = []
    for n in counts:
        root = tempfile.mkdtemp(prefix="pymta-", dir=work)
        pm = Pymta(root, free_port(), relayhost="[127.0.0.1]:1")
        _fill_queue(pm, n, 1024, rcpt="user@remote.test", next_try=int(time.time()) + 86400)
        settle(work, f"queue of {n}")
        t0 = time.perf_counter()
        r = pm.run_cmd("-bp")
        t_mailq = time.perf_counter() - t0
        t0 = time.perf_counter()
        pm.run_cmd("-q")
        t_pass = time.perf_counter() - t0
        out.append((n, t_mailq, t_pass, r.returncode))
        shutil.rmtree(root, ignore_errors=True)
    return out


def case_big_message(work, mb=100):
    """Peak RSS (MB) of each pymta path with one message of ``mb`` megabytes."""
    root = tempfile.mkdtemp(prefix="pymta-", dir=work)
    path = os.path.join(root, "big.eml")
    line = b"x" * 76 + b"\n"
    with open(path, "wb") as f:
        f.write(b"From: a@example.test\nTo: user@example.test\nSubject: big\n\n")
        for _ in range(mb * 1024 * 1024 // len(line)):
            f.write(line)
    result = {}
    port = free_port()
    pm = Pymta(root, port)
    # injection
    with open(path, "rb") as f:
        r = subprocess.run(["/usr/bin/time", "-f", "%M", PY, SENDMAIL, "-C", pm.conf, "-odq", "-i",
                            "user@example.test"], stdin=f, capture_output=True)
    try:
        result["inject"] = int(r.stderr.decode().strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        result["inject"] = float("nan")
    # local delivery of that message
    r = subprocess.run(["/usr/bin/time", "-f", "%M", PY, SENDMAIL, "-C", pm.conf, "-q"], capture_output=True)
    try:
        result["local delivery"] = int(r.stderr.decode().strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        result["local delivery"] = float("nan")
    # SMTP
    pm.start()
    try:
        import smtplib
        with open(path, "rb") as f:
            data = f.read().replace(b"\n", b"\r\n")     # SMTP wants CRLF
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as c:
            c.sendmail("a@example.test", ["user@example.test"], data)
        del data
        result["smtp (daemon)"] = tree_hwm_kb(pm.proc.pid) / 1024
    finally:
        pm.stop()
    shutil.rmtree(root, ignore_errors=True)
    return result


# -- delivery that a bad destination cannot stall (issue 14) ---------------------

class BadPeer:
    """A tarpit (accepts, never greets) or a blackhole (connect() hangs: a
    listening socket whose one-connection backlog is taken and never
    accepted) on 127.0.0.1; a 421 server counts its connections."""

    def __init__(self, kind):
        import threading
        self.kind, self.connections = kind, 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held = []
        if kind == "blackhole":
            self.sock.listen(0)
            self.held.append(socket.create_connection(("127.0.0.1", self.port), 5))
            return
        self.sock.listen(1024)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.kind == "421":
                try:
                    c.sendall(b"421 4.3.2 Service not available\r\n")
                except OSError:
                    pass
                c.close()
            else:
                self.held.append(c)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.held:
            c.close()


def _sink(*extra):
    port = free_port()
    p = subprocess.Popen([SMTP_SINK, "-u", "nobody", *extra, f"127.0.0.1:{port}", "1024"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port)
    return p, port


def _stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    p.wait()


def _pymta_relay(work, transport, **params):
    root = tempfile.mkdtemp(prefix="pymta-", dir=work)
    path = os.path.join(root, "transport")
    with open(path, "w") as f:
        f.write(transport)
    return Pymta(root, free_port(), transport_maps=path, **params)


def _time_until(pred, timeout):
    t0 = time.perf_counter()
    end = t0 + timeout
    while time.perf_counter() < end:
        if pred():
            return time.perf_counter() - t0
        time.sleep(0.02)
    return float("nan")


def case_stall_pymta(work, bad_kind, n_good, n_bad, size=5120):
    """Seconds until n_good messages to a healthy sink are delivered by one
    `sendmail -q`, with n_bad messages to a bad peer queued before them
    (bad_kind None: without them)."""
    sink, sink_port = _sink()
    bad = BadPeer(bad_kind) if bad_kind else None
    try:
        tmap = f"healthy.test smtp:[127.0.0.1]:{sink_port}\n"
        if bad:
            tmap += f"bad.test smtp:[127.0.0.1]:{bad.port}\n"
        pm = _pymta_relay(work, tmap)
        if bad:
            _fill_queue(pm, n_bad, size, rcpt="user@bad.test")
        _fill_queue(pm, n_good, size, rcpt="user@healthy.test")
        settle(work, f"stall {bad_kind or 'alone'}")
        p = subprocess.Popen([PY, SENDMAIL, "-C", pm.conf, "-q"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            left = n_bad if bad else 0
            took = _time_until(lambda: pm.queue_count() <= left, 600)
        finally:
            _stop(p)
        shutil.rmtree(pm.root, ignore_errors=True)
        return took
    finally:
        _stop(sink)
        if bad:
            bad.close()


def _sink_count(port):
    out = subprocess.run([os.path.join(PEERS, "sink.sh"), "count", str(port)],
                         capture_output=True, text=True).stdout.strip()
    return int(out or 0)


def case_stall_postfix(work, bad_kind, n_good, n_bad, size=5120):
    """The same through a private Postfix: mail held, then postqueue -f; the
    time until smtp-sink counted n_good more messages."""
    sink_port = free_port()
    subprocess.run([os.path.join(PEERS, "sink.sh"), "start", str(sink_port)], capture_output=True)
    bad = BadPeer(bad_kind) if bad_kind else None
    pdir, pport = os.path.join(work, "pfxs"), free_port()
    env = dict(os.environ, HOLD="1", DOMAINS="healthy.test bad.test")
    try:
        subprocess.run([os.path.join(PEERS, "postfix-down.sh"), pdir, "--purge"], capture_output=True)
        subprocess.run([os.path.join(PEERS, "postfix-up.sh"), str(pport), pdir, f"relay:{sink_port}"],
                       env=env, check=True, capture_output=True)
        etc = os.path.join(pdir, "etc")
        if bad:
            with open(os.path.join(etc, "transport"), "w") as f:
                f.write(f"bad.test relay:[127.0.0.1]:{bad.port}\n")
            subprocess.run(["postconf", "-c", etc, "-e", f"transport_maps = texthash:{etc}/transport"],
                           check=True, capture_output=True)
            subprocess.run(["postfix", "-c", etc, "reload"], capture_output=True)
            time.sleep(1)
            subprocess.run([os.path.join(PEERS, "bench-accept.sh"), "127.0.0.1", str(pport), "20",
                            str(n_bad), str(size)], env=dict(os.environ, TO="user@bad.test"),
                           capture_output=True)
        subprocess.run([os.path.join(PEERS, "bench-accept.sh"), "127.0.0.1", str(pport), "20",
                        str(n_good), str(size)], env=dict(os.environ, TO="user@healthy.test"),
                       capture_output=True)
        total = n_good + (n_bad if bad else 0)
        deferred = os.path.join(pdir, "spool", "deferred")
        _time_until(lambda: sum(len(f) for _, _, f in os.walk(deferred)) >= total, 120)
        settle(work, f"stall {bad_kind or 'alone'}")
        c0 = _sink_count(sink_port)
        subprocess.run(["postqueue", "-c", etc, "-f"], capture_output=True)
        return _time_until(lambda: _sink_count(sink_port) >= c0 + n_good, 600)
    finally:
        subprocess.run([os.path.join(PEERS, "postfix-down.sh"), pdir, "--purge"], capture_output=True)
        subprocess.run([os.path.join(PEERS, "sink.sh"), "stop", str(sink_port)], capture_output=True)
        if bad:
            bad.close()


def case_dead_hop(work, n):
    """Connection attempts while one queue run defers n messages to a relay
    that greets with 421, and the run's time."""
    bad = BadPeer("421")
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{bad.port}")
        _fill_queue(pm, n, 1024, rcpt="user@remote.test")
        settle(work, "dead hop")
        t0 = time.perf_counter()
        pm.run_cmd("-q")
        took = time.perf_counter() - t0
        shutil.rmtree(pm.root, ignore_errors=True)
        return bad.connections, took
    finally:
        bad.close()


def case_flush(work, n, size=5120):
    """pymta flush of n deferred messages once the relay is back (msgs/s)."""
    sink, sink_port = _sink()
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{sink_port}")
        _fill_queue(pm, n, size, rcpt="user@remote.test", next_try=int(time.time()) + 3600)
        settle(work, "flush")
        t0 = time.perf_counter()
        subprocess.run([PY, os.path.join(TOP, "bin", "pymta"), "-C", pm.conf, "flush"],
                       capture_output=True)
        took = time.perf_counter() - t0
        left = pm.queue_count()
        shutil.rmtree(pm.root, ignore_errors=True)
        return (n - left) / took
    finally:
        _stop(sink)


def case_flush_postfix(work, n, size=5120):
    settle(work, "flush")      # before bench-relay.sh's fill, as in case_drain
    pfx_sink = free_port()
    out = subprocess.run([os.path.join(PEERS, "bench-relay.sh"), str(free_port()),
                          os.path.join(work, "pfxf"), str(pfx_sink), str(n), str(size)],
                         capture_output=True, text=True).stdout
    subprocess.run([os.path.join(PEERS, "sink.sh"), "stop", str(pfx_sink)], capture_output=True)
    subprocess.run([os.path.join(PEERS, "postfix-down.sh"), os.path.join(work, "pfxf"), "--purge"],
                   capture_output=True)
    for line in out.splitlines():
        if line.startswith("drain:"):
            return float(line.split()[1])
    return float("nan")


def case_mailq_rss(work, n):
    root = tempfile.mkdtemp(prefix="pymta-", dir=work)
    pm = Pymta(root, free_port(), relayhost="[127.0.0.1]:1")
    _fill_queue(pm, n, 1024, rcpt="user@remote.test", next_try=int(time.time()) + 86400)
    settle(work, f"mailq of {n}")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", PY, SENDMAIL, "-C", pm.conf, "-bp"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    try:
        return took, int(r.stderr.decode().split()[-1]) / 1024
    except (ValueError, IndexError):
        return took, float("nan")


def case_slow_sink(work, n, delay=1):
    """Drain n messages to a sink that takes ``delay`` s a message (msgs/s)."""
    sink, sink_port = _sink("-w", str(delay))
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{sink_port}")
        _fill_queue(pm, n, 5120, rcpt="user@remote.test")
        t0 = time.perf_counter()
        pm.run_cmd("-q")
        took = time.perf_counter() - t0
        left = pm.queue_count()
        shutil.rmtree(pm.root, ignore_errors=True)
        return (n - left) / took
    finally:
        _stop(sink)


def _postfix_held(work, name, sink_port, n, size=5120, to="user@remote.test", hold=True):
    """A private Postfix relaying to 127.0.0.1:sink_port with n messages
    queued (held, deferred, when ``hold``); returns (its directory, etc)."""
    pdir, pport = os.path.join(work, name), free_port()
    subprocess.run([os.path.join(PEERS, "postfix-down.sh"), pdir, "--purge"], capture_output=True)
    subprocess.run([os.path.join(PEERS, "postfix-up.sh"), str(pport), pdir, f"relay:{sink_port}"],
                   env=dict(os.environ, HOLD="1" if hold else "0"), check=True, capture_output=True)
    subprocess.run([os.path.join(PEERS, "bench-accept.sh"), "127.0.0.1", str(pport), "20",
                    str(n), str(size)], env=dict(os.environ, TO=to), capture_output=True)
    deferred = os.path.join(pdir, "spool", "deferred")
    if hold:
        _time_until(lambda: sum(len(f) for _, _, f in os.walk(deferred)) >= n, 600)
    return pdir, os.path.join(pdir, "etc")


def _postfix_down(pdir):
    subprocess.run([os.path.join(PEERS, "postfix-down.sh"), pdir, "--purge"], capture_output=True)


def case_slow_sink_postfix(work, n, delay=1):
    """The same drain through a private Postfix: n held, then postqueue -f;
    the time until its queue is empty."""
    sink, sink_port = _sink("-w", str(delay))
    pdir = None
    try:
        pdir, etc = _postfix_held(work, "pfxw", sink_port, n)
        pf = Postfix(pdir, 0)
        t0 = time.perf_counter()
        subprocess.run(["postqueue", "-c", etc, "-f"], capture_output=True)
        pf.wait_empty(600)
        took = time.perf_counter() - t0
        return (n - pf.queue_count()) / took
    finally:
        if pdir:
            _postfix_down(pdir)
        _stop(sink)


def case_sigterm(work):
    """Seconds from SIGTERM to exit of a daemon whose hand-offs hang on a tarpit."""
    bad = BadPeer("tarpit")
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{bad.port}")
        pm.start()
        import smtplib
        with smtplib.SMTP("127.0.0.1", pm.port, timeout=30) as c:
            for i in range(10):
                c.sendmail("a@example.test", [f"u{i}@remote.test"], b"Subject: x\r\n\r\nhi\r\n")
        _time_until(lambda: bad.connections >= 1, 30)
        t0 = time.perf_counter()
        os.killpg(pm.proc.pid, signal.SIGTERM)
        try:
            pm.proc.wait(120)
        except subprocess.TimeoutExpired:
            pm.stop()
        took = time.perf_counter() - t0
        shutil.rmtree(pm.root, ignore_errors=True)
        return took
    finally:
        bad.close()


def case_dead_hop_postfix(work, n):
    """Postfix's side of case_dead_hop: n held for a relay that greets 421,
    then postqueue -f; connection attempts until every one is deferred
    again, and the time that took."""
    bad = BadPeer("421")
    pdir = None
    try:
        pdir, etc = _postfix_held(work, "pfxd", bad.port, n, size=1024)
        log = os.path.join(pdir, "log", "maillog")

        def deferred_again():
            with open(log, errors="replace") as f:
                return sum(1 for line in f if "status=deferred" in line
                           and "deferred transport" not in line) >= n
        settle(work, "dead hop")
        t0 = time.perf_counter()
        subprocess.run(["postqueue", "-c", etc, "-f"], capture_output=True)
        _time_until(deferred_again, 600)
        return bad.connections, time.perf_counter() - t0
    finally:
        if pdir:
            _postfix_down(pdir)
        bad.close()


def case_sigterm_postfix(work):
    """postfix stop while its deliveries hang on a tarpit: seconds until its
    master is gone."""
    bad = BadPeer("tarpit")
    pdir = None
    try:
        pdir, etc = _postfix_held(work, "pfxt", bad.port, 10, size=1024, hold=False)
        _time_until(lambda: bad.connections >= 1, 60)
        with open(os.path.join(pdir, "spool", "pid", "master.pid")) as f:
            pid = int(f.read().split()[0])

        def gone():
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True
        t0 = time.perf_counter()
        subprocess.run(["postfix", "-c", etc, "stop"], capture_output=True)
        _time_until(gone, 120)
        return time.perf_counter() - t0
    finally:
        if pdir:
            _postfix_down(pdir)
        bad.close()


class LimitedSink:
    """A fast SMTP server on 127.0.0.1 that serves ``limit`` connections at
    once and greets one more with 421; counts messages and the peak of
    connections open at once (the 421'd ones too)."""

    def __init__(self, limit=2):
        import threading
        self.limit, self.delivered, self.open, self.peak, self.refused = limit, 0, 0, 0, 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
            over = self.open > self.limit
            self.refused += over
        try:
            if over:
                c.sendall(b"421 4.7.0 Too many connections\r\n")
                return
            f = c.makefile("rb")
            c.sendall(b"220 limited.test ESMTP\r\n")
            data = False
            for line in f:
                if data:
                    if line == b".\r\n":
                        data = False
                        with self.lock:
                            self.delivered += 1
                        c.sendall(b"250 2.0.0 Ok\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    c.sendall(b"250-limited.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    data = True
                    c.sendall(b"354 go\r\n")
                elif verb == b"QUIT":
                    c.sendall(b"221 bye\r\n")
                    return
                else:
                    c.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            c.close()
            with self.lock:
                self.open -= 1

    def close(self):
        self.sock.close()


def case_limited(work, n, timeout=300):
    """n messages to a server that takes 2 connections and 421s a third:
    (seconds until all are delivered, or nan; delivered; peak connections)."""
    srv = LimitedSink(2)
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{srv.port}")
        _fill_queue(pm, n, 5120, rcpt="user@remote.test")
        settle(work, "limited")
        p = subprocess.Popen([PY, SENDMAIL, "-C", pm.conf, "-q"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            took = _time_until(lambda: srv.delivered >= n, timeout)
        finally:
            _stop(p)
        shutil.rmtree(pm.root, ignore_errors=True)
        return took, srv.delivered, srv.peak
    finally:
        srv.close()


def case_limited_postfix(work, n, timeout=300):
    srv = LimitedSink(2)
    pdir = None
    try:
        pdir, etc = _postfix_held(work, "pfxl", srv.port, n)
        settle(work, "limited")
        subprocess.run(["postqueue", "-c", etc, "-f"], capture_output=True)
        took = _time_until(lambda: srv.delivered >= n, timeout)
        return took, srv.delivered, srv.peak
    finally:
        if pdir:
            _postfix_down(pdir)
        srv.close()


def case_big_queue(work, n):
    """n x 1 KB queued, not due: mailq's time and peak RSS, then pymta
    flush to an smtp-sink (msgs/s)."""
    sink, sink_port = _sink()
    try:
        pm = _pymta_relay(work, "", relayhost=f"[127.0.0.1]:{sink_port}")
        _fill_queue(pm, n, 1024, rcpt="user@remote.test", next_try=int(time.time()) + 86400)
        settle(work, f"queue of {n}, mailq and flush")
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", PY, SENDMAIL, "-C", pm.conf, "-bp"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        mailq = time.perf_counter() - t0
        try:
            mb = int(r.stderr.decode().split()[-1]) / 1024
        except (ValueError, IndexError):
            mb = float("nan")
        t0 = time.perf_counter()
        subprocess.run([PY, os.path.join(TOP, "bin", "pymta"), "-C", pm.conf, "flush"],
                       capture_output=True)
        rate = (n - pm.queue_count()) / (time.perf_counter() - t0)
        shutil.rmtree(pm.root, ignore_errors=True)
        return mailq, mb, rate
    finally:
        _stop(sink)


def case_big_queue_postfix(work, n):
    """The same through Postfix: postqueue -p's time, then postqueue -f."""
    sink, sink_port = _sink()
    pdir = None
    try:
        pdir, etc = _postfix_held(work, "pfxq", sink_port, n, size=1024)
        pf = Postfix(pdir, 0)
        settle(work, f"queue of {n}, mailq and flush")
        t0 = time.perf_counter()
        subprocess.run(["postqueue", "-c", etc, "-p"], stdout=subprocess.DEVNULL)
        mailq = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(["postqueue", "-c", etc, "-f"], capture_output=True)
        pf.wait_empty(1800)
        rate = (n - pf.queue_count()) / (time.perf_counter() - t0)
        return mailq, rate
    finally:
        if pdir:
            _postfix_down(pdir)
        _stop(sink)


def run_sched_cases(work, quick, with_postfix):
    """The rows of issue 14; returns (text rows, markdown lines)."""
    n_good, n_bad = (500, 50) if quick else (2000, 200)
    md = ["", "Delivery with a bad destination (issue 14):", "",
          "| case | pymta | Postfix |", "|---|---|---|"]

    def add(name, p, q="-"):
        md.append(f"| {name} | {p} | {q} |")
        print(f"{name}: pymta {p}, postfix {q}", flush=True)

    base = case_stall_pymta(work, None, n_good, 0)
    pbase = case_stall_postfix(work, None, n_good, 0) if with_postfix else float("nan")
    add(f"{n_good} to a healthy sink, alone: healthy mail done", f"{base:.1f} s",
        f"{pbase:.1f} s" if with_postfix else "-")
    for kind in ("tarpit", "blackhole"):
        t = case_stall_pymta(work, kind, n_good, n_bad)
        q = case_stall_postfix(work, kind, n_good, n_bad) if with_postfix else float("nan")
        add(f"same + {n_bad} to a {kind}, queued first: healthy mail done",
            f"{t:.1f} s ({t / base:.2f}x alone)",
            f"{q:.1f} s ({q / pbase:.2f}x alone)" if with_postfix else "-")
    nd = 2000 if quick else 10000
    conns, took = case_dead_hop(work, nd)
    q = "-"
    if with_postfix:
        pconns, ptook = case_dead_hop_postfix(work, nd)
        q = f"{pconns} ({ptook:.1f} s)"
    add(f"one queue run deferring {nd} to a relay that greets 421: connection attempts",
        f"{conns} ({took:.1f} s)", q)
    nf = 2000 if quick else 10000
    add(f"flush {nf} deferred messages, relay back", f"{case_flush(work, nf):.0f} msgs/s",
        f"{case_flush_postfix(work, nf):.0f} msgs/s" if with_postfix else "-")

    def limited(res, n, timeout):
        took, got, peak = res
        done = f"{took:.1f} s" if took == took else f"{got} of {n} after {timeout} s"
        return f"{done}, peak {peak} connections"
    nl = 300 if quick else 2000
    q = limited(case_limited_postfix(work, nl, 180), nl, 180) if with_postfix else "-"
    add(f"{nl} to a server that takes 2 connections and 421s a third: all delivered",
        limited(case_limited(work, nl, 300), nl, 300), q)
    nm = 10000 if quick else 100000
    t10, mb10 = case_mailq_rss(work, 10000)
    mailq, mb, rate = case_big_queue(work, nm)
    pq, prate = case_big_queue_postfix(work, nm) if with_postfix else (float("nan"),) * 2
    add(f"mailq with {nm} x 1 KB queued: time, peak RSS", f"{mailq:.1f} s, {mb:.0f} MB",
        f"{pq:.1f} s (postqueue -p)" if with_postfix else "-")
    add(f"mailq peak RSS, 10,000 queued / {nm}", f"{mb10:.0f} MB / {mb:.0f} MB")
    add(f"flush {nm} x 1 KB, relay back", f"{rate:.0f} msgs/s",
        f"{prate:.0f} msgs/s (postqueue -f)" if with_postfix else "-")
    ns = 100 if quick else 400
    add(f"drain {ns} to a sink taking 1 s a message", f"{case_slow_sink(work, ns):.1f} msgs/s",
        f"{case_slow_sink_postfix(work, ns):.1f} msgs/s (postqueue -f)" if with_postfix else "-")
    add("SIGTERM to exit, deliveries hanging on a tarpit", f"{case_sigterm(work):.1f} s",
        f"{case_sigterm_postfix(work):.1f} s (postfix stop)" if with_postfix else "-")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller loads, one repetition")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--cases", default="accept,models,drain,inject,queue,bigmsg,sched")
    ap.add_argument("--results", help="write the results there (default: bench/RESULTS.md, "
                    "and not with --quick)")
    ap.add_argument("--work", metavar="DIR", help="make the work directory in DIR (default: $TMPDIR, "
                    "else the first of the system's temporary directory, /var/tmp and var/ where "
                    "creating a file is quick)")
    a = ap.parse_args()
    reps = 1 if a.quick else a.reps
    scale = 4 if a.quick else 1
    with_postfix = not a.no_postfix and Postfix.available()
    cases = set(a.cases.split(","))
    if a.work:
        os.makedirs(a.work, exist_ok=True)
    work, create_us, tried = work_dir(a.work or os.environ.get("TMPDIR"))
    tried_text = " (tried " + ", ".join(f"{b}: {why}" for b, why in tried) + ")" if len(tried) > 1 else ""
    print(f"work directory: {work}, creating a file {create_us:.0f} us{tried_text}",
          file=sys.stderr, flush=True)
    if create_us >= SLOW_CREATE_US:
        print(f"warning: creating a file takes {create_us:.0f} us in the quickest work directory"
              f"{tried_text}, healthy is under {SLOW_CREATE_US}: every figure will be off",
              file=sys.stderr, flush=True)
    rows = []

    def row(name, res, unit="msgs/s", better="higher"):
        p, q = median(res["pymta"]), median(res.get("postfix", []))
        ratio = (p / q if better == "higher" else q / p) if res.get("postfix") else float("nan")
        rss = f"{res['rss'] / 1024:.0f} MB" if res.get("rss") else ""
        rows.append((name, f"{p:.1f} {unit}", f"{q:.1f} {unit}" if res.get("postfix") else "-",
                     f"{ratio:.2f}" if ratio == ratio else "-", rss))
        print(f"{name}: pymta {p:.1f} {unit}, postfix {q:.1f} {unit}, ratio {ratio:.2f} {rss}", flush=True)

    try:
        if "accept" in cases:
            row("accept, 20 sessions, 5 KB, delivered meanwhile",
                case_accept(work, 20, 2000 // scale, 5120, reps, with_postfix))
            row("accept, 1 session, 5 KB", case_accept(work, 1, 2000 // scale, 5120, reps, with_postfix))
            row("accept, 20 sessions, 1 MB", case_accept(work, 20, 200 // scale, 1048576, reps, with_postfix))
            # Big mail makes one listener CPU-bound: what a single one does
            # (the default is two on two CPUs, one per CPU but one above).
            row("accept, 20 sessions, 1 MB, smtpd_listeners=1",
                case_accept(work, 20, 200 // scale, 1048576, reps, with_postfix, smtpd_listeners="1"))
        if "models" in cases:
            # The process models side by side, pymta alone (Postfix's
            # figures are those of the accept rows).
            for model in ("loop", "threads", "fork"):
                row(f"accept, 20 sessions, 5 KB, smtpd_process_model={model}",
                    case_accept(work, 20, 2000 // scale, 5120, reps, False, smtpd_process_model=model))
                row(f"accept, 20 sessions, 1 MB, smtpd_process_model={model}",
                    case_accept(work, 20, 200 // scale, 1048576, reps, False, smtpd_process_model=model))
        if "drain" in cases:
            res = case_drain(work, 2000 // scale, 5120, reps, with_postfix)
            if res:
                row("relay drain to smtp-sink, 5 KB", res)
        if "inject" in cases:
            res = case_inject(work, 200 // scale, 5120, reps, with_postfix)
            row("injection, sendmail -i rcpt, 5 KB (median)", res["launcher"], unit="ms", better="lower")
            if res["pip"]:
                row("injection as above, through the sendmail of `pip install .`", res["pip"],
                    unit="ms", better="lower")
        scale_rows = []
        if "queue" in cases:
            counts = [10000] + ([] if a.quick else [100000])
            scale_rows = case_queue_scale(work, counts)
            for n, tm, tp, rc in scale_rows:
                print(f"queue of {n}: mailq {tm:.2f} s (exit {rc}), idle queue pass {tp:.2f} s", flush=True)
        sched_md = []
        if "sched" in cases and SMTP_SINK:
            sched_md = run_sched_cases(work, a.quick, with_postfix)
        big = {}
        if "bigmsg" in cases:
            big = case_big_message(work, 100 // scale)
            print("100 MB message peak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in big.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    waits = [w for _, w, _ in SETTLE_WAITS]
    settled_text = ""
    if waits:
        settled_text = (f"; before each of the {len(waits)} measured runs the benchmark waited until "
                        f"creating a file there took under {SLOW_CREATE_US} us again (at most {SETTLE_S} s): "
                        f"{sum(w >= 1 for w in waits)} waited, {median(waits):.0f} s in the median, "
                        f"{max(waits):.0f} s at most"
                        + (f"; it did not settle for {', '.join(sorted(_UNSETTLED))}" if _UNSETTLED else ""))
    if CPU_PROBES:
        settled_text += (f"; a Python loop of 3 million additions took {min(CPU_PROBES):.0f}-"
                         f"{max(CPU_PROBES):.0f} ms (median {median(CPU_PROBES):.0f}) before them")
    lines = ["# pymta benchmark results", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({os.cpu_count()} cores, "
             f"{platform.machine()}, Python {platform.python_version()}); load generator: "
             f"{'smtp-source' if SMTP_SOURCE else 'bench/loadgen.py'}; repetitions: {reps} (medians)"
             + ("" if with_postfix else "; Postfix not available: pymta alone")
             + f"; work directory in {os.path.dirname(work)}, where creating a file took "
             f"{create_us:.0f} us{tried_text}{settled_text}.", "",
             "| case | pymta | Postfix | pymta/Postfix | pymta peak RSS |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    if scale_rows:
        lines += ["", "| messages queued (none due) | mailq | idle queue pass |", "|---|---|---|"]
        lines += [f"| {n} | {tm:.2f} s | {tp:.2f} s |" for n, tm, tp, rc in scale_rows]
    lines += sched_md
    if big:
        lines += ["", f"Peak RSS with one {100 // scale} MB message: "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in big.items()) + "."]
    lines += ["", "Ratios above 1 mean pymta is ahead (for latency: Postfix's time / pymta's)."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    results = a.results or (None if a.quick else os.path.join(HERE, "RESULTS.md"))
    if results:
        with open(results, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
