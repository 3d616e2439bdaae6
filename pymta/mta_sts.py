"""MTA-STS (RFC 8461) for MX deliveries, when ``smtp_mta_sts_enable`` is set.

For a recipient domain D: the TXT record ``_mta-sts.D`` (``v=STSv1;
id=...``) says a policy exists; the policy is fetched from
``https://mta-sts.D/.well-known/mta-sts.txt`` over TLS whose certificate
must chain to a trusted CA (smtp_tls_CAfile, else the system store) and
name mta-sts.D; no redirect is followed, the answer must be 200 with
text/plain, 64 KB at most. It is cached for its ``max_age`` (at most a
year) in memory and in ``data_directory``/mta-sts/, and fetched again when
the TXT id changes. A failed fetch or DNS lookup keeps a cached policy
that has not expired; with none, there is no policy.

In ``enforce`` mode only MX hosts that match the policy's ``mx`` patterns
are used (none left: the message is deferred, 4.7.5), and their TLS must
verify: the certificate must chain to a trusted CA and name the MX host.
``testing`` mode logs what enforce would refuse and delivers as usual;
``none`` is no policy. DANE, where its TLSA records are usable, takes
precedence (RFC 8461 2).
"""

import json
import os
import re
import socket
import ssl
import threading
import time

from .status import TempFail

HTTPS_PORT = 443
MAX_POLICY = 64 * 1024
MAX_AGE = 31557600
MEMORY_LIMIT = 10000       # policies kept in memory by one process
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_memory = {}
_lock = threading.Lock()


class Policy:
    __slots__ = ("domain", "id", "mode", "mx", "max_age", "fetched")

    def __init__(self, domain, id, mode, mx, max_age, fetched):
        self.domain, self.id, self.mode, self.mx = domain, id, mode, tuple(mx)
        self.max_age, self.fetched = max_age, fetched

    def expired(self, now):
        return now >= self.fetched + self.max_age

    def to_json(self):
        return {"domain": self.domain, "id": self.id, "mode": self.mode, "mx": list(self.mx),
                "max_age": self.max_age, "fetched": self.fetched}

    @classmethod
    def from_json(cls, d):
        p = cls(str(d["domain"]), str(d["id"]), str(d["mode"]), [str(x) for x in d["mx"]],
                int(d["max_age"]), float(d["fetched"]))
        if p.mode not in ("enforce", "testing", "none") or not 0 <= p.max_age <= MAX_AGE:
            raise ValueError("bad cached policy")
        return p

    def mx_matches(self, host):
        """RFC 8461 4.1: an exact name, or ``*.`` and one label more."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif pattern == host:
                return True
        return False


class FetchError(TempFail):
    """No policy could be had (an HTTPS fetch failed, a bad policy); the
    text says why."""


def parse_txt(strings):
    """The id of a ``v=STSv1`` TXT record set, or None (none, or several)."""
    found = []
    for text in strings:
        if not text.startswith("v=STSv1"):
            continue
        fields = dict(f.strip().partition("=")[::2] for f in text.split(";") if f.strip())
        if fields.get("v") != "STSv1":
            continue
        found.append(fields.get("id", ""))
    if len(found) != 1 or not _ID_RE.match(found[0]):
        return None
    return found[0]


def parse_policy(domain, id, text, now):
    """A Policy from the policy file's text; raises FetchError."""
    fields, mx = {}, []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise FetchError("policy without version: STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise FetchError(f"policy with a bad mode {mode!r}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise FetchError("policy without a valid max_age")
    if mode != "none" and not mx:
        raise FetchError("policy without mx lines")
    return Policy(domain, id, mode, mx, min(int(age), MAX_AGE), now)


def fetch(cfg, domain, addresses, timeout):
    """The policy text of ``domain`` from one of ``addresses`` (of
    mta-sts.domain); raises FetchError."""
    host = f"mta-sts.{domain}"
    try:
        ctx = ssl.create_default_context(cafile=cfg.smtp_tls_CAfile or None)
    except (OSError, ssl.SSLError) as e:
        raise FetchError(f"cannot load smtp_tls_CAfile: {e}") from None
    last = None
    for ip in addresses:
        try:
            with socket.create_connection((ip, HTTPS_PORT), timeout) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as s:
                    s.settimeout(timeout)
                    s.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                              f"User-Agent: pymta\r\nConnection: close\r\n\r\n".encode("ascii"))
                    data = bytearray()
                    deadline = time.monotonic() + timeout
                    while len(data) <= MAX_POLICY + 8192:
                        if time.monotonic() > deadline:
                            raise FetchError(f"{host}[{ip}]: timed out")
                        chunk = s.recv(16384)
                        if not chunk:
                            break
                        data += chunk
            return _http_body(host, ip, bytes(data))
        except ValueError as e:            # a malformed answer (chunk sizes, encodings)
            last = FetchError(f"{host}[{ip}]: bad HTTP answer ({e})")
        except ssl.SSLCertVerificationError as e:
            last = FetchError(f"{host}[{ip}]: certificate not verified: {e.verify_message}")
        except (OSError, ssl.SSLError) as e:
            last = FetchError(f"{host}[{ip}]: {getattr(e, 'strerror', None) or e}")
        except FetchError as e:
            last = e
    raise last or FetchError(f"{host}: no address")


