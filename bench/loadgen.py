#!/usr/bin/env python3
"""A load generator like Postfix's smtp-source, for machines without it.

usage: loadgen.py -s SESSIONS -m MSGS -l SIZE [-f from] [-t to] HOST:PORT

SESSIONS processes each send their share of MSGS messages of SIZE bytes, one
connection per message (smtp-source's default). Exits non-zero if any message
was not accepted.
"""

import argparse
import multiprocessing
import smtplib
import sys


def worker(args):
    host, port, count, size, sender, rcpt = args
    line = b"La de da de da de da de da de da de da de da de da de da de da\r\n"
    body = (line * (size // len(line) + 1))[:size]
    msg = (b"From: <%s>\r\nTo: <%s>\r\nSubject: loadgen\r\n\r\n" % (sender.encode(), rcpt.encode())) + body
    failed = 0
    for _ in range(count):
        try:
            with smtplib.SMTP(host, port, timeout=120) as c:
                c.sendmail(sender, [rcpt], msg)
        except (smtplib.SMTPException, OSError):
            failed += 1
    return failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-s", type=int, default=1)
    ap.add_argument("-m", type=int, default=1)
    ap.add_argument("-l", type=int, default=5120)
    ap.add_argument("-f", default="bench@example.test")
    ap.add_argument("-t", default="user@example.test")
    ap.add_argument("target")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    shares = [a.m // a.s + (1 if i < a.m % a.s else 0) for i in range(a.s)]
    with multiprocessing.Pool(a.s) as pool:
        failed = sum(pool.map(worker, [(host, int(port), n, a.l, a.f, a.t) for n in shares if n]))
    if failed:
        print(f"loadgen: {failed} of {a.m} messages not accepted", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
