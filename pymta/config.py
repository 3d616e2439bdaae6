"""pymta.conf: Postfix main.cf syntax, Postfix parameter names.

The file holds ``name = value`` lines. A line that starts with white space
continues the previous one; a line whose first non-blank character is ``#``
is a comment. ``$name`` and ``${name}`` expand to another parameter's value.
Every parameter is declared in :data:`PARAMS` with its type, default and one
line of documentation; ``man/pymta.conf.5`` and ``sendmail -bP`` are made
from that table. An unknown name or a bad value is a :class:`ConfigError`
naming the file, the line and the parameter (exit 78, EX_CONFIG).

The result is a frozen :class:`Config` passed explicitly; there is no global.
"""

import os

from .status import ConfigError, TableError

DEFAULT_PATH = "/etc/pymta/pymta.conf"

# Parameter types. Times take a unit letter (s, m, h, d, w); a bare number
# uses the parameter's default unit, as in Postfix.
STR, INT, SIZE, TIME, BOOL, LIST, ENUM = "str", "int", "size", "time", "bool", "list", "enum"

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class P:
    """One declared parameter."""

    __slots__ = ("name", "type", "default", "doc", "unit", "choices", "section")

    def __init__(self, name, type, default, doc, unit="s", choices=(), section="general"):
        self.name, self.type, self.default, self.doc = name, type, default, doc
        self.unit, self.choices, self.section = unit, tuple(choices), section


def _host():
    return os.uname().nodename or "localhost"   # gethostname(), without importing socket


def _default_hostname():
    name = _host()
    return name if "." in name else name + ".localdomain"


def _default_domain():
    name = _default_hostname()
    return name.split(".", 1)[1] if "." in name else "localdomain"


