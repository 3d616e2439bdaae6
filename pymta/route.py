"""Routing: a recipient -> a local target, a remote domain, an expansion, or a failure.

Local names (no domain, or a mydestination domain) go through the aliases,
then the user's .forward, then the password file; ``user+tag`` falls back to
``user``. Expansion is done here in full (aliases, :include: files, .forward
files, recursively) so the queue runner records the final recipients once:
duplicates are dropped, a name reached again inside its own expansion is
dropped as sendmail does, and when nothing is left (``a: b``, ``b: a``, or
two .forward files naming each other) the recipient fails with 5.4.6, as it
does beyond MAX_DEPTH levels.

Pipes and files are only ever produced by expansion (flag ``a``); typed by a
client they are refused with 550 5.7.1 before anything is run or written.
"""

from dataclasses import dataclass, field
import errno
import logging
import os
import pwd
import sys
import time

from . import address, aliases, safefile, tables, userdb
from . import envelope as E
from .config import parse_hostport
from .local_target import Target
from .status import AddressError, PermFail, Reply, EX_OK, EX_NOUSER, EX_USAGE

MAX_DEPTH = 20
INCLUDE_TIME_LIMIT = 10            # seconds to read a .forward or :include: file
_NOTIFY_FLAGS = "SFDN"


@dataclass
class Route:
    """What to do with one recipient; see the module docstring for kinds."""

    kind: str                      # local, remote, expand, fail
    target: Target = None          # local
    domain: str = ""               # remote: next-hop domain, or relayhost as written
    address: str = ""              # remote: the recipient address
    host: str = ""                 # remote: host to connect to (domain or relayhost host)
    port: int = 0                  # remote: port (smtp_port, or relayhost's)
    mx: bool = True                # remote: look up MX for host ([host] and literals: no)
    children: list = field(default_factory=list)   # expand
    sender: str = None             # expand: owner-LIST envelope sender
    reply: Reply = None            # fail


def _fail(code, enhanced, text):
    return Route("fail", reply=Reply(code, enhanced, text))


class _Loop(PermFail):
    """An alias, .forward or virtual alias chain that loops or goes too deep."""

    reply = Reply(554, "5.4.6", "Aliasing/forwarding loop broken")

    def __init__(self, chain):
        super().__init__(" -> ".join(chain))
        self.chain = chain


def _is_special(text):
    """A pipe, file or :include: in address form (perhaps quoted)."""
    return text[:1] in ("|", "/") or text.lower().startswith(":include:")


