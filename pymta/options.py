"""The parsed sendmail command line, as handed from cli.py to the modules."""

from .record import Record


class Options(Record):
    _fields = (
        ("program", "sendmail"),          # sendmail, mailq or newaliases (argv[0])
        ("mode", "m"),                    # -b letter: m deliver, s stdin SMTP, d daemon,
                                          # D foreground daemon, p list queue, P count,
                                          # i newaliases, v verify; "q" queue run; "d0" config dump
        ("recipients", list),
        ("read_recipients", False),       # -t
        ("ignore_dots", False),           # -i, -oi
        ("sender", None),                 # -f / -r
        ("fullname", None),               # -F
        ("delivery_mode", None),          # -od: b background, i interactive, q queue only;
                                          # None: the delivery_mode parameter
        ("error_mode", "p"),              # -oe: p print, m mail, q quiet, w write, e
        ("body_type", ""),                # -B 7BIT | 8BITMIME
        ("dsn_notify", None),             # -N never | success,failure,delay
        ("dsn_ret", ""),                  # -R full | hdrs
        ("dsn_envid", ""),                # -V
        ("verbose", False),               # -v
        ("log_tag", None),                # -L
        ("traffic_file", None),           # -X
        ("config_path", None),            # -C
        ("overrides", list),              # -O name=value
        ("queue_interval", None),         # -q30m: seconds; -q alone: 0 (one run)
        ("queue_filters", list),          # [(kind, substring, negate)]: I, R, S, Q
        ("queue_hold", None),             # -Q[reason]: hold (reason) or release ("")
        ("hop_count", 0),                 # -h
        ("no_alias", False),              # -n
        ("json", False),                  # mailq --json
        ("count_only", False),            # mailq -c (and -bP)
        ("debug", None),                  # -d flags
        ("args", list),                   # extra words after the mode's flags
    )
