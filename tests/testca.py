"""Test certificate authorities, made with the openssl command.

    ca = TestCA(tmp_path / "ca1", "Test CA 1")
    cert, key = ca.issue("smtp.example.test", ips=["127.0.0.2"])
    ctx = server_context(cert, key)       # for SMTPSink(tls_context=...)
    ca.cert                               # smtp_tls_CAfile

EC P-256 keys: made in milliseconds. Certificates are valid from an hour ago
for two days; ``expired=True`` makes one that ended yesterday.
"""

import os
import shutil
import ssl
import subprocess

import pytest


def _openssl(*args, cwd=None):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def need_openssl():
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make test certificates")


class TestCA:
    __test__ = False        # not a pytest class

    def __init__(self, directory, name="pymta Test CA"):
        need_openssl()
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.cert = os.path.join(self.dir, "ca.pem")
        self.key = os.path.join(self.dir, "ca.key")
        self._n = 0
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", self.key,
                 "-out", self.cert, "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, cn, dns=None, ips=(), expired=False):
        """(cert path, key path) of a server certificate for ``cn`` with SANs
        ``dns`` (default [cn]) and ``ips``; the chain file holds the leaf."""
        self._n += 1
        base = os.path.join(self.dir, f"leaf{self._n}")
        dns = [cn] if dns is None else list(dns)
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        ext = base + ".ext"
        with open(ext, "w") as f:
            if sans:
                f.write("subjectAltName=" + ",".join(sans) + "\n")
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                    "authorityKeyIdentifier=keyid\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-subj", f"/CN={cn}", "-keyout", base + ".key", "-out", base + ".csr")
        if expired:
            cnf = base + ".cnf"
            with open(cnf, "w") as f:
                f.write(f"[ca]\ndefault_ca=d\n[d]\ndatabase={base}.idx\nnew_certs_dir={self.dir}\n"
                        f"serial={base}.srl\ndefault_md=sha256\npolicy=p\ncopy_extensions=none\n"
                        "[p]\ncommonName=supplied\n")
            open(base + ".idx", "w").close()
            with open(base + ".srl", "w") as f:
                f.write("1000\n")
            _openssl("ca", "-batch", "-config", cnf, "-cert", self.cert, "-keyfile", self.key,
                     "-in", base + ".csr", "-out", base + ".pem", "-extfile", ext,
                     "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-notext")
        else:
            _openssl("x509", "-req", "-in", base + ".csr", "-CA", self.cert, "-CAkey", self.key,
                     "-CAcreateserial", "-days", "2", "-out", base + ".pem", "-extfile", ext)
        return base + ".pem", base + ".key"


def server_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def tlsa_data(cert, selector, mtype):
    """The hex data of a TLSA record (usage aside) for PEM certificate
    ``cert``, computed by the openssl command (not by pymta's code)."""
    import hashlib
    der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"], check=True,
                         capture_output=True).stdout
    if selector == 1:
        pem = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-pubkey"], check=True,
                             capture_output=True).stdout
        der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem,
                             check=True, capture_output=True).stdout
    if mtype == 1:
        der = hashlib.sha256(der).digest()
    elif mtype == 2:
        der = hashlib.sha512(der).digest()
    return der.hex()
