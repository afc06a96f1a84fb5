"""The routing decision: one parsed mail + envelope + lookups → one `Decision` with its reasons. Pure.

This is the file that answers "why did this mail create a lead instead of joining the thread". It follows
DESIGN.md's precedence, first match wins:

1. duplicate   2. loop (our header, Odoo's loop tag)   — then mail beyond the parse limits is quarantined —
3. bounce (VERP, bounce address, DSN, detectors; delayed-only → deferred; NDR prose whose only other
   sign is the Subject → quarantine, unless a person forwards it or answers a known thread)   4. ARF complaint
5. auto-reply (on the thread it answers)   6. reply (References + In-Reply-To; Odoo's forward rule)
7. alias create (one target per alias; catchall + Cc alias routes to the alias, which Odoo refuses)
8. domain default alias   9. quarantine with a reason.

Every step that looked at something says so in `explanation`, matched or not, so `mailgate explain` shows
the whole path. Detectors (bounce, ARF, auto-reply) are passed in through `Detectors` so tests can pin them.
A detector that *raises* quarantines the mail with reason "<name> detector error": guessing on would turn a
bounce hit by a detector bug into a new record; in quarantine it is visible and released after the fix.
A detector missing from this build (NotImplementedError) is skipped and said so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aliases.model import Alias, AliasTable
from aliases.resolve import TO_LIKE, Resolved, resolve_recipients
from routing import arf as _arf
from routing import autoreply as _autoreply
from routing import bounce as _bounce
from routing.bounce import BounceReport, VerpHit
from routing.model import (
    LOOP_HEADER, Action, Complaint, Decision, DuplicateLookup, RoutingEnvelope, Target, ThreadHit, ThreadLookup,
)
from routing.parse import ParsedMail
from routing.threads import has_odoo_loop_mark, reference_chain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detectors:
    """The classifiers the router consults, by default the real ones in routing/bounce, arf, autoreply.

    Looked up at call time (not bound at import), so a reloaded or patched module is honoured.
    """

    bounce: Callable[..., BounceReport | None] | None = None
    arf: Callable[..., Complaint | None] | None = None
    auto_reply: Callable[..., str | None] | None = None

    def classify_bounce(self, msg: Any, **kw: Any) -> BounceReport | None:
        return (self.bounce or _bounce.classify_bounce)(msg, **kw)

    def parse_arf(self, msg: Any) -> Complaint | None:
        return (self.arf or _arf.parse_arf)(msg)

    def detect_auto_reply(self, msg: Any) -> str | None:
        return (self.auto_reply or _autoreply.detect_auto_reply)(msg)


DEFAULT_DETECTORS = Detectors()
#: recipients listed one per line in the explanation; the rest are counted (a 500-address Cc stays readable)
_MAX_LISTED = 20


class _Why:
    """Explanation lines, in the order the router looked at things."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


class _DetectorFailed(Exception):
    def __init__(self, name: str):
        self.name = name


