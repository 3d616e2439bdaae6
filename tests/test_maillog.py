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
