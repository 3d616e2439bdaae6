"""DKIM signing (RFC 6376) of the mail this host originates, with dkimpy.

Which messages: those submitted locally (sendmail, ``-bs``), by a client in
mynetworks or by an authenticated client, which the queue records at
receipt (the qf's ``C`` uid, or its ``t`` flag), and whose one From:
address is in a domain of ``dkim_domains``. Mail relayed for others is
never signed, whatever its From: says. Signatures are rsa-sha256 with
relaxed/relaxed canonicalization, over the header fields RFC 6376
recommends (From: twice, so no second From: can be added).

Where: at remote delivery, in the process that delivers, which is the
privileged one (the daemon's master, a queue run by root); the SMTP
listeners, which run as mail_owner, never read the key. A process that
cannot read the key (a delivery started by a user) defers the message with
4.3.0, as a milter's failure does in Postfix, and the next queue run signs
it. The signature is made once per delivery attempt and goes out before
the message's first header line.

Memory: the body hash is computed here from the df in 256 KB chunks; dkimpy
sees the header section only and signs the header hash. A 100 MB message
costs what a small one does.
"""

import email.utils
import hashlib
import base64
import os
import re
import threading
import time

from .status import MESSAGE_BLOCK, Reply, TempFail

HEADER_MAX = 1024 * 1024      # a longer header section is not signed
_LINE_MAX = 1024 * 1024       # a longer line is hashed in parts
_WSP = re.compile(rb"[ \t]+")

_keys = {}
_keys_lock = threading.Lock()


def enabled(cfg):
    return bool(cfg.dkim_selector and cfg.dkim_private_key_file)


def originated_here(env):
    """Whether the message was submitted locally, from mynetworks or by an
    authenticated client (recorded at receipt)."""
    return env.uid >= 0 or env.trusted


