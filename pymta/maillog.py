"""The mail log: sendmail's maillog lines through syslog, a file or stderr.

Every module logs through ``logging.getLogger("pymta")``; the programs
(cli.py, admin.py) call :func:`setup_logging` once.
"""

import logging
import os
import sys


class SyslogHandler(logging.Handler):
    """Log records to syslog through the C library (the stdlib syslog module):
    cheaper to import than logging.handlers, which a sendmail run would pay
    for on every message."""

    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, ident, facility):
        super().__init__()
        import syslog
        self._syslog = syslog
        syslog.openlog(ident, syslog.LOG_PID, facility)

    def emit(self, record):
        try:
            self._syslog.syslog(self._PRIORITY.get(record.levelname, 6), self.format(record))
        except Exception:
            self.handleError(record)


def setup_logging(cfg, foreground=False, tag=None, verbose=False):
    """The mail log: maillog_file, else stderr in the foreground, else syslog."""
    logging.raiseExceptions = False
    logger = logging.getLogger("pymta")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    name = tag or cfg.syslog_name
    if cfg.maillog_file:
        handler = logging.FileHandler(cfg.maillog_file, delay=True)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {cfg.myhostname.split('.')[0]} {name}[%(process)d]: %(message)s",
            "%b %d %H:%M:%S"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name}[%(process)d]: %(message)s",
                                               "%b %d %H:%M:%S"))
    else:
        import syslog
        facility = getattr(syslog, "LOG_" + cfg.syslog_facility.upper(), syslog.LOG_MAIL)
        if os.path.exists("/dev/log"):
            handler = SyslogHandler(name, facility)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            # No syslog here: say nothing rather than write to the stderr of
            # cron or a mail client, which would mail or show it.
            handler = logging.NullHandler()
    logger.addHandler(handler)
    return logger
