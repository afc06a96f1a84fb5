"""Bounce classification: one parsed message in, per-recipient `BounceResult`s out (or None: not a bounce).

Order of evidence, strongest first:
1. the VERP token the gateway resolved (`verp`): it names the recipient beyond doubt;
2. an RFC 3464 delivery-status part (routing/dsn.py): one result per failed or delayed recipient;
3. the ordered NDR detectors (routing/detectors/), only for mail that *looks like* an NDR.
Status and diagnostic become a reason and hard/soft in routing/bounce_status.py.

Never raises: a malformed message yields what could be read, or None.
"""

from __future__ import annotations

import email
import email.header
import email.message
import re
from dataclasses import dataclass, replace

from routing.bounce_status import classify_status
from routing.detectors import DETECTORS, Detector, Hit
from routing.detectors.base import addresses_in, cut_returned, notice_text, status_in
from routing.detectors.simple import is_warning
from routing.detectors.x_failed_recipients import XFailedRecipientsDetector
from routing.dsn import DsnRecipient, parse_dsn
from routing.model import BounceResult


@dataclass(frozen=True)
class VerpHit:
    """A VERP token in the envelope recipient resolved (by the gateway) to the outbound row it names."""

    recipient: str
    original_message_id: str | None = None


@dataclass(frozen=True)
class BounceReport:
    """What `classify_bounce` found.

    `results` may be empty: the message looks like an NDR (mailer-daemon sender, DSN content type…) but names
    no recipient we can read. The router quarantines it with that reason, never routes it as mail.
    """

    results: tuple[BounceResult, ...]
    via: str                      # "dsn", "verp", a detector's name, "bounce-address", "ndr-unattributed"
    explanation: tuple[str, ...] = ()
    #: the only sign of an NDR was the Subject: people write "not delivered" too, so the router takes this
    #: report only when the envelope shows a machine sent it (null sender, bounce or VERP address)
    subject_only: bool = False

    @property
    def deferred_only(self) -> bool:
        return bool(self.results) and all(r.action == "delayed" for r in self.results)


_NDR_LOCALS = re.compile(r"^(?:mailer-?daemon|postmaster|mdaemon|mail\.delivery\.system|ndr|"
                         r"mail-?delivery(?:-?system)?)$", re.IGNORECASE)
_NDR_NAMES = re.compile(r"mail\s*delivery\s*(?:sub)?system|mailer[- ]daemon|postmaster|delivery\s+subsystem", re.IGNORECASE)
_NDR_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery\s+status\s+notification|delivery\s+notification|failure\s+notice|returned\s+mail"
    r"|mail\s+delivery\s+(?:fail|problem|warning)|deliver(?:y|ed)\s+fail|non[- ]?delivery|could\s+not\s+be\s+delivered"
    r"|not\s+delivered|delivery\s+problem|mail\s+system\s+error|failed\s+mail|delivery\s+report|message\s+delayed"
    r"|delayed\s+mail|delivery\s+failure|mail\s+error|processing\s+error|not\s+been\s+delivered|delivery\s+delayed"
    r"|warning:\s+message|automatically\s+rejected|returned\s+to\s+sender|rejected\s+mail|nicht\s+zustellbar"
    r"|unzustellbar|non\s+remis|no\s+entregado|non\s+recapitato",
    re.IGNORECASE)


def decoded_header(msg: email.message.Message, name: str) -> str:
    """A header as readable text (RFC 2047 words decoded, bad charsets tolerated); "" when absent."""
    try:
        value = msg.get(name)
    except Exception:  # noqa: BLE001
        return ""
    if value is None:
        return ""
    try:
        parts = []
        for chunk, charset in email.header.decode_header(str(value)):
            if isinstance(chunk, bytes):
                try:
                    chunk = chunk.decode(charset or "ascii", errors="replace")
                except LookupError:
                    chunk = chunk.decode("latin-1")
            parts.append(chunk)
        return " ".join("".join(parts).split())
    except Exception:  # noqa: BLE001
        return " ".join(str(value).split())


