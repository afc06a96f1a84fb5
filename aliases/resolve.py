"""Which alias (or catchall, bounce address, VERP address) each recipient of a mail names. Pure.

Order of sources: the envelope RCPT first (what the MTA actually delivered to us; a Bcc'd alias is only
there), then Delivered-To, To, Cc, Resent-To, Resent-Cc — Odoo reads only the headers (spec §1.1, §5.5).
An envelope recipient also written in the headers is counted where the headers put it (a Cc stays a Cc).
Domains compare case-insensitively (Odoo fails on a domain stored with capitals, spec §1.7) and in one form
whether written in Unicode or punycode, with or without the root's trailing dot (aliases.names); `sales+vip@`
resolves to `sales@` with tag "vip" unless an alias literally named `sales+vip@` exists (Odoo allows `+`
in alias names and has no subaddressing at all).

`rcpt_verdict` is the SMTP listener's RCPT-time check: refuse at the door what would only be quarantined
in a strict domain (no backscatter, spec §5.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aliases.model import Alias, AliasTable, Domain
from aliases.names import normalize_address, split_address
from routing.tokens import VERP_PREFIX

Source = Literal["rcpt", "delivered-to", "x-original-to", "to", "cc", "resent-to", "resent-cc"]
Kind = Literal["alias", "catchall", "bounce", "verp", "unknown", "foreign"]
Verdict = Literal["accept", "unknown_user", "no_relay"]

#: Sources Odoo counts as "to" for bounce, catchall and forward detection (Delivered-To + To; never Cc), plus
#: the envelope itself (RCPT alone, i.e. a Bcc, and X-Original-To, where Postfix records it).
TO_LIKE: frozenset[str] = frozenset({"rcpt", "delivered-to", "x-original-to", "to"})


@dataclass(frozen=True)
class Resolved:
    """One recipient address and what it names in our alias table."""

    address: str                 # lower-cased, domain in ASCII form (aliases.names)
    source: Source
    kind: Kind
    alias: Alias | None = None
    tag: str | None = None       # the +tag when subaddressing matched a base alias/catchall/bounce
    domain: Domain | None = None
    via_local: bool = False      # matched an `incoming_local` alias by its local part only

    def describe(self) -> str:
        where = {"rcpt": "envelope RCPT", "delivered-to": "Delivered-To", "x-original-to": "X-Original-To",
                 "to": "To", "cc": "Cc", "resent-to": "Resent-To", "resent-cc": "Resent-Cc"}[self.source]
        if self.kind == "alias" and self.alias is not None:
            what = f"alias {self.alias.address} → {self.alias.model}"
            if self.via_local:
                what += " (local part; incoming_local)"
            if self.alias.force_thread_id:
                what += f" (forced thread {self.alias.force_thread_id})"
        elif self.kind == "foreign":
            what = "not one of our domains"
        elif self.kind == "unknown":
            what = f"no alias in our domain {self.domain.name if self.domain else '?'}"
        else:
            what = f"the {self.kind} address of {self.domain.name if self.domain else '?'}"
        tag = f" (+tag {self.tag!r})" if self.tag else ""
        return f"{where} {self.address}: {what}{tag}"


def resolve_address(table: AliasTable, address: str, source: Source = "rcpt") -> Resolved:
    """What one address names: alias (exact, then `+tag` base), bounce/VERP, catchall, unknown or foreign."""
    local, domain_name = split_address(address)
    addr = f"{local}@{domain_name}" if domain_name else local
    domain = table.domain(domain_name) if domain_name else None
    if domain is None:
        local_alias = table.local_alias(local, domain_name) if domain_name else None
        if local_alias is not None:  # Odoo's alias_incoming_local on another domain
            return Resolved(addr, source, "alias", alias=local_alias, via_local=True)
        return Resolved(addr, source, "foreign")
    exact = table.alias(addr)
    if exact is not None:
        return Resolved(addr, source, "alias", alias=exact, domain=domain)
    base, plus, tag = local.partition("+")
    tag_or_none = tag if plus and tag else None
    if domain.bounce and base == domain.bounce.lower():
        # bounce+TOKEN@ is VERP (an outbound recipient row); a bare bounce@ is the bounce address itself.
        return Resolved(addr, source, "verp" if tag_or_none else "bounce", tag=tag_or_none, domain=domain)
    if local.startswith(VERP_PREFIX) and len(local) > len(VERP_PREFIX):
        # the relay always writes `bounce+TOKEN@domain` (routing.tokens), whatever the domain's bounce name
        return Resolved(addr, source, "verp", tag=local[len(VERP_PREFIX):], domain=domain)
    if plus:
        based = table.alias(f"{base}@{domain_name}")
        if based is not None:
            return Resolved(addr, source, "alias", alias=based, tag=tag_or_none, domain=domain)
    if domain.catchall and base == domain.catchall.lower():
        return Resolved(addr, source, "catchall", tag=tag_or_none, domain=domain)
    local_alias = table.local_alias(local, domain_name)
    if local_alias is not None:
        return Resolved(addr, source, "alias", alias=local_alias, domain=domain, via_local=True)
    return Resolved(addr, source, "unknown", domain=domain)


def resolve_recipients(table: AliasTable, *, rcpt: tuple[str, ...] = (), delivered_to: tuple[str, ...] = (),
                       to: tuple[str, ...] = (), cc: tuple[str, ...] = (), resent_to: tuple[str, ...] = (),
                       resent_cc: tuple[str, ...] = (),
                       x_original_to: tuple[str, ...] = ()) -> tuple[Resolved, ...]:
    """Every recipient once, in source order (RCPT, Delivered-To, X-Original-To, To, Cc, Resent-To/Cc).

    An address written in the headers takes its *first header* position as its source, even when it is also
    an envelope RCPT: the MTA puts every recipient in the envelope, Cc included, and Odoo, which reads only
    the headers, counts a Cc as no To for bounce and forward detection (spec §1.3, §1.5, test
    `references_forward_cc`). Only an address in the envelope alone (a Bcc) has the source "rcpt".
    """
    seen: set[str] = set()
    out: list[Resolved] = []
    headers: tuple[tuple[Source, tuple[str, ...]], ...] = (
        ("delivered-to", delivered_to), ("x-original-to", x_original_to), ("to", to),
        ("cc", cc), ("resent-to", resent_to), ("resent-cc", resent_cc),
    )
    header_source: dict[str, Source] = {}
    for source, addresses in headers:
        for address in addresses:
            header_source.setdefault(normalize_address(address), source)
    groups: tuple[tuple[Source, tuple[str, ...]], ...] = (("rcpt", rcpt), *headers)
    for source, addresses in groups:
        for address in addresses:
            where = header_source.get(normalize_address(address), "rcpt") if source == "rcpt" else source
            res = resolve_address(table, address, where)
            if res.address in seen or "@" not in res.address:
                continue
            seen.add(res.address)
            out.append(res)
    return tuple(out)


def rcpt_verdict(table: AliasTable, address: str) -> tuple[Verdict, str]:
    """RCPT-time verdict for the SMTP listener: accept, unknown_user (550 5.1.1) or no_relay (550 5.7.1).

    Aliases (also with a +tag), the catchall, the bounce address and VERP addresses are accepted. An unknown
    local part is refused only in a strict domain without a default alias: with a default alias the mail
    is routable, so refusing it would lose mail the sysadmin asked to keep.
    """
    res = resolve_address(table, address, "rcpt")
    if res.kind == "foreign" or (res.via_local and res.domain is None):
        # A local-part alias routes mail that reached us for another domain (headers), but RCPT for a domain
        # we do not serve is still refused: accepting it would make us a sink for anybody's domain.
        return "no_relay", f"{res.address or address!r}: not a domain this gateway accepts mail for"
    if res.kind in ("alias", "catchall", "bounce", "verp"):
        return "accept", res.describe()
    dom = res.domain
    assert dom is not None
    if split_address(res.address)[0] == "postmaster":
        # RFC 5321 §4.5.1: every domain must accept postmaster; it is routed (or quarantined) like any mail.
        return "accept", f"{res.address}: postmaster is always accepted (RFC 5321 §4.5.1)"
    if dom.default_alias:
        return "accept", f"{res.address}: no alias, routed to the default alias {dom.default_alias} of {dom.name}"
    if dom.strict:
        return "unknown_user", f"{res.address}: no such alias in strict domain {dom.name}"
    return "accept", f"{res.address}: no alias, but {dom.name} is not strict (routed or quarantined later)"