def _http_body(host, ip, data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError(f"{host}[{ip}]: bad HTTP answer")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split()
    if len(status) < 2 or status[1] != "200":
        raise FetchError(f"{host}[{ip}]: HTTP status {' '.join(status[1:])[:40]}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise FetchError(f"{host}[{ip}]: content type is not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _unchunk(body)
    elif headers.get("content-length", "").isdigit():
        body = body[:int(headers["content-length"])]
    if len(body) > MAX_POLICY:
        raise FetchError(f"{host}[{ip}]: policy larger than 64 KB")
    return body.decode("utf-8", "replace")


def _unchunk(body):
    out, pos = bytearray(), 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise FetchError("bad chunked encoding")
        size = int(body[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


# -- the cache ----------------------------------------------------------------

def _cache_path(cfg, domain):
    safe = "".join(c for c in domain.lower() if c.isalnum() or c in "-.")
    return os.path.join(cfg.data_directory, "mta-sts", safe.strip(".") or "_")


def _load(cfg, domain):
    with _lock:
        p = _memory.get((cfg.data_directory, domain))
    if p is not None:
        return p
    try:
        fd = os.open(_cache_path(cfg, domain), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_uid != os.geteuid():
                return None
            return Policy.from_json(json.loads(f.read(MAX_POLICY)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(cfg, policy, log):
    with _lock:
        if len(_memory) >= MEMORY_LIMIT:
            _memory.clear()
        _memory[(cfg.data_directory, policy.domain)] = policy
    path = _cache_path(cfg, policy.domain)
    d = os.path.dirname(path)
    try:
        for new in (cfg.data_directory, d):
            try:
                os.mkdir(new, 0o700)
            except FileExistsError:
                pass
        st = os.lstat(d)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(policy.to_json(), f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning(f"MTA-STS: cannot cache the policy of {policy.domain} in {d}: "
                    f"{e.strerror or e}")


def policy_for(cfg, domain, resolver, log, now=None):
    """The MTA-STS Policy in force for ``domain`` (mode enforce or
    testing), or None."""
    from . import mx
    import dns.exception
    now = time.time() if now is None else now
    domain = domain.lower().rstrip(".")
    cached = _load(cfg, domain)
    if cached is not None and cached.expired(now):
        cached = None
    try:
        ans = resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False, raise_on_no_answer=False)
        strings = [b"".join(r.strings).decode("ascii", "replace") for r in (ans.rrset or [])]
        txt_id = parse_txt(strings)
    except dns.exception.DNSException:
        txt_id = None
    if txt_id is not None and (cached is None or cached.id != txt_id):
        try:
            addrs = mx.addresses(resolver, f"mta-sts.{domain}")
            text = fetch(cfg, domain, addrs, max(1, cfg.smtp_connect_timeout))
            fresh = parse_policy(domain, txt_id, text, now)
        except (FetchError, TempFail) as e:
            log.info(f"MTA-STS: no policy fetched for {domain}: {e}")
        else:
            _store(cfg, fresh, log)
            cached = fresh
    if cached is None or cached.mode == "none":
        return None
    return cached
