"""ARF (RFC 5965) feedback reports: a mailbox provider tells us a recipient marked our mail as spam.

Odoo counts these as bounces; they are complaints (the address works, its owner does not want the mail),
so they become `complained` events and never touch the bounce counter.
"""

from __future__ import annotations

import email
import email.message
import re

from routing.model import Complaint

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s*(.*)$")


def _report_fields(part: email.message.Message) -> dict[str, str]:
    """The machine-readable fields of a message/feedback-report part, lower-cased names, first value wins."""
    payload = part.get_payload()
    if isinstance(payload, list):  # compat32 parses message/* bodies into sub-messages
        text = "\n".join(f"{k}: {v}" for sub in payload if isinstance(sub, email.message.Message)
                         for k, v in sub.items())
    else:
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload or "")
    fields: dict[str, str] = {}
    last = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and last:
            fields[last] += " " + line.strip()
            continue
        m = _FIELD.match(line)
        if m:
            last = m.group(1).lower()
            fields.setdefault(last, m.group(2).strip())
    return fields


def _embedded_headers(msg: email.message.Message) -> email.message.Message | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(part.get_payload())
            return email.message_from_string(text.lstrip())
    return None


def _bare(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.lower().startswith("rfc822;"):
        value = value[7:].strip()
    return value.strip("<>").strip() or None


def parse_arf(msg: email.message.Message) -> Complaint | None:
    """The complaint when the message is a multipart/report; report-type=feedback-report, else None."""
    try:
        if msg.get_content_type() != "multipart/report" or \
                (msg.get_param("report-type") or "").lower() != "feedback-report":
            return None
        report = next((p for p in msg.walk() if p.get_content_type() == "message/feedback-report"), None)
        fields = _report_fields(report) if report is not None else {}
        original = _embedded_headers(msg)
        message_id = None
        if original is not None:
            for name in ("Message-ID", "X-Microsoft-Original-Message-ID"):
                value = original.get(name)
                if value and "<" in str(value):
                    message_id = "<" + str(value).split("<", 1)[1].split(">", 1)[0].strip() + ">"
                    break
        recipient = _bare(fields.get("original-rcpt-to"))
        if recipient is None and original is not None and original.get("To"):
            recipient = None  # the visible To may be a list; only Original-Rcpt-To names the complainer
        return Complaint(
            feedback_type=(fields.get("feedback-type") or "abuse").lower(),
            original_recipient=recipient,
            original_message_id=message_id,
            user_agent=fields.get("user-agent"),
            source_ip=fields.get("source-ip"),
            reported_domain=fields.get("reported-domain"),
        )
    except Exception:  # noqa: BLE001 - a broken report is no complaint rather than a crash
        return None
