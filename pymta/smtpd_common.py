"""What the SMTP server's process models share: the session services, the
admission limits, binding, the client's name, the TLS context, the
deadlines and the log lines of a connection.

A process model is a module with the same two names: ``Server(sock,
services, submission)``, the sessions of one listening socket, and
``serve(servers, stop, tick)``, which runs them until ``stop()`` is true
and then lets those in progress end. :func:`driver` picks the module that
``smtpd_process_model`` names:

- ``loop`` (:mod:`pymta.smtpd_loop`): every session in one event loop,
  with syncer processes for the fsyncs of the commits;
- ``threads`` (:mod:`pymta.smtpd_threads`): a thread per session, each
  running the blocking pump, the sessions sharing the fsyncs of the queue
  directory;
- ``fork`` (:mod:`pymta.smtpd_pump`): a child process per session, each
  running the blocking pump, which ``sendmail -bs`` runs too.

A session itself is :class:`pymta.smtpd_session.Session`, the protocol with
no socket; the drivers move its bytes and do what
:meth:`~pymta.smtpd_session.Session.next_step` asks (read, commit, start
TLS, close). The server admits at most ``smtpd_session_limit`` sessions and
``smtpd_client_connection_count_limit`` per client address (divided among
the listener processes); the rest get 421 at once. ``STOPPING`` is set by
the daemon on SIGTERM: idle sessions get 421 within a second, a DATA in
progress finishes its commit first.

Nothing here imports a driver (but :func:`driver`, when called).
"""

import importlib
import ipaddress
import logging
import os
import socket
import ssl
import threading

from .smtpd_policy import in_networks
from .smtpd_session import Session
from .queue_dir import Spool
from .status import Reply

STOPPING = threading.Event()

DRIVERS = {"loop": "pymta.smtpd_loop", "threads": "pymta.smtpd_threads", "fork": "pymta.smtpd_pump"}


def driver(cfg):
    """The module of the process model ``smtpd_process_model`` names."""
    return importlib.import_module(DRIVERS[cfg.smtpd_process_model])


def client_ip(addr):
    ip = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        mapped = ipaddress.ip_address(ip.split("%")[0])
        if getattr(mapped, "ipv4_mapped", None):
            return str(mapped.ipv4_mapped)
    except ValueError:
        pass
    return ip


def peername(ip, resolver=None):
    """The client's verified host name: PTR, then A/AAAA of that name must
    give ``ip`` back; else 'unknown'. ``resolver`` is a dnspython resolver
    (dns_nameservers, dns_timeout); None uses the system's (getnameinfo's
    order of sources: /etc/hosts, then DNS, as nsswitch.conf says)."""
    if resolver is None:
        try:
            name = socket.gethostbyaddr(ip)[0]
            addrs = {a[4][0] for a in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError):
            return "unknown"
        return name if ip in addrs else "unknown"
    import dns.exception
    try:
        names = [str(r.target).rstrip(".") for r in resolver.resolve_address(ip)]
    except dns.exception.DNSException:
        return "unknown"
    want = ipaddress.ip_address(ip)
    for name in names[:5]:
        for rdtype in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, rdtype)
            except dns.exception.DNSException:
                continue
            if any(ipaddress.ip_address(r.address) == want for r in answer):
                return name
    return "unknown"


TLS_PEM_MAX = 1 << 20


def tls_pem(cfg):
    """The certificate chain and key files' contents in one PEM text, read
    by the privileged master at a reload to hand to the listeners (which
    cannot read a root-only key); None when STARTTLS is off. Raises OSError."""
    if cfg.smtpd_tls_security_level == "none" or not cfg.smtpd_tls_cert_file:
        return None
    parts = []
    for path in dict.fromkeys(p for p in (cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file) if p):
        with open(path, "rb") as f:
            parts.append(f.read(TLS_PEM_MAX))
    return b"\n".join(parts)


