"""The alias model: domains and aliases as frozen data.

An `AliasTable` is what the sysadmin configured (optionally merged with Odoo's `mail.alias`), in the form the
pure resolver and the SMTP RCPT check both read. Addresses and domain names are stored lower-case (Odoo fails
to match a domain stored with capitals, spec §1.7; we never do), domains in ASCII form without a trailing dot,
whatever the source wrote (aliases.names): a config, an Odoo row and a mail may each spell an IDN its own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aliases.names import normalize_address, normalize_domain

ContactPolicy = Literal["everyone", "partners", "followers", "employees"]


@dataclass(frozen=True)
class Domain:
    """A mail domain the gateway answers for."""

    name: str
    catchall: str | None = "catchall"
    bounce: str | None = "bounce"
    strict: bool = False
    default_alias: str | None = None  # full address of an alias
    tracking: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_domain(self.name))
        if self.default_alias:
            object.__setattr__(self, "default_alias", normalize_address(self.default_alias))

    @property
    def catchall_address(self) -> str | None:
        return f"{self.catchall}@{self.name}".lower() if self.catchall else None

    @property
    def bounce_address(self) -> str | None:
        return f"{self.bounce}@{self.name}".lower() if self.bounce else None


@dataclass(frozen=True)
class Alias:
    """An address that creates (or, with force_thread_id, updates) records of one Odoo model."""

    address: str
    model: str
    defaults: tuple[tuple[str, Any], ...] = ()
    contact: ContactPolicy = "everyone"
    force_thread_id: int | None = None
    create_partner: bool = False
    tracking: bool = True
    bounced_content: str | None = None
    source: Literal["config", "odoo"] = "config"
    # Odoo's `alias_incoming_local`: the local part matches on any domain allowed by the table's
    # `incoming_local_domains` (Odoo's `mail.catchall.domain.allowed`; empty = any domain).
    incoming_local: bool = False
    # Odoo's alias parent (`alias_parent_model_id`, `alias_parent_thread_id`): the record whose followers the
    # `followers` policy checks when the alias creates records (a project's followers for its task alias).
    parent_model: str | None = None
    parent_thread_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", normalize_address(self.address))

    @property
    def local(self) -> str:
        return self.address.split("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.address.split("@", 1)[1]

    def defaults_dict(self) -> dict[str, Any]:
        return dict(self.defaults)


@dataclass(frozen=True)
class AliasTable:
    """All domains and aliases, with lookup helpers. Build once per config (re)load; share freely."""

    domains: tuple[Domain, ...] = ()
    aliases: tuple[Alias, ...] = ()
    incoming_local_domains: tuple[str, ...] = ()
    _by_address: dict[str, Alias] = field(default_factory=dict, init=False, repr=False, compare=False)
    _by_domain: dict[str, Domain] = field(default_factory=dict, init=False, repr=False, compare=False)
    _by_local: dict[str, Alias] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allowed = tuple(normalize_domain(d) for d in self.incoming_local_domains)
        object.__setattr__(self, "incoming_local_domains", allowed)
        object.__setattr__(self, "_by_address", {a.address: a for a in self.aliases})
        object.__setattr__(self, "_by_domain", {d.name: d for d in self.domains})
        by_local: dict[str, Alias] = {}
        for a in self.aliases:
            if a.incoming_local:
                by_local.setdefault(a.local.lower(), a)
        object.__setattr__(self, "_by_local", by_local)

    def local_alias(self, local: str, domain: str) -> Alias | None:
        """An `incoming_local` alias named `local`, when `domain` may use it (Odoo spec §1.7: our alias
        domains always may; others only when the allowed list is empty or names them)."""
        alias = self._by_local.get(local.lower())
        if alias is None:
            return None
        domain = normalize_domain(domain)
        allowed = set(self.incoming_local_domains)
        if not allowed or domain in allowed or domain in self._by_domain:
            return alias
        return None

    def domain(self, name: str) -> Domain | None:
        return self._by_domain.get(normalize_domain(name))

    def alias(self, address: str) -> Alias | None:
        return self._by_address.get(normalize_address(address))

    def bounce_addresses(self) -> frozenset[str]:
        return frozenset(d.bounce_address for d in self.domains if d.bounce_address)

    def catchall_addresses(self) -> frozenset[str]:
        return frozenset(d.catchall_address for d in self.domains if d.catchall_address)
