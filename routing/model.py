"""Records that cross the routing boundary: the envelope in, lookups passed in, one `Decision` out.

Everything here is frozen: a decision is computed once, stored as JSON next to the spooled message, and
executed by delivery. `Decision.to_json()` is also the `mailgate explain --json` contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol


class Action(StrEnum):
    """What to do with one inbound message (first match of DESIGN.md's precedence wins)."""

    DUPLICATE = "duplicate"    # already handled: no-op, recorded
    LOOP = "loop"              # our own mail or a loop header: drop, recorded
    BOUNCE = "bounce"          # at least one recipient failed (hard or soft)
    DEFERRED = "deferred"      # DSN that only reports delays: an event, never a bounce
    COMPLAINT = "complaint"    # ARF feedback report
    AUTO_REPLY = "auto_reply"  # out-of-office and other RFC 3834 auto-submitted mail
    REPLY = "reply"            # joins an existing thread
    CREATE = "create"          # new record(s) through alias(es)
    QUARANTINE = "quarantine"  # nothing matched: kept with a reason, can be released


BounceKind = Literal["hard", "soft"]

#: Sisimai's vocabulary, fixed: every bounce result carries exactly one of these.
BOUNCE_REASONS: frozenset[str] = frozenset({
    "userunknown", "hostunknown", "mailboxfull", "exceedlimit", "mesgtoolarge", "filtered", "spamdetected",
    "blocked", "rejected", "policyviolation", "securityerror", "expired", "systemerror", "networkerror",
    "mailererror", "toomanyconn", "suspend", "hasmoved", "notaccept", "norelaying", "syntaxerror",
    "contenterror", "virusdetected", "undefined",
})


@dataclass(frozen=True)
class BounceResult:
    """One failed (or delayed) recipient of a mail we, or Odoo, sent."""

    recipient: str
    kind: BounceKind
    reason: str = "undefined"
    status: str | None = None             # enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None         # Diagnostic-Code or the NDR's sentence
    original_message_id: str | None = None
    action: Literal["failed", "delayed"] = "failed"
    remote_mta: str | None = None
    detector: str = ""                    # which detector recognised it (for explain)

    def __post_init__(self) -> None:
        if self.reason not in BOUNCE_REASONS:
            raise ValueError(f"bounce reason {self.reason!r} is not in the fixed vocabulary")

    def to_json(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient, "kind": self.kind, "reason": self.reason, "status": self.status,
            "diagnostic": self.diagnostic, "original_message_id": self.original_message_id,
            "action": self.action, "remote_mta": self.remote_mta, "detector": self.detector,
        }


@dataclass(frozen=True)
class Complaint:
    """An ARF (RFC 5965) feedback report: a recipient marked our mail as spam (or similar)."""

    feedback_type: str
    original_recipient: str | None = None
    original_message_id: str | None = None
    user_agent: str | None = None
    source_ip: str | None = None
    reported_domain: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "feedback_type": self.feedback_type, "original_recipient": self.original_recipient,
            "original_message_id": self.original_message_id, "user_agent": self.user_agent,
            "source_ip": self.source_ip, "reported_domain": self.reported_domain,
        }


@dataclass(frozen=True)
class Target:
    """Where a message goes in Odoo: a record to post on (res_id) or a model to create in (alias)."""

    model: str
    res_id: int | None = None
    alias: str | None = None
    contact: str = "everyone"
    defaults: tuple[tuple[str, Any], ...] = ()
    create_partner: bool = False
    parent_message_id: str | None = None  # the referenced Message-ID that matched (replies)
    # the alias's parent record (Odoo's alias_parent_model_id / alias_parent_thread_id): whose followers the
    # `followers` policy checks, and whose followers come first in the author lookup, when creating
    parent_model: str | None = None
    parent_res_id: int | None = None

    def follow_record(self) -> tuple[str, int] | None:
        """The record the `followers` policy and the author lookup look at: this target's record when it
        updates one, else the alias's parent record; None when there is neither (spec §1.8)."""
        if self.res_id:
            return self.model, self.res_id
        if self.parent_model and self.parent_res_id:
            return self.parent_model, self.parent_res_id
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.res_id is not None:
            out["res_id"] = self.res_id
        if self.alias is not None:
            out["alias"] = self.alias
        if self.contact != "everyone":
            out["contact"] = self.contact
        if self.defaults:
            out["defaults"] = dict(self.defaults)
        if self.create_partner:
            out["create_partner"] = True
        if self.parent_message_id:
            out["parent_message_id"] = self.parent_message_id
        if self.parent_model and self.parent_res_id:
            out["parent_model"], out["parent_res_id"] = self.parent_model, self.parent_res_id
        return out


