"""The mail log's lines: the daemon's fast path writes what the logging
package would, and gives way to it when another handler is added."""

import os
import re
import subprocess
import sys

from conftest import TOP

SCRIPT = r"""
import logging, sys
sys.path.insert(0, {top!r})
from pymta import config, maillog
cfg = config.load({conf!r}, {{}})
log = maillog.setup_logging(cfg)
log.info("fast %s line", "info")
log.debug("not shown")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("fast exception")
h = logging.StreamHandler(sys.stdout)
h.setFormatter(logging.Formatter("extra: %(message)s"))
log.addHandler(h)
log.warning("through %s", "logging")
log.removeHandler(h)
log.error("fast again")
"""


def test_fast_lines_match_the_logging_format_and_yield_to_other_handlers(inst, tmp_path):
    maillog = tmp_path / "maillog"
    inst.write_config(maillog_file=str(maillog), myhostname="mx.example.test")
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(top=TOP, conf=inst.conf_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "extra: through logging\n"
    lines = maillog.read_text().splitlines()
    prefix = r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d mx pymta\[\d+\]: "
    assert re.match(prefix + "fast info line$", lines[0]), lines
    assert re.match(prefix + "fast exception$", lines[1]), lines
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-3].endswith("ZeroDivisionError: division by zero")
    assert re.match(prefix + "through logging$", lines[-2]), lines
    assert re.match(prefix + "fast again$", lines[-1]), lines
    assert "not shown" not in maillog.read_text()
    pids = set(re.findall(r"pymta\[(\d+)\]", maillog.read_text()))
    assert len(pids) == 1 and os.getpid() not in {int(p) for p in pids}


THREADS_SCRIPT = r"""
import os, sys, threading
sys.path.insert(0, {top!r})
from pymta import config, maillog
cfg = config.load({conf!r}, {{}})
log = maillog.setup_logging(cfg)
log.info("first")
half = threading.Barrier(9)
rotated = threading.Event()

def writer(n):
    for i in range(400):
        if i == 200:
            half.wait()
        elif i == 300:
            rotated.wait()
        log.info("thread %d line %d %s", n, i, "x" * 200)

threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
half.wait()
os.rename({path!r}, {path!r} + ".1")        # a rotation, while the threads write
assert maillog.reopen()
rotated.set()
for t in threads:
    t.join()
pid = os.fork()
if pid == 0:
    log.info("from the child")
    os._exit(0)
os.waitpid(pid, 0)
log.info("last")
"""


def test_lines_of_many_threads_stay_whole_across_a_reopen_and_a_fork(inst, tmp_path):
    """The fast path writes without the handler's lock: lines of threads
    writing at once never mix; a reopen (SIGHUP after a rotation) while
    they write puts the new file under their descriptor, losing nothing,
    and a forked child's lines go to the same file."""
    maillog = tmp_path / "maillog"
    inst.write_config(maillog_file=str(maillog), myhostname="mx.example.test")
    r = subprocess.run([sys.executable, "-c", THREADS_SCRIPT.format(
        top=TOP, conf=inst.conf_path, path=str(maillog))], capture_output=True, text=True,
        timeout=120)
    assert r.returncode == 0, r.stderr
    old = (tmp_path / "maillog.1").read_text().splitlines()
    new = maillog.read_text().splitlines()
    assert old[0].endswith(" first") and new[-1].endswith(" last")
    assert new[-2].endswith(" from the child")
    body = [line.split("]: ", 1)[1] for line in old[1:] + new[:-2]]
    assert sorted(body) == sorted(f"thread {n} line {i} {'x' * 200}"
                                  for n in range(8) for i in range(400))
    assert len(old) > 8 * 200 and len(new) > 8 * 100   # both files got lines of the threads
    pids = {line.split("pymta[", 1)[1].split("]")[0] for line in old + new}
    assert len(pids) == 2                       # the child's own pid
