"""A tiny authoritative DNS server for tests, written with dnspython: UDP on 127.0.0.1, answers from a dict.

Why our own: sender authentication (SPF, DKIM keys, DMARC policies) must be tested against real DNS on the
wire, through the same `dns.resolver.Resolver` the gateway uses, without any network beyond loopback.

Records are ``{name: {rdtype: [text, ...]}}``, e.g. ``{"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}}``.
TXT texts are given unquoted and split into 255-byte strings here (DKIM keys are longer). A name in the dict
answers NOERROR (empty when it lacks the type); any other name NXDOMAIN. Names in `silent` get no answer at all,
so the client times out — how a dead or firewalled authoritative server looks.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT


def _txt_strings(text: str) -> list[bytes]:
    data = text.encode()
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


class DNSTestServer:
    """Serve `records` on 127.0.0.1:<free port> from a thread until `stop()` (or the `with` block ends)."""

    def __init__(self, records: Mapping[str, Mapping[str, Iterable[str]]], *, silent: Iterable[str] = ()):
        self.records = {name.lower().rstrip("."): {t.upper(): list(v) for t, v in types.items()}
                        for name, types in records.items()}
        self.silent = {n.lower().rstrip(".") for n in silent}
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> "DNSTestServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self._sock.close()

    def resolver(self, timeout: float = 1.0) -> dns.resolver.Resolver:
        """A resolver that asks only this server (no /etc/resolv.conf, no cache)."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = ["127.0.0.1"]
        res.port = self.port
        res.timeout = timeout
        res.lifetime = timeout
        return res

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, addr = self._sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            try:
                reply = self._answer(dns.message.from_wire(wire))
            except Exception:  # noqa: BLE001 - a garbled query is simply not answered
                continue
            if reply is not None:
                try:
                    self._sock.sendto(reply.to_wire(max_size=65535), addr)
                except OSError:
                    pass

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if name in self.silent:
                return None
            types = self.records.get(name)
            if types is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            values = types.get(rdtype, [])
            if not values:
                continue
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
            for value in values:
                if question.rdtype == dns.rdatatype.TXT:
                    rrset.add(TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _txt_strings(value)), ttl=60)
                else:
                    rrset.add(dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, value), ttl=60)
            response.answer.append(rrset)
        return response
