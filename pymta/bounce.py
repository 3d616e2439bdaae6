"""RFC 3464 delivery status notifications: bounces and delay warnings.

``report()`` writes one ``multipart/report; report-type=delivery-status``
message for a set of recipients that failed (or are delayed) together and
commits it to the spool with the null sender, like any other message: a
readable text part, the ``message/delivery-status`` part, then the
original message (``message/rfc822``) or only its header
(``text/rfc822-headers``, for RET=HDRS or a delay warning), streamed from
the df. A message from ``<>`` is never bounced: its report goes to
``bounce_notice_recipient`` from ``double_bounce_sender`` instead, and a
failed double bounce is only logged.
"""

import logging
import secrets
import time

from . import envelope as E
from . import headers
from .address import qualify
from .queue_dir import Spool
from .status import MESSAGE_BLOCK



def double_bounce_address(cfg):
    return qualify(cfg.double_bounce_sender, cfg.myorigin)


def _relay_host(relay):
    """'mx.example [192.0.2.1]:25' -> 'mx.example'."""
    return relay.split(" ")[0].split("[")[0] if relay else ""


def _clean(text):
    """What a bounce copies from a client or a remote server (an address,
    ENVID, ORCPT, a reply text) as one line of printable text: a control
    character (CR, LF, NUL, TAB, DEL, C1), a line separator or a byte that
    was not UTF-8 becomes its xtext form ``+XX``, so no text can end a
    header field, start a MIME boundary or a header of its own. CR and LF
    of a multi-line reply become a space first."""
    if text.isprintable():
        return text
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return "".join(c if c.isprintable() else f"+{ord(c) & 0xFF if 0xDC80 <= ord(c) <= 0xDCFF else ord(c):02X}"
                   for c in text)


def _diagnostic(r):
    return _clean(r.text or r.dsn)


def _final(r):
    """(Final-Recipient address, X-Actual-Recipient or ""): a |command or
    /file is reported as the address that led there, and named apart."""
    led = getattr(r, "via", "") or r.parent
    if r.address.startswith(("|", "/")) and led:
        return led, r.address
    return r.address, ""


