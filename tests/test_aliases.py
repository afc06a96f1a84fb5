"""aliases/: resolution order, +tag, case, catchall/bounce/VERP, RCPT verdicts, policy, Odoo merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from aliases.load import alias_from_odoo_row, build_table, merge_aliases
from aliases.model import Alias, AliasTable, Domain
from aliases.policy import SenderFacts, evaluate, rule_for
from aliases.resolve import rcpt_verdict, resolve_address, resolve_recipients
from gateway.config import load_config

FIXTURES = Path(__file__).parent / "fixtures" / "routing"

TABLE = AliasTable(
    domains=(Domain("example.com"), Domain("odd.example.com", bounce="returns", strict=True), Domain("strict.example.org", strict=True),
             Domain("default.example.net", strict=True, default_alias="help@default.example.net")),
    aliases=(Alias("sales@example.com", "crm.lead"), Alias("sales+eu@example.com", "crm.lead.eu"),
             Alias("jobs@strict.example.org", "hr.applicant"), Alias("help@default.example.net", "helpdesk.ticket")),
)


@pytest.mark.parametrize("address,kind,alias,tag", [
    ("sales@example.com", "alias", "sales@example.com", None),
    ("SALES@EXAMPLE.COM", "alias", "sales@example.com", None),        # Odoo misses capitalised domains
    ("Sales+VIP@Example.com", "alias", "sales@example.com", "vip"),    # +tag subaddressing
    ("sales+eu@example.com", "alias", "sales+eu@example.com", None),   # an alias literally named with +
    ("catchall@example.com", "catchall", None, None),
    ("catchall+x@example.com", "catchall", None, "x"),
    ("bounce@example.com", "bounce", None, None),
    ("bounce+abc123@example.com", "verp", None, "abc123"),
    ("nobody@example.com", "unknown", None, None),
    ("sales@elsewhere.com", "foreign", None, None),
    ("<sales@example.com.>", "alias", "sales@example.com", None),     # brackets and a trailing root dot
])
def test_resolve_address(address, kind, alias, tag):
    r = resolve_address(TABLE, address, "to")
    assert (r.kind, r.alias.address if r.alias else None, r.tag) == (kind, alias, tag)


def test_resolution_order_rcpt_first_then_headers_each_address_once():
    rs = resolve_recipients(TABLE, rcpt=("jobs@strict.example.org",), delivered_to=("sales@example.com",),
                            to=("sales@example.com", "a@x.org"), cc=("catchall@example.com",),
                            resent_to=("nobody@example.com",))
    assert [(r.source, r.address) for r in rs] == [
        ("rcpt", "jobs@strict.example.org"), ("delivered-to", "sales@example.com"), ("to", "a@x.org"),
        ("cc", "catchall@example.com"), ("resent-to", "nobody@example.com")]


@pytest.mark.parametrize("address,verdict", [
    ("sales@example.com", "accept"),
    ("sales+anything@example.com", "accept"),
    ("nobody@example.com", "accept"),                 # lax domain: accepted, routed or quarantined later
    ("jobs@strict.example.org", "accept"),
    ("JOBS+x@STRICT.example.org", "accept"),
    ("nobody@strict.example.org", "unknown_user"),    # 550 5.1.1
    ("PostMaster@strict.example.org", "accept"),      # RFC 5321 §4.5.1, even in a strict domain
    ("catchall@strict.example.org", "accept"),
    ("bounce@strict.example.org", "accept"),
    ("bounce+tok@strict.example.org", "accept"),      # VERP
    ("bounce+tok@odd.example.com", "accept"),         # the relay's VERP prefix, whatever the bounce name
    ("returns@odd.example.com", "accept"),
    ("bounce@odd.example.com", "unknown_user"),
    ("nobody@default.example.net", "accept"),         # strict, but a default alias takes it
    ("someone@gmail.com", "no_relay"),                # 550 5.7.1
    ("no-at-sign", "no_relay"),
])
def test_rcpt_verdict(address, verdict):
    got, why = rcpt_verdict(TABLE, address)
    assert got == verdict
    assert why  # always an explanation for the SMTP reply and logs


def test_policy_rules():
    assert evaluate("everyone", SenderFacts()).allowed
    assert not evaluate("partners", SenderFacts(author_found=False)).allowed
    assert evaluate("partners", SenderFacts(author_found=True)).allowed
    assert not evaluate("partners", SenderFacts(author_found=True, authenticated=False)).allowed
    assert not evaluate("followers", SenderFacts(author_found=True, is_follower=False)).allowed
    assert evaluate("followers", SenderFacts(author_found=True, is_follower=True)).allowed
    v = evaluate("followers", SenderFacts(author_found=True, is_follower=True, record_exists=False))
    assert not v.allowed and v.config_error
    assert not evaluate("employees", SenderFacts(author_found=True, is_employee=False)).allowed
    assert evaluate("employees", SenderFacts(is_employee=True)).allowed
    with pytest.raises(ValueError, match="unknown contact policy"):
        rule_for("friends")


def test_odoo_row_parsing():
    a = alias_from_odoo_row({"alias_name": "Support", "alias_domain": "Example.com", "model": "helpdesk.ticket",
                             "alias_defaults": "{'team_id': 2}", "alias_contact": "partners",
                             "alias_force_thread_id": 0})
    assert (a.address, a.model, a.defaults_dict(), a.contact, a.force_thread_id, a.source) == \
        ("support@example.com", "helpdesk.ticket", {"team_id": 2}, "partners", None, "odoo")
    with pytest.raises(ValueError, match="no domain"):
        alias_from_odoo_row({"alias_name": "x", "alias_full_name": "x", "model": "crm.lead"})
    with pytest.raises(ValueError, match="not a literal dict"):
        alias_from_odoo_row({"alias_full_name": "x@example.com", "model": "crm.lead", "alias_defaults": "foo()"})


def test_merge_config_wins_and_foreign_domains_are_skipped():
    rows = [
        {"alias_full_name": "sales@example.com", "model": "sale.order"},       # shadowed by config
        {"alias_full_name": "support@example.com", "model": "helpdesk.ticket"},
        {"alias_full_name": "x@not-ours.com", "model": "crm.lead"},
        {"alias_full_name": "bad@example.com", "model": "crm.lead", "alias_contact": "friends"},
    ]
    res = merge_aliases(TABLE, rows)
    assert res.table.alias("sales@example.com").model == "crm.lead"
    assert res.table.alias("support@example.com").model == "helpdesk.ticket"
    assert res.added == ("support@example.com",) and res.overridden == ("sales@example.com",)
    assert len(res.warnings) == 2 and res.table.alias("x@not-ours.com") is None


def test_build_table_from_the_fixture_config():
    table = build_table(load_config(FIXTURES / "mailgate.toml"))
    assert table.alias("SALES@example.COM").defaults_dict() == {"team_id": 3}
    assert table.domain("strict.example.org").default_alias == "helpdesk@strict.example.org"
    assert rcpt_verdict(table, "random@strict.example.org")[0] == "accept"  # default alias


def test_incoming_local_from_config_and_from_odoo_rows() -> None:
    from aliases.load import merge_aliases
    from aliases.resolve import resolve_address
    from gateway.config import parse_config

    cfg = parse_config({
        "domains": [{"name": "example.test"}],
        "aliases": [{"address": "jobs@example.test", "model": "hr.applicant", "incoming_local": True}],
        "routing": {"incoming_local_domains": ["Partner.Example"]},
    }, base_dir="/tmp")
    table = cfg.alias_table()
    assert resolve_address(table, "jobs@partner.example", "to").alias.address == "jobs@example.test"  # type: ignore[union-attr]
    assert resolve_address(table, "jobs@elsewhere.example", "to").kind == "foreign"
    # An Odoo alias on a domain we do not serve is kept when it is incoming_local (it matches by local part)…
    merged = merge_aliases(table, [
        {"alias_full_name": "careers@odoo-only.example", "model": "hr.applicant", "alias_incoming_local": True},
        {"alias_full_name": "other@odoo-only.example", "model": "crm.lead"},
    ])
    assert "careers@odoo-only.example" in merged.added
    assert any("other@odoo-only.example" in w for w in merged.warnings)  # …and skipped otherwise
    assert resolve_address(merged.table, "careers@example.test", "to").alias.model == "hr.applicant"  # type: ignore[union-attr]


IDN_CONFIG = {
    "domains": [{"name": "Bücher.Example", "strict": True}, {"name": "Shop.Example.", "strict": True}],
    "aliases": [{"address": "info@bücher.example", "model": "crm.lead"},
                {"address": "sales@shop.example.", "model": "crm.lead"}],
}


@pytest.mark.parametrize("address,alias", [
    ("info@bücher.example", "info@xn--bcher-kva.example"),
    ("info@xn--bcher-kva.example", "info@xn--bcher-kva.example"),   # punycode matches the Unicode config
    ("INFO@XN--BCHER-KVA.EXAMPLE.", "info@xn--bcher-kva.example"),
    ("info+x@BÜCHER.example", "info@xn--bcher-kva.example"),
    ("sales@shop.example", "sales@shop.example"),                   # config written with a trailing dot
    ("sales@Shop.Example.", "sales@shop.example"),
])
def test_domains_match_in_any_spelling(address: str, alias: str) -> None:
    from gateway.config import parse_config

    table = parse_config(IDN_CONFIG, base_dir="/tmp").alias_table()
    assert resolve_address(table, address, "to").alias.address == alias  # type: ignore[union-attr]
    assert rcpt_verdict(table, address)[0] == "accept"
    local = address.split("+")[0].split("@")[0]
    assert rcpt_verdict(table, address.replace(local, "nobody", 1))[0] == "unknown_user"  # ours, strict


def test_idn_spellings_meet_across_config_odoo_and_mail() -> None:
    """A table written in punycode, Odoo's rows in Unicode, mail in either: one domain, ASCII downstream."""
    table = AliasTable(domains=(Domain("xn--bcher-kva.example", default_alias="info@Bücher.example."),),
                       aliases=(Alias("info@BÜCHER.example", "crm.lead"),),
                       incoming_local_domains=("Bücher.Example",))
    assert table.domain("bücher.example") is table.domain("XN--BCHER-KVA.example.") is not None
    assert table.domains[0].default_alias == "info@xn--bcher-kva.example"
    assert table.catchall_addresses() == {"catchall@xn--bcher-kva.example"}
    assert table.incoming_local_domains == ("xn--bcher-kva.example",)
    merged = merge_aliases(table, [{"alias_name": "Hilfe", "alias_domain": "Bücher.Example", "model": "crm.lead"}])
    assert merged.added == ("hilfe@xn--bcher-kva.example",) and not merged.warnings
    assert resolve_address(merged.table, "hilfe@bücher.example", "rcpt").kind == "alias"
    rs = resolve_recipients(merged.table, rcpt=("info@bücher.example",), to=("info@xn--bcher-kva.example",))
    assert [(r.source, r.address) for r in rs] == [("to", "info@xn--bcher-kva.example")]  # one recipient


