"""Signed, unguessable tokens for VERP return paths and tracking links (pure).

A token names one outbound (mail, recipient) row by its integer id and carries a truncated HMAC-SHA256 of
(purpose, id[, payload]) under the site secret. It fits in an address local part: lower-case base32, no
padding, so MTAs that lower-case the local part of `bounce+TOKEN@domain` cannot break it.
Forged or altered tokens decode to None — never to a different row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_MAC_BYTES = 10  # 80 bits: forging one needs ~2^79 tries against a server that answers nothing useful


def _mac(secret: bytes, purpose: str, ident: int, payload: bytes = b"") -> bytes:
    msg = purpose.encode() + b"\0" + str(ident).encode() + b"\0" + payload
    return hmac.new(secret, msg, hashlib.sha256).digest()[:_MAC_BYTES]


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes:
    text = text.upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def make_token(secret: bytes, purpose: str, ident: int, payload: bytes = b"") -> str:
    """Token for row `ident`; `payload` (e.g. the click URL) is bound into the MAC but not carried."""
    if ident < 0:
        raise ValueError("token ids are non-negative")
    raw = ident.to_bytes(8, "big").lstrip(b"\0") or b"\0"
    return _b32(bytes([len(raw)]) + raw + _mac(secret, purpose, ident, payload))


def read_token(secret: bytes, purpose: str, token: str, payload: bytes = b"") -> int | None:
    """The id a genuine token names, or None for anything forged, truncated or malformed."""
    token = token.strip().lower()
    try:
        data = _unb32(token)
    except (ValueError, TypeError):
        return None
    if _b32(data) != token:  # only the canonical spelling: unused padding bits must not make twins
        return None
    if len(data) < 2:
        return None
    n = data[0]
    if not 1 <= n <= 8 or len(data) != 1 + n + _MAC_BYTES:
        return None
    ident = int.from_bytes(data[1:1 + n], "big")
    if not hmac.compare_digest(data[1 + n:], _mac(secret, purpose, ident, payload)):
        return None
    return ident


VERP_PREFIX = "bounce+"


def verp_address(secret: bytes, recipient_row_id: int, domain: str, prefix: str = VERP_PREFIX) -> str:
    """`bounce+TOKEN@domain` for one outbound recipient row."""
    return f"{prefix}{make_token(secret, 'verp', recipient_row_id)}@{domain}"


def read_verp(secret: bytes | None, address: str, prefix: str = VERP_PREFIX) -> int | None:
    """The outbound recipient row a VERP address names, or None (not VERP, or a forged token)."""
    if not secret or "@" not in address:
        return None
    local = address.rsplit("@", 1)[0].lower()
    if not local.startswith(prefix):
        return None
    return read_token(secret, "verp", local[len(prefix):])