class BodyHash:
    """SHA-256 of a body under relaxed canonicalization (RFC 6376 3.4.4),
    fed in chunks of df text (LF line ends; CRs are dropped, as remote
    delivery drops them)."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.empty = 0           # empty lines held back: only text after them counts them
        self.partial = b""       # the current line's unhashed tail
        self.midline = False     # part of the current line is hashed already

    def update(self, data):
        data = self.partial + data.replace(b"\r", b"")
        cut = data.rfind(b"\n")
        if cut < 0:
            self.partial = data
            if len(data) > _LINE_MAX:
                self._part_line()
            return
        self.partial = data[cut + 1:]
        self._lines(data[:cut + 1])

    def _part_line(self):
        # Hash a long line up to its last non-blank byte; the white space
        # after it may still turn out to end the line.
        text = self.partial.rstrip(b" \t")
        if not text:
            return
        self._text_before()
        self.h.update(_WSP.sub(b" ", text))
        self.partial = self.partial[len(text):]
        self.midline = True

    def _text_before(self):
        if self.empty and not self.midline:
            self.h.update(b"\r\n" * self.empty)
            self.empty = 0

    def _lines(self, block):
        block = _WSP.sub(b" ", block).replace(b" \n", b"\n")
        if self.midline:
            nl = block.find(b"\n")
            self.h.update(block[:nl] + b"\r\n")
            block = block[nl + 1:]
            self.midline = False
        text = block.rstrip(b"\n")
        if not text:
            self.empty += len(block)
            return
        self._text_before()
        self.h.update(text.replace(b"\n", b"\r\n") + b"\r\n")
        self.empty = len(block) - len(text) - 1

    def digest(self):
        if self.partial or self.midline:
            self._lines(self.partial + b"\n")
            self.partial = b""
        return self.h.digest()


def _key(cfg, log=None):
    """The parsed private key, read again when the file changes; a key
    others than its owner may read is used, with a warning."""
    path = cfg.dkim_private_key_file
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with _keys_lock:
            cached = _keys.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except OSError as e:
        raise TempFail(f"cannot read the DKIM key {path}: {e.strerror or e}",
                       Reply(451, "4.3.0", f"DKIM signing failed: cannot read the key "
                                           f"{path}: {e.strerror or e}")) from None
    from dkim.crypto import UnparsableKeyError, parse_pem_private_key
    try:
        pk = parse_pem_private_key(data)
    except (UnparsableKeyError, ValueError, IndexError, TypeError) as e:
        raise TempFail(f"bad DKIM key {path}: {e}",
                       Reply(451, "4.3.0", f"DKIM signing failed: {path} is not a PEM "
                                           "RSA private key")) from None
    if st.st_mode & 0o077 and log is not None:
        log.warning(f"warning: DKIM key {path} is mode {st.st_mode & 0o777:04o}: anyone who "
                    "can read it can sign as your domains; make it 0600, owned by root")
    with _keys_lock:
        _keys[path] = (stamp, pk)
    return pk


def _read_header(f):
    """(header section with LF ends and no CR, rest of the first chunks)
    from the df; header None when it is longer than HEADER_MAX."""
    buf = b""
    while True:
        if buf[:1] == b"\n":
            return b"", buf[1:]
        end = buf.find(b"\n\n")
        if end >= 0:
            return buf[:end + 1], buf[end + 2:]
        if len(buf) > HEADER_MAX:
            return None, b""
        chunk = f.read(MESSAGE_BLOCK)
        if not chunk:
            return buf + (b"" if buf.endswith(b"\n") or not buf else b"\n"), b""
        buf = (buf + chunk).replace(b"\r", b"")


def from_domain(headers):
    """The domain of the one address of the one From: field, or None."""
    values = [v for k, v in headers if k.lower().strip() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addrs = [a for _, a in email.utils.getaddresses([text]) if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    return addrs[0].rpartition("@")[2].lower().rstrip(".") or None


def sign(cfg, f, log=None, qid=""):
    """The DKIM-Signature header line (bytes, LF line ends) for the df
    open as ``f``, or None when the message is not to be signed (its From:
    is not in dkim_domains). Raises TempFail when it cannot sign."""
    try:
        import dkim
        from dkim.canonicalization import CanonicalizationPolicy
    except ImportError:
        raise TempFail("DKIM signing needs dkimpy",
                       Reply(451, "4.3.5", "DKIM signing failed: dkimpy is not installed")) \
            from None
    header, rest = _read_header(f)
    if not header:
        return None
    try:
        d = dkim.DKIM(header.replace(b"\n", b"\r\n") + b"\r\n", linesep=b"\n")
    except (dkim.DKIMException, IndexError, ValueError) as e:
        # A header section no receiver could check a signature of.
        if log is not None:
            log.warning(f"{qid}: not DKIM-signed: malformed header ({e})")
        return None
    domain = from_domain(d.headers)
    domains = {x.lower().rstrip(".") for x in cfg.dkim_domains}
    if domain is None or domain not in domains or not domain.isascii():
        return None
    if not cfg.dkim_selector.isascii():
        raise TempFail("dkim_selector is not ASCII",
                       Reply(451, "4.3.5", "DKIM signing failed: dkim_selector is not ASCII"))
    pk = _key(cfg, log)
    body = BodyHash()
    body.update(rest)
    while True:
        chunk = f.read(MESSAGE_BLOCK)
        if not chunk:
            break
        body.update(chunk)
    # What dkimpy's DKIM.sign() does, with the body hash made above.
    alg = b"rsa-sha256"
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    include = tuple(x.lower() for x in d.default_sign_headers())
    d.hasher = dkim.HASH_ALGORITHMS[alg]
    sel, dom = cfg.dkim_selector.encode("ascii"), domain.encode("ascii")
    fields = [
        (b"v", b"1"), (b"a", alg), (b"c", policy.to_c_value()), (b"d", dom),
        (b"i", b"@" + dom), (b"q", b"dns/txt"), (b"s", sel),
        (b"t", str(int(time.time())).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body.digest())),
        (b"b", b"0" * 60),
    ]
    try:
        value = d.gen_header(fields, include, policy, b"DKIM-Signature", pk)
    except dkim.DKIMException as e:      # a key too small for the digest
        raise TempFail(f"DKIM signing failed: {e}",
                       Reply(451, "4.3.0", f"DKIM signing failed: {e}")) from None
    if log is not None:
        log.info(f"{qid}: DKIM-Signature field added (s={cfg.dkim_selector}, d={domain})")
    return b"DKIM-Signature: " + value


def for_message(cfg, env, spool, log=None):
    """The signature to put before ``env``'s message, made once per
    delivery attempt and kept on ``env``; b"" when it is not signed.
    Raises TempFail when it should be signed and cannot be."""
    sig = getattr(env, "dkim_signature", None)
    if sig is not None:
        return sig
    sig = b""
    if enabled(cfg) and originated_here(env):
        with spool.open_data(env.id) as f:
            if cfg.smtp_generic_maps:
                # sign the header as it will leave, after smtp_generic_maps
                from . import rewrite
                gen = rewrite.generic(cfg, log)
                if gen is not None:
                    f = rewrite.HeaderRewritingReader(f, rewrite.generic_field(gen),
                                                      cfg.header_size_limit)
            sig = sign(cfg, f, log, env.id) or b""
    env.dkim_signature = sig
    return sig


def _der(tag, body):
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(n):
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


_RSA_ALGORITHM = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + _der(0x05, b""))


def public_record(pem):
    """The DNS TXT record text (``v=DKIM1; k=rsa; p=...``) for a PEM RSA
    private key: p= is its public key as a DER SubjectPublicKeyInfo."""
    from dkim.crypto import parse_pem_private_key
    pk = parse_pem_private_key(pem)
    rsa = _der(0x30, _der_int(pk["modulus"]) + _der_int(pk["publicExponent"]))
    spki = _der(0x30, _RSA_ALGORITHM + _der(0x03, b"\x00" + rsa))
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode("ascii")


def keygen(path, bits=2048):
    """Make an RSA key with openssl into ``path`` (created, mode 0600; an
    existing file is an error); returns the PEM."""
    import subprocess
    try:
        pem = subprocess.run(["openssl", "genrsa", str(bits)], check=True, capture_output=True,
                             timeout=120).stdout
    except FileNotFoundError:
        raise OSError("the openssl command is needed to make a key") from None
    except subprocess.CalledProcessError as e:
        raise OSError(f"openssl genrsa failed: {e.stderr.decode(errors='replace').strip()}") \
            from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return pem


def zone_record(selector, domain, record):
    """The TXT record as a zone file line, in strings of at most 255 bytes."""
    parts = [record[i:i + 250] for i in range(0, len(record), 250)]
    quoted = "\n\t".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT (\n\t{quoted} )"