@dataclass(frozen=True)
class Decision:
    """The router's verdict on one message, with the reasons a sysadmin can read."""

    action: Action
    explanation: tuple[str, ...]
    targets: tuple[Target, ...] = ()
    bounces: tuple[BounceResult, ...] = ()
    complaint: Complaint | None = None
    tag: str | None = None                 # +tag of the alias address (subaddressing)
    reason: str | None = None              # short machine reason (quarantine, loop, duplicate…)
    recipients: tuple[str, ...] = ()       # envelope recipients this decision is about
    auto_reply_indicator: str | None = None
    replied_message_id: str | None = None  # the outbound Message-ID a reply/auto-reply answers
    message_id: str | None = None          # normalised Message-ID of the routed message

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action.value,
            "explanation": list(self.explanation),
            "targets": [t.to_json() for t in self.targets],
            "bounces": [b.to_json() for b in self.bounces],
        }
        if self.complaint is not None:
            out["complaint"] = self.complaint.to_json()
        if self.tag is not None:
            out["tag"] = self.tag
        if self.reason is not None:
            out["reason"] = self.reason
        if self.recipients:
            out["recipients"] = list(self.recipients)
        if self.auto_reply_indicator:
            out["auto_reply_indicator"] = self.auto_reply_indicator
        if self.replied_message_id:
            out["replied_message_id"] = self.replied_message_id
        if self.message_id:
            out["message_id"] = self.message_id
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Decision":
        """Inverse of `to_json` (decisions are stored as JSON next to the message)."""
        return cls(
            action=Action(data["action"]),
            explanation=tuple(data.get("explanation", ())),
            targets=tuple(
                Target(model=t["model"], res_id=t.get("res_id"), alias=t.get("alias"),
                       contact=t.get("contact", "everyone"),
                       defaults=tuple((t.get("defaults") or {}).items()),
                       create_partner=bool(t.get("create_partner", False)),
                       parent_message_id=t.get("parent_message_id"),
                       parent_model=t.get("parent_model"), parent_res_id=t.get("parent_res_id"))
                for t in data.get("targets", ())
            ),
            bounces=tuple(
                BounceResult(**{k: v for k, v in b.items() if k in BounceResult.__dataclass_fields__})
                for b in data.get("bounces", ())
            ),
            complaint=Complaint(**data["complaint"]) if data.get("complaint") else None,
            tag=data.get("tag"),
            reason=data.get("reason"),
            recipients=tuple(data.get("recipients", ())),
            auto_reply_indicator=data.get("auto_reply_indicator"),
            replied_message_id=data.get("replied_message_id"),
            message_id=data.get("message_id"),
        )


@dataclass(frozen=True)
class RoutingEnvelope:
    """What the transport knew: envelope sender and the recipients that were accepted."""

    mail_from: str | None = None  # MAIL FROM, "" for the null sender <>; None: not known (explain, tests)
    rcpt_tos: tuple[str, ...] = ()
    source: str = "smtp"          # smtp | lmtp | imap:<name> | explain
    client_addr: str | None = None
    # Sender authentication (gateway.sender_auth), when [auth] is enabled: "pass", "fail:<published policy>"
    # (fail:reject, fail:quarantine, fail:none), "none", "temperror", "permerror"; None = not checked.
    dmarc: str | None = None
    auth_notes: tuple[str, ...] = ()  # how that result was reached, echoed into the explanation
    released: bool = False  # an operator released it from quarantine: the DMARC gate no longer holds it

    @property
    def null_sender(self) -> bool:
        """MAIL FROM was <> (bounces, auto-replies). Only an SMTP/LMTP envelope says so: a pulled mail's
        "" may just lack a Return-Path (the message's own `Return-Path: <>` is checked where it matters)."""
        return is_null_sender(self.mail_from, self.source)


def is_null_sender(mail_from: str | None, source: str) -> bool:
    """True when a transport envelope (smtp, lmtp) carried MAIL FROM:<>."""
    return mail_from is not None and mail_from.strip() in ("", "<>") and source in ("smtp", "lmtp")


@dataclass(frozen=True)
class ThreadHit:
    """A Message-ID we know: where it lives in Odoo, and whether we relayed it (tracked outbound)."""

    message_id: str
    model: str | None
    res_id: int | None
    outbound: bool = False           # we relayed it (so a reply is a `replied` event)
    is_internal: bool = False        # parent is an internal note (reply becomes a note)


class ThreadLookup(Protocol):
    """Finds the newest known message among reference ids (thread index, then Odoo on a miss)."""

    def find(self, message_ids: list[str]) -> ThreadHit | None: ...


class DuplicateLookup(Protocol):
    """True when a message with this Message-ID and body hash was already handled."""

    def seen(self, message_id: str | None, sha256: str) -> bool: ...


@dataclass(frozen=True)
class NoThreads:
    """A ThreadLookup that knows nothing (explain without a store, tests)."""

    def find(self, message_ids: list[str]) -> ThreadHit | None:
        return None


@dataclass(frozen=True)
class NoDuplicates:
    def seen(self, message_id: str | None, sha256: str) -> bool:
        return False


@dataclass(frozen=True)
class StaticThreads:
    """A ThreadLookup over a fixed mapping (tests, explain with --thread)."""

    hits: dict[str, ThreadHit] = field(default_factory=dict)

    def find(self, message_ids: list[str]) -> ThreadHit | None:
        for mid in reversed(message_ids):  # newest reference last in References
            if mid in self.hits:
                return self.hits[mid]
        return None


#: Header the gateway puts on every mail it generates itself (refusals, normalised DSNs): mail carrying it
#: that comes back in is a loop, dropped and recorded.
LOOP_HEADER = "X-Mailgate-Loop"