def ndr_indicator(msg: email.message.Message) -> str | None:
    """Why the message looks like a non-delivery report, or None. Headers only; cheap.

    A Subject alone is the weakest answer ("Subject: …"): see `machine_indicator` for the others."""
    found = machine_indicator(msg)
    if found:
        return found
    try:
        subject = decoded_header(msg, "Subject")
        if _NDR_SUBJECT.search(subject):
            return f"Subject: {subject[:80]}"
    except Exception:  # noqa: BLE001
        return None
    return None


def machine_indicator(msg: email.message.Message) -> str | None:
    """An NDR sign only a machine writes (report content type, X-Failed-Recipients, an NDR sender,
    Auto-Submitted failure), or None. Headers only; cheap."""
    try:
        ctype = msg.get_content_type()
        raw_ctype = str(msg.get("Content-Type") or "").lower()
        if "report-type=delivery-status" in raw_ctype.replace(" ", "").replace('"', ""):
            return "Content-Type: multipart/report; report-type=delivery-status"
        if ctype == "multipart/report" and (msg.get_param("report-type") or "").lower() != "feedback-report":
            return "Content-Type: multipart/report"
        if msg.get("X-Failed-Recipients"):
            return "X-Failed-Recipients header"
        from_value = str(msg.get("From") or "")
        for addr in addresses_in(from_value):
            if _NDR_LOCALS.match(addr.rpartition("@")[0]):
                return f"From: {addr}"
        if _NDR_NAMES.search(from_value):
            return f"From: {' '.join(from_value.split())}"
        auto = str(msg.get("Auto-Submitted") or "").lower()
        if "failure" in auto:
            return f"Auto-Submitted: {auto}"
    except Exception:  # noqa: BLE001
        return None
    return None


def null_return_path(msg: email.message.Message) -> str | None:
    """The delivering MTA recorded a null or NDR envelope sender (Return-Path <>, <MAILER-DAEMON@…>): not a sign
    of an NDR by itself (auto-replies use it too), but proof that no person sent the mail. None otherwise."""
    try:
        values = msg.get_all("Return-Path") or []
    except Exception:  # noqa: BLE001
        return None
    for value in values:
        text = " ".join(str(value).split())
        if text.replace(" ", "") == "<>":
            return "Return-Path: <>"
        for addr in addresses_in(text):
            if _NDR_LOCALS.match(addr.rpartition("@")[0]):
                return f"Return-Path: <{addr}>"
    return None


_MSGID_LINE = re.compile(r"^[ \t>]*(?:Message-ID|X-Microsoft-Original-Message-ID)[ \t]*:[ \t]*(<[^>\s]+>)",
                         re.IGNORECASE | re.MULTILINE)


def original_message_id(msg: email.message.Message) -> str | None:
    """The Message-ID of the mail that bounced: from the returned message/rfc822 or text/rfc822-headers
    part (Message-ID, then X-Microsoft-Original-Message-ID), else from returned headers quoted in the text."""
    try:
        for part in msg.walk():
            ctype = part.get_content_type()
            headers: email.message.Message | None = None
            if ctype == "message/rfc822":
                payload = part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                    headers = payload[0]
                elif isinstance(payload, str):
                    headers = email.message_from_string(payload)
            elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
                payload = part.get_payload(decode=True)
                text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(part.get_payload())
                if not text.strip() and isinstance(part.get_payload(), list):
                    sub = part.get_payload()[0]
                    headers = sub if isinstance(sub, email.message.Message) else None
                else:
                    headers = email.message_from_string(text.lstrip())
            if headers is not None:
                for name in ("Message-ID", "X-Microsoft-Original-Message-ID"):
                    value = headers.get(name)
                    if value and "<" in str(value):
                        return "<" + str(value).split("<", 1)[1].split(">", 1)[0].strip() + ">"
        text = notice_text(msg)
        notice = cut_returned(text)
        m = _MSGID_LINE.search(text, len(notice))
        if m:
            return m.group(1)
    except Exception:  # noqa: BLE001
        return None
    return None


