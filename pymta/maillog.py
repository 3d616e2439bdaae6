"""The mail log: sendmail's maillog lines through syslog, a file or stderr.

Every module logs through ``logging.getLogger("pymta")``; the programs
(cli.py, admin.py) call :func:`setup_logging` once.

The sendmail submission path is the exception: importing the logging
package is a quarter of what a ``sendmail`` run costs, and it writes one or
two lines. With ``setup_logging(..., light=True)`` the modules of that path
log through :data:`log`, which writes the same lines straight to syslog or
the maillog file; :func:`full_logging` sets up the logging package when the
same process goes on to deliver (``-odi``, ``-odb``).

Every line is passed through :func:`printable` on its way out, whoever
wrote it: what a client sent (a HELO name, an AUTH user name, an address,
a reply of a remote server) can never start a line of its own or carry
bytes a terminal or a log parser would act on.
"""

import os
import sys
import time

# Where the mail log goes when maillog_file is empty and there is no syslog
# socket (/dev/log): a container, a minimal install. Documented in pymta(8)
# and pymta.conf(5); etc/logrotate.pymta rotates it.
DEFAULT_MAILLOG = "/var/log/pymta.log"
SYSLOG_SOCKET = "/dev/log"


def log_file(cfg, foreground=False):
    """The file the mail log goes to: maillog_file, else (no syslog socket,
    not in the foreground) DEFAULT_MAILLOG; None for syslog or stderr."""
    if cfg.maillog_file:
        return cfg.maillog_file
    if foreground or os.path.exists(SYSLOG_SOCKET):
        return None
    return DEFAULT_MAILLOG


def open_log(path):
    """``path`` opened for appending; created 0640, owned by root:adm when
    root makes it (Debian's mode for mail.log), never through a symlink
    that is not already the log."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    else:
        if os.geteuid() == 0:
            try:
                import grp
                gid = grp.getgrnam("adm").gr_gid
            except (KeyError, ImportError):
                gid = 0
            try:
                os.fchown(fd, 0, gid)
                os.fchmod(fd, 0o640)
            except OSError:
                pass
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")

_LEVELS = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_light = None       # (write(level, text), verbose) while the light logger is in use
_params = None      # setup_logging's arguments, for full_logging()


def printable(text):
    """``text`` fit for one log line: every character that is not printable
    (control characters, CR, LF, NUL, TAB, DEL, C1 controls, line and
    paragraph separators) becomes a backslash escape, ``\\ooo`` in octal
    below 256 (LF is ``\\012``) and ``\\uXXXX`` above; a byte that was not
    UTF-8 (kept by ``surrogateescape``) becomes the octal escape of the
    byte. Printable text, non-ASCII letters included, is kept as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c):
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:        # an undecodable byte (surrogateescape)
        o -= 0xDC00
    if o < 0x100:
        return "\\%03o" % o
    return "\\u%04x" % o if o < 0x10000 else "\\U%08x" % o


_stamp = (0, "")     # (second, its time stamp), replaced whole: threads share it
_pid = os.getpid()   # this process's, for every line (a system call each time otherwise)


def _prefix(name, host=None):
    """'Nov 28 19:36:49 host name[pid]: ', the start of a maillog line."""
    global _stamp
    now = int(time.time())
    sec, text = _stamp
    if now != sec:
        text = time.strftime("%b %d %H:%M:%S", time.localtime(now))
        _stamp = (now, text)
    return f"{text} {host} {name}[{_pid}]: " if host else f"{text} {name}[{_pid}]: "


# Descriptors of the log file that the fast path writes on (see
# _fast_methods): a handler -> (the stream it was made from, descriptor).
_line_fds = {}


def _after_fork():
    """In a new child: its own pid; the parent's descriptors of the log
    file closed (the child has one thread: no one writes on them), as the
    streams they were made from are when a child replaces them."""
    global _pid
    _pid = os.getpid()
    for _, fd in _line_fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _line_fds.clear()


os.register_at_fork(after_in_child=_after_fork)


def _format_file_line(cfg, name, text):
    return f"{_prefix(name, cfg.myhostname.split('.')[0])}{text}\n"


