"""The header fields pymta writes itself: Received:, sendmail's
X-Authentication-Warning:, and the date and Message-ID of RFC 5322, in one
form whichever way mail came in.

Every message gets its Received: line when it is queued: from the SMTP
server (smtpd_session), from sendmail (inject) and at maildrop pickup
(queue_maildrop). Its shape is sendmail's::

    Received: from HELO (NAME [ADDR])          an SMTP client, or
    Received: (from LOGIN@localhost)           a local submission
            by HOST (MAIL_NAME) with PROTOCOL id QID
            for <RCPT>; DATE                   one recipient, or
            ;\n\tDATE                          several

Dates are English and in local time with its offset, as
email.utils.formatdate(localtime=True) writes them; this module imports
neither the email package nor re, socket or locale (sendmail imports it,
and its start-up is its latency).
"""

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date(t=None):
    """RFC 5322's date-time of ``t`` (now by default) in local time:
    ``Wed, 02 Dec 2026 13:05:09 +0100``."""
    lt = time.localtime(t)
    off = lt.tm_gmtoff
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return "%s, %02d %s %04d %02d:%02d:%02d %s%02d%02d" % (
        _DAYS[lt.tm_wday], lt.tm_mday, _MONTHS[lt.tm_mon - 1], lt.tm_year,
        lt.tm_hour, lt.tm_min, lt.tm_sec, sign, off // 60, off % 60)


def received(qid, hostname, mail_name, origin, protocol="", rcpt="", t=None):
    """The Received: field (LF line ends, bytes) of a message queued as
    ``qid`` by ``hostname``. ``origin`` is its first line's text: ``from
    HELO (NAME [ADDR])`` or ``(from LOGIN@localhost)``; ``protocol`` the
    with keyword (ESMTP..., none for local mail); ``rcpt`` the one
    recipient, when there is only one."""
    with_ = f" with {protocol}" if protocol else ""
    tail = f"\n\tfor <{rcpt}>; {date(t)}" if rcpt else f";\n\t{date(t)}"
    return (f"Received: {origin}\n\tby {hostname} ({mail_name}){with_} id {qid}{tail}\n"
            ).encode("utf-8", "surrogateescape")


def auth_warning(hostname, login, sender):
    """sendmail's X-Authentication-Warning: for a local user, not trusted,
    who set the envelope sender with -f (its controls shown as '?')."""
    shown = "".join(c if c.isprintable() else "?" for c in sender) or "<>"
    return (f"X-Authentication-Warning: {hostname}: {login} set sender to {shown} "
            f"using -f\n").encode("utf-8", "surrogateescape")


def message_id(token, hostname, t=None):
    """A Message-ID for a message that came without one: ``<UTC time.token@host>``."""
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(t))}.{token}@{hostname}>"