def _result(recipient: str, *, status: str | None, diagnostic: str | None, delayed: bool, detector: str,
            original_id: str | None, remote_mta: str | None = None, context: str | None = None) -> BounceResult:
    """One BounceResult; `context` (the notice's prose about this one recipient) explains the failure when
    neither the diagnostic nor a specific status names a reason.

    A detector's diagnostic is the line it cut next to the address ("(Originally addressed to u@x)",
    "Unable to deliver message to <u@x>"); the reason is often a line away in the same notice
    ("550 5.1.1 unknown user", "mailbox is full"). Reading only the slice gave soft/undefined."""
    reason, kind = classify_status(status, diagnostic, delayed=delayed)
    if reason == "undefined" and context and context != diagnostic:
        reason, kind = classify_status(status, context, delayed=delayed)
    return BounceResult(
        recipient=recipient, kind=kind, reason=reason, status=status, diagnostic=diagnostic,
        original_message_id=original_id, action="delayed" if delayed else "failed", remote_mta=remote_mta,
        detector=detector,
    )


def _from_dsn(rows: list[DsnRecipient], original_id: str | None, context: str) -> list[BounceResult]:
    out = []
    seen: set[str] = set()
    failing = {r.recipient.lower() for r in rows if r.is_failure}
    # The notice's prose may explain a recipient without a Diagnostic-Code only when it is about one recipient.
    context = context if len(failing) == 1 else ""
    for row in rows:
        # Some MTAs repeat a recipient once per expanded alias or per attempt: report it once.
        if not row.is_failure or row.recipient.lower() in seen:
            continue
        seen.add(row.recipient.lower())
        status = row.status or status_in(row.diagnostic)
        out.append(_result(row.recipient, status=status, diagnostic=row.diagnostic,
                           delayed=row.action == "delayed", detector="dsn", original_id=original_id,
                           remote_mta=row.remote_mta, context=context))
    return out


def _from_detectors(msg: email.message.Message, original_id: str | None,
                    detectors: tuple[Detector, ...]) -> tuple[str, list[BounceResult]]:
    text = cut_returned(notice_text(msg))
    warning = is_warning(text, decoded_header(msg, "Subject"))
    for detector in detectors:
        try:
            hits: tuple[Hit, ...] = detector.detect(msg)
        except Exception:  # noqa: BLE001 - one broken detector must not hide the others
            continue
        if hits:
            hits = _with_failed_recipients_header(msg, hits)
            results = [_result(h.recipient, status=h.status or status_in(h.diagnostic), diagnostic=h.diagnostic,
                               delayed=h.delayed or warning, detector=detector.name, original_id=original_id,
                               context=text[:2000] if len(hits) == 1 else None) for h in hits]
            return detector.name, results
    return "", []


def _with_failed_recipients_header(msg: email.message.Message, hits: tuple[Hit, ...]) -> tuple[Hit, ...]:
    """Add addresses that the MTA listed in X-Failed-Recipients but the prose did not (machine-written,
    so trusted as to *who*; the reason stays undefined)."""
    extra = [h for h in XFailedRecipientsDetector().detect(msg)
             if h.recipient.lower() not in {x.recipient.lower() for x in hits}]
    return hits + tuple(extra)


def _apply_verp(results: list[BounceResult], verp: VerpHit) -> list[BounceResult]:
    """The VERP recipient is authoritative; the content only tells us how and why it failed."""
    mine = [r for r in results if r.recipient.lower() == verp.recipient.lower()]
    chosen = mine[0] if mine else results[0]
    return [replace(chosen, recipient=verp.recipient,
                    original_message_id=verp.original_message_id or chosen.original_message_id)]