@pytest.mark.parametrize("address,kind,resolved,tag", [
    ('"sales"@example.com', "alias", "sales@example.com", None),          # RFC 5321: the same mailbox
    ('<"Sales+VIP"@Example.com>', "alias", "sales+vip@example.com", "vip"),
    ('"s\\ales"@example.com', "alias", "sales@example.com", None),        # a backslash pair is its character
    ('"first.last"@example.com', "unknown", "first.last@example.com", None),
    ('"john doe"@example.com', "unknown", '"john doe"@example.com', None),  # needs its quotes: kept
    ('"a..b"@example.com', "unknown", '"a..b"@example.com', None),
    ('"sales\\"@example.com', "unknown", '"sales\\"@example.com', None),  # escaped closing quote: as written
])
def test_quoted_local_parts_that_need_no_quotes_are_unquoted(address, kind, resolved, tag):
    r = resolve_address(TABLE, address, "rcpt")
    assert (r.kind, r.address, r.tag) == (kind, resolved, tag)


def test_quoted_rcpt_is_accepted_as_the_alias_and_counted_once() -> None:
    assert rcpt_verdict(TABLE, '"jobs"@strict.example.org')[0] == "accept"
    assert rcpt_verdict(TABLE, '"nobody"@strict.example.org')[0] == "unknown_user"
    rs = resolve_recipients(TABLE, rcpt=('"sales"@example.com',), to=("sales@example.com",))
    assert [(r.source, r.address) for r in rs] == [("to", "sales@example.com")]


@pytest.mark.parametrize("name,ascii_form", [
    ("straße.de", "xn--strae-oqa.de"),      # IDNA 2003 made it strasse.de: another domain, another owner
    ("STRASSE.de", "strasse.de"),
    ("Faß.DE", "xn--fa-hia.de"),              # UTS #46's own example of non-transitional processing
    ("bücher.example.", "xn--bcher-kva.example"),
    ("i❤.example", "xn--i-7iq.example"),      # refused by IDNA 2008: IDNA 2003's form, as before
])
def test_international_domains_take_their_idna_2008_form(name: str, ascii_form: str) -> None:
    from aliases.names import normalize_domain

    assert normalize_domain(name) == ascii_form
