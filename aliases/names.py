"""One spelling per domain name and address, so that every way of writing one matches every other. Pure.

Domain names are compared in their ASCII (IDNA, punycode) form, lower-case, without the root's trailing dot:
`Bücher.Example.`, `bücher.example` and `xn--bcher-kva.example` are one domain. ASCII is what an MTA without
SMTPUTF8 puts in the envelope and headers, and the only form a header, a Message-ID or a HELO can carry
as it is, so it is also the form the router, the relay and Odoo are given. The conversion is Python's
`idna` codec (IDNA 2003, no extra dependency).
"""

from __future__ import annotations


def normalize_domain(name: str, *, strict: bool = False) -> str:
    """`name` lower-case, in ASCII (punycode) form, without one trailing dot.

    A name the IDNA codec refuses (an empty or over-long label) is kept lower-case as written, which can
    only match itself; with `strict` (config) it is a ValueError instead, so the operator hears of it."""
    domain = name.strip().lower()
    domain = domain[:-1] if domain.endswith(".") else domain
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        if strict:
            raise ValueError(f"{name!r} is not a valid domain name ({exc})") from None
        return domain


def split_address(address: str, *, strict: bool = False) -> tuple[str, str]:
    """(local, domain): lower-case, the domain normalised; an address without '@' has an empty domain."""
    addr = address.strip().strip("<>").strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr, ""
    return local, normalize_domain(domain, strict=strict)


def normalize_address(address: str, *, strict: bool = False) -> str:
    """`local@domain` as `split_address` spells it (just the local part when there is no domain)."""
    local, domain = split_address(address, strict=strict)
    return f"{local}@{domain}" if domain else local
