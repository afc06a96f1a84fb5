"""gateway/config.py cross-checks: every problem at once, each under the key it is about (file, key, what)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config

PATH = "/etc/mailgate/mailgate.toml"
BASE: dict[str, Any] = {"domains": [{"name": "example.test"}]}


def problems(data: dict[str, Any]) -> list[str]:
    """The lines `check-config` prints for `data` (empty when it is valid)."""
    try:
        parse_config(data, path=PATH, base_dir="/tmp")
    except ConfigError as exc:
        assert str(exc).splitlines() == [f"{PATH}: {p}" for p in exc.problems]
        return exc.problems
    return []


def test_cross_check_problems_are_all_reported_each_under_its_index() -> None:
    got = problems({
        "domains": [{"name": "example.test", "default_alias": "help"}, {"name": "Example.TEST"}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"},
                    {"address": "SALES@example.test", "model": "crm.lead"},
                    {"address": "a@other.test", "model": "crm.lead"},
                    {"address": "nodomain", "model": "crm.lead"}],
        "listeners": [{"host": "127.0.0.1", "port": 2525}, {"host": "127.0.0.1", "port": 2525}],
    })
    assert got == [
        "domains[1 'Example.TEST'].name: the same domain as domains[0]",
        "aliases[1 'SALES@example.test'].address: the same address as aliases[0]",
        "aliases[2 'a@other.test'].address: not in a configured domain",
        "aliases[3 'nodomain'].address: not a full address (local@domain)",
        "domains[0 'example.test'].default_alias: 'help' is not an alias "
        "(no [[aliases]] address 'help@example.test')",
        "listeners[1].port: 127.0.0.1:2525 overlaps listeners[0] (127.0.0.1:2525): serve would fail to bind it "
        "(address already in use)",
    ]


def test_a_valid_config_has_no_problems() -> None:
    assert problems({**BASE, "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
                     "listeners": [{"port": 2525}, {"port": 2424, "kind": "lmtp"}]}) == []


def _binds(*listeners: dict[str, Any], **sections: Any) -> list[str]:
    return problems({**BASE, "listeners": list(listeners), **sections})


@pytest.mark.parametrize("first,second", [
    ("0.0.0.0", "127.0.0.1"),    # the IPv4 wildcard takes every IPv4 address
    ("127.0.0.1", "0.0.0.0"),
    ("::", "::1"),
    ("", "127.0.0.1"),           # "" binds every address of both families
    ("", "::"),
    ("localhost", "127.0.0.1"),  # localhost is 127.0.0.1 and ::1
    ("[::1]", "localhost"),
    ("0.0.0.0", "mail.example"),  # a name may resolve to any address of the wildcard's family
])
def test_listeners_whose_addresses_overlap_on_one_port_clash(first: str, second: str) -> None:
    got = _binds({"host": first, "port": 2525}, {"host": second, "port": 2525, "kind": "lmtp"})
    assert len(got) == 1 and got[0].startswith("listeners[1].port: ") and "overlaps listeners[0]" in got[0]


@pytest.mark.parametrize("first,second", [
    ("0.0.0.0", "::"),           # one wildcard per family: asyncio binds :: with IPV6_V6ONLY
    ("0.0.0.0", "::1"),
    ("127.0.0.1", "127.0.0.2"),
    ("127.0.0.1", "::1"),
])
def test_listeners_on_distinct_addresses_do_not_clash(first: str, second: str) -> None:
    assert _binds({"host": first, "port": 2525}, {"host": second, "port": 2525, "kind": "lmtp"}) == []


def test_listeners_clash_with_the_admin_and_tracking_http_ports() -> None:
    assert _binds({"port": 8025}) == [
        "listeners[0].port: 127.0.0.1:8025 overlaps the admin HTTP server [admin] (127.0.0.1:8025): serve would "
        "fail to bind it (address already in use)"]
    assert _binds({"port": 8025}, admin={"enabled": False}) == []
    assert _binds({"host": "0.0.0.0", "port": 9000}, admin={"port": 9000})[0].startswith("listeners[0].port: ")
    # the tracking server runs beside the outbound relay: with a submission listener or webhooks
    got = _binds({"port": 8026}, {"port": 2587, "kind": "submission"})
    assert len(got) == 1 and "overlaps the tracking HTTP server [tracking]" in got[0]
    assert _binds({"port": 8026}) == []
    assert _binds({"port": 2587, "kind": "submission"}, tracking={"port": 8025})[0].startswith("tracking.port: ")


def test_port_zero_never_clashes() -> None:
    assert _binds({"port": 0}, {"port": 0, "kind": "lmtp"}, admin={"port": 0}) == []


def test_domain_names_are_normalised_and_both_idn_spellings_are_one_domain() -> None:
    cfg = parse_config({"domains": [{"name": "Shop.Example."}, {"name": "Bücher.Example"}],
                        "aliases": [{"address": "Sales@shop.example.", "model": "crm.lead"},
                                    {"address": "info@xn--bcher-kva.example", "model": "crm.lead"}],
                        "routing": {"incoming_local_domains": ["Partner.Example."]}}, base_dir="/tmp")
    assert [d.name for d in cfg.domains] == ["shop.example", "xn--bcher-kva.example"]
    assert [a.address for a in cfg.aliases] == ["sales@shop.example", "info@xn--bcher-kva.example"]
    assert cfg.routing.incoming_local_domains == ("partner.example",)
    assert problems({"domains": [{"name": "bücher.example"}, {"name": "XN--BCHER-KVA.example."}]}) == [
        "domains[1 'XN--BCHER-KVA.example.'].name: the same domain as domains[0]"]
    got = problems({"domains": [{"name": "bücher..example"}]})
    assert len(got) == 1 and got[0].startswith("domains[0 'bücher..example'].name: 'bücher..example' is not a valid "
                                               "domain name")


@pytest.mark.parametrize("model", ["", "CRM Lead!!", "crm.Lead", "crm..lead", ".crm", "crm.lead.", "crm lead"])
def test_alias_model_must_be_a_technical_name(model: str) -> None:
    got = problems({**BASE, "aliases": [{"address": "s@example.test", "model": model}]})
    assert got == [f"aliases[0 's@example.test'].model: {model!r} is not an Odoo model's technical name (like "
                   "'crm.lead': lower-case letters, digits and _, in parts joined by dots)"]


@pytest.mark.parametrize("model", ["crm.lead", "x_custom", "helpdesk.ticket", "x_studio.model_2"])
def test_technical_model_names_pass(model: str) -> None:
    assert problems({**BASE, "aliases": [{"address": "s@example.test", "model": model}]}) == []


def test_check_config_odoo_names_aliases_whose_model_odoo_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mailgate check-config --odoo`: a well-formed model name that this Odoo has no `ir.model` for."""
    from gateway.odoo.check import check_odoo_access
    from tests.odoo_double import OdooDouble

    monkeypatch.setenv("MAILGATE_TEST_ODOO_KEY", "double-api-key")
    with OdooDouble() as odoo:
        cfg = parse_config({
            "odoo": {"url": odoo.url, "db": odoo.db, "login": odoo.login, "password_env": "MAILGATE_TEST_ODOO_KEY"},
            **BASE,
            "aliases": [{"address": "sales@example.test", "model": "crm.lead"},
                        {"address": "jobs@example.test", "model": "hr.applicant"},
                        {"address": "help@example.test", "model": "helpdesk.ticket"}],
        }, base_dir="/tmp")
        report = check_odoo_access(cfg)
    assert report["problems"] == [
        "odoo: aliases[1].model: 'hr.applicant' (alias jobs@example.test) is not a model in this Odoo (ir.model): "
        "install its module or fix the name"]