def classify_bounce(msg: email.message.Message, *, verp: VerpHit | None = None,
                    to_bounce_address: bool = False,
                    detectors: tuple[Detector, ...] = DETECTORS) -> BounceReport | None:
    """Per-recipient bounce results for `msg`, or None when it is not a bounce.

    `verp`: the gateway resolved a VERP token in the envelope recipient; that recipient is authoritative.
    `to_bounce_address`: the mail reached a domain's bounce address (no token).
    A message that reached a VERP/bounce address but shows no readable failure gives one *soft*
    "undefined" result when it looks like an NDR (never hard on a guess), and None when it does not
    (auto-replies and ordinary mail: the router decides). ARF feedback reports are never bounces.
    """
    try:
        return _classify(msg, verp=verp, to_bounce_address=to_bounce_address, detectors=detectors)
    except Exception:  # noqa: BLE001 - classification must never take the worker down
        if verp is not None and ndr_indicator(msg):
            return BounceReport((BounceResult(recipient=verp.recipient, kind="soft", reason="undefined",
                                              original_message_id=verp.original_message_id, detector="verp"),),
                                via="verp", explanation=("unreadable NDR at a VERP address",))
        return None


def _classify(msg: email.message.Message, *, verp: VerpHit | None, to_bounce_address: bool,
              detectors: tuple[Detector, ...]) -> BounceReport | None:
    if (msg.get_param("report-type") or "").lower() == "feedback-report":
        return None  # ARF: a complaint, handled by routing/arf.py
    indicator = ndr_indicator(msg)
    rows = parse_dsn(msg)
    if not (indicator or rows or verp is not None or to_bounce_address):
        return None  # ordinary mail: the cheap checks above are all a non-bounce pays for
    original_id = original_message_id(msg)
    explanation: list[str] = []
    subject_only = False
    if indicator:
        explanation.append(f"looks like an NDR ({indicator})")
        if indicator.startswith("Subject:") and not rows and verp is None and not to_bounce_address:
            confirmed = null_return_path(msg)
            if confirmed:
                explanation.append(f"{confirmed}: no person sent it")
            subject_only = confirmed is None

    via = ""
    results: list[BounceResult] = []
    if rows:
        results = _from_dsn(rows, original_id, cut_returned(notice_text(msg))[:2000])
        if results:
            via = "dsn"
            explanation.append(f"RFC 3464 report: {len(results)} failed or delayed recipient(s)")
        elif not indicator and verp is None:
            return None
        elif all(r.action in ("delivered", "relayed", "expanded") for r in rows):
            return None  # a success report (NOTIFY=SUCCESS): nothing failed, VERP or not
    if not results and indicator:  # prose is read only in mail that looks like an NDR, VERP or not
        via, results = _from_detectors(msg, original_id, detectors)
        if results:
            explanation.append(f"detector {via!r} recognised {len(results)} recipient(s)")

    if verp is not None:
        if results:
            results = _apply_verp(results, verp)
            explanation.append(f"VERP names {verp.recipient}")
            return BounceReport(tuple(results), via="verp", explanation=tuple(explanation))
        if indicator:
            result = BounceResult(recipient=verp.recipient, kind="soft", reason="undefined",
                                  original_message_id=verp.original_message_id or original_id, detector="verp")
            explanation.append(f"VERP names {verp.recipient}; no readable failure, so soft/undefined")
            return BounceReport((result,), via="verp", explanation=tuple(explanation))
        return None
    if results:
        return BounceReport(tuple(results), via=via, explanation=tuple(explanation), subject_only=subject_only)
    if indicator:
        explanation.append("no failed recipient could be read")
        return BounceReport((), via="bounce-address" if to_bounce_address else "ndr-unattributed",
                            explanation=tuple(explanation), subject_only=subject_only)
    return None