class Router:
    """Routes recipients for one configuration; cheap to make."""

    def __init__(self, cfg, log=None):
        self.cfg = cfg
        self.log = log or logging.getLogger("pymta")
        self.aliases = aliases.AliasMaps.from_config(cfg, self.log)
        self.virtual = tables.maps(cfg, "virtual_alias_maps", self.log)
        self.relay_recipients = tables.maps(cfg, "relay_recipient_maps", self.log)
        self._transports = None

    # -- lookups
    @staticmethod
    def user(name):
        """The passwd entry of ``name`` (exact, then lower case), or None
        (pymta.userdb: kept while /etc/passwd is unchanged)."""
        for n in dict.fromkeys((name, name.lower())):
            try:
                return userdb.getpwnam(n)
            except (KeyError, ValueError):
                continue
        return None

    def _base(self, name):
        """'user+tag' -> 'user' (None when there is no delimiter)."""
        d = self.cfg.recipient_delimiter
        if d and d in name:
            base = name.split(d, 1)[0]
            return base or None
        return None

    def is_local(self, addr):
        dom = address.domain_of(addr)
        return dom == "" or self.cfg.is_local_domain(dom)

    def known(self, name):
        """Whether a local name is an alias, a user, or postmaster."""
        if name.lower() == "postmaster":
            return True
        for n in (name, self._base(name)):
            if n and (self.aliases.lookup(n) is not None or self.user(n)):
                return True
        return False

    def is_virtual_domain(self, domain):
        return tables.domain_in(domain, self.cfg.virtual_alias_domains)

    def is_relay_domain(self, domain):
        d = domain.lower().rstrip(".")
        return any(d == x or d.endswith("." + x)
                   for x in (y.lower().rstrip(".") for y in self.cfg.relay_domains) if x)

    def recipient_check(self, addr):
        """For RCPT: None if ``addr`` is deliverable here (or not ours to
        check), else a 550: a virtual alias domain's address needs an entry in
        virtual_alias_maps, a relay_domains address one in relay_recipient_maps
        (when set), a local address an alias or a user."""
        domain = address.domain_of(addr)
        if self.virtual and tables.expand(self.cfg, self.virtual, addr) is not None:
            return None
        if self.is_virtual_domain(domain):
            return Reply(550, "5.1.1", f"<{addr}>: Recipient address rejected: "
                                       "User unknown in virtual alias table")
        if not self.is_local(addr):
            if self.relay_recipients and self.is_relay_domain(domain) and \
                    tables.lookup_address(self.cfg, self.relay_recipients, addr) is None:
                return Reply(550, "5.1.1", f"<{addr}>: Recipient address rejected: "
                                           "User unknown in relay recipient table")
            return None
        local = address.local_of(addr)
        if _is_special(local):
            return Reply(550, "5.7.1", "Mail to programs and files is not allowed")
        if self.known(local):
            return None
        return Reply(550, "5.1.1", f"<{addr}>: Recipient address rejected: User unknown")

    # -- targets
    def _privs(self, uid):
        """(user, uid, gid, home) that a |cmd or /file runs as; never root."""
        pw = None
        if uid is not None and uid > 0:
            try:
                pw = userdb.getpwuid(uid)
            except KeyError:
                pw = None
        if pw is None:
            pw = self.user(self.cfg.default_privs)
        if pw is None:
            return (self.cfg.default_privs, 65534, 65534, "/")
        return (pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/")

    def mailbox_target(self, pw):
        """The mbox or Maildir Target of a passwd user."""
        hm = self.cfg.home_mailbox
        if hm:
            path = os.path.join(pw.pw_dir, hm)
            kind = "maildir" if hm.endswith("/") else "mailbox"
        else:
            path = os.path.join(self.cfg.mail_spool_directory, pw.pw_name)
            kind = "mailbox"
        return Target(kind, user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
                      home=pw.pw_dir or "/", path=path.rstrip("/") if kind == "maildir" else path)

    def _special_target(self, rcpt):
        text = rcpt.address
        user, uid, gid, home = self._privs(rcpt.uid)
        if text.startswith("|"):
            return Target("command", user=user, uid=uid, gid=gid, home=home, command=text[1:])
        return Target("file", user=user, uid=uid, gid=gid, home=home, path=text)

    @property
    def transports(self):
        """transport_maps, read on first use."""
        if self._transports is None:
            from .transport import TransportMap
            self._transports = TransportMap.from_config(self.cfg, self.log)
        return self._transports

    def _transport(self, addr, local):
        if not self.cfg.transport_maps:
            return None
        return self.transports.lookup(address.domain_of(addr), local=local)

    def _remote(self, addr, transport=None):
        dom = address.domain_of(addr)
        if transport is not None:
            # "smtp:" + next hop: remote.destination() takes it as it is,
            # never the relayhost.
            nexthop = transport[1] or dom
            host, port = parse_hostport(nexthop, self.cfg.smtp_port)
            return Route("remote", domain="smtp:" + nexthop, address=addr, host=host,
                         port=port, mx=not nexthop.startswith("["))
        if self.cfg.relayhost:
            host, port = parse_hostport(self.cfg.relayhost, self.cfg.smtp_port)
            return Route("remote", domain=self.cfg.relayhost, address=addr, host=host,
                         port=port, mx=not self.cfg.relayhost.strip().startswith("["))
        lit = address.literal_ip(dom)
        return Route("remote", domain=dom, address=addr, host=lit or dom,
                     port=self.cfg.smtp_port, mx=lit is None)

    # -- .forward
    def _file_targets(self, path, text):
        """The targets of a .forward or :include: file: one or more a line,
        comments and blank lines skipped. A bad line is logged by file and
        line number only: nothing of its text (the file may be one the
        recipient cannot read, and the log is not theirs)."""
        targets = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            got, errors = aliases.parse_targets(line)
            if errors:
                self.log.warning(f"{path}:{lineno}: not an address, |command, /file or "
                                 f":include:; line ignored")
            targets.extend(got)
        return targets

    def forward_targets(self, pw):
        """The targets of the user's .forward, or None (none, unsafe, empty).

        A .forward is used only when it is a regular file owned by the user
        or root, not group or world writable, reached from the home without
        a symbolic link (each component opened with O_NOFOLLOW), and no
        larger than forward_include_size_limit; otherwise it is ignored and
        the log says why (never a line of it)."""
        for tmpl in self.cfg.forward_path:
            path = (tmpl.replace("${home}", pw.pw_dir).replace("$home", pw.pw_dir)
                    .replace("${user}", pw.pw_name).replace("$user", pw.pw_name))
            home = pw.pw_dir.rstrip("/")
            beneath = home if home and path.startswith(home + "/") else None
            try:
                fd, st = safefile.open_regular(path, beneath=beneath, follow=False)
            except safefile.Refused as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                self.log.warning(f"{pw.pw_name}: {path} {e}; ignored")
                continue
            try:
                why = None
                if st.st_uid not in (pw.pw_uid, 0):
                    why = f"is owned by uid {st.st_uid}, not by the user or root"
                elif st.st_mode & 0o022:
                    why = "is group or world writable"
                elif st.st_uid == 0 and st.st_nlink != 1 and pw.pw_uid != 0:
                    why = "is root's and has other hard links"
                if why:
                    self.log.warning(f"{pw.pw_name}: {path} {why}; ignored")
                    continue
                try:
                    data = safefile.read_fd(fd, self.cfg.forward_include_size_limit,
                                            time.monotonic() + INCLUDE_TIME_LIMIT)
                except safefile.Refused as e:
                    self.log.warning(f"{pw.pw_name}: {path} {e}; ignored")
                    continue
            finally:
                os.close(fd)
            return self._file_targets(path, data.decode("utf-8", "surrogateescape")) or None
        return None

    # -- expansion
    def route(self, rcpt, env=None):
        """Route one envelope.Recipient (see the module docstring)."""
        addr = rcpt.address
        local_part = address.local_of(addr) if not _is_special(addr) else addr
        if _is_special(addr) or (self.is_local(addr) and _is_special(local_part)):
            if E.FROM_ALIAS not in rcpt.flags:
                return _fail(550, "5.7.1", "Mail to programs and files is only allowed "
                             "from aliases, included files and .forward")
            if local_part.lower().startswith(":include:"):
                return self._expand_top(rcpt, None)
            return Route("local", target=self._special_target(
                E.Recipient(local_part, flags=rcpt.flags, uid=rcpt.uid)))
        if self.virtual and E.VIRTUAL_DONE not in rcpt.flags and E.NO_ALIAS not in rcpt.flags:
            rt = self._virtual(rcpt)
            if rt is not None:
                return rt
        if self.is_virtual_domain(address.domain_of(addr)):
            return _fail(550, "5.1.1", f"<{addr}>: User unknown in virtual alias table")
        local = self.is_local(addr)
        transport = self._transport(addr, local)
        if transport is not None and transport[0] == "error":
            from .transport import error_reply
            return Route("fail", reply=error_reply(transport[1]))
        if transport is not None and transport[0] == "smtp":
            return self._remote(addr, transport)
        if not local and (transport is None or transport[0] != "local"):
            return self._remote(addr)
        name = local_part
        if E.NO_ALIAS in rcpt.flags:
            pw = self.user(name) or (self._base(name) and self.user(self._base(name)))
            if pw:
                return Route("local", target=self.mailbox_target(pw))
            if name.lower() == "postmaster" and self.user("root"):
                return Route("local", target=self.mailbox_target(self.user("root")))
            return _fail(550, "5.1.1", f"<{addr}>: User unknown")
        return self._expand_top(rcpt, name)

    def virtual_steps(self, addr):
        """Expand ``addr`` through virtual_alias_maps, recursively: None when
        it has no entry, else (final addresses, [(address, [result, ...])],
        loops). An address reached again inside its own expansion is
        dropped (a loop), as for aliases; one that maps to itself is final."""
        if tables.expand(self.cfg, self.virtual, addr) is None:
            return None
        finals, steps, loops, seen = [], [], [], set()

        def walk(a, stack):
            if len(stack) > MAX_DEPTH:
                raise _Loop(list(stack) + [f"... ({MAX_DEPTH} levels max)"])
            got = tables.expand(self.cfg, self.virtual, a)
            if got is None:
                if a.lower() not in seen:
                    seen.add(a.lower())
                    finals.append(a)
                return
            steps.append((a, got))
            for t in got:
                if t.lower() == a.lower():
                    if t.lower() not in seen:
                        seen.add(t.lower())
                        finals.append(t)
                elif t.lower() in stack:
                    loops.append(stack + (t.lower(),))
                else:
                    walk(t, stack + (t.lower(),))

        walk(addr, (addr.lower(),))
        return finals, steps, loops

    def _virtual(self, rcpt):
        """The Route of a recipient that virtual_alias_maps rewrites, or None."""
        try:
            got = self.virtual_steps(rcpt.address)
        except _Loop as e:
            return _fail(554, "5.4.6", f"Virtual alias loop broken: {e}")
        if got is None:
            return None
        finals, steps, loops = got
        for chain in loops:
            self.log.warning(f"<{rcpt.address}>: virtual alias loop {' -> '.join(chain)} ignored")
        if not finals:
            chain = " -> ".join(loops[0]) if loops else rcpt.address
            return _fail(554, "5.4.6", f"Virtual alias loop broken: {chain}")
        notify = "".join(c for c in rcpt.flags if c in _NOTIFY_FLAGS)
        children = [E.Recipient(a, flags=notify + E.VIRTUAL_DONE, state=E.QUEUED,
                                orcpt=rcpt.orcpt, parent=rcpt.address) for a in finals]
        return Route("expand", children=children)

    def _expand_top(self, rcpt, name):
        state = {"children": [], "seen": set(), "loops": []}
        try:
            if name is None:
                self._include(rcpt.address[9:].strip(), rcpt, state, ("include",), 1)
                kind = "expanded"
            else:
                kind = self._name(name, rcpt, state, (), 0, top=True)
        except _Loop as e:
            self.log.info(f"mail loop: {e}")
            return _fail(554, "5.4.6", f"Aliasing/forwarding loop broken: {e}")
        if kind == "unknown":
            return _fail(550, "5.1.1", f"<{rcpt.address}>: User unknown")
        if kind == "user":
            return Route("local", target=self.mailbox_target(state["pw"]))
        sender = None
        if state.get("alias"):
            owner = "owner-" + state["alias"]
            if self.aliases.lookup(owner) is not None:
                sender = f"{owner}@{self.local_domain}"
        for chain in state["loops"]:
            self.log.warning(f"<{rcpt.address}>: alias loop {' -> '.join(chain)} ignored")
        if not state["children"]:
            if state["loops"]:
                chain = " -> ".join(state["loops"][0])
                return _fail(554, "5.4.6", f"Aliasing/forwarding loop broken: {chain}")
            return _fail(550, "5.1.1", f"<{rcpt.address}>: expands to no recipients")
        return Route("expand", children=state["children"], sender=sender)

    def _child(self, state, rcpt, addr, flags, uid=-1, via=""):
        """Add a final recipient; ``via`` (for a |cmd or /file) is the address
        whose alias, .forward or include named it: the command's RECIPIENT."""
        special = addr.startswith(("|", "/"))
        key = (addr.lower() if not special else addr, uid if flags == "a" else -1)
        if key in state["seen"]:
            return
        state["seen"].add(key)
        notify = "".join(c for c in rcpt.flags if c in _NOTIFY_FLAGS)
        via = via if special and via and via != rcpt.address else ""
        state["children"].append(E.Recipient(addr, flags=notify + flags, state=E.QUEUED,
                                              orcpt=rcpt.orcpt, parent=rcpt.address, uid=uid,
                                              via=via))

    @property
    def local_domain(self):
        """The domain given to final local users: myhostname when it is local."""
        cfg = self.cfg
        if cfg.is_local_domain(cfg.myhostname) or not cfg.mydestination:
            return cfg.myhostname
        return cfg.mydestination[0]

    def _qualify_user(self, name):
        return f"{name}@{self.local_domain}"

    def _name(self, name, rcpt, state, stack, depth, top=False):
        """Expand a local name; returns 'user' (only at top: deliver directly),
        'expanded' or 'unknown'. Raises _Loop."""
        key = name.lower()
        if key in stack:
            state["loops"].append(stack + (key,))
            return "expanded"
        if depth > MAX_DEPTH:
            raise _Loop(stack + (key, f"... ({MAX_DEPTH} levels max)"))
        stack = stack + (key,)
        base = self._base(name)
        via = rcpt.address if top else self._qualify_user(name)
        for n in (name, base):
            if not n:
                continue
            targets = self.aliases.lookup(n)
            if targets is not None:
                if top:
                    state["alias"] = n.lower()
                self._targets(targets, n.lower(), rcpt, state, stack, depth, "alias", -1, via)
                return "expanded"
            pw = self.user(n)
            if pw:
                fwd = self.forward_targets(pw)
                if fwd is None:
                    if top:
                        state["pw"] = pw
                        return "user"
                    final = pw.pw_name + name[len(n):]
                    self._child(state, rcpt, self._qualify_user(final), E.NO_ALIAS)
                    return "expanded"
                self._targets(fwd, n.lower(), rcpt, state, stack, depth, "forward", pw.pw_uid, via)
                return "expanded"
        if key == "postmaster" and self.user("root"):
            if top:
                state["pw"] = self.user("root")
                return "user"
            self._child(state, rcpt, self._qualify_user("root"), E.NO_ALIAS)
            return "expanded"
        if top:
            return "unknown"
        self._child(state, rcpt, self._qualify_user(name), E.NO_ALIAS)   # fails 5.1.1 later
        return "expanded"

    def _targets(self, targets, owner, rcpt, state, stack, depth, source, uid, via=""):
        """Expand the targets of alias/.forward/include ``owner`` found in
        ``source``; ``via`` is the address being expanded (see _child)."""
        cmds_ok = source in self.cfg.allow_mail_to_commands
        files_ok = source in self.cfg.allow_mail_to_files
        uid = uid if uid and uid > 0 else -1
        for t in targets:
            if t.startswith("|"):
                self._child(state, rcpt, t, E.FROM_ALIAS if cmds_ok else "", uid, via)
            elif t.startswith("/"):
                self._child(state, rcpt, t, E.FROM_ALIAS if files_ok else "", uid, via)
            elif t.lower().startswith(":include:"):
                self._include(t[9:], rcpt, state, stack, depth + 1, uid, via=via)
            elif t.startswith("\\"):
                addr = t[1:]
                if self.is_local(addr):
                    self._child(state, rcpt, self._qualify_user(address.local_of(addr)), E.NO_ALIAS)
                else:
                    self._child(state, rcpt, addr, "")
            elif not self.is_local(t):
                self._child(state, rcpt, t, "")
            else:
                name = address.local_of(t)
                if name.lower() == owner and source != "include":
                    # 'user: user' or a .forward naming its own user: the user itself.
                    self._child(state, rcpt, self._qualify_user(name), E.NO_ALIAS)
                else:
                    self._name(name, rcpt, state, stack, depth + 1)

    def _read_as(self, path, uid):
        """(st_mode, st_uid, text) of include file ``path`` read with the
        rights of ``uid`` (a child process as that user: a file the user
        cannot read cannot be included); raises OSError (nothing of the
        file in it)."""
        pw = pwd.getpwuid(uid)
        try:
            groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        except OSError:
            groups = [pw.pw_gid]
        mode, fuid, data = safefile.read_file_as(
            path, self.cfg.forward_include_size_limit, INCLUDE_TIME_LIMIT,
            pw.pw_uid, pw.pw_gid, groups)
        return mode, fuid, data

    def _include(self, path, rcpt, state, stack, depth, owner=-1, via=""):
        """Expand :include:``path``. ``owner`` is the uid whose expansion
        names it (a .forward's user, or an include file's owner; -1 for the
        aliases, root's): the file is opened with that user's rights and its
        commands and files run as that user. From the aliases it is opened
        as root and runs as the file's owner (root: default_privs). Either
        way only a regular file is read (never a FIFO or a device), up to
        forward_include_size_limit bytes and INCLUDE_TIME_LIMIT seconds."""
        key = ":include:" + path
        if key in stack:
            state["loops"].append(stack + (key,))
            return
        if depth > MAX_DEPTH:
            raise _Loop(stack + (key, f"... ({MAX_DEPTH} levels max)"))
        reader = owner
        if owner <= 0 and os.geteuid() == 0:
            # From the aliases: a name that someone else controls (a file,
            # or a symbolic link, that is not root's) is read with that
            # user's rights, and what it names runs as that user: a list
            # owner's symlink to a root-only file, or to another user's
            # list, gives no more than the list owner's own rights.
            try:
                named = os.lstat(path).st_uid
            except OSError:
                named = 0
            if named != 0:
                reader = named
        try:
            if reader > 0 and os.geteuid() == 0:
                mode, fuid, data = self._read_as(path, reader)
            else:
                st, data = safefile.read_file(path, self.cfg.forward_include_size_limit,
                                              INCLUDE_TIME_LIMIT)
                mode, fuid = st.st_mode, st.st_uid
            text = data.decode("utf-8", "surrogateescape")
        except (OSError, KeyError) as e:
            why = str(e) if isinstance(e, safefile.Refused) else (
                getattr(e, "strerror", None) or "unknown owner")
            self.log.warning(f"<{rcpt.address}>: cannot open :include:{path}: {why}")
            return
        uid = reader if reader > 0 else fuid
        safe = not mode & 0o022
        targets = []
        for t in self._file_targets(path, text):
            if not safe and t.startswith(("|", "/")):
                self.log.warning(f"{path}: group/world-writable; its |command and /file "
                                 f"targets are not allowed")
                self._child(state, rcpt, t, "", -1)   # fails 5.7.1 when routed
                continue
            targets.append(t)
        self._targets(targets, key, rcpt, state, stack + (key,), depth, "include", uid, via)


def describe(router, rcpt, depth=0):
    """sendmail -bv lines for one recipient: [(deliverable, text)]."""
    r = router.route(rcpt)
    addr = rcpt.address
    steps = []
    if r.kind == "expand" and E.VIRTUAL_DONE not in rcpt.flags and router.virtual:
        got = router.virtual_steps(addr)
        for a, targets in (got[1] if got else ()):
            steps.append((True, f"{a}... virtual_alias_maps: -> {', '.join(targets)}"))
    if steps:
        for child in r.children:
            steps.extend(describe(router, child, depth + 1))
        return steps
    if r.kind == "fail":
        text = r.reply.text
        if text.startswith(f"<{addr}>: "):
            text = text[len(addr) + 4:]
        return [(False, f"{addr}... {text}")]
    if r.kind == "remote":
        return [(True, f"{addr}... deliverable: mailer esmtp, host {r.domain}, user {addr}")]
    if r.kind == "local":
        t = r.target
        if t.kind == "command":
            return [(True, f"|{t.command}... deliverable: mailer prog, user {t.user}")]
        if t.kind == "file":
            return [(True, f"{t.path}... deliverable: mailer *file*, user {t.user}")]
        return [(True, f"{addr}... deliverable: mailer local, user {t.user}, "
                       f"{t.kind} {t.path}")]
    out = []
    for child in r.children:
        out.extend(describe(router, child, depth + 1))
    return out


def verify_main(cfg, opts):
    """``sendmail -bv address ...``: print where each address goes; deliver nothing."""
    router = Router(cfg)
    rw = None
    from . import rewrite
    if rewrite.wanted(cfg):
        rw = rewrite.Rewriter(cfg)
    addrs = list(opts.recipients) + list(opts.args)
    if not addrs:
        print("sendmail: -bv needs at least one address", file=sys.stderr)
        return EX_USAGE
    ok = True
    for text in addrs:
        for one in aliases._split_outside_quotes(text):
            one = one.strip()
            if not one:
                continue
            try:
                addr = address.check_mailbox(one, require_domain=False)
            except AddressError as e:
                print(f"{one}... {e}")
                ok = False
                continue
            if rw is not None:
                new = rw.recipient(addr)
                if new != addr:
                    print(f"{addr}... canonical: -> {new}")
                    addr = new
            for good, line in describe(router, E.Recipient(addr, flags=E.PRIMARY)):
                print(line)
                ok = ok and good
    return EX_OK if ok else EX_NOUSER
