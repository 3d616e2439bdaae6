"""SMTP delivery to the next MTA with stdlib smtplib: one transaction per
destination for all its recipients, a Reply per recipient.

The message is streamed from the df to the socket (LF -> CRLF, any CR
dropped, dot-stuffing; BDAT chunks without dot-stuffing to a server that
offers CHUNKING), never read whole, so a 100 MB message costs 256 KB
of memory. Hosts come from mx.lookup() or from ``relayhost``; a host that
refuses, drops or stalls before MAIL moves delivery to the next address.
Connections may be kept in a :class:`ConnectionCache` and reused for the
next message to the same destination in the same queue run.

Choices (documented in sendmail(8)): an 8-bit body to a server that does
not offer 8BITMIME is sent as it is, without BODY= (as Postfix does with
MIME conversion off); BINARYMIME cannot be sent over DATA and fails with
5.6.3. TLS follows the policy of :mod:`pymta.tls_policy` (STARTTLS, or
TLS from the first byte with smtp_tls_wrappermode); after TLS, SMTP AUTH
as a client is :mod:`pymta.sasl_client`, never in plain text.
"""

import ipaddress
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
import weakref

from . import config as C
from . import dkimsign, mx
from . import sasl_client, tls_policy
from . import sched as _sched
from .address import domain_of, xtext_encode
from .queue_dir import Spool
from .status import MESSAGE_BLOCK, PermFail, Reply, TempFail

CHUNK = MESSAGE_BLOCK
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class Results(dict):
    """address -> Reply, plus ``relay`` ("name [ip]:port" of the server that
    answered, or "" when none did) and ``dsn`` (whether it offered DSN)."""

    relay = ""
    dsn = False
    without_dsn = frozenset()   # accepted by a server that does not offer DSN


STOPPING = threading.Event()
_live = weakref.WeakSet()       # every socket made here, open or not
_live_lock = threading.Lock()


def abort_connections():
    """The mail system stops: no new connection, and every open one (also
    one still connecting, or waiting for a greeting) is shut down, so that
    the threads using them get an error at once instead of a timeout."""
    STOPPING.set()
    with _live_lock:
        socks = list(_live)
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP with a connect timeout distinct from the greeting's."""

    def __init__(self, cfg, wrap_context=None):
        self._greet_timeout = cfg.smtp_helo_timeout
        self._wrap_context = wrap_context     # implicit TLS (smtp_tls_wrappermode)
        super().__init__(local_hostname=cfg.smtp_helo_name, timeout=cfg.smtp_connect_timeout)

    def _get_socket(self, host, port, timeout):
        # ``host`` is an address: connect without a lookup, through a socket
        # that abort_connections() can reach while connect() waits.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        with _live_lock:
            _live.add(sock)
        if STOPPING.is_set():
            sock.close()
            raise OSError(0, "mail system stopping")
        try:
            sock.settimeout(timeout)
            if self.source_address:
                sock.bind(self.source_address)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        # Commands go out in whole groups; Nagle would only delay them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._wrap_context is not None:
            try:
                sock = self._wrap_context.wrap_socket(sock, server_hostname=self._host)
            except BaseException:
                sock.close()
                raise
            with _live_lock:
                _live.add(sock)
        sock.settimeout(self._greet_timeout)
        return sock


