"""Local delivery: who delivers, in which process, to which target module.

Every delivery runs in a process that has dropped to the target's uid and
gids before it opens the mailbox or runs the command (when pymta is root):
a long-lived worker per identity for mailboxes, files and Maildirs
(pymta.workers), a fresh child for each |command. Commands and files never
run as root (default_privs instead). The targets themselves are written by
local_mbox (mailboxes and /files), local_maildir and local_command, as
Postfix's local(8) has mailbox.c, maildir.c and command.c; local_target has
the Target and what they share.
"""

import functools
import gc
import logging
import os
import pwd

from . import forkserver, local_command, local_maildir, local_mbox, userdb
from .queue_dir import Spool
from . import workers as _workers
from .local_target import Target, os_reply
from .status import DeliveryError, Reply

_noted_unprivileged = []


class _Ids:
    """Switch the effective uid between root and the target user (mailbox child)."""

    def __init__(self, target):
        self.target = target

    def root(self):
        os.seteuid(0)
        os.setegid(0)

    def user(self):
        os.setegid(self.target.gid)
        os.seteuid(self.target.uid)


def _groups(target):
    """The target user's group list, looked up before fork (NSS is not fork-safe
    in a threaded process); kept while /etc/group is unchanged (pymta.userdb)."""
    try:
        return userdb.getgrouplist(target.user, target.gid)
    except (OSError, KeyError):
        return [target.gid]


def _drop(target, groups, keep_root=False, extra_gid=None):
    """Become the target user (groups, gid, uid). ``keep_root`` only sets the
    effective ids, so the process can take back root to manage the dot-lock."""
    groups = list(groups)
    if extra_gid is not None and extra_gid not in groups:
        groups.append(extra_gid)
    os.setgroups(groups)
    if keep_root:
        os.setegid(target.gid)
        os.seteuid(target.uid)
    else:
        os.setgid(target.gid)
        os.setuid(target.uid)


def _write(cfg, env, rcpt, target, df, notes, ids=None, create_gid=None, as_root=False):
    """The delivery to ``target`` by its module, in a process that already has
    the target's ids (``ids``: a mailbox delivery by root, see local_mbox)."""
    kind = target.kind
    if kind in ("mailbox", "file"):
        return local_mbox.deliver(cfg, env, rcpt, target, df, notes, ids=ids,
                                  create_gid=create_gid, as_root=as_root)
    if kind == "maildir":
        return local_maildir.deliver(env, rcpt, target, df)
    if kind == "command":
        return local_command.deliver(cfg, env, rcpt, target, df)
    return Reply(550, "5.3.0", f"unknown local target kind {kind!r}")


def _run(cfg, env, rcpt, target, df, privileged, notes, groups=()):
    """The delivery itself, in the process that runs it (child or self)."""
    if not privileged:
        return _write(cfg, env, rcpt, target, df, notes)
    os.umask(0o077)
    if target.kind == "mailbox":
        gid = local_mbox.spool_group(target)
        as_root = local_mbox.root_only_dir(target.path)
        _drop(target, groups, keep_root=True, extra_gid=gid)
        return _write(cfg, env, rcpt, target, df, notes, ids=_Ids(target), create_gid=gid,
                      as_root=as_root)
    _drop(target, groups)
    return _write(cfg, env, rcpt, target, df, notes)


def _safe_target(cfg, target):
    """Commands and files never run as root: map uid 0 to default_privs."""
    if target.kind in ("command", "file") and target.uid <= 0:
        try:
            pw = pwd.getpwnam(cfg.default_privs)
        except KeyError:
            return None
        return Target(target.kind, user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                      home=pw.pw_dir or "/", path=target.path, command=target.command,
                      shell=pw.pw_shell or "/bin/sh")
    if target.kind == "command" and target.uid > 0:
        # The login shell for SHELL, looked up here, before any fork.
        try:
            shell = pwd.getpwuid(target.uid).pw_shell or "/bin/sh"
        except KeyError:
            shell = "/bin/sh"
        if shell != target.shell:
            target = Target(target.kind, user=target.user, uid=target.uid, gid=target.gid,
                            home=target.home, path=target.path, command=target.command,
                            shell=shell)
    return target


def deliver(cfg, env, rcpt, target, log=None):
    """Deliver message ``env`` to one local ``target`` for ``rcpt``; returns a Reply.

    As root the work is done in a forked child with the target's privileges;
    otherwise in this process, as this user.
    """
    log = log or logging.getLogger("pymta")
    if target.kind in ("command", "file") and "a" not in rcpt.flags:
        return Reply(550, "5.7.1", "Mail to programs and files is only allowed "
                     "from aliases, included files and .forward")
    privileged = os.geteuid() == 0
    target = _safe_target(cfg, target)
    if target is None:
        return Reply(451, "4.3.0", f"default_privs user {cfg.default_privs!r} does not exist")
    try:
        df = Spool.from_config(cfg).open_data(env.id)
    except OSError as e:
        return Reply(451, "4.3.0", f"cannot open df{env.id}: {e.strerror}")
    with df:
        if not privileged:
            if not _noted_unprivileged:
                _noted_unprivileged.append(True)
                log.info(f"not running as root: local delivery as uid {os.getuid()}, "
                         "to mailboxes, files and commands this user may use")
            notes = []
            try:
                reply = _run(cfg, env, rcpt, target, df, False, notes)
            except DeliveryError as e:
                reply = e.reply
            except OSError as e:
                reply = os_reply(e, target.path or target.command)
            for n in notes:
                log.warning(f"{env.id}: {n}")
            return reply
        if target.kind in _POOLED_KINDS:
            return _deliver_pooled(cfg, env, rcpt, target, df, log)
        return _deliver_child(cfg, env, rcpt, target, df, log)