# Every parameter is documented from this table: after adding or changing one,
# regenerate the sample config and the man page (tests/test_config.py checks):
#   python -m pymta.confdoc conf > etc/pymta.conf
#   python -m pymta.confdoc man > man/pymta.conf.5
_PARAMS = [
    P("config_directory", STR, "/etc/pymta", "Directory of the configuration file; set from -C, for use as $config_directory.", section="files"),
    # -- identity and addressing
    P("myhostname", STR, _default_hostname(), "Fully qualified name of this host, used in HELO, Received: and bounces.", section="identity"),
    P("mydomain", STR, _default_domain(), "This host's domain; by default myhostname less its first label.", section="identity"),
    P("myorigin", STR, "$myhostname", "Domain appended to unqualified addresses of local submissions.", section="identity"),
    P("mydestination", LIST, "$myhostname, localhost.$mydomain, localhost", "Domains delivered locally on this host.", section="identity"),
    P("mynetworks", LIST, "127.0.0.0/8, [::1]/128", "Client networks trusted to relay through this host (CIDR).", section="identity"),
    P("relay_domains", LIST, "", "Remote domains this host accepts mail for from anyone and relays.", section="identity"),
    P("relayhost", STR, "", "Send all non-local mail to this host: host, host:port, [host] or [host]:port (brackets: no MX lookup).", section="identity"),
    P("mail_name", STR, "pymta", "The name of the mail system in the banner and Received: lines.", section="identity"),
    P("recipient_delimiter", STR, "+", "Separator of user+tag extensions; an unknown user+tag falls back to user. Empty disables.", section="identity"),
    P("trusted_users", LIST, "root, daemon, $mail_owner", "Users who may set the sender with -f without an X-Authentication-Warning: header.", section="identity"),
    # -- files and ownership
    P("queue_directory", STR, "/var/spool/pymta", "The queue: qf/df file pairs, and the maildrop for unprivileged submissions.", section="files"),
    P("mail_spool_directory", STR, "/var/mail", "Directory of the users' mbox files.", section="files"),
    P("home_mailbox", STR, "", "Mailbox relative to the user's home instead of mail_spool_directory; ending in / means Maildir.", section="files"),
    P("virtual_alias_maps", LIST, "", "Tables of virtual aliases (user@domain, user, @domain -> one or more addresses), applied to every recipient before local aliases; see pymta-tables(5).", section="tables"),
    P("transport_maps", LIST, "", "Tables of 'domain transport:nexthop' entries routing domains to a given hop (smtp:[host]:port), to local delivery (local:) or to a refusal (error:text); .domain matches subdomains, * every other remote domain; see pymta(8) and pymta-tables(5).", section="tables"),
    P("virtual_alias_domains", LIST, "", "Domains that exist only in virtual_alias_maps: mail for them is accepted from anyone, and an address with no entry is refused at RCPT (550 5.1.1).", section="tables"),
    P("canonical_maps", LIST, "", "Tables rewriting sender and recipient addresses, in the envelope and in the headers, of mail submitted locally, from mynetworks or by an authenticated client.", section="tables"),
    P("sender_canonical_maps", LIST, "", "As canonical_maps, for sender addresses only (envelope sender, From, Sender, Reply-To...); tried before canonical_maps.", section="tables"),
    P("recipient_canonical_maps", LIST, "", "As canonical_maps, for recipient addresses only (envelope recipients, To, Cc...); tried before canonical_maps.", section="tables"),
    P("masquerade_domains", LIST, "", "Domains that hide their subdomains in sender addresses of rewritten mail (host.example.com -> example.com); a domain written !domain is never masqueraded.", section="tables"),
    P("masquerade_exceptions", LIST, "", "Local parts (e.g. root) whose addresses are never masqueraded.", section="tables"),
    P("smtp_generic_maps", LIST, "", "Tables rewriting addresses in mail leaving by SMTP (envelope sender and recipients, and headers), e.g. root@host.lan -> admin@example.com behind a smarthost.", section="tables"),
    P("relay_recipient_maps", LIST, "", "Tables of the valid addresses of relay_domains (a backup MX): a recipient in those domains with no entry is refused at RCPT (550 5.1.1). Empty: every address is accepted.", section="tables"),
    P("alias_maps", LIST, "hash:/etc/aliases", "The aliases file(s); a hash: prefix is accepted and names the same file.", section="files"),
    P("alias_database", LIST, "$alias_maps", "The aliases file(s) that newaliases rebuilds.", section="files"),
    P("forward_path", LIST, "$home/.forward", "Where a user's .forward file is looked for ($home, $user expand).", section="files"),
    P("mail_owner", STR, "mail", "The unprivileged user that owns the queue and speaks SMTP.", section="files"),
    P("default_privs", STR, "nobody", "The user that runs programs and writes files named in the aliases file.", section="files"),
    P("data_directory", STR, "/var/lib/pymta", "Where remote delivery keeps what it learns (MTA-STS policies); made by root, mode 0700, when first needed.", section="files"),
    P("pid_file", STR, "/run/pymta.pid", "The daemon's process id file.", section="files"),
    P("smtpd_sasl_password_file", STR, "/etc/pymta/passwd", "Credentials for SMTP AUTH: user:salted-hash lines (see pymta(8)).", section="files"),
    P("maillog_file", STR, "", "Write the mail log to this file (created 0640 root:adm, reopened on SIGHUP); empty: stderr with -bD, else syslog, else (no /dev/log) /var/log/pymta.log.", section="files"),
    P("syslog_facility", STR, "mail", "Syslog facility of the mail log.", section="files"),
    P("syslog_name", STR, "pymta", "Syslog identifier of the mail log.", section="files"),
    # -- limits
    P("message_size_limit", SIZE, "10240000", "Largest message accepted, in bytes; 0 means no limit.", section="limits"),
    P("queue_minfree", SIZE, "20971520", "Free bytes the queue file system must keep; below it MAIL gets 452 4.3.1.", section="limits"),
    P("smtpd_recipient_limit", INT, "1000", "Most recipients in one SMTP transaction; more get 452 4.5.3.", section="limits"),
    P("hopcount_limit", INT, "50", "Most Received: headers a message may carry before it is refused as a loop.", section="limits"),
    P("line_length_limit", SIZE, "1000", "Longest text line in bytes (CRLF included) before the smtpd_long_line_action applies.", section="limits"),
    P("mailbox_size_limit", SIZE, "51200000", "Largest mailbox or file a local delivery may grow; 0 means no limit.", section="limits"),
    P("header_size_limit", SIZE, "102400", "Largest header section of a message in bytes.", section="limits"),
    # -- the SMTP server
    P("smtpd_listen", LIST, "127.0.0.1:25, [::1]:25", "Addresses the SMTP server listens on: address:port, IPv6 as [::1]:25.", section="smtpd"),
    P("submission_listen", LIST, "", "Addresses of the submission service (port 587): AUTH is required before MAIL.", section="smtpd"),
    P("submissions_listen", LIST, "", "Addresses of the submission service with implicit TLS (port 465, RFC 8314): TLS from the first byte (smtpd_tls_cert_file is needed), then AUTH is required before MAIL.", section="smtpd"),
    P("smtpd_banner", STR, "$myhostname ESMTP $mail_name", "Text after 220 in the greeting.", section="smtpd"),
    P("smtpd_timeout", TIME, "300s", "Time a client has to send each command or each block of message data.", section="smtpd"),
    P("smtpd_stress_timeout", TIME, "10s", "smtpd_timeout while a listener is under stress (every slot of its share of smtpd_session_limit in use, so new clients get 421; smtpd_process_model = loop or threads), as Postfix's ${stress?{10}:{300}}s: idle clients make room sooner. 0 disables.", section="smtpd"),
    P("smtpd_min_data_rate", INT, "64", "Slowest average rate in bytes per second accepted during DATA; 0 disables.", section="smtpd"),
    P("smtpd_process_model", ENUM, "loop", "How sessions run: loop (one event loop per listener, the fsyncs of its commits done as smtpd_loop_fsync says, with threads for lookups and TLS sessions), threads (a thread per session, the sessions sharing the fsyncs of the queue directory) or fork (a child process per session); pymta(8) says when to choose which.", choices=("loop", "threads", "fork"), section="smtpd"),
    P("smtpd_loop_fsync", ENUM, "aio", "How the event loop (smtpd_process_model = loop) has the fsyncs of its commits done without waiting for them: aio (Linux's asynchronous I/O: the kernel does each fsync and the loop is told when it is done; syncer processes where the kernel cannot, older than 4.18 or under a seccomp filter) or processes (eight syncer processes per listener, which the descriptors are sent to). Takes a restart.", choices=("aio", "processes"), section="smtpd"),
    P("smtpd_listeners", INT, "0", "Listener processes of the daemon, each with its event loop on the same sockets; 0: one per CPU but one (left to the deliveries), at least 2 (1 on a one-CPU machine), at most 4.", section="smtpd"),
    P("smtpd_session_limit", INT, "100", "Most SMTP sessions at once; more get 421. Each listener process admits its share (the limit divided by smtpd_listeners, rounded up).", section="smtpd"),
    P("smtpd_client_connection_count_limit", INT, "20", "Most simultaneous sessions from one client address, well under smtpd_session_limit so that one client cannot lock the others out; more get 421. Each listener process admits its share, as for smtpd_session_limit. 0: no limit.", section="smtpd"),
    P("smtpd_client_event_limit_exceptions", LIST, "$mynetworks", "Clients (addresses and networks, mynetworks syntax) exempt from smtpd_client_connection_count_limit, as in Postfix.", section="smtpd"),
    P("smtpd_per_record_deadline", BOOL, "yes", "smtpd_timeout limits the time to send a whole command line, and each message line (a longer line: each line_length_limit bytes of it), not each read: a client trickling a byte at a time is dropped. no: the time between two reads.", section="smtpd"),
    P("smtpd_greet_pause", TIME, "0s", "Wait this long before the greeting; a client that talks first gets 554.", section="smtpd"),
    P("smtpd_peername_lookup", BOOL, "yes", "Look up the client's host name (reverse, confirmed forward): in the dns_nameservers when set, else through the system's resolver in its order (/etc/hosts, then DNS).", section="smtpd"),
    P("smtpd_enable_expn", BOOL, "no", "Answer EXPN with the expansion of a list (else 502).", section="smtpd"),
    P("smtpd_hard_error_limit", INT, "20", "Errors a client may make in one session before it gets 421 and is disconnected.", section="smtpd"),
    P("smtpd_sasl_failure_limit", INT, "3", "Failed AUTH attempts a client may make in one session; the last one's 535 is followed by 421 and the connection is closed.", section="smtpd"),
    P("smtpd_sasl_failure_delay", TIME, "1s", "The reply to the n-th failed AUTH of a session is delayed n times this, and nothing more is read from the client meanwhile; 0 disables.", section="smtpd"),
    P("smtpd_long_line_action", ENUM, "keep", "A message line over line_length_limit: keep (store it whole, never cut) or reject (550 5.6.0).", choices=("keep", "reject"), section="smtpd"),
    P("smtpd_tls_cert_file", STR, "", "PEM certificate (chain) of the SMTP server for STARTTLS.", section="tls"),
    P("smtpd_tls_key_file", STR, "$smtpd_tls_cert_file", "PEM private key of the SMTP server.", section="tls"),
    P("smtpd_tls_security_level", ENUM, "may", "none: no STARTTLS; may: offer it; encrypt: require it before MAIL.", choices=("none", "may", "encrypt"), section="tls"),
    P("smtp_tls_security_level", ENUM, "may", "Outbound TLS, with Postfix's meanings: none (never), may (STARTTLS when offered, certificate not checked, plain text if the handshake fails), encrypt (TLS required, certificate not checked), verify (TLS required, the certificate must chain to smtp_tls_CAfile and name the server: the MX host or relayhost name), secure (as verify, but the name must be the next-hop domain or one under it, never a name learnt from an MX record), dane (RFC 7672: TLSA records authenticated by a validating resolver in dns_nameservers authenticate the server; without them, as may). A certificate refused at verify and above defers the message with 4.7.5; nothing is sent, no fall-back to plain text.", choices=("none", "may", "encrypt", "verify", "secure", "dane"), section="tls"),
    P("smtp_tls_CAfile", STR, "", "PEM file of the certificate authorities that remote delivery trusts at the verify and secure levels and for MTA-STS policies; empty means the system's store.", section="tls"),
    P("smtp_tls_policy_maps", LIST, "", "Files of per-destination TLS policies, Postfix's syntax: 'destination level [match=name:name...]', the destination the relayhost as written, else the recipient domain or .parent-domain; levels none, may, encrypt, dane, dane-only, verify, secure; an entry overrides smtp_tls_security_level and MTA-STS. A hash: prefix names the same file.", section="tls"),
    P("smtp_mta_sts_enable", BOOL, "no", "Apply the recipient domains' MTA-STS policies (RFC 8461) to MX deliveries: in enforce mode only the MX hosts the policy names, with a verified certificate. Policies are cached in $data_directory/mta-sts for their max_age.", section="tls"),
    P("smtp_tls_wrappermode", BOOL, "no", "Speak TLS from the first byte (implicit TLS, RFC 8314, a relayhost on port 465) instead of STARTTLS; the security level is then at least encrypt.", section="tls"),
    # -- the queue and retries
    P("maximal_queue_lifetime", TIME, "5d", "Time a message may stay queued before it is bounced.", unit="d", section="queue"),
    P("bounce_queue_lifetime", TIME, "5d", "Time a bounce may stay queued before it is given up.", unit="d", section="queue"),
    P("delay_warning_time", TIME, "0h", "Send the sender a delay warning after this long; 0 disables.", unit="h", section="queue"),
    P("minimal_backoff_time", TIME, "300s", "Shortest wait before a deferred message is tried again.", section="queue"),
    P("maximal_backoff_time", TIME, "4000s", "Longest wait between two tries of a deferred message.", section="queue"),
    P("queue_run_delay", TIME, "300s", "Interval of the daemon's queue runs when -q gives none.", section="queue"),
    P("delivery_mode", ENUM, "background", "How sendmail delivers a submission without -od: background (-odb), interactive (-odi) or queue (-odq).", choices=("background", "interactive", "queue"), section="queue"),
    P("queue_sweep_age", TIME, "1d", "Age after which orphan tf and df files (no qf) are removed by a queue run.", unit="d", section="queue"),
    P("delivery_process_limit", INT, "4", "Processes a queue run delivers with (each runs its share of delivery_thread_limit).", section="queue"),
    P("in_flow_delay", TIME, "1s", "When deliveries fall behind (the daemon's hand-off is full), how long a client waits for the 250 of each message, so that the listeners slow down before memory grows (0: never).", section="queue"),
    P("delivery_thread_limit", INT, "20", "Most deliveries in progress at once in one queue run, and in the daemon's hand-offs: a delivery waiting on the network holds a thread, not a CPU.", section="queue"),
    P("default_destination_concurrency_limit", INT, "20", "Most SMTP connections at once to one destination (next hop and port), across the daemon and every sendmail -q run (0: no limit).", section="queue"),
    P("initial_destination_concurrency", INT, "5", "Most connections at once to a destination that has delivered nothing within smtp_dead_host_time (slow start).", section="queue"),
    P("authorized_mailq_users", LIST, "static:anyone", "Who may list the queue through the daemon (mailq and sendmail -bp by users who cannot read the queue): static:anyone, or user names; root and mail_owner always may.", section="queue"),
    P("bounce_notice_recipient", STR, "postmaster", "Who receives the copy of a bounce that could not be returned (double bounce).", section="queue"),
    P("double_bounce_sender", STR, "double-bounce", "Sender of notices about undeliverable bounces; mail to it is discarded.", section="queue"),
    # -- local delivery
    P("allow_mail_to_commands", LIST, "alias, forward, include", "Where |command targets are allowed: alias, forward, include.", section="local"),
    P("allow_mail_to_files", LIST, "alias, forward, include", "Where /file targets are allowed: alias, forward, include.", section="local"),
    P("command_time_limit", TIME, "1000s", "Time limit of a |command delivery.", section="local"),
    P("command_path", STR, "/usr/bin:/bin", "PATH of |command deliveries.", section="local"),
    P("stale_lock_time", TIME, "500s", "Age after which a mailbox's dot-lock (USER.lock) is taken for the leftover of a killed delivery and removed, as in Postfix.", section="local"),
    P("forward_include_size_limit", SIZE, "1048576", "Largest .forward or :include: file read, in bytes; a larger one is not used (logged). Each is read within 10 seconds.", section="local"),
    P("command_from_line", BOOL, "yes", "Give |command deliveries the mbox From_ line (From sender  date) before the message, as Postfix's local(8) does, so that procmail, formail and the like see the envelope sender.", section="local"),
    P("command_expansion_filter", STR, "1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "Characters allowed in the values of a |command's environment (SENDER, RECIPIENT, LOCAL, ...); any other character is replaced by an underscore, as Postfix does.", section="local"),
    P("mailbox_from_quoting", ENUM, "mboxo", "How a body line that looks like a From_ line is quoted in an mbox: mboxo (a line starting with \"From \" gets a \">\", as Postfix, sendmail's mail.local and procmail write and every reader expects) or mboxrd (also \">From \" and \">>From \" get one more \">\", reversible, for readers that undo it).", choices=("mboxo", "mboxrd"), section="local"),
    # -- remote delivery
    P("smtp_port", INT, "25", "Port that remote delivery connects to.", section="smtp"),
    P("smtp_destination_recipient_limit", INT, "50", "Most recipients per remote SMTP transaction; more go in further transactions (0: no limit).", section="smtp"),
    P("smtp_helo_name", STR, "$myhostname", "Name sent in EHLO/HELO by remote delivery.", section="smtp"),
    P("smtp_connect_timeout", TIME, "30s", "Time allowed to connect to a remote server.", section="smtp"),
    P("smtp_helo_timeout", TIME, "300s", "Time allowed for the greeting and EHLO reply.", section="smtp"),
    P("smtp_dead_host_time", TIME, "300s", "How long a server that refused the connection, timed out or greeted with 421 is skipped, and a destination none of whose servers could be used is marked dead: its messages are deferred with the same reason without connecting (0: never).", section="smtp"),
    P("smtp_data_done_timeout", TIME, "600s", "Time allowed for the reply to the end of the message.", section="smtp"),
    P("smtp_command_timeout", TIME, "300s", "Time allowed for the reply to other commands.", section="smtp"),
    P("smtp_sasl_auth_enable", BOOL, "no", "Log in to the next server with SMTP AUTH (PLAIN or LOGIN) when smtp_sasl_password_maps has credentials for it; only ever over TLS (see pymta(8), Relaying through a provider).", section="smtp"),
    P("smtp_sasl_password_maps", LIST, "", "Files of client credentials, lines 'destination user:password', the destination written as in relayhost ([host]:port) or a host name; a hash: prefix names the same file. Read by the root side only; keep it mode 0600.", section="smtp"),
    P("dns_nameservers", LIST, "", "DNS servers for MX and address lookups (address or address:port); empty means the system resolver.", section="smtp"),
    P("dns_timeout", TIME, "10s", "Time allowed for one DNS lookup before the delivery is deferred.", section="smtp"),
    # -- DKIM signing
    P("dkim_selector", STR, "", "DKIM selector (s=) of the signatures; empty: nothing is signed.", section="dkim"),
    P("dkim_private_key_file", STR, "", "PEM RSA private key for DKIM signing, read by the delivering (privileged) process only; empty: nothing is signed. pymta dkim-keygen makes one.", section="dkim"),
    P("dkim_domains", LIST, "$mydomain", "Sign a message whose From: address is in one of these domains (d= is that domain), when it was submitted locally, from mynetworks or by an authenticated client; mail relayed for others is never signed.", section="dkim"),
]

PARAMS = {p.name: p for p in _PARAMS}

# No regular expressions here, nor in anything else sendmail imports to
# queue a message: importing re (and enum, which it needs) would cost every
# sendmail run (its latency) a third of its time.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _is_name(text):
    """[A-Za-z0-9_]+"""
    return bool(text) and _NAME_CHARS.issuperset(text)


def _is_number(text):
    """[0-9]+"""
    return text.isdigit() and text.isascii()


def expand_refs(value, lookup):
    """Replace each $name or ${name} in ``value`` with ``lookup(name, ref)``
    (``ref`` is the reference's own text, to keep it as it is)."""
    if "$" not in value:
        return value
    out, i, n = [], 0, len(value)
    while True:
        j = value.find("$", i)
        if j < 0:
            out.append(value[i:])
            return "".join(out)
        out.append(value[i:j])
        k = j + 1
        if k < n and value[k] == "{":
            e = value.find("}", k + 1)
            if e > 0 and _is_name(value[k + 1:e]):
                out.append(lookup(value[k + 1:e], value[j:e + 1]))
                i = e + 1
                continue
        else:
            e = k
            while e < n and value[e] in _NAME_CHARS:
                e += 1
            if e > k:
                out.append(lookup(value[k:e], value[j:e]))
                i = e
                continue
        out.append("$")
        i = k


def parse_time(value, unit="s"):
    """'30m' -> 1800; a bare number takes ``unit``. Raises ValueError."""
    v = value.strip()
    letter = v[-1:] if v[-1:] in ("s", "m", "h", "d", "w") else ""
    number = v[:len(v) - len(letter)].rstrip()
    if not _is_number(number):
        raise ValueError(f"bad time value {value!r} (use a number with s, m, h, d or w)")
    return int(number) * _TIME_UNITS[letter or unit]


# -- the values of the parameters whose syntax is more than their type.
# Each check raises ValueError with what is wrong; build() runs the check of
# every parameter whose value is not its default (the defaults are known to
# be good, and sendmail's start-up is its latency).

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_hostname(name, what="host name"):
    """A DNS name: letters, digits, hyphens (and _) in dot-separated labels."""
    if not name or len(name) > 253:
        raise ValueError(f"bad {what} {name!r}")
    for label in name.rstrip(".").split("."):
        if not label or len(label) > 63 or not _HOST_CHARS.issuperset(label) \
                or label[0] == "-" or label[-1] == "-":
            raise ValueError(f"bad {what} {name!r}")


def _is_ipv4(text):
    """Whether ``text`` is a dotted-quad IPv4 address as inet_pton reads
    one (four decimal parts up to 255, no leading zero)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        0 < len(p) <= 3 and p.isascii() and p.isdigit() and (p[0] != "0" or p == "0") and int(p) <= 255
        for p in parts)


def _check_ip(text):
    """4 or 6 for an IPv4 or IPv6 address, else ValueError. Through the C
    socket module, not ipaddress: its imports would cost every sendmail run
    of a configuration that sets mynetworks a good part of its start-up; a
    plain IPv4 address (smtpd_listen's 127.0.0.1) not even that."""
    if _is_ipv4(text):
        return 4
    import _socket
    for family, version in ((_socket.AF_INET, 4), (_socket.AF_INET6, 6)):
        try:
            _socket.inet_pton(family, text.split("%", 1)[0])
            return version
        except (OSError, ValueError):
            continue
    raise ValueError(f"bad IP address {text!r}")


def check_hostport(item, default_port=25, zero_port=False):
    """host, host:port, [host], [host]:port, [IPv6]:port -> (host, port)."""
    host, port = parse_hostport(item, default_port)
    if not (0 if zero_port else 1) <= port <= 65535:
        raise ValueError(f"bad port in {item!r}")
    text = item.strip()
    if text.startswith("["):
        inner = host[5:] if host.lower().startswith("ipv6:") else host
        if any(c in inner for c in ":") or inner.replace(".", "").isdigit():
            _check_ip(inner)
        else:
            check_hostname(inner)
    elif host.replace(".", "").isdigit():
        _check_ip(host)
    else:
        check_hostname(host)
    return host, port


def _check_relayhost(value):
    if value.strip():
        if len(value.split()) != 1:
            raise ValueError(f"bad relayhost {value!r}: one host, [host] or host:port")
        try:
            check_hostport(value, 25)
        except ValueError as e:
            raise ValueError(f"bad relayhost {value!r} (host, host:port, [host] or [host]:port): {e}") from None


def _check_listen(values):
    for item in values:
        host, _ = parse_hostport(item, 25)
        if host:                      # ":25": every address
            check_hostport(item, 25, zero_port=True)


def _check_nameservers(values):
    for item in values:
        host, _ = parse_hostport(item, 53)
        _check_ip(host)


def _check_networks(values):
    for item in values:
        net = item.replace("[", "").replace("]", "") if item.startswith("[") else item
        addr, slash, bits = net.partition("/")
        try:
            version = _check_ip(addr)
            if slash and not (_is_number(bits) and int(bits) <= (32 if version == 4 else 128)):
                raise ValueError(bits)
        except ValueError:
            raise ValueError(f"bad network {item!r} in mynetworks (address/bits, IPv6 as "
                             "[::1]/128)") from None


def _check_domains(values):
    for item in values:
        check_hostname(item, "domain")


_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-$")


def _check_user(value, what):
    if not value or not _USER_CHARS.issuperset(value) or value[0] == "-":
        raise ValueError(f"bad user name {value!r}")


def _check_privs(value):
    _check_user(value, "default_privs")
    if value in ("root", "0"):
        raise ValueError("default_privs must not be root: deliveries to programs and files "
                         "of the aliases would run as root")


def _check_abs(value):
    if not value.startswith("/"):
        raise ValueError(f"not an absolute path: {value!r}")


def _check_abs_or_empty(value):
    if value:
        _check_abs(value)


def _check_home_mailbox(value):
    if value.startswith("/"):
        raise ValueError(f"home_mailbox is relative to the home directory: {value!r}")


def _check_maps(values):
    for item in values:
        kind, sep, path = item.partition(":")
        if not sep:
            path = item
        elif kind not in ("hash", "btree", "lmdb", "cdb", "texthash"):
            raise ValueError(f"bad map type {kind!r} in {item!r} (use hash:/path)")
        _check_abs(path)


def _check_where(values):
    bad = [v for v in values if v not in ("alias", "forward", "include")]
    if bad:
        raise ValueError(f"bad value {bad[0]!r} (alias, forward, include)")


def _check_facility(value):
    names = ("auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news",
             "syslog", "user", "uucp") + tuple(f"local{i}" for i in range(8))
    if value.lower() not in names:
        raise ValueError(f"bad syslog facility {value!r} (mail, daemon, local0..local7, ...)")


def _check_delimiter(value):
    if any(c.isspace() or c in "@<>\"," for c in value):
        raise ValueError(f"bad recipient_delimiter {value!r}")


def _check_port(value):
    if not 0 < value <= 65535:
        raise ValueError(f"bad port {value}")


def _check_users(values):
    for v in values:
        _check_user(v, "trusted_users")


_TABLE_TYPES = frozenset(("hash", "btree", "texthash", "dbm", "sdbm", "lmdb", "cdb"))


def table_paths(items):
    """The files of a maps parameter (a list of ``type:path`` or paths; all
    those types mean the same text file); TableError for another type.
    Here, with str operations, not in pymta.tables: checking a configuration
    that sets a table must not cost every sendmail run the import of
    tables, logging and re."""
    out = []
    for item in items:
        for one in split_list(item):
            kind, colon, rest = one.partition(":")
            path = rest if colon and kind.lower() in _TABLE_TYPES else one
            if ":" in path.split("/", 1)[0]:
                raise TableError(f"{one}: unsupported table type (pymta reads text "
                                 "files: hash:/path, texthash:/path or /path)")
            out.append(path)
    return out


def _check_tables(values):
    try:
        paths = table_paths(values)
    except TableError as e:
        raise ValueError(str(e)) from None
    for path in paths:
        _check_abs(path)


_CHECKS = {
    "virtual_alias_maps": _check_tables,
    "relay_recipient_maps": _check_tables,
    "canonical_maps": _check_tables,
    "sender_canonical_maps": _check_tables,
    "recipient_canonical_maps": _check_tables,
    "smtp_generic_maps": _check_tables,
    "virtual_alias_domains": _check_domains,
    "masquerade_domains": lambda v: _check_domains([d[1:] if d.startswith("!") else d for d in v]),
    "myhostname": check_hostname,
    "mydomain": lambda v: check_hostname(v, "domain"),
    "myorigin": lambda v: check_hostname(v, "domain"),
    "mydestination": _check_domains,
    "relay_domains": _check_domains,
    "relayhost": _check_relayhost,
    "mynetworks": _check_networks,
    "smtpd_listen": _check_listen,
    "submission_listen": _check_listen,
    "dns_nameservers": _check_nameservers,
    "mail_owner": lambda v: _check_user(v, "mail_owner"),
    "default_privs": _check_privs,
    "trusted_users": _check_users,
    "queue_directory": _check_abs,
    "mail_spool_directory": _check_abs,
    "pid_file": _check_abs,
    "maillog_file": _check_abs_or_empty,
    "smtpd_tls_cert_file": _check_abs_or_empty,
    "smtpd_tls_key_file": _check_abs_or_empty,
    "smtpd_sasl_password_file": _check_abs_or_empty,
    "home_mailbox": _check_home_mailbox,
    "alias_maps": _check_maps,
    "alias_database": _check_maps,
    "allow_mail_to_commands": _check_where,
    "allow_mail_to_files": _check_where,
    "syslog_facility": _check_facility,
    "recipient_delimiter": _check_delimiter,
    "smtp_port": _check_port,
    "smtp_sasl_password_maps": _check_tables,
    "smtp_tls_policy_maps": _check_tables,
    "smtp_tls_CAfile": _check_abs_or_empty,
    "data_directory": _check_abs,
}


def split_list(value):
    """Postfix list syntax: items separated by commas and/or white space."""
    return value.replace(",", " ").split()


def _convert(p, raw):
    if p.type in (STR,):
        return raw
    if p.type == LIST:
        return tuple(split_list(raw))
    if p.type in (INT, SIZE):
        if not _is_number(raw.strip()):
            raise ValueError(f"bad number {raw!r}")
        return int(raw)
    if p.type == TIME:
        return parse_time(raw, p.unit)
    if p.type == BOOL:
        v = raw.strip().lower()
        if v in ("yes", "true", "1"):
            return True
        if v in ("no", "false", "0"):
            return False
        raise ValueError(f"bad boolean {raw!r} (use yes or no)")
    if p.type == ENUM:
        v = raw.strip()
        if v not in p.choices:
            raise ValueError(f"bad value {raw!r} (one of: {', '.join(p.choices)})")
        return v
    raise AssertionError(p.type)


def read_lines(text, path):
    """Yield (lineno, name, raw value) from main.cf-style text."""
    current = None  # [lineno, name, value]
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError("continuation line with nothing to continue", path, lineno)
            current[2] += " " + stripped
            continue
        if current is not None:
            yield tuple(current)
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not _is_name(name):
            raise ConfigError(f"expected 'name = value', got {line.strip()!r}", path, lineno)
        current = [lineno, name, value.strip()]
    if current is not None:
        yield tuple(current)


class Config:
    """The effective configuration: attributes named after the parameters.

    ``raw`` keeps the unexpanded strings and ``explicit`` the names set in the
    file or by ``-O``, for ``sendmail -bP``.
    """

    def __init__(self, values, raw, explicit, path, warnings=()):
        # The values are also plain attributes: a parameter is read on
        # every command of every session, and __getattr__ is only the
        # fallback for a name that is none.
        self.__dict__.update(values)
        object.__setattr__(self, "warnings", tuple(warnings))   # "unused parameter" lines
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "explicit", explicit)
        object.__setattr__(self, "path", path)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("Config is frozen")

    def __setstate__(self, state):
        # Unpickling (a fork server's request): without this, pickle's
        # look-up of __setstate__ would reach __getattr__ before _values.
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def get(self, name):
        return self._values[name]

    def expanded(self, name):
        """The parameter's value as text, after $name expansion."""
        return self._expanded[name]

    def with_overrides(self, **overrides):
        """A new Config with some raw values replaced (for tests and -O)."""
        raw = dict(self.raw)
        raw.update({k: str(v) for k, v in overrides.items()})
        return build(raw, set(self.explicit) | set(overrides), self.path, {})

    # Derived helpers used across modules.
    @property
    def local_domains(self):
        domains = self.__dict__.get("_local_domains")
        if domains is None:
            domains = frozenset(d.lower().rstrip(".") for d in self.mydestination)
            object.__setattr__(self, "_local_domains", domains)
        return domains

    def is_local_domain(self, domain):
        return domain.lower().rstrip(".") in self.local_domains


def _expand_all(raw, lines, path, names=None):
    """{name: value with $name expanded} for ``names`` (default: every
    parameter) and the parameters they refer to."""
    out = {}

    def expand(name, stack):
        if name in out:
            return out[name]
        if name in stack:
            chain = " -> ".join(stack + (name,))
            raise ConfigError(f"recursive $ expansion: {chain}", path, lines.get(name), name)
        value = raw[name]

        def sub(ref, text):
            if ref not in raw:
                # Postfix leaves unknown $names (e.g. $home in forward_path) alone.
                return text
            return expand(ref, stack + (name,))

        result = expand_refs(value, sub)
        out[name] = result
        return result

    for name in (raw if names is None else names):
        expand(name, ())
    return out


def _default_mydomain(raw, explicit, lines, path):
    """``raw`` with mydomain, when not set, made from myhostname less its
    first label (Postfix), "localdomain" when myhostname has one label."""
    if "mydomain" in explicit or "myhostname" not in explicit:
        return raw
    host = _expand_all(raw, lines, path, ("myhostname",))["myhostname"].rstrip(".")
    raw = dict(raw)
    raw["mydomain"] = host.split(".", 1)[1] if "." in host else "localdomain"
    return raw


def build(raw, explicit, path, lines, warnings=()):
    raw = _default_mydomain(raw, explicit, lines, path)
    expanded = _expand_all(raw, lines, path)     # once: sendmail's start-up is its latency
    values = {}
    for name, text in expanded.items():
        p = PARAMS[name]
        try:
            values[name] = _convert(p, text)
            check = _CHECKS.get(name)
            if check is not None and raw[name] != p.default:
                check(values[name])
        except ValueError as e:
            raise ConfigError(str(e), path, lines.get(name), name) from None
    cfg = Config(values, raw, frozenset(explicit), path, warnings)
    object.__setattr__(cfg, "_expanded", expanded)
    return cfg


def load(path=None, overrides=(), must_exist=None):
    """Read ``path`` (default $PYMTA_CONFIG or /etc/pymta/pymta.conf).

    ``overrides`` is a sequence of "name=value" strings (``-O``). A missing
    default file means all defaults; a missing file that was named is an error.
    """
    named = path is not None or "PYMTA_CONFIG" in os.environ
    if path is None:
        path = os.environ.get("PYMTA_CONFIG") or DEFAULT_PATH
    if must_exist is None:
        must_exist = named
    raw = {name: p.default for name, p in PARAMS.items()}
    raw["config_directory"] = os.path.dirname(os.path.abspath(path))
    explicit, lines, warnings = set(), {}, []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        if must_exist:
            raise ConfigError("no such file", path) from None
        text = ""
    except OSError as e:
        raise ConfigError(e.strerror or str(e), path) from None
    for lineno, name, value in read_lines(text, path):
        if name not in PARAMS:
            # Postfix's "unused parameter": a typo or another version's
            # setting must not stop the mail. Said by the daemon, pymta check
            # and pymta config (see warn_unused).
            warnings.append(f"{path}, line {lineno}: unused parameter: {name}={value}")
            continue
        raw[name] = value
        explicit.add(name)
        lines[name] = lineno
    for item in overrides:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq:
            raise ConfigError(f"-O {item!r}: expected name=value", "-O")
        if name not in PARAMS:
            raise ConfigError("unknown parameter", "-O", None, name)
        raw[name] = value.strip()
        explicit.add(name)
        lines.pop(name, None)
    return build(raw, explicit, path, lines, warnings)


def from_dict(**values):
    """A Config from defaults plus ``values`` (tests and embedding)."""
    raw = {name: p.default for name, p in PARAMS.items()}
    for k, v in values.items():
        if k not in PARAMS:
            raise ConfigError("unknown parameter", "<dict>", None, k)
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        raw[k] = str(v)
    return build(raw, set(values), "<dict>", {})


def dump(cfg, only_explicit=False, names=None, expand=True, values_only=False, defaults=False):
    """``name = value`` lines like postconf: every parameter sorted, or ``names``
    in their order; ``only_explicit``: those set in the file or by -O;
    ``expand``: with $name expanded (postconf -x), else as written;
    ``defaults``: the defaults (postconf -d); ``values_only``: the values (-h).
    ``sendmail -d0`` and ``pymta config`` print this. Unknown names raise
    KeyError."""
    out = []
    for name in (names or sorted(PARAMS)):
        if name not in PARAMS:
            raise KeyError(name)
        if only_explicit and name not in cfg.explicit:
            continue
        if defaults:
            value = PARAMS[name].default
        else:
            value = cfg.expanded(name) if expand else cfg.raw[name]
        out.append(value if values_only else f"{name} = {value}".rstrip())
    return "\n".join(out) + ("\n" if out else "")


def parse_hostport(item, default_port):
    """'host:port', '[v6]:port', '[v6]', 'host' -> (host, port). Raises ValueError."""
    item = item.strip()
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {item!r}: missing ]")
        if rest.startswith(":"):
            port = rest[1:]
        elif rest == "":
            port = str(default_port)
        else:
            raise ValueError(f"bad address {item!r}")
    elif item.count(":") == 1:
        host, port = item.split(":")
    elif ":" in item:
        raise ValueError(f"bad address {item!r}: write IPv6 as [addr]:port")
    else:
        host, port = item, str(default_port)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {item!r}")
    return host, int(port)