def _light_writer(cfg, name):
    """write(level, text) for the configured destination, without logging."""
    path = log_file(cfg)
    if path:
        def write(level, text):
            try:
                with open_log(path) as f:
                    f.write(_format_file_line(cfg, name, text))
            except OSError:
                pass
        return write
    if os.path.exists("/dev/log"):
        import syslog
        facility = getattr(syslog, "LOG_" + cfg.syslog_facility.upper(), syslog.LOG_MAIL)
        syslog.openlog(name, syslog.LOG_PID, facility)

        def write(level, text):
            syslog.syslog(_LEVELS.get(level, 6), text)
        return write
    return lambda level, text: None   # no syslog here: stay quiet (see setup_logging)


class _Log:
    """The submission path's logger: light until full_logging() is called."""

    def _emit(self, level, msg, args, exc_info=False):
        if _light is None:
            import logging
            getattr(logging.getLogger("pymta"), level)(msg, *args, exc_info=exc_info)
            return
        write, verbose = _light
        if level == "debug" and not verbose:
            return
        write(level, printable(msg % args if args else msg))

    def debug(self, msg, *args):
        self._emit("debug", msg, args)

    def info(self, msg, *args):
        self._emit("info", msg, args)

    def warning(self, msg, *args):
        self._emit("warning", msg, args)

    def error(self, msg, *args):
        self._emit("error", msg, args)

    def exception(self, msg, *args):
        self._emit("error", msg, args, exc_info=True)


log = _Log()


class _Printable:
    """A logging filter: the record's message made :func:`printable`."""

    def filter(self, record):
        text = record.getMessage()
        if not text.isprintable():
            record.msg, record.args = printable(text), None
        return True


def _syslog_handler(name, facility):
    """A logging handler that writes through the C library (the stdlib syslog
    module): cheaper to import than logging.handlers."""
    import logging
    import syslog

    class Handler(logging.Handler):
        def __init__(self):
            super().__init__()
            syslog.openlog(name, syslog.LOG_PID, facility)

        def emit(self, record):
            try:
                syslog.syslog(_LEVELS.get(record.levelname.lower(), 6), self.format(record))
            except Exception:   # noqa: BLE001 - logging's own convention (Handler.emit)
                self.handleError(record)

    return Handler()


def setup_logging(cfg, foreground=False, tag=None, verbose=False, light=False):
    """The mail log: maillog_file, else stderr in the foreground, else syslog.
    ``light`` (sendmail's submission path) defers the logging package."""
    global _light, _params
    name = tag or cfg.syslog_name
    _params = (cfg, foreground, tag, verbose)
    if light and not foreground:
        _light = (_light_writer(cfg, name), verbose)
        return log
    _light = None
    import logging
    logging.raiseExceptions = False
    # No line of the mail log names a source file, a thread or a
    # multiprocessing process: skip finding them for every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("pymta")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        made = _line_fds.pop(h, None)
        if made is not None:
            os.close(made[1])
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for f in list(logger.filters):
        if isinstance(f, _Printable):
            logger.removeFilter(f)
    logger.addFilter(_Printable())     # for the lines the logging package writes
    path = log_file(cfg, foreground)
    if path:
        handler = _LogFile(path)
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
        handler = _syslog_handler(name, facility)
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    _fast_methods(logger, handler, cfg, name)
    return logger


def _log_file_class():
    import logging

    class LogFile(logging.FileHandler):
        """A FileHandler whose file is made 0640 root:adm (open_log) and is
        opened at the first line; reopen() closes it for the next line to
        open the file by its name again (after a rotation)."""

        def __init__(self, path):
            super().__init__(path, delay=True)

        def _open(self):
            return open_log(self.baseFilename)

    return LogFile


def _LogFile(path):
    return _log_file_class()(path)


def reopen():
    """SIGHUP: the log file is opened by its name again, so that a rotated
    (renamed) file is left alone: at once, over the descriptors the old
    one had (os.dup2), which threads writing a line at that moment may be
    using; when it cannot be opened, the next line tries again. Returns
    whether there was a log file."""
    import logging
    done = False
    for h in logging.getLogger("pymta").handlers:
        if isinstance(h, logging.FileHandler):
            h.acquire()
            try:
                if h.stream is not None and getattr(h, "forwarded", False) is False:
                    _reopen_stream(h)
                done = True
            finally:
                h.release()
    return done


