"""RFC 3464 delivery status notifications, read per recipient.

Odoo reads only the first per-recipient block of a DSN; we read them all. The parser is deliberately
tolerant: real DSNs put brackets around addresses, omit the address type, fold lines, forget the blank line
between blocks, or hide the report inside a multipart/mixed. A block without Final-Recipient falls back to
Original-Recipient (then X-Actual-Recipient).
"""

from __future__ import annotations

import email.message
import re
from dataclasses import dataclass

from routing.detectors.base import clean_address

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s?(.*)$")


@dataclass(frozen=True)
class DsnRecipient:
    """One per-recipient block of a DSN, with the per-message Reporting-MTA carried along."""

    recipient: str
    action: str                      # lower-cased: failed | delayed | delivered | relayed | expanded | ""
    status: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    final_recipient: str | None = None
    reporting_mta: str | None = None

    @property
    def is_failure(self) -> bool:
        return self.action in ("failed", "delayed")


def find_status_parts(msg: email.message.Message) -> list[email.message.Message]:
    """Every message/delivery-status part in the tree (a DSN may be nested in multipart/mixed)."""
    out = []
    try:
        for part in msg.walk():
            if part.get_content_type() in _DSN_TYPES:
                out.append(part)
    except Exception:  # noqa: BLE001 - a broken tree yields what was reached
        pass
    return out


def _part_text(part: email.message.Message) -> str:
    """The delivery-status body as text, whether compat32 parsed it into blocks or left it a string."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for block in payload:
            if isinstance(block, email.message.Message):
                lines = [f"{k}: {v}" for k, v in block.items()]
                inner = block.get_payload()
                if isinstance(inner, str) and inner.strip():
                    lines.append(inner)       # headers the parser took for a body (missing blank line)
                blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
    try:
        raw = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        raw = None
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return payload if isinstance(payload, str) else ""


def _blocks(text: str) -> list[dict[str, str]]:
    """Header blocks separated by blank lines, with folded lines joined; field names lower-cased."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                out.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last:
            current[last] += " " + line.strip()
            continue
        m = _HEADER_LINE.match(line)
        if not m:
            continue
        name = m.group(1).lower()
        if name in current and name in ("final-recipient", "original-recipient") and last != name:
            # no blank line between two recipient blocks: start a new one
            out.append(current)
            current = {}
        current[name] = m.group(2).strip()
        last = name
    if current:
        out.append(current)
    return out


def _typed_value(value: str | None) -> str | None:
    """`rfc822; user@host` → `user@host`; `dns; mx.example.com` → `mx.example.com`."""
    if not value:
        return None
    if ";" in value:
        value = value.split(";", 1)[1]
    value = value.strip()
    return value or None


def _diagnostic(value: str | None) -> str | None:
    if not value:
        return None
    return " ".join(value.split()) or None


def parse_dsn(msg: email.message.Message) -> list[DsnRecipient]:
    """Every per-recipient block of every delivery-status part, in order. Never raises."""
    out: list[DsnRecipient] = []
    for part in find_status_parts(msg):
        try:
            blocks = _blocks(_part_text(part))
        except Exception:  # noqa: BLE001
            continue
        reporting = None
        for block in blocks:
            if "reporting-mta" in block and not ({"final-recipient", "original-recipient"} & block.keys()):
                reporting = _typed_value(block.get("reporting-mta"))
                continue
            # Original-Recipient is the address *we* sent to; Final-Recipient may be an alias target,
            # an X.400 name or a local mailbox (user@host-without-domain). Prefer the one we can use.
            original = block.get("original-recipient")
            rcpt = None
            for name in ("original-recipient", "final-recipient", "x-actual-recipient"):
                value = block.get(name)
                if value and (";" not in value or value.split(";", 1)[0].strip().lower() in ("rfc822", "utf-8")):
                    rcpt = clean_address(_typed_value(value) or "")
                if rcpt:
                    break
            if not rcpt:
                continue
            status = _clean_status(block.get("status"))
            action = (block.get("action") or "").strip().lower().split()[0:1]
            out.append(DsnRecipient(
                recipient=rcpt,
                action=_infer_action(action[0] if action else "", status),
                status=status,
                diagnostic=_diagnostic(block.get("diagnostic-code") or block.get("x-diagnostic-code")
                                       or block.get("x400-supplementary-info")),
                remote_mta=_typed_value(block.get("remote-mta")),
                original_recipient=clean_address(_typed_value(original) or "") if original else None,
                final_recipient=_typed_value(block.get("final-recipient")),
                reporting_mta=reporting,
            ))
    return out


_STATUS_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def _clean_status(value: str | None) -> str | None:
    if not value:
        return None
    m = _STATUS_CODE.search(value)
    return ".".join(m.groups()) if m else None


def _infer_action(action: str, status: str | None) -> str:
    """Missing or odd Action values are read from the status class, as RFC 3464 §2.3.3 implies."""
    action = action.strip(";,.")
    if action in ("failed", "delayed", "delivered", "relayed", "expanded"):
        return action
    if action in ("failure", "fail", "error"):
        return "failed"
    if action in ("delay", "warning"):
        return "delayed"
    if status:
        return {"2": "delivered", "4": "delayed", "5": "failed"}[status[0]]
    return "failed"