def _load_pem(ctx, pem):
    """load_cert_chain() from memory: through an anonymous file (memfd)."""
    fd = os.memfd_create("pymta-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def make_ssl_context(cfg, log=None, previous=None, pem=None):
    """The server TLS context, or None when STARTTLS is not to be offered.

    At a reload (SIGHUP) the listener runs as mail_owner and may not be
    able to read a key only root can read: ``pem`` is then the certificate
    and key as the master read them (:func:`tls_pem`), and ``previous`` the
    context in use, kept (and the reason logged) when neither gives a new
    one, instead of silently no longer offering STARTTLS (and AUTH)."""
    if cfg.smtpd_tls_security_level == "none" or not cfg.smtpd_tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if pem is not None:
            _load_pem(ctx, pem)
        else:
            ctx.load_cert_chain(cfg.smtpd_tls_cert_file, cfg.smtpd_tls_key_file or None)
    except (OSError, ssl.SSLError) as e:
        if previous is not None:
            if log:
                how = "as handed over by the master" if pem is not None else f"as uid {os.geteuid()}"
                log.warning(f"warning: reload: cannot load TLS certificate {cfg.smtpd_tls_cert_file} "
                            f"and key {cfg.smtpd_tls_key_file or cfg.smtpd_tls_cert_file} {how}: "
                            f"{e}; STARTTLS goes on with the certificate and key loaded before")
            return previous
        if log:
            log.error(f"warning: cannot load TLS certificate {cfg.smtpd_tls_cert_file}: {e}; "
                      "STARTTLS is not offered")
        return None
    return ctx


class Services:
    """What sessions share under one configuration; rebuilt on SIGHUP."""

    def __init__(self, cfg, log=None, notify=None, previous=None, pem=None):
        self.cfg = cfg
        self.log = log or logging.getLogger("pymta")
        self.spool = Spool.from_config(cfg)
        self.notify = notify
        self.ssl_ctx = make_ssl_context(cfg, self.log,
                                        previous.ssl_ctx if previous is not None else None, pem)
        from . import route
        router = route.Router(cfg, log=self.log)
        self.recipient_check = router.recipient_check
        self.expand = self._expander(route, router)
        from . import auth
        self.auth = auth.PasswordFile(cfg.smtpd_sasl_password_file, self.log)
        # The client's name: with dns_nameservers, those DNS servers only;
        # else the system's resolver in its own order (nsswitch.conf: files,
        # then DNS), so a loopback client is "localhost" as /etc/hosts says.
        self.resolver = None
        self.peer_lookup = None
        if cfg.smtpd_peername_lookup:
            if cfg.dns_nameservers:
                from . import mx
                resolver = self.resolver = mx.make_resolver(cfg)
                self.peer_lookup = lambda ip: peername(ip, resolver)
            else:
                self.peer_lookup = peername

    @staticmethod
    def _expander(route, router):
        def expand(addr):
            from . import envelope as E
            try:
                rt = router.route(E.Recipient(addr))
            except Exception:   # noqa: BLE001 - a routing failure only means no expansion here
                return []
            if rt.kind == "expand":
                return [c.address for c in rt.children]
            return [addr] if rt.kind == "local" else []
        return expand

    def session(self, client_addr="", client_name="unknown", submission=False, check=False, **kw):
        """A Session; ``check``: its messages' control files record their
        df's length, CRC-32 and boot id (the loop's one-round commit)."""
        spool = self.spool
        return Session(
            self.cfg, begin_message=(lambda: spool.new_message(check=True)) if check
            else spool.new_message, client_addr=client_addr,
            client_name=client_name, recipient_check=self.recipient_check,
            auth_verify=self.auth if kw.pop("auth", True) else None,
            free_space=self.spool.free_space, log=self.log, submission=submission,
            draining=STOPPING.is_set, expand=self.expand, accepted=self.notify, **kw)


class Admission:
    """The sessions of one listening socket, counted in total and per
    client address for the limits; the base of each driver's ``Server``.
    ``share``: the listener processes that divide the limits between them;
    ``submission``: AUTH required before MAIL; ``implicit_tls``: TLS before
    the greeting (submissions, port 465)."""

    share = 1

    def __init__(self, services, submission=False):
        self.services = services
        self.submission = bool(submission)
        self.implicit_tls = submission == "tls"
        self._count_lock = threading.Lock()
        self._total = 0
        self._per_client = {}

    def admit(self, ip):
        """None when a session from ``ip`` may start (it is counted),
        else the 421 to send."""
        cfg = self.services.cfg
        n = self.share
        with self._count_lock:
            if self._total >= -(-cfg.smtpd_session_limit // n):
                return Reply(421, "4.7.0", f"{cfg.myhostname} Error: too many sessions, try again later")
            limit = cfg.smtpd_client_connection_count_limit
            if limit and self._per_client.get(ip, 0) >= -(-limit // n) \
                    and not in_networks(ip, cfg.smtpd_client_event_limit_exceptions):
                return Reply(421, "4.7.0", f"{cfg.myhostname} Error: too many connections from {ip}")
            self._total += 1
            self._per_client[ip] = self._per_client.get(ip, 0) + 1
        return None

    def turned_away(self, sock, ip, blocking=True):
        """Admit a session from ``ip`` (False), or send ``sock`` its 421,
        log it and return True; the caller closes the socket. A blocking
        send waits 2 s at most; the event loop's does not wait."""
        refusal = self.admit(ip)
        if refusal is None:
            return False
        self.services.log.info(f"warning: {ip}: {refusal}")
        try:
            if blocking:
                sock.settimeout(2)
                sock.sendall(refusal.lines())
            else:
                sock.setblocking(False)
                sock.send(refusal.lines())
        except OSError:
            pass
        return True

    def leave(self, ip):
        """A session admitted from ``ip`` has ended."""
        with self._count_lock:
            self._total -= 1
            n = self._per_client.get(ip, 1) - 1
            if n:
                self._per_client[ip] = n
            else:
                self._per_client.pop(ip, None)

    @property
    def sessions(self):
        return self._total

    @property
    def stressed(self):
        """Whether this listener has every slot of its share of
        smtpd_session_limit in use (new clients get 421), Postfix's stress:
        its sessions then get smtpd_stress_timeout."""
        return self._total >= -(-self.services.cfg.smtpd_session_limit // self.share)


def bind(spec, default_port=25):
    """A listening socket for 'addr:port' or '[v6]:port' (IPv6 only on v6)."""
    return bind_copies(spec, default_port, 1)[0]


def bind_copies(spec, default_port, copies):
    """``copies`` listening sockets on one address, one per listener
    process: with more than one, SO_REUSEPORT sockets (the kernel spreads
    connections among them), after a plain bind has shown that nobody else
    listens there."""
    from .config import parse_hostport
    host, port = parse_hostport(spec, default_port)
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]

    def one(reuseport, listen=True):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            if listen:
                sock.listen(256)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock
    if copies <= 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [one(False)] * max(1, copies)
    one(False, listen=False).close()     # EADDRINUSE if anyone listens there
    if addr[1] == 0:
        raise ValueError(f"{spec}: several listeners need a fixed port")
    socks = []
    try:
        for _ in range(copies):
            socks.append(one(True))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def record_clock(cfg, session, data, partial):
    """After ``data`` was read and fed to ``session``: (whether the client's
    smtpd_timeout starts again, bytes of the line now in progress). With
    smtpd_per_record_deadline the clock starts again only once a whole line
    (in DATA: a line, or line_length_limit bytes of a longer one) has come,
    as Postfix's smtpd_per_record_deadline does; without, at every read."""
    if not cfg.smtpd_per_record_deadline:
        return True, 0
    nl = data.rfind(b"\n")
    if nl >= 0:
        return True, len(data) - nl - 1
    partial += len(data)
    if session.in_data and partial >= cfg.line_length_limit:
        return True, 0
    return False, partial


def timeout_of(cfg, stressed=False):
    """smtpd_timeout, or smtpd_stress_timeout when the listener is under
    stress (as Postfix's smtpd_timeout = ${stress?{10}:{300}}s)."""
    if stressed and cfg.smtpd_stress_timeout:
        return min(cfg.smtpd_timeout, cfg.smtpd_stress_timeout)
    return cfg.smtpd_timeout


def deadline(cfg, session, idle_since, data_start, stressed=False):
    """When the session times out: ``smtpd_timeout`` (under stress
    ``smtpd_stress_timeout``) after the client's clock last started
    (``idle_since``: see record_clock), and during DATA (begun at
    ``data_start``) also when it is slower than ``smtpd_min_data_rate`` (0:
    no limit for the whole DATA)."""
    timeout = timeout_of(cfg, stressed)
    limit = idle_since + timeout
    if data_start is not None and cfg.smtpd_min_data_rate:
        slow = data_start + timeout + session.data_received / cfg.smtpd_min_data_rate
        limit = min(limit, slow)
    return limit


def expire(cfg, log, session, peer, now, idle_since, stressed=False):
    """Close a session past its deadline; the 421 to send, logged."""
    if session.in_data and now < idle_since + timeout_of(cfg, stressed):
        log.info(f"data rate too low after DATA from {peer}")
        session.close()
        return Reply(421, "4.4.2", f"{cfg.myhostname} Error: data rate too low, "
                     "closing connection").lines()
    log.info(f"timeout after {session.last_command} from {peer}")
    return session.timeout()


def lost_line(last_command, peer, e=None):
    """The log line for a connection that closed or failed under us."""
    return (f"lost connection after {last_command} from {peer}"
            + (f" ({e.strerror or e})" if e is not None and not isinstance(e, ConnectionResetError)
               else ""))


def early_line(peer):
    return (f"reject: CONNECT from {peer}: 554 5.5.1 Error: SMTP protocol "
            "synchronization (client talked before the greeting)")


R_EARLY = Reply(554, "5.5.1", "Error: SMTP protocol synchronization")
