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
        "listeners[1].port: 127.0.0.1:2525 is also listeners[0]'s address",
    ]


def test_a_valid_config_has_no_problems() -> None:
    assert problems({**BASE, "aliases": [{"address": "sales@example.test", "model": "crm.lead"}],
                     "listeners": [{"port": 2525}, {"port": 2424, "kind": "lmtp"}]}) == []
