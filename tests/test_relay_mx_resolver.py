"""make_mx_resolver's answers for a domain without MX records (its own A/AAAA addresses are the implicit MX,
RFC 5321 §5.1), against a stubbed dnspython resolver."""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver
import pytest

from gateway.outbound import DestinationError, make_mx_resolver


class _Address:
    def __init__(self, ip: str):
        self.ip = ip

    def to_text(self) -> str:
        return self.ip


def _stub_dns(monkeypatch, answers: dict[str, object]) -> None:
    """MX, A and AAAA for the one test domain: a list of addresses, or an exception to raise."""
    async def resolve(self, qname, rdtype="A", *args, **kwargs):  # type: ignore[no-untyped-def]
        answer = answers[rdtype]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(dns.asyncresolver.Resolver, "resolve", resolve)


@pytest.mark.parametrize("aaaa", [dns.exception.Timeout(), dns.resolver.NoNameservers()])
async def test_an_a_answer_is_used_when_the_aaaa_lookup_fails_for_now(monkeypatch, aaaa) -> None:
    """The failed AAAA lookup threw the A answer away: the mail was deferred though it could be delivered."""
    _stub_dns(monkeypatch, {"MX": dns.resolver.NoAnswer(), "A": [_Address("192.0.2.1")], "AAAA": aaaa})
    assert await make_mx_resolver()("ex.test") == [("192.0.2.1", 25)]


async def test_an_aaaa_answer_is_used_when_the_a_lookup_fails_for_now(monkeypatch) -> None:
    _stub_dns(monkeypatch, {"MX": dns.resolver.NoAnswer(), "A": dns.exception.Timeout(),
                            "AAAA": [_Address("2001:db8::1")]})
    assert await make_mx_resolver()("ex.test") == [("2001:db8::1", 25)]


async def test_no_address_and_a_failed_lookup_is_temporary(monkeypatch) -> None:
    _stub_dns(monkeypatch, {"MX": dns.resolver.NoAnswer(), "A": dns.resolver.NoAnswer(),
                            "AAAA": dns.exception.Timeout()})
    with pytest.raises(DestinationError) as exc:
        await make_mx_resolver()("ex.test")
    assert not exc.value.permanent and exc.value.status == "4.4.1"


async def test_no_mx_and_no_address_at_all_is_permanent(monkeypatch) -> None:
    _stub_dns(monkeypatch, {"MX": dns.resolver.NoAnswer(), "A": dns.resolver.NoAnswer(),
                            "AAAA": dns.resolver.NoAnswer()})
    with pytest.raises(DestinationError) as exc:
        await make_mx_resolver()("ex.test")
    assert exc.value.permanent and exc.value.status == "5.1.2"


@pytest.mark.parametrize("literal, host", [
    ("[8.8.8.8]", "8.8.8.8"),
    ("[ipv6:2606:4700:4700::1111]", "2606:4700:4700::1111"),   # lower-cased as the transport passes it
])
async def test_an_address_literal_is_its_own_host_without_dns(monkeypatch, literal, host) -> None:
    """RFC 5321 §4.1.3: `user@[8.8.8.8]` goes to that address. It was looked up as a name: NXDOMAIN, bounced."""
    _stub_dns(monkeypatch, {})  # any DNS question would raise KeyError
    assert await make_mx_resolver(port=2525)(literal) == [(host, 2525)]


@pytest.mark.parametrize("literal, status", [
    ("[127.0.0.1]", "5.1.2"), ("[10.1.2.3]", "5.1.2"), ("[ipv6:::1]", "5.1.2"), ("[169.254.1.1]", "5.1.2"),
    ("[not.an.ip]", "5.1.3"),
])
async def test_an_address_literal_off_the_public_internet_is_refused(monkeypatch, literal, status) -> None:
    """A recipient address must not aim the relay at the hosts beside it, or at the gateway itself."""
    _stub_dns(monkeypatch, {})
    with pytest.raises(DestinationError) as refused:
        await make_mx_resolver()(literal)
    assert refused.value.permanent and refused.value.status == status
