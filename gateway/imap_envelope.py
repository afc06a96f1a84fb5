"""The envelope of a pulled message, rebuilt from its headers.

Mail read from a mailbox has lost its SMTP envelope. The delivering MTA usually recorded it: `Return-Path`
holds MAIL FROM, and `Delivered-To` / `X-Original-To` the RCPT TO (Bcc'd aliases appear nowhere else).
Which header to trust depends on the site's MTA, so the order is configuration (`rcpt_headers`): the first
header present wins, with every address it lists. Pure: bytes in, addresses out.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr

from gateway.spool import header_block

_PARSER = BytesHeaderParser(policy=compat32)


def envelope_from_headers(raw: bytes, rcpt_headers: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """(mail_from, rcpt_tos) for a pulled message; `""` for a null or missing Return-Path.

    Addresses are deduplicated case-insensitively, keeping the header's order. No header at all gives no
    recipients: the router then resolves from To/Cc like Odoo does.
    """
    headers = _PARSER.parsebytes(header_block(raw) + b"\r\n\r\n")
    mail_from = ""
    return_path = headers.get("Return-Path")
    if return_path is not None:
        mail_from = parseaddr(str(return_path))[1]
    rcpts: list[str] = []
    for name in rcpt_headers:
        values = headers.get_all(name)
        if not values:
            continue
        seen: set[str] = set()
        for _display, addr in getaddresses([str(v) for v in values]):
            addr = addr.strip()
            if addr and "@" in addr and addr.lower() not in seen:
                seen.add(addr.lower())
                rcpts.append(addr)
        if rcpts:
            break
    return mail_from, tuple(rcpts)