def test_two_imap_sources_with_one_name_are_refused() -> None:
    """Two accounts under one name shared a checkpoint: the second's mail was taken for already seen."""
    src = {"login": "catchall", "password_env": "PW", "host": "127.0.0.1", "port": 993}
    got = problems({**BASE, "imap": [{**src, "name": "catchall"}, {**src, "name": "other"},
                                     {**src, "name": "catchall", "host": "127.0.0.2"}]})
    assert len(got) == 1 and got[0].startswith("imap[2") and "the same name as imap[0]" in got[0]


def test_followers_policy_needs_a_record_to_follow() -> None:
    """Odoo calls `followers` without a record a configuration error: every mail would be refused."""
    alias = {"address": "tasks@example.test", "model": "project.task", "contact": "followers"}
    assert any("needs a record whose followers may write" in p for p in problems({**BASE, "aliases": [alias]}))
    assert problems({**BASE, "aliases": [{**alias, "force_thread_id": 7}]}) == []
    assert problems({**BASE, "aliases": [{**alias, "parent_model": "project.project", "parent_thread_id": 4}]}) == []
    assert any("together" in p for p in problems({**BASE, "aliases": [{**alias, "parent_model": "project.project"}]}))


def test_webhook_types_must_be_event_types_and_names_unique() -> None:
    """A misspelt type ("bounce") filtered out every event for that subscriber, each marked skipped; two
    hooks of one name shared a cursor and deliveries, and one signed with the other's secret."""
    hook = {"url": "https://crm.example.net/hook", "secret_env": "HOOK_SECRET"}
    got = problems({**BASE, "events": {"webhooks": [
        {**hook, "name": "crm", "types": ["bounced", "bounce"]},
        {**hook, "name": "crm", "types": ["opened"]},
        {**hook, "name": "bi"}]}})
    assert len(got) == 2, got
    assert got[0].startswith("events.webhooks[0 'crm'].types: unknown event type(s) 'bounce'; known: delivered")
    assert got[1] == ("events.webhooks[1 'crm'].name: the same name as events.webhooks[0]; each subscriber needs "
                      "its own (it keys the subscriber's cursor, deliveries and secret)")