def _safe(why: _Why, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except NotImplementedError:
        why(f"{name} detector not available in this build; skipped")
        return None
    except Exception as exc:  # noqa: BLE001 - see module docstring
        log.warning("%s detector raised on a message: %s: %s", name, exc.__class__.__name__, exc)
        why(f"{name} detector failed ({exc.__class__.__name__}: {exc}); quarantined rather than guessed")
        raise _DetectorFailed(name) from exc


def _alias_target(alias: Alias) -> Target:
    return Target(model=alias.model, res_id=alias.force_thread_id, alias=alias.address, contact=alias.contact,
                  defaults=alias.defaults, create_partner=alias.create_partner,
                  parent_model=alias.parent_model, parent_res_id=alias.parent_thread_id)


def _distinct_aliases(resolved: list[Resolved]) -> list[Resolved]:
    """One entry per alias (Odoo: one route per matched alias), first mention wins."""
    seen: set[str] = set()
    out: list[Resolved] = []
    for r in resolved:
        if r.kind == "alias" and r.alias is not None and r.alias.address not in seen:
            seen.add(r.alias.address)
            out.append(r)
    return out


def _thread_target(hit: ThreadHit, dest: Resolved | None) -> Target:
    assert hit.model is not None and hit.res_id is not None
    alias = dest.alias if dest else None
    return Target(model=hit.model, res_id=hit.res_id, alias=alias.address if alias else None,
                  contact=alias.contact if alias else "everyone", parent_message_id=hit.message_id)


_FORWARD_SUBJECT = re.compile(r"^\s*(?:fwd?|tr|wg|rv|enc)\s*:", re.IGNORECASE)


def _sent_by_a_person(parsed: ParsedMail, thread_hit: Callable[[], ThreadHit | None]) -> str | None:
    """Why a mail whose only NDR sign is its Subject was written by a person, or None: it forwards something
    (a customer passing a bounce notice on to support), or it answers a thread we know (a conversation,
    which NDRs do not join). Such mail is routed as mail even when its text quotes an NDR."""
    if _FORWARD_SUBJECT.match(parsed.subject):
        return "its Subject marks a forward"
    found = thread_hit()
    if found is not None:
        return f"it answers a known thread: {_describe_hit(found)}"
    return None


def _describe_hit(hit: ThreadHit) -> str:
    where = f"{hit.model} {hit.res_id}" if hit.model and hit.res_id else "a message without a record"
    src = "thread index, outbound mail we relayed" if hit.outbound else "thread index"
    return f"{hit.message_id} matches {where} ({src})"


#: DMARC results (RoutingEnvelope.dmarc) under which the From is taken as forged: the domain owner asked
#: receivers to reject or quarantine unauthenticated mail. fail:none is only monitoring; temperror fails open.
_FORGED = frozenset({"fail:reject", "fail:quarantine"})


def _from_domain(parsed: ParsedMail) -> str | None:
    addr = parsed.from_addr or ""
    return addr.rsplit("@", 1)[1] if "@" in addr else None


def _forged_for_restricted_alias(why: _Why, parsed: ParsedMail, envelope: RoutingEnvelope,
                                 targets: tuple[Target, ...]) -> bool:
    """True when new mail would reach an alias with a contact policy but its From fails DMARC (spec §5.9).

    Odoo checks `partners`/`followers`/`employees` against the From address alone; a From that its own
    domain disowns must not pass. The whole mail is quarantined (not just the restricted targets), so nothing
    is half-delivered and the operator sees it. Replies are not gated here: they join a known thread.
    """
    if envelope.dmarc not in _FORGED:
        return False
    restricted = [t for t in targets if t.contact != "everyone"]
    if not restricted:
        why(f"DMARC {envelope.dmarc}, but every alias accepts everyone: the contact policy does not gate it")
        return False
    published = envelope.dmarc.split(":", 1)[1]
    domain = _from_domain(parsed) or "(none)"
    if envelope.released:
        why(f"From domain {domain} fails DMARC (p={published}), but an operator released this mail from "
            f"quarantine: the contact policy {', '.join(sorted({t.contact for t in restricted}))} is left to Odoo")
        return False
    for t in restricted:
        why(f"From domain {domain} fails DMARC and publishes p={published}; alias {t.alias} accepts only "
            f"{t.contact}: a forged From cannot pass `{t.contact}`")
    why("quarantined (reason dmarc): the sender is not who the From says")
    return True


def route(parsed: ParsedMail, envelope: RoutingEnvelope, *, aliases: AliasTable, threads: ThreadLookup,
          duplicates: DuplicateLookup, verp: Callable[[str], VerpHit | None] | None = None, sha256: str,
          detectors: Detectors = DEFAULT_DETECTORS) -> Decision:
    """Decide what to do with one message (DESIGN.md "Routing precedence"; first match wins).

    `threads.find` receives the reference chain oldest → newest (In-Reply-To last), as `StaticThreads`
    expects; `verp(address)` resolves a `bounce+TOKEN@` recipient to the outbound row it names.
    """
    why = _Why()
    try:
        return _route(why, parsed, envelope, aliases=aliases, threads=threads, duplicates=duplicates, verp=verp,
                      sha256=sha256, detectors=detectors)
    except _DetectorFailed as exc:
        return Decision(action=Action.QUARANTINE, explanation=tuple(why.lines), reason=f"{exc.name} detector error",
                        message_id=parsed.message_id,
                        recipients=tuple(envelope.rcpt_tos) or tuple(parsed.delivered_to or parsed.to))


def _route(why: _Why, parsed: ParsedMail, envelope: RoutingEnvelope, *, aliases: AliasTable,
           threads: ThreadLookup, duplicates: DuplicateLookup, verp: Callable[[str], VerpHit | None] | None,
           sha256: str, detectors: Detectors) -> Decision:
    msg = parsed.msg
    base: dict[str, Any] = {"message_id": parsed.message_id}
    resolved = list(resolve_recipients(
        aliases, rcpt=envelope.rcpt_tos, delivered_to=parsed.delivered_to, x_original_to=parsed.x_original_to,
        to=parsed.to, cc=parsed.cc, resent_to=parsed.resent_to, resent_cc=parsed.resent_cc))
    ours = [r for r in resolved if r.kind != "foreign"]
    base["recipients"] = tuple(envelope.rcpt_tos) or tuple(r.address for r in ours)

    def decide(action: Action, **kw: Any) -> Decision:
        fields = {**base, **kw}
        return Decision(action=action, explanation=tuple(why.lines), **fields)

    # 1. duplicate ---------------------------------------------------------------------------------------
    if duplicates.seen(parsed.message_id, sha256):
        why(f"Message-ID {parsed.message_id or '(none)'} with body hash {sha256[:12]}… was already handled")
        return decide(Action.DUPLICATE, reason="duplicate")

    # 2. loop --------------------------------------------------------------------------------------------
    if parsed.has_header(LOOP_HEADER):
        why(f"carries {LOOP_HEADER}: mail the gateway generated came back; dropped to break the loop")
        return decide(Action.LOOP, reason="own mail")
    if has_odoo_loop_mark(parsed.references, parsed.in_reply_to):
        why("References/In-Reply-To carry Odoo's -loop-detection-bounce-email@ tag (a reply to a rate-limit "
            "refusal); dropped as Odoo does")
        return decide(Action.LOOP, reason="odoo loop tag")

    if parsed.limit_exceeded:
        why(f"message exceeds the parse limits ({parsed.limit_exceeded}); not routed automatically")
        return decide(Action.QUARANTINE, reason=f"limits: {parsed.limit_exceeded}")

    if envelope.dmarc is not None:
        for line in envelope.auth_notes:
            why(line)
        why(f"DMARC for From domain {_from_domain(parsed) or '(none)'}: {envelope.dmarc}")

    for r in resolved[:_MAX_LISTED]:
        why(r.describe())
    if len(resolved) > _MAX_LISTED:
        why(f"… and {len(resolved) - _MAX_LISTED} more recipient(s)")
    if not resolved:
        why("no recipient in the envelope or in Delivered-To/To/Cc/Resent-*")

    chain = reference_chain(parsed.references, parsed.in_reply_to)
    hit: ThreadHit | None = None
    looked_up = False

    def thread_hit() -> ThreadHit | None:
        nonlocal hit, looked_up
        if not looked_up:
            looked_up = True
            hit = threads.find(list(chain)) if chain else None
        return hit

    # 3. bounce ------------------------------------------------------------------------------------------
    to_like = [r for r in resolved if r.source in TO_LIKE]
    verp_hit: VerpHit | None = None
    for r in to_like:
        if r.kind == "verp" and verp is not None:
            verp_hit = verp(r.address)
            if verp_hit is not None:
                why(f"VERP address {r.address} names outbound recipient {verp_hit.recipient}")
                break
            why(f"VERP-shaped address {r.address} has no valid token (forged or expired)")
    to_bounce = any(r.kind in ("bounce", "verp") for r in to_like)
    try:
        report_type = (msg.get_param("report-type") or "")
    except Exception:  # noqa: BLE001
        report_type = ""
    report_type = str(report_type).lower()
    is_feedback = parsed.content_type == "multipart/report" and report_type == "feedback-report"

    report: BounceReport | None = None
    if not is_feedback:
        report = _safe(why, "bounce", detectors.classify_bounce, msg, verp=verp_hit, to_bounce_address=to_bounce)
    if report is not None and report.subject_only and not to_bounce:
        # "My parcel was not delivered" is a customer, not an NDR: a subject needs a machine-written sign
        if envelope.null_sender:
            why("MAIL FROM:<> (null sender): no person sent it")
        else:
            looks = report.explanation[0] if report.explanation else "the subject looks like an NDR"
            person = _sent_by_a_person(parsed, thread_hit)
            if report.results and person is None:
                # the prose has an NDR's shape too: neither a bounce (no machine sign) nor a new record
                named = ", ".join(b.recipient for b in report.results[:5])
                why(f"{looks}, and detector {report.via!r} reads a failed recipient in its text ({named}), but "
                    "nothing machine-written backs it (null sender, NDR sender, DSN, X-Failed-Recipients, bounce "
                    "address): quarantined as a probable bounce rather than made a record")
                return decide(Action.QUARANTINE, reason=f"probable bounce: {report.via} read a failed "
                              "recipient, only the Subject says NDR")
            why(f"{looks}, but nothing machine-written backs it (null sender, NDR sender, DSN, "
                "X-Failed-Recipients, bounce address): a person can write that subject; not a bounce"
                + (f" ({person})" if person else ""))
            report = None
    if report is not None:
        for line in report.explanation:
            why(line)
        for b in report.results:
            why(f"{b.action} recipient {b.recipient}: {b.kind} ({b.reason}, status {b.status or '?'}) "
                f"via {report.via}")
        if report.deferred_only:
            why("every recipient is only delayed: a deferral event, not a bounce")
            return decide(Action.DEFERRED, bounces=report.results, reason="delayed")
        if not report.results:
            why(f"recognised as a bounce via {report.via}, but no failed recipient could be extracted; "
                "quarantined so an operator can see whose address failed")
            return decide(Action.QUARANTINE, reason="bounce with no identifiable recipient")
        return decide(Action.BOUNCE, bounces=report.results, reason=f"bounce via {report.via}")

    # 4. ARF complaint ---------------------------------------------------------------------------------
    complaint: Complaint | None = _safe(why, "ARF", detectors.parse_arf, msg)
    if complaint is not None:
        why(f"ARF feedback report ({complaint.feedback_type}) about "
            f"{complaint.original_recipient or 'an unknown recipient'}")
        return decide(Action.COMPLAINT, complaint=complaint, reason=f"complaint {complaint.feedback_type}",
                      replied_message_id=complaint.original_message_id)

    # 5. auto-reply -------------------------------------------------------------------------------------
    indicator: str | None = _safe(why, "auto-reply", detectors.detect_auto_reply, msg)
    if indicator:
        why(f"auto-reply ({indicator}): never creates a record, never counts as a human reply")
        found = thread_hit()
        targets: tuple[Target, ...] = ()
        if found is not None and found.model and found.res_id:
            why(f"it answers: {_describe_hit(found)}")
            targets = (_thread_target(found, None),)
        elif chain:
            why(f"its references ({len(chain)}) match no known thread")
        else:
            why("it carries no References/In-Reply-To")
        return decide(Action.AUTO_REPLY, targets=targets, auto_reply_indicator=indicator, reason="auto-reply",
                      replied_message_id=found.message_id if found is not None and found.outbound else None)

    if to_bounce:
        # Mail to the bounce address that is neither a recognisable bounce nor an auto-reply: Odoo drops it
        # silently (test process_bounce_alias); we keep it in quarantine, nothing counted, nothing lost.
        why("sent to the bounce address but not recognised as a bounce, complaint or auto-reply; quarantined, "
            "nothing counted")
        return decide(Action.QUARANTINE, reason="bounce address, unrecognised: no identifiable recipient")

    # 6. reply -------------------------------------------------------------------------------------------
    forward_only: list[Resolved] = []
    if chain:
        found = thread_hit()
        if found is None:
            why(f"References/In-Reply-To ({', '.join(chain[-3:])}{' …' if len(chain) > 3 else ''}) "
                "match no known thread")
        elif not (found.model and found.res_id):
            why(f"{_describe_hit(found)}: not a reply to a record; routed as new mail (Odoo route_reply_model_none)")
        else:
            why(_describe_hit(found))
            other = [r for r in _distinct_aliases(resolved)
                     if r.source in TO_LIKE and r.alias is not None and r.alias.model != found.model]
            if other:
                why(f"forward: {', '.join(r.address for r in other)} in To/Delivered-To is an alias of another "
                    f"model, so this is new mail for that alias, not a reply (Odoo forward_bypass_*)")
                forward_only = other
            else:
                dest = next((r for r in _distinct_aliases(resolved)
                             if r.alias is not None and r.alias.model == found.model), None)
                if dest is not None and dest.alias is not None:
                    why(f"same-model alias {dest.alias.address} among recipients: contact policy "
                        f"{dest.alias.contact} applies")
                return decide(Action.REPLY, targets=(_thread_target(found, dest),),
                              tag=dest.tag if dest else None, reason="reply",
                              replied_message_id=found.message_id if found.outbound else None)

    # 7. alias create ----------------------------------------------------------------------------------
    alias_hits = forward_only or _distinct_aliases(resolved)
    if alias_hits:
        if any(r.kind == "catchall" for r in resolved):
            why("the catchall is a recipient too; the aliases win (Odoo refuses 'To: catchall, Cc: alias')")
        targets = tuple(_alias_target(r.alias) for r in alias_hits if r.alias is not None)
        for t in targets:
            why(f"alias {t.alias} → " + (f"update forced thread {t.model} {t.res_id}" if t.res_id
                                          else f"create a {t.model} record") + f" (contact: {t.contact})")
        tag = next((r.tag for r in alias_hits if r.tag), None)
        if _forged_for_restricted_alias(why, parsed, envelope, targets):
            return decide(Action.QUARANTINE, reason="dmarc")
        return decide(Action.CREATE, targets=targets, tag=tag, reason="alias")

    # 8. domain default alias --------------------------------------------------------------------------
    for r in resolved:
        if r.kind in ("unknown", "catchall") and r.domain is not None and r.domain.default_alias:
            alias = aliases.alias(r.domain.default_alias)
            if alias is None:
                why(f"default alias {r.domain.default_alias} of {r.domain.name} is not a configured alias")
                continue
            target = _alias_target(alias)
            why(f"no alias matched; {r.address} falls to the default alias {alias.address} of {r.domain.name} "
                f"→ {'update ' + alias.model + ' ' + str(alias.force_thread_id) if alias.force_thread_id else 'create a ' + alias.model + ' record'}")
            if _forged_for_restricted_alias(why, parsed, envelope, (target,)):
                return decide(Action.QUARANTINE, reason="dmarc")
            return decide(Action.CREATE, targets=(target,), tag=r.tag, reason="default alias")

    # 9. quarantine -----------------------------------------------------------------------------------
    if not ours:
        reason = "no recipient in our domains"
    elif all(r.kind == "catchall" for r in ours) and chain and thread_hit() is None:
        # The catchall is the Reply-To of Odoo's mail: this is a reply, and what is missing is its thread
        # (a parent Odoo never held or has deleted, mail sent around the gateway), not an alias.
        reason = "unknown thread (a reply whose parent Odoo does not hold)"
        why(f"no route: {reason}; quarantined (check that the thread's Message-IDs exist in Odoo, then "
            "release it, or forward it to the right alias)")
        return decide(Action.QUARANTINE, reason=reason)
    elif all(r.kind == "catchall" for r in ours):
        reason = "catchall only"
    else:
        reason = "no alias matched"
    why(f"no route: {reason}; quarantined (release it after adding an alias)")
    return decide(Action.QUARANTINE, reason=reason)