def to_reply(code, msg, default_enhanced=None):
    """An smtplib (code, bytes) answer as a Reply, its enhanced code parsed out."""
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    lines = text.split("\n")
    enhanced = ""
    m = _ENHANCED_RE.match(lines[0])
    if m and m.group(1) == str(code)[0]:
        enhanced = m.group(0).strip()
        lines = [_ENHANCED_RE.sub("", ln, count=1) for ln in lines]
    if not enhanced:
        enhanced = default_enhanced or {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
    return Reply(code, enhanced, " ".join(ln.strip() for ln in lines).strip())


def _temp(text, enhanced="4.4.2"):
    return Reply(451, enhanced, text)


class Busy(TempFail):
    """Every connection slot of the destination is taken (by this process or
    another): nothing was tried, the message waits for a free one."""


class Connection:
    """An open SMTP session with one server, between transactions. It holds
    one of its destination's connection slots (pymta.sched) until closed."""

    slot = None
    hop = None              # the destination whose slot it holds
    idle_since = 0.0        # when it went into a ConnectionCache (time.time())

    def __init__(self, smtp, host, ip, port, tls):
        self.smtp, self.host, self.ip, self.port, self.tls = smtp, host, ip, port, tls
        self.relay = f"{host.strip('[]')} [{ip}]:{port}"

    def close(self, quit=True):
        try:
            if quit:
                self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        try:
            self.smtp.close()
        except OSError:
            pass
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class ConnectionCache:
    """Idle connections by destination, reused within one queue run."""

    def __init__(self, per_destination=4):
        self._idle = {}
        self._lock = threading.Lock()
        self.per_destination = per_destination

    def get(self, key):
        with self._lock:
            lst = self._idle.get(key)
            return lst.pop() if lst else None

    def put(self, key, conn):
        conn.idle_since = time.time()
        with self._lock:
            lst = self._idle.setdefault(key, [])
            if len(lst) < self.per_destination:
                lst.append(conn)
                return
        conn.close()

    def close_all(self):
        with self._lock:
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()

    def close_unwanted_idle(self, sch, idle_time):
        """Close the idle connections whose destination someone waits for
        (a want newer than their idleness, pymta.sched) or that have been
        idle for ``idle_time`` seconds; keep the others for the next message."""
        now = time.time()
        with self._lock:
            go = []
            for key, lst in list(self._idle.items()):
                keep = []
                for c in lst:
                    if now - c.idle_since >= idle_time or (c.hop is not None
                                                           and sch.wanted(c.hop, c.idle_since)):
                        go.append(c)
                    else:
                        keep.append(c)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for c in go:
            c.close()


def destination(cfg, domain):
    """(name, port, use_mx) for a next-hop ``domain``; relayhost overrides,
    except for a transport_maps next hop ("smtp:" + nexthop).

    ``[host]:port`` as in Postfix: brackets mean no MX lookup. An IP address
    becomes an address literal."""
    if domain.startswith("smtp:"):
        target = domain[5:]
    else:
        target = cfg.relayhost or domain
    use_mx = not target.startswith("[")
    if target.startswith("[") and target.endswith("]") and literal_is_ip(target):
        return target, cfg.smtp_port, False
    try:
        host, port = C.parse_hostport(target, cfg.smtp_port)
    except ValueError:
        host, port = target, cfg.smtp_port
    try:
        ip = ipaddress.ip_address(host)
        host = f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"
        use_mx = False
    except ValueError:
        pass
    return host, port, use_mx


def literal_is_ip(text):
    inner = text[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        ipaddress.ip_address(inner)
        return True
    except ValueError:
        return False


class DeadHosts:
    """Servers (address, port) that refused the connection, timed out or
    greeted with 421, with the reply, until smtp_dead_host_time has passed.
    Shared by every delivery of the process, so that a dead relay costs one
    connection attempt per period, not one per message."""

    def __init__(self):
        self._dead = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._dead.get(key)
            if item is None:
                return None
            if item[0] <= time.monotonic():
                del self._dead[key]
                return None
            return item[1]

    def mark(self, cfg, key, reply):
        if cfg.smtp_dead_host_time > 0:
            with self._lock:
                self._dead[key] = (time.monotonic() + cfg.smtp_dead_host_time, reply)

    def clear(self, key=None):
        with self._lock:
            if key is None:
                self._dead.clear()
            else:
                self._dead.pop(key, None)


dead_hosts = DeadHosts()


def _open(cfg, host, ip, port, verbose, log, tls_ok=True, policy=None, domain=None):
    """Connect, greet, EHLO, TLS as ``policy`` (a tls_policy.Policy; the
    static one when None) asks and AUTH when configured for next hop
    ``domain``; returns (Connection, None) or (None, Reply) saying why this
    address is no good. A server marked dead is not tried; one that
    refuses, times out or greets with 421 is marked dead."""
    dead = dead_hosts.get((ip, port))
    if dead is not None:
        return None, dead
    if policy is None:
        policy = tls_policy.static_policy(cfg, domain or host, host)
    conn, why = _open1(cfg, host, ip, port, verbose, log, tls_ok, policy, domain or host)
    if STOPPING.is_set():
        if conn is not None:
            conn.close(quit=False)
        return None, Reply(451, "4.3.2", "delivery interrupted: mail system stopping")
    if conn is not None:
        dead_hosts.clear((ip, port))
    elif _dead_kind(why):
        dead_hosts.mark(cfg, (ip, port), why)
    return conn, why


def host_at(host, ip):
    """'host[ip]' as the log and mailq show a server; an address literal
    ([192.0.2.1], [IPv6:...]) is its address already: '[ip]' once."""
    if host.startswith("[") and host.endswith("]"):
        return f"[{ip}]"
    return f"{host}[{ip}]"


def _open1(cfg, host, ip, port, verbose, log, tls_ok, policy, domain):
    where = f"{host_at(host, ip)}:{port}"
    level = policy.level
    wrap = cfg.smtp_tls_wrappermode and level != "none"
    ctx = None
    if level != "none":
        try:
            ctx = tls_policy.client_context(cfg, policy)
        except tls_policy.TLSSetupError as e:
            return None, _temp(str(e), "4.7.5")
    smtp = _SMTP(cfg, wrap_context=ctx if wrap else None)
    if verbose:
        smtp.set_debuglevel(1)
    smtp._host = ip if host.startswith("[") else host    # the TLS server name
    try:
        code, msg = smtp.connect(ip, port)
    except ssl.SSLError as e:          # implicit TLS: the handshake is part of connecting
        smtp.close()
        return None, _tls_failed(where, e)
    except smtplib.SMTPConnectError as e:
        return None, to_reply(e.smtp_code, e.smtp_error, "4.4.1")
    except (socket.timeout, TimeoutError):
        smtp.close()
        return None, _temp(f"connect to {where}: Connection timed out", "4.4.1")
    except smtplib.SMTPServerDisconnected as e:
        smtp.close()
        return None, _temp(f"lost connection with {where} while receiving the initial "
                           f"server greeting ({e})", "4.4.2")
    except OSError as e:
        smtp.close()
        return None, _temp(f"connect to {where}: {e.strerror or e}", "4.4.1")
    if code != 220:
        smtp.close()
        return None, to_reply(code, msg, "4.4.1" if code < 500 else "5.0.0")
    tls = wrap
    try:
        if wrap:
            bad = tls_policy.check_peer(policy, smtp.sock)
            if bad is not None:
                smtp.close()
                return None, _temp(f"TLS: {bad} ({where}, {policy.why})", "4.7.5")
        smtp.sock.settimeout(cfg.smtp_helo_timeout)
        code, msg = smtp.ehlo()
        if code != 250:
            code, msg = smtp.helo()
            if code != 250:
                smtp.close()
                return None, to_reply(code, msg)
        if not wrap and level != "none" and tls_ok and smtp.has_extn("starttls"):
            try:
                code, msg = smtp.starttls(context=ctx)
            except (ssl.SSLError, OSError, smtplib.SMTPException) as e:
                smtp.close()
                if level == "may" and not _has_credentials(cfg, domain, host):
                    log.info(f"{where}: TLS failed ({e}); trying again without TLS")
                    return _open1(cfg, host, ip, port, verbose, log, False, policy, domain)
                return None, _tls_failed(where, e)
            bad = tls_policy.check_peer(policy, smtp.sock)
            if bad is not None:
                smtp.close()
                return None, _temp(f"TLS: {bad} ({where}, {policy.why})", "4.7.5")
            tls = True
            code, msg = smtp.ehlo()
            if code != 250:
                smtp.close()
                return None, to_reply(code, msg)
        elif not wrap and policy.required:
            smtp.close()
            return None, _temp(f"TLS is required, but was not offered by {where}", "4.7.4")
        if cfg.smtp_sasl_auth_enable and smtp.has_extn("auth"):
            why = _authenticate(cfg, smtp, tls, domain, host, where, log)
            if why is not None:
                smtp.close()
                return None, why
    except smtplib.SMTPServerDisconnected as e:
        smtp.close()
        return None, _temp(f"lost connection with {where} while sending EHLO ({e})")
    except (OSError, smtplib.SMTPException) as e:
        smtp.close()
        return None, _temp(f"conversation with {where} failed during EHLO: {e}")
    return Connection(smtp, host, ip, port, tls), None


def _tls_failed(where, e):
    if isinstance(e, ssl.SSLCertVerificationError):
        return _temp(f"TLS certificate not verified: {e.verify_message or e.reason} ({where})",
                     "4.7.5")
    return _temp(f"TLS handshake with {where} failed: {e}", "4.7.5")


def _has_credentials(cfg, domain, host):
    """Whether AUTH is configured for this server: then a failed TLS
    handshake is not retried in plain text, where the login could not be
    made and the server would refuse the mail, perhaps for good."""
    if not cfg.smtp_sasl_auth_enable:
        return False
    try:
        return sasl_client.credentials(cfg, domain, host) is not None
    except sasl_client.PasswordError:
        return True


def _authenticate(cfg, smtp, tls, domain, host, where, log):
    """SMTP AUTH when there are credentials for this server; None when
    done or not needed, else the Reply that defers the message."""
    try:
        creds = sasl_client.credentials(cfg, domain, host)
    except sasl_client.PasswordError as e:
        log.error(f"{where}: {e}")
        return _temp(f"SASL: {e}", "4.7.0")
    if creds is None:
        return None
    if not tls:
        return Reply(454, "4.7.0", f"{where} offers AUTH without TLS: no credentials sent "
                                   "(pymta sends them only over TLS)")
    return sasl_client.login(smtp, creds, where)


def _mail_params(conn, env):
    smtp = conn.smtp
    params = []
    if smtp.has_extn("size"):
        params.append(f"SIZE={env.size}")
    if env.body_type == "8BITMIME" and smtp.has_extn("8bitmime"):
        params.append("BODY=8BITMIME")
    if env.smtputf8 and smtp.has_extn("smtputf8"):
        params.append("SMTPUTF8")
    if smtp.has_extn("dsn"):
        if env.ret:
            params.append(f"RET={env.ret}")
        if env.envid:
            params.append(f"ENVID={xtext_encode(env.envid)}")
    return "".join(" " + p for p in params)


def _rcpt_params(conn, r):
    if not conn.smtp.has_extn("dsn"):
        return ""
    params = []
    if "N" in r.flags:
        params.append("NOTIFY=NEVER")
    else:
        words = [w for f, w in (("S", "SUCCESS"), ("F", "FAILURE"), ("D", "DELAY")) if f in r.flags]
        if words:
            params.append("NOTIFY=" + ",".join(words))
    if r.orcpt:
        # The spool keeps the value decoded; on the wire it is xtext
        # (RFC 3461 4.2): "+" and "=" too, or user+tag@ is refused.
        kind, sep, value = r.orcpt.partition(";")
        if sep:
            params.append(f"ORCPT={kind};{xtext_encode(value)}")
    return "".join(" " + p for p in params)


def _precheck(conn, env):
    """A Reply failing the whole message before MAIL, or None."""
    smtp = conn.smtp
    if env.body_type == "BINARYMIME":
        return Reply(554, "5.6.3", "Binary content cannot be relayed with DATA")
    limit = smtp.esmtp_features.get("size", "")
    if limit.strip().isdigit() and int(limit) and env.size > int(limit):
        return Reply(552, "5.3.4", f"Message size exceeds fixed limit of {conn.relay} ({limit})")
    if env.smtputf8 and not smtp.has_extn("smtputf8"):
        if any(not r.isascii() for r in [env.sender] + [x.address for x in env.recipients]):
            return Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by {conn.relay}")
    return None


def stream_data(sock, f, prefix=b""):
    """Send the df ``f`` as SMTP DATA, after the header lines ``prefix``
    (a DKIM-Signature): LF -> CRLF, CRs dropped, dot-stuffed, then the
    final CRLF.CRLF. Works chunk by chunk."""
    at_line_start = True
    pending = bytearray(prefix.replace(b"\n", b"\r\n"))
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            break
        chunk = chunk.replace(b"\r", b"")
        if not chunk:
            continue
        if at_line_start and chunk[:1] == b".":
            pending += b"."
        chunk = chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        at_line_start = chunk.endswith(b"\n")
        pending += chunk
        if len(pending) >= CHUNK:
            sock.sendall(pending)
            pending.clear()
    if not at_line_start:
        pending += b"\r\n"
    pending += b".\r\n"
    sock.sendall(pending)


def stream_chunks(smtp, f, prefix=b""):
    """Send the df ``f`` as BDAT chunks (RFC 3030), after the header lines
    ``prefix``: CRs dropped, LF -> CRLF, no dot-stuffing, a CRLF added at
    the end when missing. Each chunk's reply is read before the next goes;
    returns the reply to the LAST chunk, or to the first one refused."""
    data = bytearray(prefix.replace(b"\n", b"\r\n"))
    ends_line = True
    following = f.read(CHUNK)
    while True:
        chunk, following = following, b""
        if chunk:
            following = f.read(CHUNK)
            chunk = chunk.replace(b"\r", b"")
            if chunk:
                ends_line = chunk.endswith(b"\n")
                data += chunk.replace(b"\n", b"\r\n")
        last = not following
        if last and not ends_line:
            data += b"\r\n"
        smtp.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b""))
        smtp.sock.sendall(data)
        code, msg = smtp.getreply()
        if last or code != 250:
            return code, msg
        data.clear()