# Mailbox, file and Maildir deliveries go to a long-lived worker per identity
# (pymta.workers); a |command gets a fresh child each time, so that no program
# a user's .forward runs can linger in a process that later delivers for others.
_POOLED_KINDS = frozenset({"mailbox", "file", "maildir"})


def _pool_setup(target, groups, extra_gid):
    """A worker's start (pickled to the fork server: a module-level function)."""
    gc.collect()
    gc.freeze()     # the inherited heap stays shared with the parent
    os.umask(0o077)
    from .proctitle import set_name
    set_name("pymta: local")    # ps -o user,comm: whose deliveries it makes
    _drop(target, groups, keep_root=target.kind == "mailbox", extra_gid=extra_gid)


def _pool_handle(cfg, payloads, fds):
    """One batch of deliveries to one target in a worker (workers.Pool
    combines those to the same target, batch_key below): the target
    module's deliver_batch locks, writes and fsyncs once for them all. A
    [code, enhanced, text, notes] for each; notes of the batch as a whole
    (the lock's) go with its first message."""
    dfs = []
    notes = []
    try:
        for fd in fds:
            dfs.append(os.fdopen(os.dup(fd), "rb"))
        target, as_root, gid = payloads[0][2:]
        msgs = [(env, rcpt, df) for (env, rcpt, *_), df in zip(payloads, dfs)]
        try:
            if target.kind == "maildir":
                replies = local_maildir.deliver_batch(msgs, target)
            elif target.kind in ("mailbox", "file"):
                ids = _Ids(target) if target.kind == "mailbox" else None
                replies = local_mbox.deliver_batch(cfg, msgs, target, notes, ids=ids,
                                                   create_gid=gid if ids else None,
                                                   as_root=as_root)
            else:
                replies = [Reply(550, "5.3.0", f"unknown local target kind {target.kind!r}")] \
                    * len(msgs)
        except DeliveryError as e:
            replies = [e.reply] * len(msgs)
        except OSError as e:
            replies = [os_reply(e, target.path)] * len(msgs)
    except Exception as e:   # noqa: BLE001 - report, never kill the worker's loop
        replies = [Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")] \
            * len(payloads)
    finally:
        for df in dfs:
            df.close()
    return [[r.code, r.enhanced, r.text, notes if i == 0 else []]
            for i, r in enumerate(replies)]


def _deliver_pooled(cfg, env, rcpt, target, df, log):
    gid = local_mbox.spool_group(target) if target.kind == "mailbox" else None
    as_root = target.kind == "mailbox" and local_mbox.root_only_dir(target.path)
    groups = tuple(_groups(target))
    key = (cfg, target.kind, target.uid, target.gid, groups, gid)
    # Deliveries to the same target with the same rights share batches.
    batch_key = (target.path, target.user, target.home, as_root)
    try:
        code, enhanced, text, notes = _workers.POOL.call(
            key, functools.partial(_pool_setup, target, groups, gid),
            functools.partial(_pool_handle, cfg),
            (env, rcpt, target, as_root, gid), df.fileno(), batch_key=batch_key)
    except _workers.WorkerGone as e:
        return Reply(451, "4.3.0", f"local delivery process failed: {e}")
    for n in notes:
        log.warning(f"{env.id}: {n}")
    return Reply(code, enhanced, text)


def _command_child(fds, cfg, env, rcpt, target, groups):
    """A |command delivery, in its own child (forkserver.spawn): the reply
    goes to ``fds[0]``, the message is read from ``fds[1]``."""
    wfd, dfd = fds
    gc.disable()
    notes = []
    try:
        with os.fdopen(dfd, "rb") as df:
            reply = _run(cfg, env, rcpt, target, df, True, notes, groups)
    except DeliveryError as e:
        reply = e.reply
    except OSError as e:
        reply = os_reply(e, target.path or target.command)
    except BaseException as e:   # noqa: BLE001 - report, never escape into the parent's code
        reply = Reply(451, "4.3.0", f"local delivery error: {type(e).__name__}: {e}")
    forkserver.put_result(wfd, [reply.code, reply.enhanced, reply.text, notes])


def _deliver_child(cfg, env, rcpt, target, df, log):
    groups = _groups(target)
    rfd, wfd = os.pipe()
    try:
        try:
            child = forkserver.spawn(_command_child, (cfg, env, rcpt, target, groups),
                                     [wfd, df.fileno()])
        finally:
            os.close(wfd)
        try:
            (code, enhanced, text, notes), _ = forkserver.get_result(rfd, child=child)
        except (OSError, ValueError, TypeError, forkserver.ResultError):
            status = child.wait()
            return Reply(451, "4.3.0", f"local delivery process failed (wait status {status})")
        finally:
            child.wait()
            child.close()
    finally:
        os.close(rfd)
    for n in notes:
        log.warning(f"{env.id}: {n}")
    return Reply(code, enhanced, text)
