"""The parsed sendmail command line, as handed from cli.py to the modules."""

from dataclasses import dataclass, field


@dataclass
class Options:
    program: str = "sendmail"        # sendmail, mailq or newaliases (argv[0])
    mode: str = "m"                  # -b letter: m deliver, s stdin SMTP, d daemon,
                                     # D foreground daemon, p list queue, P count,
                                     # i newaliases, v verify; "q" queue run; "d0" config dump
    recipients: list = field(default_factory=list)
    read_recipients: bool = False    # -t
    ignore_dots: bool = False        # -i, -oi
    sender: str = None               # -f / -r
    fullname: str = None             # -F
    delivery_mode: str = None        # -od: b background, i interactive, q queue only;
                                     # None: the delivery_mode parameter
    error_mode: str = "p"            # -oe: p print, m mail, q quiet, w write, e
    body_type: str = ""              # -B 7BIT | 8BITMIME
    dsn_notify: str = None           # -N never | success,failure,delay
    dsn_ret: str = ""                # -R full | hdrs
    dsn_envid: str = ""              # -V
    verbose: bool = False            # -v
    log_tag: str = None              # -L
    traffic_file: str = None         # -X
    config_path: str = None          # -C
    overrides: list = field(default_factory=list)   # -O name=value
    queue_interval: int = None       # -q30m: seconds; -q alone: 0 (one run)
    queue_filters: list = field(default_factory=list)  # [(kind, substring, negate)]: I, R, S, Q
    queue_hold: str = None           # -Q[reason]: hold (reason) or release ("")
    hop_count: int = 0               # -h
    no_alias: bool = False           # -n
    json: bool = False               # mailq --json
    count_only: bool = False         # mailq -c (and -bP)
    debug: str = None                # -d flags
    args: list = field(default_factory=list)        # extra words after the mode's flags