def _encode_cmd(text, utf8):
    return (text + "\r\n").encode("utf-8" if utf8 else "ascii", "strict" if not utf8 else "replace")


class _Stale(TempFail):
    """A cached connection that turned out to be dead before MAIL."""


def transaction(cfg, conn, env, rcpts, spool, reset=False):
    """One MAIL/RCPT.../DATA on ``conn`` (preceded by RSET when ``reset``,
    for a reused connection). With PIPELINING, RSET, MAIL, every RCPT and
    DATA go out in one write (RFC 2920). Returns (results, reusable);
    raises _Stale if a reused connection is found dead at RSET."""
    smtp = conn.smtp
    results = Results()
    results.relay = conn.relay
    results.dsn = smtp.has_extn("dsn")
    bad = _precheck(conn, env)
    if bad is not None:
        for r in rcpts:
            results[r.address] = bad
        return results, True
    utf8 = env.smtputf8 and smtp.has_extn("smtputf8")
    pipelining = smtp.has_extn("pipelining")
    chunking = smtp.has_extn("chunking")       # BDAT instead of DATA
    data_cmd = b"" if chunking else b"DATA\r\n"
    stage = "MAIL FROM"
    gen = None
    if cfg.smtp_generic_maps:
        from . import rewrite
        gen = rewrite.generic(cfg)
    out = gen or (lambda a: a)        # smtp_generic_maps: addresses as they leave
    try:
        cmds = [f"MAIL FROM:<{out(env.sender)}>{_mail_params(conn, env)}"]
        cmds += [f"RCPT TO:<{out(r.address)}>{_rcpt_params(conn, r)}" for r in rcpts]
        try:
            wire = [_encode_cmd(c, utf8) for c in cmds]
        except UnicodeEncodeError:
            for r in rcpts:
                results[r.address] = Reply(553, "5.6.7", "non-ASCII address and no SMTPUTF8 support")
            return results, True
        smtp.sock.settimeout(cfg.smtp_command_timeout)
        if reset:
            try:
                if pipelining:
                    smtp.send(b"RSET\r\n" + b"".join(wire) + data_cmd)
                else:
                    smtp.send(b"RSET\r\n")
                code = smtp.getreply()[0]
            except (smtplib.SMTPException, OSError):
                raise _Stale() from None
            if code != 250:
                raise _Stale()
        elif pipelining:
            smtp.send(b"".join(wire) + data_cmd)
        answers = []
        if pipelining:
            for _ in wire:
                answers.append(smtp.getreply())
                stage = "RCPT TO"
            stage = "DATA"
            data_answer = None if chunking else smtp.getreply()
        else:
            smtp.send(wire[0])
            answers.append(smtp.getreply())
            if answers[0][0] == 250:
                stage = "RCPT TO"
                for w in wire[1:]:
                    smtp.send(w)
                    answers.append(smtp.getreply())
            data_answer = None
        code, msg = answers[0]
        accepted = []
        if code != 250:
            reply = to_reply(code, msg)
            for r in rcpts:
                results[r.address] = reply
        else:
            for r, (code, msg) in zip(rcpts, answers[1:]):
                if 200 <= code < 300:
                    accepted.append(r)
                else:
                    results[r.address] = to_reply(code, msg)
        if any(a[0] == 421 for a in answers) or (data_answer and data_answer[0] == 421):
            reply = to_reply(421, b"4.4.2 server closing the connection")
            for r in rcpts:
                results.setdefault(r.address, reply)
            return results, False
        if not accepted:
            if data_answer and data_answer[0] == 354:
                smtp.send(b".\r\n")        # RFC 2920: end the empty DATA
                smtp.getreply()
            return results, True
        if chunking:
            stage = "BDAT"
            smtp.sock.settimeout(cfg.smtp_data_done_timeout)
            with spool.open_data(env.id) as f:
                if gen is not None:
                    f = rewrite.HeaderRewritingReader(f, rewrite.generic_field(gen),
                                                      cfg.header_size_limit)
                code, msg = stream_chunks(smtp, f, getattr(env, "dkim_signature", b""))
            reply = to_reply(code, msg)
            for r in accepted:
                results[r.address] = reply
            return results, code != 421
        stage = "DATA"
        if data_answer is None:
            smtp.putcmd("data")
            data_answer = smtp.getreply()
        code, msg = data_answer
        if code != 354:
            reply = to_reply(code, msg) if code >= 400 else _temp(f"unexpected reply to DATA: {code}", "4.5.0")
            for r in accepted:
                results[r.address] = reply
            return results, True
        stage = "end of data"
        with spool.open_data(env.id) as f:
            if gen is not None:
                f = rewrite.HeaderRewritingReader(f, rewrite.generic_field(gen),
                                                  cfg.header_size_limit)
            stream_data(smtp.sock, f, getattr(env, "dkim_signature", b""))
        smtp.sock.settimeout(cfg.smtp_data_done_timeout)
        code, msg = smtp.getreply()
        reply = to_reply(code, msg)
        for r in accepted:
            results[r.address] = reply
        return results, code != 421
    except (smtplib.SMTPException, OSError) as e:
        why = "timed out" if "timed out" in str(e) else "lost connection"
        reply = _temp(f"{why} with {conn.relay} while sending {stage}")
        for r in rcpts:
            results.setdefault(r.address, reply)
        return results, False


