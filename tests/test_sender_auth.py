"""Issue 7, security: an alias contact policy `partners` cannot be passed with a forged From when the From
domain publishes DMARC reject. SPF (pyspf), DKIM (dkimpy) and DMARC run against a local authoritative DNS
server (tests/dns_server.py) through the resolver the gateway is configured with; mail is routed by the
worker's RouteStep against an SQLite store, as in production."""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import ConfigError, parse_config
from gateway.pipeline import RouteStep
from gateway.sender_auth import (
    DkimResult, DmarcRecord, DmarcRecordError, aligned, check_sender, evaluate_dmarc, fetch_dmarc,
    organizational_domain, parse_dmarc_record, trusted_results,
)
from gateway.spool import Envelope, get_message, release, spool_one, transition
from gateway.store import open_store
from routing.model import Action, RoutingEnvelope, StaticThreads, ThreadHit
from routing.model import NoDuplicates
from routing.parse import parse_mail
from routing.router import route
from tests.dns_server import DNSTestServer

pytestmark = pytest.mark.reliability

GOOD_IP = "192.0.2.10"      # bank.test's SPF-authorised outbound server
FORGER_IP = "203.0.113.66"  # anyone else


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    """(PEM private key for dkimpy, p= value for the DNS key record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def dns_server(dkim_key: tuple[bytes, str]):
    records = {
        "bank.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"], "A": [GOOD_IP]},
        "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@bank.test"]},
        "sel._domainkey.bank.test": {"TXT": [f"v=DKIM1; k=rsa; p={dkim_key[1]}"]},
        "news.bank.test": {"A": [GOOD_IP]},
        "lax.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.lax.test": {"TXT": ["v=DMARC1; p=none"]},
        "mailer.test": {"TXT": [f"v=spf1 ip4:{FORGER_IP} -all"]},
        "nodmarc.test": {"TXT": ["v=spf1 -all"]},
    }
    with DNSTestServer(records, silent=["_dmarc.slow.test", "slow.test", "sel._domainkey.slowkey.test"]) as srv:
        yield srv


def _mail(from_addr: str, to: str = "partners@example.test", *, body: str = "Please update my bank details.\n",
          extra: str = "") -> bytes:
    digest = hashlib.sha1(f"{from_addr}{to}{body}{extra}".encode()).hexdigest()[:12]
    head = (f"From: Treasurer <{from_addr}>\r\nTo: {to}\r\nSubject: Invoice\r\n"
            f"Message-ID: <{digest}@sender.test>\r\n{extra}")
    return (head + "\r\n" + body.replace("\n", "\r\n")).encode()


def _signed(raw: bytes, pem: bytes, domain: str = "bank.test") -> bytes:
    sig = dkim.sign(raw, b"sel", domain.encode(), pem, include_headers=[b"from", b"to", b"subject", b"message-id"])
    return sig + raw


def _config(tmp_path: Path, dns: DNSTestServer, **auth: Any):
    return parse_config({
        "storage": {"url": f"sqlite:///{tmp_path}/auth.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True}],
        "aliases": [{"address": "partners@example.test", "model": "res.partner", "contact": "partners"},
                    {"address": "billing@example.test", "model": "account.move", "contact": "followers",
                     "force_thread_id": 42},
                    {"address": "sales@example.test", "model": "crm.lead"}],
        "auth": {"enabled": True, "nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 0.5, **auth},
    }, base_dir=str(tmp_path))


def _route(tmp_path: Path, dns: DNSTestServer, raw: bytes, *, mail_from: str, ip: str | None,
           rcpt: str = "partners@example.test", **auth: Any):
    config = _config(tmp_path, dns, **auth)
    engine = open_store(config.storage_url())
    ident = spool_one(engine, raw, Envelope(mail_from, (rcpt,), client_addr=ip, helo="mx.sender.test"))
    message = get_message(engine, ident)
    assert message is not None
    decision = RouteStep(config, engine)(raw, message)
    engine.dispose()
    return decision


# --- end to end through RouteStep ---------------------------------------------------------------------------

def test_forged_from_of_a_reject_domain_cannot_reach_a_partners_alias(tmp_path: Path, dns_server: DNSTestServer):
    raw = _mail("ceo@bank.test")
    decision = _route(tmp_path, dns_server, raw, mail_from="ceo@bank.test", ip=FORGER_IP)
    assert decision.action is Action.QUARANTINE
    assert decision.reason == "dmarc"
    text = "\n".join(decision.explanation)
    assert "DMARC for From domain bank.test: fail:reject" in text
    assert "bank.test fails DMARC and publishes p=reject" in text
    assert "a forged From cannot pass `partners`" in text
    assert "SPF fail" in text  # how the verdict was reached is in the explanation too


def test_forged_from_to_a_forced_thread_alias_with_a_policy_is_quarantined(tmp_path: Path,
                                                                          dns_server: DNSTestServer):
    raw = _mail("ceo@bank.test", "billing@example.test")
    decision = _route(tmp_path, dns_server, raw, mail_from="", ip=FORGER_IP, rcpt="billing@example.test")
    assert (decision.action, decision.reason) == (Action.QUARANTINE, "dmarc")
    assert any("cannot pass `followers`" in line for line in decision.explanation)


def test_the_same_forged_mail_to_an_everyone_alias_is_still_created(tmp_path: Path, dns_server: DNSTestServer):
    raw = _mail("ceo@bank.test", "sales@example.test")
    decision = _route(tmp_path, dns_server, raw, mail_from="ceo@bank.test", ip=FORGER_IP, rcpt="sales@example.test")
    assert decision.action is Action.CREATE
    assert [t.alias for t in decision.targets] == ["sales@example.test"]
    assert any("every alias accepts everyone" in line for line in decision.explanation)


def test_a_dkim_signed_mail_from_the_domain_passes(tmp_path: Path, dns_server: DNSTestServer,
                                                   dkim_key: tuple[bytes, str]):
    # Sent through a forwarder: SPF fails, the aligned DKIM signature carries DMARC.
    raw = _signed(_mail("ceo@bank.test"), dkim_key[0])
    decision = _route(tmp_path, dns_server, raw, mail_from="ceo@bank.test", ip=FORGER_IP)
    assert decision.action is Action.CREATE
    assert [t.contact for t in decision.targets] == ["partners"]
    assert any("DMARC for From domain bank.test: pass" in line for line in decision.explanation)


def test_a_tampered_dkim_signature_fails(dns_server: DNSTestServer, dkim_key: tuple[bytes, str]):
    raw = _signed(_mail("ceo@bank.test"), dkim_key[0]).replace(b"bank details", b"bank DETAILS")
    result = check_sender(raw, mail_from="ceo@bank.test", client_ip=FORGER_IP, helo="x",
                          resolver=dns_server.resolver(), timeout=0.5)
    assert result.dkim == (DkimResult("bank.test", "sel", "fail"),)
    assert result.verdict == "fail:reject"


def test_spf_pass_with_an_aligned_mail_from_passes(tmp_path: Path, dns_server: DNSTestServer):
    raw = _mail("ceo@bank.test")
    decision = _route(tmp_path, dns_server, raw, mail_from="bounces@bank.test", ip=GOOD_IP)
    assert decision.action is Action.CREATE
    result = check_sender(raw, mail_from="bounces@bank.test", client_ip=GOOD_IP, helo="mx.bank.test",
                          resolver=dns_server.resolver(), timeout=0.5)
    assert (result.spf, result.dmarc, result.policy) == ("pass", "pass", "reject")


def test_spf_pass_for_an_unaligned_mail_from_is_still_a_dmarc_fail(dns_server: DNSTestServer):
    # The classic phish: the forger's own domain passes SPF, the From is someone else's.
    result = check_sender(_mail("ceo@bank.test"), mail_from="x@mailer.test", client_ip=FORGER_IP, helo="x",
                          resolver=dns_server.resolver(), timeout=0.5)
    assert result.spf == "pass"
    assert result.verdict == "fail:reject"


def test_a_subdomain_gets_the_organisations_sp_policy(dns_server: DNSTestServer):
    result = check_sender(_mail("ceo@news.bank.test"), mail_from="ceo@news.bank.test", client_ip=FORGER_IP,
                          helo="x", resolver=dns_server.resolver(), timeout=0.5)
    assert result.verdict == "fail:quarantine"
    assert result.from_domain == "news.bank.test"


def test_p_none_failure_is_not_quarantined(tmp_path: Path, dns_server: DNSTestServer):
    decision = _route(tmp_path, dns_server, _mail("boss@lax.test"), mail_from="boss@lax.test", ip=FORGER_IP)
    assert decision.action is Action.CREATE
    assert any("DMARC for From domain lax.test: fail:none" in line for line in decision.explanation)


def test_no_dmarc_record_is_none_and_not_quarantined(tmp_path: Path, dns_server: DNSTestServer):
    decision = _route(tmp_path, dns_server, _mail("a@nodmarc.test"), mail_from="a@nodmarc.test", ip=FORGER_IP)
    assert decision.action is Action.CREATE
    assert any("DMARC for From domain nodmarc.test: none" in line for line in decision.explanation)


def test_dns_timeout_is_temperror_fails_open_and_is_logged(tmp_path: Path, dns_server: DNSTestServer,
                                                           caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        decision = _route(tmp_path, dns_server, _mail("a@slow.test"), mail_from="a@slow.test", ip=FORGER_IP)
    assert decision.action is Action.CREATE
    assert any("DMARC for From domain slow.test: temperror" in line for line in decision.explanation)
    assert "temperror" in caplog.text and "fail open" in caplog.text


def test_a_dkim_key_lookup_timeout_is_temperror_not_fail(dns_server: DNSTestServer, dkim_key: tuple[bytes, str]):
    # slowkey.test has no DMARC record of its own here: evaluate directly with a reject record.
    raw = _signed(_mail("ceo@slowkey.test"), dkim_key[0], domain="slowkey.test")
    result = check_sender(raw, mail_from="ceo@slowkey.test", client_ip=FORGER_IP, helo="x",
                          resolver=dns_server.resolver(), timeout=0.3)
    assert result.dkim == (DkimResult("slowkey.test", "sel", "temperror"),)
    verdict, _, lines = evaluate_dmarc("slowkey.test", DmarcRecord(p="reject"), "slowkey.test",
                                       spf_result=result.spf, spf_domain="slowkey.test", dkim_results=result.dkim)
    assert verdict == "temperror"


def test_auth_disabled_by_default_asks_no_dns(tmp_path: Path, dns_server: DNSTestServer):
    before = len(dns_server.queries)
    config = _config(tmp_path, dns_server, enabled=False)
    assert parse_config({}).auth.enabled is False
    engine = open_store(config.storage_url())
    raw = _mail("ceo@bank.test")
    ident = spool_one(engine, raw, Envelope("ceo@bank.test", ("partners@example.test",), client_addr=FORGER_IP))
    message = get_message(engine, ident)
    assert message is not None
    decision = RouteStep(config, engine)(raw, message)
    assert decision.action is Action.CREATE
    assert len(dns_server.queries) == before


def test_trusted_upstream_authentication_results(tmp_path: Path, dns_server: DNSTestServer):
    # Behind another MTA: its topmost Authentication-Results is used; the forger's own copy below is not.
    extra = ("Authentication-Results: mx.trusted.test; spf=fail smtp.mailfrom=bank.test; dkim=none;\r\n"
             " dmarc=fail (p=REJECT) header.from=bank.test\r\n"
             "Authentication-Results: mx.trusted.test; dmarc=pass header.from=bank.test\r\n")
    raw = _mail("ceo@bank.test", extra=extra)
    decision = _route(tmp_path, dns_server, raw, mail_from="ceo@bank.test", ip="127.0.0.1",
                      trust_authentication_results_from="mx.trusted.test")
    assert (decision.action, decision.reason) == (Action.QUARANTINE, "dmarc")
    forged_only = _mail("ceo@bank.test", extra="Authentication-Results: evil.test; dmarc=pass\r\n")
    assert trusted_results(forged_only, "mx.trusted.test") is None


def test_upstream_spf_and_dkim_without_a_dmarc_result_are_evaluated_here(dns_server: DNSTestServer):
    extra = ("Authentication-Results: mx.trusted.test;\r\n spf=pass (sender ok) smtp.mailfrom=bounce@bank.test;\r\n"
             " dkim=fail header.d=bank.test header.s=sel\r\n")
    raw = _mail("ceo@bank.test", extra=extra)
    parsed = trusted_results(raw, "MX.trusted.test")
    assert parsed is not None
    assert parsed["spf"] == ("pass", "bank.test")
    assert parsed["dkim"] == [DkimResult("bank.test", "sel", "fail")]
    result = check_sender(raw, mail_from="x@y.test", client_ip="127.0.0.1", helo="localhost",
                          resolver=dns_server.resolver(), timeout=0.5, trusted_authserv_id="mx.trusted.test")
    assert (result.spf, result.dmarc, result.policy) == ("pass", "pass", "reject")


def test_an_operator_release_lets_the_quarantined_mail_through(tmp_path: Path, dns_server: DNSTestServer):
    config = _config(tmp_path, dns_server)
    engine = open_store(config.storage_url())
    raw = _mail("ceo@bank.test")
    ident = spool_one(engine, raw, Envelope("ceo@bank.test", ("partners@example.test",), client_addr=FORGER_IP))
    step = RouteStep(config, engine)
    first = step(raw, get_message(engine, ident))  # type: ignore[arg-type]
    assert (first.action, first.reason) == (Action.QUARANTINE, "dmarc")
    assert transition(engine, ident, "quarantined", note="quarantine: dmarc")
    assert release(engine, ident, note="released from quarantine by operator; routed again with current config")
    again = step(raw, get_message(engine, ident))  # type: ignore[arg-type]
    assert again.action is Action.CREATE
    assert any("an operator released this mail" in line for line in again.explanation)
    engine.dispose()


def test_without_a_client_ip_spf_only_mail_is_not_taken_for_a_forgery(tmp_path: Path, dns_server: DNSTestServer,
                                                                       dkim_key: tuple[bytes, str]):
    # An IMAP source: no client IP, so SPF cannot be checked; a DKIM-less mail may be SPF-only, not forged.
    decision = _route(tmp_path, dns_server, _mail("ceo@bank.test"), mail_from="ceo@bank.test", ip=None)
    assert decision.action is Action.CREATE
    assert any("SPF could not be checked here" in line for line in decision.explanation)
    # ... while DKIM still carries DMARC: a signed mail passes.
    signed = check_sender(_signed(_mail("ceo@bank.test"), dkim_key[0]), mail_from="", client_ip=None, helo=None,
                          resolver=dns_server.resolver(), timeout=0.5)
    assert signed.verdict == "pass"


# --- replies are not gated ------------------------------------------------------------------------------------

def test_a_reply_with_a_failing_from_still_joins_its_thread():
    raw = _mail("ceo@bank.test", extra="In-Reply-To: <known@odoo.test>\r\n")
    config = parse_config({"domains": [{"name": "example.test"}],
                           "aliases": [{"address": "partners@example.test", "model": "res.partner",
                                        "contact": "partners"}]})
    hit = ThreadHit(message_id="<known@odoo.test>", model="res.partner", res_id=5)
    decision = route(parse_mail(raw), RoutingEnvelope(rcpt_tos=("partners@example.test",), dmarc="fail:reject"),
                     aliases=config.alias_table(), threads=StaticThreads({"<known@odoo.test>": hit}),
                     duplicates=NoDuplicates(), sha256=hashlib.sha256(raw).hexdigest())
    assert decision.action is Action.REPLY


# --- pure parts -----------------------------------------------------------------------------------------------

def test_parse_dmarc_record():
    rec = parse_dmarc_record("v=DMARC1; p=Reject; sp=none; adkim=s; aspf=r; pct=50; rua=mailto:a@b.test; fo=1")
    assert rec == DmarcRecord(p="reject", sp="none", adkim="s", aspf="r", pct=50, rua="mailto:a@b.test")
    assert parse_dmarc_record("v=DMARC1;p=quarantine").adkim == "r"
    assert parse_dmarc_record("v=DMARC1; p=bogus; rua=mailto:x@y.test").p == "none"  # RFC 7489 §6.6.3
    for bad in ("v=DMARC1; p=bogus", "v=DMARC1", "v=spf1 -all", "v=DMARC1; p=reject; adkim=x",
                "v=DMARC1; p=reject; pct=101", "v=DMARC1; p=reject; sp=maybe"):
        with pytest.raises(DmarcRecordError):
            parse_dmarc_record(bad)


@pytest.mark.parametrize("domain,org", [
    ("bank.test", "bank.test"), ("mail.news.bank.test", "bank.test"), ("shop.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"), ("a.b.example.com.au", "example.com.au"), ("Example.COM.", "example.com"),
])
def test_organizational_domain(domain: str, org: str):
    assert organizational_domain(domain) == org


def test_alignment_relaxed_and_strict():
    assert aligned("mail.bank.test", "bank.test", "r")
    assert not aligned("mail.bank.test", "bank.test", "s")
    assert aligned("BANK.test", "bank.test", "s")
    assert not aligned("bank.test.evil", "bank.test", "r")
    assert not aligned("a.co.uk", "b.co.uk", "r")  # two registrations under one public suffix
    assert not aligned(None, "bank.test", "r")


def test_evaluate_dmarc_needs_one_aligned_pass():
    rec = DmarcRecord(p="reject", adkim="s")
    other = DkimResult("mailer.test", "s1", "pass")
    sub = DkimResult("mail.bank.test", "s1", "pass")
    assert evaluate_dmarc("bank.test", rec, "bank.test", spf_result="pass", spf_domain="mailer.test",
                          dkim_results=[other])[0] == "fail"
    assert evaluate_dmarc("bank.test", rec, "bank.test", spf_result="fail", spf_domain="bank.test",
                          dkim_results=[sub])[0] == "fail"  # adkim=s: a subdomain signature does not align
    assert evaluate_dmarc("bank.test", DmarcRecord(p="reject"), "bank.test", spf_result="fail",
                          spf_domain="bank.test", dkim_results=[sub])[0] == "pass"
    assert evaluate_dmarc("bank.test", rec, "bank.test", spf_result="pass", spf_domain="bounce.bank.test",
                          dkim_results=[])[0] == "pass"  # aspf=r by default
    assert evaluate_dmarc("x.bank.test", DmarcRecord(p="reject", sp="none"), "bank.test", spf_result="fail",
                          spf_domain=None, dkim_results=[])[:2] == ("fail", "none")


def test_fetch_dmarc_falls_back_to_the_organisational_domain(dns_server: DNSTestServer):
    record, at, error, _ = fetch_dmarc("deep.news.bank.test", resolver=dns_server.resolver(), timeout=0.5)
    assert (record.p if record else None, at, error) == ("reject", "bank.test", None)
    record, at, error, note = fetch_dmarc("slow.test", resolver=dns_server.resolver(), timeout=0.3)
    assert (record, error) == (None, "temperror")


def test_auth_config_rejects_a_nameserver_that_is_not_an_ip():
    with pytest.raises(ConfigError) as err:
        parse_config({"auth": {"enabled": True, "nameservers": ["dns.example"]}})
    assert "auth.nameservers" in str(err.value)
