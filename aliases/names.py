"""One spelling per domain name and address, so that every way of writing one matches every other. Pure.

Domain names are compared in their ASCII (IDNA, punycode) form, lower-case, without the root's trailing dot:
`Bücher.Example.`, `bücher.example` and `xn--bcher-kva.example` are one domain. ASCII is what an MTA without
SMTPUTF8 puts in the envelope and headers, and the only form a header, a Message-ID or a HELO can carry
as it is, so it is also the form the router, the relay and Odoo are given. The conversion is IDNA 2008 with
UTS #46 mapping, non-transitional (the `idna` package), as browsers and current MTAs do: Python's own codec is
IDNA 2003, which maps `straße.de` to `strasse.de` — another domain, with another owner — where IDNA 2008 gives
`xn--strae-oqa.de`. A name IDNA 2008 refuses (emoji and other symbols) falls back to IDNA 2003.

A quoted local part whose content needs no quotes is the same mailbox unquoted (RFC 5321 §4.1.2): `"sales"@`
and `"s\\ales"@` are `sales@`. One that does need them (`"john doe"@`) is kept as written.
"""

from __future__ import annotations

import re

import idna

#: RFC 5322 dot-atom (atext, with RFC 6531's non-ASCII for SMTPUTF8): a local part that needs no quotes
_ATEXT = r"[a-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*", re.IGNORECASE)


def normalize_domain(name: str, *, strict: bool = False) -> str:
    """`name` lower-case, in ASCII (punycode) form, without one trailing dot.

    A name the IDNA codec refuses (an empty or over-long label) is kept lower-case as written, which can
    only match itself; with `strict` (config) it is a ValueError instead, so the operator hears of it."""
    domain = name.strip().lower()
    domain = domain[:-1] if domain.endswith(".") else domain
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError:
        pass
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        if strict:
            raise ValueError(f"{name!r} is not a valid domain name ({exc})") from None
        return domain


def unquote_local(local: str) -> str:
    """`local` without its quotes when the quoted content, backslash pairs undone, is a dot-atom; else as is."""
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return local
    content: list[str] = []
    chars = iter(local[1:-1])
    for ch in chars:
        if ch == "\\":
            ch = next(chars, "")
            if not ch:
                return local  # the closing quote was escaped: not a quoted string
        elif ch == '"':
            return local  # an unescaped quote inside: not one quoted string
        content.append(ch)
    unquoted = "".join(content)
    return unquoted if _DOT_ATOM.fullmatch(unquoted) else local


def split_address(address: str, *, strict: bool = False) -> tuple[str, str]:
    """(local, domain): lower-case, the local part unquoted when it can be and the domain normalised; an
    address without '@' has an empty domain."""
    addr = address.strip().strip("<>").strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr, ""
    return unquote_local(local), normalize_domain(domain, strict=strict)


def normalize_address(address: str, *, strict: bool = False) -> str:
    """`local@domain` as `split_address` spells it (just the local part when there is no domain)."""
    local, domain = split_address(address, strict=strict)
    return f"{local}@{domain}" if domain else local
