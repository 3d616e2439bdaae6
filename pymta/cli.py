"""sendmail, mailq and newaliases: the command line, and nothing else.

The only module that reads argv, loads the configuration, sets up logging
and exits. The personality comes from ``basename(argv[0])``. sendmail's
syntax is not getopt's (``-q`` takes an optional attached argument, ``-o``
and ``-b`` take letters), so the parser below follows sendmail's own rules:
single-letter flags may be grouped (``-ti``), and a flag that takes a value
takes the rest of its word or, if that is empty, the next word.
"""

import os
import sys

from .maillog import setup_logging
from .options import Options
from .status import EX_USAGE, PymtaError, run_program

USAGE = """\
usage: sendmail [-t] [-i] [-f sender] [-F name] [-odb|-odi|-odq] [-oem|-oep|-oeq]
                [-B 7BIT|8BITMIME] [-N dsn] [-R full|hdrs] [-V envid] [-v]
                [-C file] [-O name=value] [--] [recipient ...]
       sendmail -bs | -bd | -bD [-q interval] | -bp | -bP | -bi | -bv address ...
       sendmail -q[interval] [-qI|-qR|-qS[!]substring] [-Q[reason]] [-v]
       sendmail -d0                     (print the configuration, as pymta config)
       mailq [-v] [-c] [--json] [-qI|-qR|-qS[!]substring]
       newaliases
See sendmail(8)."""

# Flags that take a value (attached or in the next word).
_WITH_VALUE = set("BCdfFhLNoOpRrVXA")
# Flags that take only an attached, optional value.
_ATTACHED_ONLY = set("bqQe")
# Flags with no value.
_PLAIN = set("tivnmsUGx")


class UsageError(PymtaError):
    """A bad command line: ``sendmail: message``, exit 64."""

    exit_code = EX_USAGE


def parse_time_arg(text):
    from .config import parse_time
    try:
        return parse_time(text, "m") if text.isdigit() else parse_time(text)
    except ValueError:
        raise UsageError(f"bad queue interval {text!r}") from None


def _apply_o(opts, value):
    """sendmail's -o: a one-letter option and its value (-oi, -odb, -oem)."""
    if not value:
        raise UsageError("-o needs an option letter")
    letter, rest = value[0], value[1:]
    if letter == "i":
        opts.ignore_dots = rest.lower() not in ("false", "f", "n", "no")
    elif letter == "d":
        if rest[:1] not in ("b", "i", "q", "d") or len(rest) != 1:
            raise UsageError(f"bad delivery mode -od{rest}")
        opts.delivery_mode = "q" if rest == "d" else rest
    elif letter == "e":
        if rest[:1] not in ("m", "p", "q", "w", "e") or len(rest) != 1:
            raise UsageError(f"bad error mode -oe{rest}")
        opts.error_mode = rest
    elif letter == "Q":
        opts.overrides.append(f"queue_directory={rest}")
    elif letter in ("m", "L", "b", "s", "c", "R"):
        pass  # me-too, log level, other sendmail tunables without meaning here
    else:
        raise UsageError(f"unknown option -o{value}")


def _apply_q(opts, value):
    if opts.mode == "m":
        opts.mode = "q"
    if value == "":
        opts.queue_interval = opts.queue_interval or 0
        return
    kind = value[0]
    if value == "Q":
        # -qQ alone: the held (quarantined) messages, whatever their reason.
        opts.queue_filters.append(("Q", "", False))
        opts.queue_interval = opts.queue_interval or 0
        return
    if kind in "IRSQ" and len(value) > 1 or kind in "IRS":
        sub = value[1:]
        negate = sub.startswith("!")
        if negate:
            sub = sub[1:]
        if not sub:
            raise UsageError(f"-q{kind} needs a substring")
        opts.queue_filters.append((kind, sub, negate))
        opts.queue_interval = opts.queue_interval or 0
    elif kind == "f":
        opts.queue_interval = 0
    else:
        opts.queue_interval = parse_time_arg(value)


def parse_args(argv, program="sendmail"):
    """Options from sendmail's argv (without argv[0]); raises UsageError."""
    opts = Options(program=program)
    if program == "mailq":
        opts.mode = "p"
    elif program == "newaliases":
        opts.mode = "i"
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            opts.recipients.extend(args[i:])
            break
        if word == "--json" and opts.mode in ("p", "P"):
            opts.json = True
            continue
        if not word.startswith("-") or word == "-":
            opts.recipients.append(word)
            continue
        j = 1
        while j < len(word):
            flag = word[j]
            rest = word[j + 1:]
            if flag in _ATTACHED_ONLY:
                value = rest
                j = len(word)
            elif flag in _WITH_VALUE:
                if rest:
                    value = rest
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise UsageError(f"option -{flag} requires a value")
                j = len(word)
            elif flag in _PLAIN or (flag == "c" and opts.mode in ("p", "P")):
                value = None
                j += 1
            else:
                raise UsageError(f"unknown option -{flag}")
            _apply(opts, flag, value)
    return opts


