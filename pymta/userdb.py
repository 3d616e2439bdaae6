"""Password and group look-ups for routing and delivery, kept while valid.

Every message to an alias's /file or |command looks up default_privs,
every mailbox delivery its user, every delivery in a worker the user's
group list: each getpwnam() reads /etc/passwd through NSS (and asks each
source nsswitch.conf names), each getgrouplist() all of /etc/group. This
module keeps the answers, as nscd does, with these limits:

  * an answer is used only while /etc/passwd (for getpwnam, getpwuid) or
    /etc/group (for getgrouplist) is the same file as when it was looked
    up: same inode, size, modification and change time, checked with one
    stat() at every look-up (useradd, usermod, vipw and the like replace
    or rewrite the file, so their changes are seen by the next look-up);
  * and for at most MAX_AGE seconds, for what other NSS sources (LDAP,
    systemd) answer, whose changes touch neither file;
  * a name or uid that is not found is never kept (a user made a moment
    ago is found at once), nor is anything when the file cannot be stat'ed.

Root-only work relies on these answers (whose ids a delivery runs with),
so a change of the files always wins over the cache.
"""

import os
import pwd
import time

PASSWD = "/etc/passwd"
GROUP = "/etc/group"
MAX_AGE = 60.0          # seconds an answer is kept, whatever the files say
MAX_ENTRIES = 4096      # then the cache starts again (a bound, not an LRU)

_cache = {}             # key -> (file stamp, when it expires, answer)


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _cached(key, path, lookup, arg):
    stamp = _stamp(path)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and stamp is not None and hit[0] == stamp and now < hit[1]:
        return hit[2]
    value = lookup(*arg)       # KeyError (no such user) or OSError goes to the caller
    if stamp is not None:
        if len(_cache) >= MAX_ENTRIES:
            _cache.clear()
        _cache[key] = (stamp, now + MAX_AGE, value)
    return value


def getpwnam(name):
    """pwd.getpwnam(name), kept while /etc/passwd is unchanged."""
    return _cached(("n", name), PASSWD, pwd.getpwnam, (name,))


def getpwuid(uid):
    """pwd.getpwuid(uid), kept while /etc/passwd is unchanged."""
    return _cached(("u", uid), PASSWD, pwd.getpwuid, (uid,))


def getgrouplist(user, gid):
    """os.getgrouplist(user, gid) as a new list, kept while /etc/group is unchanged."""
    return list(_cached(("g", user, gid), GROUP, _grouplist, (user, gid)))


def _grouplist(user, gid):
    return tuple(os.getgrouplist(user, gid))


def clear():
    """Forget every answer (tests; a caller that knows better)."""
    _cache.clear()