def hop_key(cfg, domain):
    """The scheduling name of the next hop ``domain``: "name:port"."""
    name, port, _ = destination(cfg, domain)
    return f"{name.lower()}:{port}"


def deliver(cfg, env, rcpts, domain, log=None, resolver=None, cache=None, verbose=False):
    """Deliver ``env`` to ``rcpts`` (envelope.Recipient objects or addresses)
    at the next hop ``domain``; returns Results (address -> Reply).

    Recipients go out in transactions of at most
    smtp_destination_recipient_limit. Recipients a server answered 452 (too
    many recipients) go again at once in a new transaction, over the same
    connection when it stays open, as long as each transaction gets at least
    one recipient accepted; otherwise the 452 stands and they are deferred.

    A destination marked dead (pymta.sched) defers every recipient with the
    mark's reply, without a connection. Raises Busy, nothing tried, when a
    new connection is needed and every slot of the destination is taken."""
    log = log or logging.getLogger("pymta")
    rcpts = [r if hasattr(r, "address") else _Rcpt(r) for r in rcpts]
    sch = _sched.for_config(cfg, log)
    hop = hop_key(cfg, domain)
    results = Results()
    results.without_dsn = set()     # accepted by a server that does not offer DSN
    dead = sch.dead(hop)
    if dead is not None:
        for r in rcpts:
            results[r.address] = dead
        return results
    try:
        dkimsign.for_message(cfg, env, Spool.from_config(cfg), log)
    except TempFail as e:
        log.error(f"{env.id}: {e}")
        return Results({r.address: e.reply for r in rcpts})
    limit = cfg.smtp_destination_recipient_limit
    own_cache = cache is None
    if own_cache:
        cache = ConnectionCache(per_destination=1)
    pending = list(rcpts)
    try:
        while pending:
            batch, pending = (pending[:limit], pending[limit:]) if limit > 0 else (pending, [])
            try:
                res = _deliver_batch(cfg, env, batch, domain, log, resolver, cache, verbose, sch, hop)
            except Busy:
                if not results:
                    raise
                busy = _temp(f"all connections to {hop} in use", "4.4.5")
                for r in batch + pending:
                    results[r.address] = busy
                break
            if res.relay or not results.relay:
                results.relay = res.relay
            again = [r for r in batch if res[r.address].code == 452]
            progress = any(200 <= res[r.address].code < 300 for r in batch)
            for r in batch:
                if not (progress and res[r.address].code == 452):
                    results[r.address] = res[r.address]
                    if not res.dsn:
                        results.without_dsn.add(r.address)
            if progress and again:
                pending = again + pending
    finally:
        if own_cache:
            cache.close_all()
    if any(200 <= reply.code < 300 for reply in results.values()):
        sch.delivered(hop)
    return results