def _apply(opts, flag, value):
    if flag == "b":
        if value not in ("m", "s", "d", "D", "p", "P", "i", "v"):
            raise UsageError(f"unknown mode -b{value}")
        opts.mode = value
        if value == "P":
            opts.count_only = True
    elif flag == "t":
        opts.read_recipients = True
    elif flag == "i":
        opts.ignore_dots = True
    elif flag in ("f", "r"):
        opts.sender = value
    elif flag == "F":
        opts.fullname = value
    elif flag == "o":
        _apply_o(opts, value)
    elif flag == "e":
        _apply_o(opts, "e" + value)
    elif flag == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"bad body type -B{value} (7BIT or 8BITMIME)")
        opts.body_type = value.upper()
    elif flag == "N":
        words = [w.strip().lower() for w in value.split(",") if w.strip()]
        if not words or any(w not in ("never", "success", "failure", "delay") for w in words) \
                or ("never" in words and len(words) > 1):
            raise UsageError(f"bad -N {value!r} (never, or success,failure,delay)")
        opts.dsn_notify = ",".join(words)
    elif flag == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"bad -R {value!r} (full or hdrs)")
        opts.dsn_ret = value.upper()
    elif flag == "V":
        opts.dsn_envid = value
    elif flag == "v":
        opts.verbose = True
    elif flag == "L":
        opts.log_tag = value
    elif flag == "X":
        opts.traffic_file = value
    elif flag == "C":
        opts.config_path = value
    elif flag == "O":
        opts.overrides.append(value)
    elif flag == "q":
        _apply_q(opts, value)
    elif flag == "Q":
        opts.queue_hold = value
        if opts.mode == "m":
            opts.mode = "q"
        opts.queue_interval = opts.queue_interval or 0
    elif flag == "h":
        if not value.isdigit():
            raise UsageError(f"bad hop count -h {value!r}")
        opts.hop_count = int(value)
    elif flag == "n":
        opts.no_alias = True
    elif flag == "c":
        opts.count_only = True
    elif flag == "d":
        opts.debug = value
        if value.split(".")[0] == "0" and opts.mode == "m":
            opts.mode = "d0"
    elif flag == "p":
        pass  # -p protocol:host (sets $r/$s): accepted for trusted callers, unused
    elif flag == "A":
        pass  # -Ac / -Am: which submit.cf; there is only one configuration
    # m, s, U, G, x: accepted, no meaning here.


def _dispatch(cfg, opts):
    mode = opts.mode
    if mode == "m":
        from . import inject
        return inject.main(cfg, opts)
    if mode in ("p", "P"):
        from . import mailq
        return mailq.main(cfg, opts)
    if mode == "d0":
        from . import config
        sys.stdout.write(config.dump(cfg))     # as `pymta config`: expanded
        return 0
    if mode == "s":
        from . import smtpd_pump
        return smtpd_pump.serve_stdio(cfg, opts)
    if mode in ("d", "D"):
        from . import daemon
        return daemon.main(cfg, opts)
    if mode == "i":
        from . import aliases
        return aliases.newaliases_main(cfg, opts)
    if mode == "v":
        from . import route
        return route.verify_main(cfg, opts)
    if mode == "q":
        from . import queue_run
        return queue_run.main(cfg, opts)
    raise UsageError(f"unknown mode {mode}")


def main(argv=None):
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "sendmail"
    if program not in ("mailq", "newaliases"):
        program = "sendmail"
    try:
        opts = parse_args(argv[1:], program)
    except UsageError as e:
        print(f"{program}: {e}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return EX_USAGE
    return run_program(program, _run, opts)


def _run(opts):
    from . import config
    cfg = config.load(opts.config_path, opts.overrides)
    log = setup_logging(cfg, foreground=opts.mode == "D", tag=opts.log_tag,
                        verbose=opts.verbose, light=opts.mode == "m")
    if cfg.warnings:
        warn_unused(cfg, log, opts.program,
                    loud=opts.mode in ("d", "D", "d0", "i") or sys.stderr.isatty())
    return _dispatch(cfg, opts)


def warn_unused(cfg, log, program, loud=True):
    """Postfix's "unused parameter" warnings: logged, and on stderr where an
    administrator reads it (the daemon's start, -d0, newaliases, a terminal),
    not for every program that submits mail through sendmail."""
    for text in cfg.warnings:
        log.warning(f"warning: {text}")
        if loud:
            print(f"{program}: warning: {text}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
