"""|command delivery: /bin/sh -c as the recipient, the message on stdin.

The environment is Postfix local(8)'s (command_environment), with what
comes from mail censored by command_expansion_filter; the command runs in
its own session under command_time_limit, killed with its process group
when over; the first lines of its output go into the bounce; exit status
75 (EX_TEMPFAIL) defers, any other failure bounces. local.py runs it in a
fresh child that has become the recipient (or default_privs, never root).
"""

import os
import signal
import subprocess
import threading

from . import address as _address
from .local_target import from_line, prefix, recipient
from .status import EX_TEMPFAIL, READ_SIZE, DeliveryError, Reply

OUTPUT_LINES = 5           # lines of a failed command's output kept for the bounce
OUTPUT_BYTES = 4096


def command_environment(cfg, env, rcpt, target):
    """The environment of a |command, as Postfix's local(8) gives it: who it
    runs as (USER, LOGNAME, HOME, SHELL), the envelope (SENDER, RECIPIENT and
    its LOCAL part, lower case, DOMAIN and address EXTENSION,
    ORIGINAL_RECIPIENT before aliasing), the client (CLIENT_*, SASL_USERNAME),
    PATH from command_path. Values that come from mail have every character
    outside command_expansion_filter replaced by "_"."""
    allowed = frozenset(cfg.command_expansion_filter)

    def censor(value):
        return "".join(c if c in allowed else "_" for c in value or "")

    to = recipient(rcpt)
    local, domain = _address.split(to)
    local = _address.unquote_local(local).lower()     # "a b"@x: LOCAL is a b
    delim = cfg.recipient_delimiter
    extension = local.split(delim, 1)[1] if delim and delim in local else ""
    environ = {"HOME": target.home or "/", "USER": target.user, "LOGNAME": target.user,
               "SHELL": target.shell or "/bin/sh", "PATH": cfg.command_path,
               "SENDER": censor(env.sender), "RECIPIENT": censor(to),
               "LOCAL": censor(local), "DOMAIN": censor(domain.lower()),
               "EXTENSION": censor(extension),
               "ORIGINAL_RECIPIENT": censor(rcpt.parent or rcpt.address)}
    for name, value in (("CLIENT_ADDRESS", env.client_addr), ("CLIENT_HOSTNAME", env.client_name),
                        ("CLIENT_HELO", env.helo), ("CLIENT_PROTOCOL", env.protocol),
                        ("SASL_USERNAME", env.auth_user)):
        if value:
            environ[name] = censor(value)
    tz = os.environ.get("TZ")
    if tz:
        environ["TZ"] = tz
    return environ


def deliver(cfg, env, rcpt, target, df):
    """|command delivery: /bin/sh -c, the message on stdin (after the From_
    line unless command_from_line is off, and with a final newline), a time
    limit, exit codes."""
    environ = command_environment(cfg, env, rcpt, target)
    cwd = target.home if target.home and os.path.isdir(target.home) else "/"
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", target.command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=environ, cwd=cwd, start_new_session=True, close_fds=True)
    except OSError as e:
        raise DeliveryError(Reply(451, "4.3.0", f"cannot run /bin/sh: {e.strerror}")) from None
    output = bytearray()

    def reader():
        while True:
            chunk = proc.stdout.read(READ_SIZE)
            if not chunk:
                return
            if len(output) < OUTPUT_BYTES:
                output.extend(chunk[: OUTPUT_BYTES - len(output)])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    timed_out = []

    def kill():
        timed_out.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(cfg.command_time_limit, kill)
    timer.start()
    try:
        try:
            head = prefix(env, rcpt)
            if cfg.command_from_line:
                head = from_line(env) + head
            proc.stdin.write(head)
            last = b"\n"
            while True:
                chunk = df.read(READ_SIZE)
                if not chunk:
                    break
                proc.stdin.write(chunk)
                last = chunk[-1:]
            if last != b"\n":
                proc.stdin.write(b"\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass   # a command need not read all of its input
        rc = proc.wait()
        t.join(5)
    finally:
        timer.cancel()
    lines = [ln.strip() for ln in bytes(output).decode("utf-8", "replace").splitlines() if ln.strip()]
    said = "; ".join(lines[:OUTPUT_LINES])
    said = f": {said}" if said else ""
    if timed_out:
        return Reply(554, "5.3.0", f"command time limit exceeded ({cfg.command_time_limit}s): "
                                   f"{target.command}{said}")
    if rc == 0:
        return Reply(250, "2.0.0", f"delivered to command: {target.command}")
    if rc < 0:
        return Reply(554, "5.3.0", f"command died with signal {-rc}: {target.command}{said}")
    if rc == EX_TEMPFAIL:
        return Reply(451, "4.3.0", f"command exit status {rc} (temporary): {target.command}{said}")
    return Reply(554, "5.3.0", f"command exit status {rc}: {target.command}{said}")
