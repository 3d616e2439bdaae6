"""The mail log: sendmail's maillog lines through syslog, a file or stderr.

Every module logs through ``logging.getLogger("pymta")``; the programs
(cli.py, admin.py) call :func:`setup_logging` once.
"""

import logging
import logging.handlers
import sys


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
        facility = logging.handlers.SysLogHandler.facility_names.get(
            cfg.syslog_facility, logging.handlers.SysLogHandler.LOG_MAIL)
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log", facility=facility)
        except OSError:
            # No syslog here: say nothing rather than write to the stderr of
            # cron or a mail client, which would mail or show it.
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter(f"{name}[%(process)d]: %(message)s"))
    logger.addHandler(handler)
    return logger