def _status_fields(cfg, env, rcpts, action, now):
    lines = [f"Reporting-MTA: dns; {cfg.myhostname}", f"X-Pymta-Queue-ID: {env.id}"]
    if env.envid:
        lines.append(f"Original-Envelope-Id: {_clean(env.envid)}")
    lines.append(f"Arrival-Date: {headers.date(env.created or now)}")
    for r in rcpts:
        final, actual = _final(r)
        lines.append("")
        lines.append(f"Final-Recipient: rfc822; {_clean(final)}")
        if r.orcpt:
            kind, _, value = r.orcpt.partition(";")
            lines.append(f"Original-Recipient: {_clean(kind.strip())}; {_clean(value.strip())}")
        if actual:
            lines.append(f"X-Actual-Recipient: X-unix; {_clean(actual)}")
        lines.append(f"Action: {action}")
        default = {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")
        lines.append(f"Status: {r.dsn or default}")
        host = _relay_host(r.relay)
        if host and not host.startswith("local"):
            lines.append(f"Remote-MTA: dns; {host}")
        diag = _diagnostic(r) if r.text and action in ("failed", "delayed", "relayed") else ""
        if diag:
            lines.append(f"Diagnostic-Code: smtp; {diag}")
        lines.append(f"Last-Attempt-Date: {headers.date(r.updated or env.last_attempt or now)}")
        if action == "delayed":
            until = env.created + (cfg.bounce_queue_lifetime if env.is_bounce
                                   else cfg.maximal_queue_lifetime)
            lines.append(f"Will-Retry-Until: {headers.date(until)}")
    return "\n".join(lines) + "\n"


def _text_part(cfg, env, rcpts, action, double, now):
    who = "your message"
    if double:
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                "A message with the null sender <> (a bounce or other notice) could\n"
                "not be delivered. It is reported here instead of being returned.\n")
    elif action == "failed":
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                f"I'm sorry to have to inform you that {who} could not\n"
                "be delivered to one or more recipients. It's attached below.\n\n"
                "For further assistance, please send mail to postmaster.\n")
    elif action == "delivered":
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                "Your message was successfully delivered to the destination(s)\n"
                "listed below. Its headers are attached.\n")
    elif action == "expanded":
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                "Your message was delivered to the alias or mailing list below, which\n"
                "passed it on to its members; you will not be told of each delivery.\n"
                "Its headers are attached.\n")
    elif action == "relayed":
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                "Your message was successfully relayed to the destination(s) listed\n"
                "below, to a server that does not report delivery status: you may\n"
                "still receive notices of errors from other systems. Its headers are\n"
                "attached.\n")
    else:
        hours = max(1, int((now - env.created) // 3600)) if env.created else 0
        head = (f"This is the mail system at host {cfg.myhostname}.\n\n"
                f"#################################################################\n"
                f"# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
                f"#################################################################\n\n"
                f"Your message could not be delivered for {hours} hour(s).\n"
                "It will be retried until it is too old; the headers are attached.\n")
    lines = [head, ""]
    for r in rcpts:
        relay = f" (relay {_clean(r.relay)})" if r.relay else ""
        lines.append(f"<{_clean(_final(r)[0])}>: {_diagnostic(r)}{relay}")
    return "\n".join(lines) + "\n"


def report(cfg, env, rcpts, action="failed", now=None, log=None, spool=None):
    """Commit the report about ``rcpts`` of ``env``; returns the new
    message's MessageLock (the caller delivers it and releases the lock),
    or None when no report is due (NOTIFY, or a double bounce that failed)."""
    log = log or logging.getLogger("pymta")
    now = int(now if now is not None else time.time())
    spool = spool or Spool.from_config(cfg)
    double = env.is_bounce
    dbl_addr = double_bounce_address(cfg)
    if env.sender.lower() == dbl_addr.lower():
        log.info(f"{env.id}: double bounce to <{rcpts[0].address}> failed too; "
                 "discarded (logged only)")
        return None
    if double:
        if action != "failed":
            return None
        to, sender = qualify(cfg.bounce_notice_recipient, cfg.myorigin), dbl_addr
    else:
        what = {"failed": "F", "delayed": "D"}.get(action, "S")
        rcpts = [r for r in rcpts if r.notify(what)]
        if not rcpts:
            return None
        to, sender = env.sender, ""
    boundary = f"{env.id}.{now}.{secrets.token_hex(4)}/{cfg.myhostname}"
    headers_only = action != "failed" or env.ret.upper() == "HDRS"
    if action == "failed":
        subject = ("Postmaster notify: see transcript for details" if double
                   else "Undelivered Mail Returned to Sender")
    elif action == "delayed":
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    head = (
        f"Date: {headers.date(now)}\n"
        f"From: Mail Delivery System <MAILER-DAEMON@{cfg.myhostname}>\n"
        f"To: <{_clean(to)}>\n"
        f"Subject: {subject}\n"
        f"Message-ID: <{env.id}.{now}.{secrets.token_hex(3)}@{cfg.myhostname}>\n"
        f"Auto-Submitted: auto-replied\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\n"
        f"\tboundary=\"{boundary}\"\n"
        f"Content-Transfer-Encoding: {'8bit' if env.body_type == '8BITMIME' else '7bit'}\n"
        f"\n"
        f"This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        f"Content-Description: Notification\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n"
        + _text_part(cfg, env, rcpts, action, double, now)
        + f"\n--{boundary}\n"
        f"Content-Description: Delivery report\n"
        f"Content-Type: message/delivery-status\n\n"
        + _status_fields(cfg, env, rcpts, action, now)
        + f"\n--{boundary}\n"
    )
    if headers_only and action in ("delivered", "relayed"):
        head += ("Content-Description: Message Headers\n"
                 "Content-Type: text/rfc822-headers\n\n")
    elif headers_only:
        head += ("Content-Description: Undelivered Message Headers\n"
                 "Content-Type: text/rfc822-headers\n\n")
    else:
        head += ("Content-Description: Undelivered Message\n"
                 "Content-Type: message/rfc822\n\n")
    new = E.Envelope(sender=sender, protocol="local", created=now, trusted=True,
                     body_type="8BITMIME" if env.body_type == "8BITMIME" else "")
    new.add_recipient(to, flags=E.PRIMARY)
    with spool.new_message() as w:
        w.write(head.encode("utf-8", "replace"))
        last = b"\n"
        with spool.open_data(env.id) as f:
            if headers_only:
                for line in f:
                    if line in (b"\n", b"\r\n"):
                        break
                    w.write(line)
                    last = line[-1:]
            else:
                while True:
                    chunk = f.read(MESSAGE_BLOCK)
                    if not chunk:
                        break
                    w.write(chunk)
                    last = chunk[-1:]
        w.write((b"" if last == b"\n" else b"\n") + f"\n--{boundary}--\n".encode())
        qid = w.commit(new)
        lock = w.handoff()
    kind = "postmaster notify" if double else {"failed": "DSN", "delayed": "delay warning"}.get(
        action, f"success DSN ({action})")
    summary = ", ".join(f"<{_final(r)[0]}> {r.dsn}" for r in rcpts)
    log.info(f"{env.id}: {qid}: {kind}: {summary}")
    return lock
