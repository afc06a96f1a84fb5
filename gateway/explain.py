"""`mailgate explain`: route a mail file with the current config and say why, touching nothing.

No store, no Odoo: thread lookups know nothing (unless the operator names threads with `--thread`), nothing
is a duplicate, VERP tokens are not resolved to outbound rows. The decision is what the worker would decide
for a *new* message with the same recipients — the question a sysadmin asks after adding an alias.

`route_raw` is the one call from raw bytes to a Decision; the worker's route step can use it too, so
explain and production cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aliases.model import AliasTable
from routing.bounce import VerpHit
from routing.model import Decision, DuplicateLookup, NoDuplicates, NoThreads, RoutingEnvelope, ThreadLookup
from routing.parse import ParsedMail, parse_mail
from routing.router import DEFAULT_DETECTORS, Detectors, route


def parse_limits(config: Any) -> dict[str, int]:
    """Parse limits from `config.routing` (defaults when the config has no routing section)."""
    rc = getattr(config, "routing", None)
    return {
        "max_headers": getattr(rc, "max_headers", 1000),
        "max_mime_depth": getattr(rc, "max_mime_depth", 20),
        "max_parts": getattr(rc, "max_parts", 500),
    }


def header_recipients(parsed: ParsedMail) -> tuple[str, ...]:
    """Envelope recipients guessed from headers when none were given: Delivered-To, X-Original-To, To.

    The first header that has addresses wins (Delivered-To is what the last MTA actually delivered to).
    """
    for addresses in (parsed.delivered_to, parsed.x_original_to, parsed.to):
        if addresses:
            return addresses
    return ()


def route_raw(raw: bytes, envelope: RoutingEnvelope, *, table: AliasTable, config: Any = None,
              threads: ThreadLookup | None = None, duplicates: DuplicateLookup | None = None,
              verp: Callable[[str], VerpHit | None] | None = None, sha256: str | None = None,
              detectors: Detectors = DEFAULT_DETECTORS) -> tuple[ParsedMail, Decision]:
    """Parse (with the config's limits) and route one raw message."""
    parsed = parse_mail(raw, **parse_limits(config))
    decision = route(parsed, envelope, aliases=table, threads=threads or NoThreads(),
                     duplicates=duplicates or NoDuplicates(), verp=verp,
                     sha256=sha256 or hashlib.sha256(raw).hexdigest(), detectors=detectors)
    return parsed, decision


@dataclass(frozen=True)
class Explained:
    file: str
    parsed: ParsedMail
    decision: Decision
    envelope: RoutingEnvelope

    def to_json(self) -> dict[str, Any]:
        """The `explain --json` contract: file, action, explanation, targets, bounces, complaint?, tag?."""
        d = self.decision.to_json()
        out: dict[str, Any] = {"file": self.file, "action": d["action"], "explanation": d["explanation"],
                               "targets": d["targets"], "bounces": d["bounces"]}
        for key in ("complaint", "tag", "reason", "recipients", "message_id", "auto_reply_indicator",
                    "replied_message_id"):
            if key in d:
                out[key] = d[key]
        if self.parsed.defects:
            out["defects"] = list(self.parsed.defects)
        return out

    def to_text(self) -> str:
        d = self.decision
        lines = [f"{self.file}: {d.action.value}" + (f" ({d.reason})" if d.reason else "")]
        lines.append(f"  Message-ID: {d.message_id or '(none)'}   From: {self.parsed.from_addr or '(none)'}")
        lines.append(f"  envelope recipients: {', '.join(self.envelope.rcpt_tos) or '(none)'}")
        for t in d.targets:
            where = f"{t.model} {t.res_id}" if t.res_id else f"new {t.model}"
            lines.append(f"  → {where}" + (f" via {t.alias}" if t.alias else "")
                         + (f" (contact: {t.contact})" if t.contact != "everyone" else ""))
        for b in d.bounces:
            lines.append(f"  ✗ {b.recipient}: {b.kind} {b.reason} {b.status or ''} {b.diagnostic or ''}".rstrip())
        if d.complaint:
            lines.append(f"  complaint: {d.complaint.feedback_type} from {d.complaint.original_recipient}")
        if d.tag:
            lines.append(f"  tag: {d.tag}")
        lines.append("  why:")
        lines.extend(f"    - {line}" for line in d.explanation)
        if self.parsed.defects:
            lines.append(f"  defects: {', '.join(self.parsed.defects)}")
        return "\n".join(lines)


def explain_bytes(raw: bytes, *, table: AliasTable, config: Any = None, rcpt: tuple[str, ...] = (),
                  file: str = "-", threads: ThreadLookup | None = None,
                  detectors: Detectors = DEFAULT_DETECTORS) -> Explained:
    """Decide for one raw message; with no `rcpt`, recipients come from Delivered-To / X-Original-To / To."""
    parsed = parse_mail(raw, **parse_limits(config))
    envelope = RoutingEnvelope(rcpt_tos=tuple(rcpt) or header_recipients(parsed), source="explain",
                               mail_from=parsed.return_path or "")
    decision = route(parsed, envelope, aliases=table, threads=threads or NoThreads(),
                     duplicates=NoDuplicates(), verp=None, sha256=hashlib.sha256(raw).hexdigest(),
                     detectors=detectors)
    return Explained(file=file, parsed=parsed, decision=decision, envelope=envelope)