def _reopen_stream(h):
    """The file of handler ``h`` (its lock held) opened by its name again."""
    try:
        new = open_log(h.baseFilename)
    except OSError:
        # The next line tries again (the fast path's descriptor, made
        # from this stream, is dropped with it and never reused).
        try:
            h.stream.close()
        except OSError:
            pass
        h.stream = None
        return
    with new:
        fds = {h.stream.fileno()}
        made = _line_fds.get(h)
        if made is not None and made[0] is h.stream:
            fds.add(made[1])
        for fd in fds:
            os.dup2(new.fileno(), fd, inheritable=False)


def _line_fd(handler):
    """A descriptor of the file (or pipe) of FileHandler ``handler``'s
    stream, made under its lock once per stream and never closed in this
    process (a thread may be writing on it): reopen() puts the new file
    under it."""
    handler.acquire()
    try:
        if handler.stream is None:
            handler.stream = handler._open()
        stream = handler.stream
        made = _line_fds.get(handler)
        if made is None or made[0] is not stream:
            made = _line_fds[handler] = (stream, os.dup(stream.fileno()))
        return made[1]
    finally:
        handler.release()


def write_lines(handler, data):
    """Whole lines (bytes) into the log of FileHandler ``handler``: one
    write(2), without the handler's lock. The file is opened O_APPEND (a
    listener's log pipe takes one write up to PIPE_BUF whole), so the lines
    of several threads never mix, and a delivery thread never waits for
    another's write. Errors are ignored, as the logging package does."""
    try:
        made = _line_fds.get(handler)
        fd = made[1] if made is not None and made[0] is handler.stream else _line_fd(handler)
        while data:
            data = data[os.write(fd, data):]
    except (OSError, ValueError):
        pass


def _fast_methods(logger, handler, cfg, name):
    """Give ``logger`` debug/info/warning/error/exception methods that write
    the same line as ``handler`` would, without a LogRecord, a Formatter and
    the handler machinery: a sixth of what the daemon's master spent in
    Python. Whenever the logger has other handlers than this one (sendmail
    -q -v adds one), the logging package does the work as before."""
    import logging
    import threading
    import traceback
    host = cfg.myhostname.split(".")[0] if isinstance(handler, logging.FileHandler) else None

    if isinstance(handler, logging.FileHandler):
        def emit(level, text):
            write_lines(handler, (_prefix(name, host) + text + "\n").encode("utf-8", "replace"))
    elif isinstance(handler, logging.StreamHandler):
        lock = threading.Lock()

        def emit(level, text):
            with lock:
                try:
                    handler.stream.write(_prefix(name, host) + text + "\n")
                    handler.stream.flush()
                except (OSError, ValueError):
                    pass
    elif isinstance(handler, logging.NullHandler):
        def emit(level, text):
            pass
    else:   # syslog
        import syslog

        def emit(level, text):
            try:
                syslog.syslog(_LEVELS.get(level, 6), text)
            except (OSError, ValueError):
                pass

    def method(level, levelno, exc_default=False):
        slow = getattr(logging.Logger, "exception" if exc_default else level)

        def log_it(msg, *args, exc_info=exc_default, **kw):
            hs = logger.handlers
            if len(hs) != 1 or hs[0] is not handler or kw or logger.disabled:
                return slow(logger, msg, *args, exc_info=exc_info, **kw)
            if levelno < logger.level:
                return
            text = printable(msg % args if args else str(msg))
            if exc_info:
                tb = traceback.format_exc()
                if tb and tb != "NoneType: None\n":
                    text += "\n" + tb.rstrip("\n")
            emit(level, text)
        return log_it

    logger.debug = method("debug", logging.DEBUG)
    logger.info = method("info", logging.INFO)
    logger.warning = method("warning", logging.WARNING)
    logger.error = method("error", logging.ERROR)
    logger.exception = method("error", logging.ERROR, exc_default=True)


def full_logging():
    """Switch from the light logger to the logging package (before a delivery
    in this process: the runner and its modules log through logging)."""
    if _light is not None and _params is not None:
        cfg, foreground, tag, verbose = _params
        setup_logging(cfg, foreground, tag, verbose)
