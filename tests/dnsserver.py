"""A small authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP).

It answers from a zone dict so that tests never ask the system resolver::

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",
        "slow.test": "STALL",          # never answers
    }

A name missing from the zone is NXDOMAIN; a name present without the asked
type gets an empty NOERROR answer. ``server.zone`` may be changed while the
server runs; ``server.queries`` records (name, type) of every question.

``ad`` plays a validating resolver: True sets the AD bit on every answer
(NXDOMAIN and no-data included), a set of names on the answers for those
names only; as real resolvers do, only for queries that asked for it (AD or
DO set). The default: no AD bit at all.
"""

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _norm(name):
    return str(name).lower().rstrip(".")


class DNSServer:
    def __init__(self, zone=None, host="127.0.0.1", ad=False):
        self.zone = dict(zone or {})
        self.ad = ad
        self.queries = []
        self.host = host
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((host, 0))
        self.port = self._udp.getsockname()[1]
        self._tcp = None
        # The TCP side on the same port number (retry on the rare clash).
        try:
            self._tcp = socket.create_server((host, self.port))
        except OSError:
            self._tcp = None
        self._stop = threading.Event()
        self._threads = []

    @property
    def address(self):
        """The dns_nameservers value pointing at this server."""
        return f"{self.host}:{self.port}"

    def answer(self, wire):
        """The response bytes for a query, or None to stay silent."""
        try:
            q = dns.message.from_wire(wire)
        except Exception:   # noqa: BLE001 - any malformed query: no answer, as a server does
            return None
        if not q.question:
            return None
        question = q.question[0]
        name, rdtype = _norm(question.name), question.rdtype
        self.queries.append((name, dns.rdatatype.to_text(rdtype)))
        resp = dns.message.make_response(q)
        resp.flags |= dns.flags.AA
        asked = q.flags & dns.flags.AD or q.ednsflags & dns.flags.DO
        if asked and (self.ad is True or (self.ad and name in self.ad)):
            resp.flags |= dns.flags.AD
        entry = self.zone.get(name)
        if entry == "STALL":
            return None
        if entry == "SERVFAIL":
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif entry is None or entry == "NXDOMAIN":
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            tname = dns.rdatatype.to_text(rdtype)
            values = entry.get(tname, [])
            texts = []
            for v in values:
                if tname == "MX":
                    pref, host = v
                    texts.append(f"{pref} {host if host == '.' else host.rstrip('.') + '.'}")
                else:
                    texts.append(str(v))
            if texts:
                rrset = dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN,
                                                 rdtype, texts)
                resp.answer.append(rrset)
        return resp.to_wire()

    def _serve_udp(self):
        self._udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            out = self.answer(wire)
            if out is not None:
                try:
                    self._udp.sendto(out, peer)
                except OSError:
                    pass

    def _serve_tcp(self):
        self._tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn):
        conn.settimeout(5)
        with conn:
            try:
                head = conn.recv(2)
                if len(head) < 2:
                    return
                n = int.from_bytes(head, "big")
                wire = b""
                while len(wire) < n:
                    more = conn.recv(n - len(wire))
                    if not more:
                        return
                    wire += more
                out = self.answer(wire)
                if out is not None:
                    conn.sendall(len(out).to_bytes(2, "big") + out)
            except OSError:
                pass

    def start(self):
        for target in (self._serve_udp, self._serve_tcp if self._tcp else None):
            if target:
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self._udp.close()
        if self._tcp:
            self._tcp.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

