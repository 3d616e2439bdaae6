"""Replies, delivery outcomes, exceptions and exit codes shared by all of pymta.

Every failure in pymta is carried as a :class:`Reply`: an SMTP code, an
RFC 3463 enhanced status code and a text. The same Reply travels from the
protocol to the log line, the qf ``M`` status and the bounce.
"""

import errno

# sysexits.h, the exit codes sendmail's callers understand.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

# The sizes of one I/O call, the same in every module: what one read from a
# pipe or a socket asks for, and the block in which message data moves
# between files (df, maildrop, mailboxes) and the network (and the size of
# message held in memory before the commit spills it to its df).
READ_SIZE = 65536
MESSAGE_BLOCK = 256 * 1024


_LINES = {}     # (code, enhanced, text) -> Reply.lines()


def _format_lines(code, enhanced, text):
    parts = text.split("\n") or [""]
    out = []
    for i, part in enumerate(parts):
        sep = "-" if i < len(parts) - 1 else " "
        if enhanced:
            out.append(f"{code}{sep}{enhanced} {part}\r\n")
        else:
            out.append(f"{code}{sep}{part}\r\n")
    return "".join(out).encode("utf-8", "replace")


class Reply:
    """An SMTP reply: ``code`` (e.g. 250), ``enhanced`` ("2.0.0" or ""), ``text``.

    Immutable and hashable (a plain class: dataclasses would cost every
    sendmail run the import of inspect)."""

    __slots__ = ("code", "enhanced", "text")

    def __init__(self, code, enhanced, text):
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "text", text)

    def __setattr__(self, name, value):
        raise AttributeError("Reply is immutable")

    def __eq__(self, other):
        if type(other) is not Reply:
            return NotImplemented
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self):
        return hash((self.code, self.enhanced, self.text))

    def __repr__(self):
        return f"Reply(code={self.code!r}, enhanced={self.enhanced!r}, text={self.text!r})"

    def __reduce__(self):
        return (Reply, (self.code, self.enhanced, self.text))

    def lines(self, enhanced=True):
        """The reply as wire lines (bytes, CRLF-terminated), multi-line if needed."""
        key = (self.code, self.enhanced if enhanced else "", self.text)
        out = _LINES.get(key)
        if out is None:
            # Kept for the replies said again and again (Ok, the greeting,
            # EHLO's); those naming a client's address come and go.
            out = _format_lines(*key)
            if len(_LINES) >= 256:
                _LINES.clear()
            _LINES[key] = out
        return out

    def __str__(self):
        text = self.text.replace("\n", " ")
        if self.enhanced:
            return f"{self.code} {self.enhanced} {text}"
        return f"{self.code} {text}"

    @property
    def outcome(self):
        return Outcome.from_code(self.code)

    @property
    def dsn(self):
        """The RFC 3463 status, guessed from the code when none was given."""
        if self.enhanced:
            return self.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")


class Outcome:
    """The three ends of a delivery attempt: ``Outcome.OK``, ``TEMPFAIL``,
    ``PERMFAIL``, each with a ``name`` and a ``value`` ("ok", ...). Three
    constants, not an enum.Enum: importing enum would cost every sendmail
    run (its latency) a few milliseconds."""

    __slots__ = ("name", "value")

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __repr__(self):
        return f"<Outcome.{self.name}>"

    def __reduce__(self):       # the same constant again, as an enum member would be
        return getattr, (Outcome, self.name)

    @classmethod
    def from_code(cls, code):
        if 200 <= code < 400:
            return cls.OK
        if 400 <= code < 500:
            return cls.TEMPFAIL
        return cls.PERMFAIL


Outcome.OK = Outcome("OK", "ok")
Outcome.TEMPFAIL = Outcome("TEMPFAIL", "tempfail")
Outcome.PERMFAIL = Outcome("PERMFAIL", "permfail")


class PymtaError(Exception):
    """Base of pymta's exceptions; ``reply`` says what to tell the peer."""

    reply = Reply(451, "4.3.0", "Local error in processing")
    exit_code = EX_SOFTWARE

    def __init__(self, message=None, reply=None, exit_code=None):
        if reply is not None:
            self.reply = reply
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(message if message is not None else self.reply.text)


class TempFail(PymtaError):
    """A temporary failure: the message stays queued and is tried again."""

    reply = Reply(451, "4.3.0", "Temporary local problem")
    exit_code = EX_TEMPFAIL


class PermFail(PymtaError):
    """A permanent failure: the recipient (or message) is bounced."""

    reply = Reply(550, "5.0.0", "Permanent failure")
    exit_code = EX_UNAVAILABLE


class ConfigError(PymtaError):
    """A bad configuration: names the file, the line and the parameter."""

    reply = Reply(451, "4.3.5", "Server configuration error")
    exit_code = EX_CONFIG

    def __init__(self, message, path=None, lineno=None, param=None):
        self.path, self.lineno, self.param = path, lineno, param
        where = ""
        if path:
            where = f"{path}:{lineno}: " if lineno else f"{path}: "
        if param:
            where += f"{param}: "
        super().__init__(where + message)


class TableError(ConfigError):
    """A lookup table that cannot be used as configured (its type, its
    file, its rights); the text says which and why."""


class AddressError(PymtaError):
    """A malformed address; the reply is what SMTP answers for it."""

    reply = Reply(501, "5.1.3", "Bad address syntax")
    exit_code = EX_DATAERR


class SpoolError(TempFail):
    """The spool could not take or give a message (disk, permissions)."""

    reply = Reply(451, "4.3.0", "Error writing message to the queue")
    exit_code = EX_TEMPFAIL

    @classmethod
    def writing(cls, e, what):
        """An OSError from writing the queue as a SpoolError with the right
        reply: 452 4.3.1 when the disk or the quota is full."""
        reply = Reply(452, "4.3.1", "Insufficient system storage") \
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else cls.reply
        return cls(f"{what}: {e.strerror or e}", reply)


class DeliveryError(PymtaError):
    """A delivery to one local target that ends with ``reply`` (4xx or
    5xx), raised where that is decided (a lock not had, a mailbox full)."""

    def __init__(self, reply):
        super().__init__(str(reply), reply=reply)


class SpoolCorrupt(PymtaError):
    """A queue file that cannot be parsed."""

    exit_code = EX_DATAERR


def run_program(program, body, *args):
    """Run a program's ``body(*args)`` and map pymta's exceptions to what the
    user sees: ``program: message`` on stderr (``program: fatal: ...`` for a
    configuration error) and the sysexits code; ^C is EX_TEMPFAIL and a
    closed output EX_SOFTWARE."""
    import sys
    try:
        return body(*args)
    except ConfigError as e:
        print(f"{program}: fatal: {e}", file=sys.stderr)
        return EX_CONFIG
    except PymtaError as e:
        print(f"{program}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except BrokenPipeError:
        return EX_SOFTWARE
    except PermissionError as e:
        # A file or directory this user may not touch (the queue, a log):
        # one line, never a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"{program}: {where}{e.strerror or 'Permission denied'}", file=sys.stderr)
        return EX_NOPERM
