"""The normalised DSN the gateway hands Odoo for one *hard* bounce (pure).

Why: Odoo refuses writes to `mail.notification` even to admin, so the only way to raise `message_bounce` *and*
mark the bounced notification is to let Odoo's own bounce handler see a DSN (spec §6). Its handler is weak
(spec §1.3, §5.8): it reads only the first per-recipient block, counts delays as bounces and misses
non-standard NDRs. So the gateway classifies every bounce itself and gives Odoo one clean RFC 3464 report
per failed recipient, shaped so that Odoo's detection and extraction cannot miss:

* `Delivered-To` and `To` = the domain's bounce address (detection rule 1), `From: MAILER-DAEMON@…` (rule 2),
  `multipart/report; report-type=delivery-status` (rule 3);
* one `Final-Recipient` (the only block Odoo reads);
* the original Message-ID in a `text/rfc822-headers` part (how Odoo finds the message and its notification);
* `routing.model.LOOP_HEADER`, so the report can never come back in as a new mail, and a deterministic
  Message-ID, so the same bounce always yields the same report.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib

from routing.model import LOOP_HEADER, BounceResult


def dsn_message_id(bounce: BounceResult, seed: str, domain: str) -> str:
    digest = hashlib.sha256(f"{seed}\0{bounce.recipient.lower()}\0{bounce.original_message_id}".encode())
    return f"<dsn.{digest.hexdigest()[:32]}@{domain or 'mailgate.invalid'}>"


def _clean(value: str | None, limit: int = 900) -> str:
    """One header-safe line: no CR/LF (header injection), ASCII only, bounded."""
    text = " ".join(str(value or "").split())
    return text.encode("ascii", "replace").decode("ascii")[:limit]


def build_normalized_dsn(bounce: BounceResult, *, bounce_address: str, seed: str,
                         reporting_mta: str = "mailgate", original_headers: str | None = None,
                         date: dt.datetime | None = None) -> bytes:
    """RFC 3464 report for one failed recipient, addressed to Odoo's bounce address; CRLF line ends, 7-bit."""
    domain = bounce_address.rsplit("@", 1)[-1] if "@" in bounce_address else ""
    boundary = "mailgate-dsn-" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    status = _clean(bounce.status) or "5.0.0"
    diagnostic = _clean(bounce.diagnostic) or f"{bounce.reason}"
    recipient = _clean(bounce.recipient, 320)
    when = email.utils.format_datetime(date or dt.datetime.now(dt.timezone.utc))
    orig_id = _clean(bounce.original_message_id, 998)
    headers_part = ""
    if original_headers:
        kept = [line for line in original_headers.replace("\r\n", "\n").split("\n")
                if line and not line.lower().startswith("message-id:")]
        headers_part = "\r\n".join(line.encode("ascii", "replace").decode("ascii")[:998] for line in kept)
    lines = [
        f"Delivered-To: {bounce_address}",
        "Return-Path: <>",
        f"From: MAILER-DAEMON@{domain or 'mailgate.invalid'} (Mail Delivery System)",
        f"To: {bounce_address}",
        f"Subject: Undelivered Mail Returned to Sender: {recipient}",
        f"Date: {when}",
        f"Message-ID: {dsn_message_id(bounce, seed, domain)}",
        "Auto-Submitted: auto-replied",
        f"{LOOP_HEADER}: normalized-dsn",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a delivery status notification normalised by mailgate.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"Delivery to {recipient} failed permanently ({bounce.reason}, {status}).",
        f"{diagnostic}",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {_clean(reporting_mta, 255)}",
        f"Arrival-Date: {when}",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Action: {'delayed' if bounce.action == 'delayed' else 'failed'}",
        f"Status: {status}",
    ]
    if bounce.remote_mta:
        lines.append(f"Remote-MTA: dns; {_clean(bounce.remote_mta, 255)}")
    lines += [f"Diagnostic-Code: smtp; {diagnostic}", "", f"--{boundary}",
              "Content-Type: text/rfc822-headers", ""]
    if orig_id:
        lines.append(f"Message-ID: {orig_id}")
    if headers_part:
        lines.append(headers_part)
    lines += ["", f"--{boundary}--", ""]
    return "\r\n".join(lines).encode("ascii", "replace")