def _dead_kind(why):
    """Whether a failure to open a connection says the server is unusable for
    a while (refused, timed out, 421 greeting), as the dead-host mark does."""
    return (why.code == 421 or why.enhanced == "4.4.1" and why.text.startswith("connect to")
            or "initial server greeting" in why.text and "timed out" in why.text)


def _deliver_batch(cfg, env, rcpts, domain, log, resolver, cache, verbose, sch, hop):
    """One transaction for ``rcpts`` at ``domain`` (reusing a cached
    connection when there is one)."""
    spool = Spool.from_config(cfg)
    name, port, use_mx = destination(cfg, domain)
    key = (name.lower(), port)
    if cache is not None:
        while True:
            conn = cache.get(key)
            if conn is None:
                break
            try:
                results, reusable = transaction(cfg, conn, env, rcpts, spool, reset=True)
            except _Stale:
                conn.close(quit=False)
                continue
            except BaseException:
                conn.close(quit=False)
                raise
            _finish(cache, key, conn, reusable)
            return results
    slot = sch.acquire(hop)
    if slot is None:
        sch.want(hop)       # the processes that keep idle connections to it let them go
        raise Busy(hop)
    try:
        # Looked at again with the slot in hand: another thread or process
        # may have marked the hop dead between deliver()'s look and now
        # (it marks before it lets its slot go).
        dead = sch.dead(hop)
        if dead is not None:
            return Results({r.address: dead for r in rcpts})
        try:
            hosts = mx.lookup(cfg, name, resolver=resolver, port=port, use_mx=use_mx)
        except (TempFail, PermFail) as e:
            results = Results()
            for r in rcpts:
                results[r.address] = e.reply
            return results
        plan = tls_policy.Plan(cfg, name, port, use_mx, resolver, log)
        try:
            hosts = plan.hosts(hosts)
        except TempFail as e:
            results = Results()
            for r in rcpts:
                results[r.address] = e.reply
            return results
        last = _temp(f"no server for {name} answered", "4.4.1")
        relay = ""
        all_dead = True
        for host in hosts:
            policy, why = plan.policy(host)
            if why is not None:
                log.info(f"{env.id}: {host.name}: {why.text}")
                last, relay = why, host.name
                all_dead = False
                continue
            for ip in host.addresses:
                conn, why = _open(cfg, host.name, ip, port, verbose, log, policy=policy, domain=name)
                if conn is None:
                    log.info(f"{env.id}: {why.text}" if why.text.startswith(("connect", "lost", "TLS"))
                             else f"{env.id}: {host_at(host.name, ip)}:{port} said: {why}")
                    last, relay = why, f"{host.name.strip('[]')} [{ip}]:{port}"
                    if why.code == 421 and not STOPPING.is_set():
                        others = sch.busy(hop) - 1          # the slot held here is one
                        if others > 0:
                            # It serves our other connections: its limit, not
                            # its death. The message waits for a slot.
                            dead_hosts.clear((ip, port))
                            sch.cap(hop, others)
                            log.info(f"{env.id}: {hop}: 421 with {others} other connection(s) "
                                     f"open: at most {others} at once for now")
                            sch.want(hop)
                            raise Busy(hop)
                    all_dead = all_dead and _dead_kind(why)
                    continue
                conn.slot, slot = slot, None
                conn.hop = hop
                try:
                    results, reusable = transaction(cfg, conn, env, rcpts, spool)
                except BaseException:
                    conn.close(quit=False)      # and its slot with it
                    raise
                _finish(cache, key, conn, reusable)
                return results
        if all_dead and relay and not STOPPING.is_set():
            # Every server of the destination is unusable: its other messages,
            # in every process, are deferred without a connection for a while.
            sch.mark_dead(hop, last)
        results = Results()
        results.relay = relay
        if last.code >= 500 and not last.enhanced.startswith("5"):
            last = Reply(last.code, "5.0.0", last.text)
        for r in rcpts:
            results[r.address] = last
        return results
    finally:
        if slot is not None:
            slot.release()


def _finish(cache, key, conn, reusable):
    if reusable and cache is not None:
        cache.put(key, conn)
    else:
        conn.close(quit=reusable)


class _Rcpt:
    """A bare address given to deliver() instead of a Recipient."""

    flags, orcpt = "", ""

    def __init__(self, address):
        self.address = address


def next_hop(cfg, address):
    """The next-hop domain of a remote ``address`` (relayhost when set)."""
    return cfg.relayhost or domain_of(address)
