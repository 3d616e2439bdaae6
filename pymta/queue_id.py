"""Queue ids: new_id() makes them, valid_id() checks them, id_time() reads them.

Queue ids are sendmail's shape: six characters of UTC time (year mod 60,
month, day, hour, minute, second, each one of 60 letters), three of a
per-process sequence, then the process id: ``6ASHBJ000012345``. They sort
by time and are unique across processes (pid) and threads (the sequence,
under a lock); creating the df with O_EXCL catches the rest (see
pymta.queue_commit). An id is checked against its grammar before any path is
built from it, so no file outside the queue directory is ever named.
"""

import os
import time
import _thread   # threading's Lock without its import (sendmail's start-up is its latency)

_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
_id_lock = _thread.allocate_lock()
# A child forked while another thread held the lock must not inherit it held.
os.register_at_fork(after_in_child=lambda: globals().update(_id_lock=_thread.allocate_lock()))
_id_state = {"sec": 0, "seq": 0, "pid": 0}


def new_id(now=None):
    """A fresh, time-ordered, process- and thread-unique queue id."""
    while True:
        with _id_lock:
            sec = int(now if now is not None else time.time())
            pid = os.getpid()
            if sec != _id_state["sec"] or pid != _id_state["pid"]:
                _id_state.update(sec=sec, seq=0, pid=pid)
                seq = 0
                break
            if _id_state["seq"] + 1 < 60 ** 3:
                _id_state["seq"] += 1
                seq = _id_state["seq"]
                break
        # 216,000 ids in one second in one process: wait for the next second.
        now = None
        time.sleep(1.0 - (time.time() % 1.0))
    t = time.gmtime(sec)
    c = _CHARS
    return (c[t.tm_year % 60] + c[t.tm_mon - 1] + c[t.tm_mday] + c[t.tm_hour]
            + c[t.tm_min] + c[min(t.tm_sec, 59)]
            + c[seq // 3600] + c[(seq // 60) % 60] + c[seq % 60] + "%06d" % pid)


def valid_id(qid):
    """[0-9A-Za-x]{9}[0-9]{6,10}"""
    if not qid or not 15 <= len(qid) <= 19 or not qid.isascii():
        return False
    head, pid = qid[:9], qid[9:]
    return head.isalnum() and pid.isdigit() and "y" not in head and "z" not in head


def id_time(qid):
    """The arrival time encoded in an id (UTC, to the second), or None."""
    import calendar   # not every sendmail run needs it
    try:
        idx = [_CHARS.index(ch) for ch in qid[:6]]
    except ValueError:
        return None
    year_now = time.gmtime().tm_year
    year = year_now - ((year_now - idx[0]) % 60)
    try:
        return calendar.timegm((year, idx[1] + 1, idx[2], idx[3], idx[4], idx[5], 0, 0, 0))
    except (OverflowError, ValueError):
        return None
