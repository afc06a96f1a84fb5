"""Executing the router's decision against Odoo — exactly once.

`Delivery.deliver(message, raw, decision)` runs in a worker thread and either returns a `DeliveryOutcome`
(the worker records the state change and the events in one transaction) or raises
`gateway.errors.TransientError` (retry with backoff) / `PermanentError` (park as `dead`).

Exactly once, across crashes and retries:
* every Odoo id is recorded in `odoo_writes` (unique per message and step) the moment it exists, in its own
  committed transaction, so a retry resumes where the last attempt stopped (record created → only post);
* before any create or post, Odoo is asked for a `mail.message` with this Message-ID (which also covers a
  post whose answer was lost on the wire);
* a mail without a Message-ID gets a deterministic one (from its body hash), so the check above can work.

Modes (config `[odoo] mode`):
* `passthrough` (default) — the raw mail, once, to `mail.thread.message_process` (Delivered-To per accepted
  recipient, References fix-up, 7-bit): Odoo's own routing then runs, and every app hooked into it fires.
  Afterwards the gateway looks up where it landed and says so when Odoo disagreed with its own decision.
* `explicit` — `message_new` + `ir.attachment` + `message_post` (+ `message_subscribe`) as Odoo's gateway
  would, with the gateway's contact policy and refusal mail.
Both: hard bounces reach Odoo as a normalised DSN through `message_process`; soft bounces, delays and
complaints only produce events; auto-replies never create a record (dropped, or a note on their thread).
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import email.utils
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from aliases.model import AliasTable
from aliases.names import normalize_address
from aliases.resolve import resolve_address
from gateway.config import Config
from gateway.errors import PermanentError, TransientError
from gateway.odoo.client import OdooClient, m2o_id
from gateway.outbox import EventDraft, spool_event_seed
from gateway.refusal import RefusalSender
from gateway.schema import messages, odoo_writes
from gateway.spool import SpooledMessage, check_lease, lease_fence
from gateway.store import reading, utcnow
from gateway.thread_lookup import forget_record, index_message, is_outbound, record_of, replying_recipient
from routing import msgdict
from routing.autoreply import no_answer_reason
from routing.model import Action, BounceResult, Decision, Target, is_null_sender
from routing.normalized_dsn import build_normalized_dsn

log = logging.getLogger(__name__)

#: Message-IDs Odoo generates (tools.generate_tracking_message_id): `<rnd.time-openerp-<res>@host>`.
_ODOO_MADE = re.compile(r"-openerp-[^@>]*@")
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)

COMMENT, NOTE = "mail.mt_comment", "mail.mt_note"
#: the creation subtype Odoo's gateway posts with, per model (`_creation_subtype`, spec §1.11)
CREATION_SUBTYPES = {"crm.lead": "crm.mt_lead_create", "helpdesk.ticket": "helpdesk.mt_ticket_new"}
#: context Odoo's gateway runs message_new/message_post with (spec §1.11, §3.3)
GATEWAY_CONTEXT = {"mail_create_nosubscribe": True, "mail_create_nolog": True}


@dataclass(frozen=True)
class DeliveryOutcome:
    state: str            # "delivered" | "dropped" | "quarantined"
    note: str
    events: tuple[EventDraft, ...] = ()
    odoo_refs: tuple[tuple[str, int], ...] = ()


# ------------------------------------------------------------------------------------------ the ledger
@dataclass(frozen=True)
class _Row:
    message: int
    step: str
    model: str | None
    res_id: int | None
    result: str | None
    created_at: Any


class WriteLedger:
    """`odoo_writes` for one spooled message: what an earlier attempt already did in Odoo."""

    def __init__(self, engine: Engine, message: int):
        self.engine = engine
        self.message = message
        with reading(engine) as conn:
            rows = conn.execute(select(odoo_writes).where(odoo_writes.c.message == message)).all()
        self._done: dict[str, Any] = {r.step: r for r in rows}

    def get(self, step: str) -> Any:
        return self._done.get(step)

    def res_id(self, step: str) -> int | None:
        row = self._done.get(step)
        return row.res_id if row is not None else None

    @property
    def empty(self) -> bool:
        """No attempt of this message has written anything to Odoo (nor was about to)."""
        return not self._done

    def claimed(self, prefix: str, *, besides: str) -> set[int]:
        """Record ids that steps starting with `prefix`, other than `besides`, already made (another alias's
        record of the same model: never this alias's to reuse)."""
        return {int(r.res_id) for step, r in self._done.items()
                if step.startswith(prefix) and step != besides and r is not None and r.res_id is not None}

    def record(self, step: str, model: str | None, res_id: int | None, result: Any = None) -> None:
        """Commit one write *now* (before anything else can fail)."""
        values = dict(message=self.message, step=step[:255], model=model, res_id=res_id,
                      result=json.dumps(result, default=str) if result is not None else None,
                      created_at=utcnow())
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(odoo_writes).values(**values))
        except IntegrityError:  # an earlier attempt recorded it after we read the ledger: keep its row
            with reading(self.engine) as conn:
                self._done[step] = conn.execute(select(odoo_writes).where(
                    odoo_writes.c.message == self.message, odoo_writes.c.step == step[:255])).first()
            return
        self._done[step] = _Row(**values)


class _Fenced:
    """The Odoo client behind the worker's lease: each call first checks that the message is still this
    worker's (`gateway.spool.check_lease`). A worker whose lease ran out while Odoo was slow went on writing
    the lead, the post and the attachments while the worker that took the message over wrote them too."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def fenced(*args: Any, **kwargs: Any) -> Any:
            check_lease()
            return attr(*args, **kwargs)

        return fenced


# ---------------------------------------------------------------------------------------- the delivery
class Delivery:
    """Executes decisions against Odoo; one instance is shared by the worker threads."""

    def __init__(self, config: Config, engine: Engine, client: OdooClient | None,
                 tables: Callable[[], AliasTable] | None = None):
        """`tables`: the route step's current table (config merged with the aliases synced from Odoo), so
        delivery knows every alias routing knows; without it, the config's aliases only."""
        self.config = config
        self.engine = engine
        self.client = client
        self.mode = config.odoo.mode
        self._tables = tables
        self._config_table = config.alias_table()
        self.refusals = RefusalSender(config, engine)
        self._odoo_own_aliases: tuple[float, frozenset[str] | None] = (0.0, None)

    @property
    def aliases(self) -> AliasTable:
        """The alias table routing uses, as the sync refreshes it. With the config's alone, an Odoo-only alias
        of another model in a reply's Cc got a Delivered-To, and Odoo took the reply for a forward (a new
        record instead of a message on the thread, spec §1.5)."""
        return self._tables() if self._tables is not None else self._config_table

    def reload(self, config: Config) -> None:
        """SIGHUP: new aliases, mode and limits for the next message (the Odoo client is kept)."""
        self.config = config
        self.mode = config.odoo.mode
        self._config_table = config.alias_table()
        self.refusals = RefusalSender(config, self.engine)
        self._odoo_own_aliases = (0.0, None)

    # ------------------------------------------------------------------------------------ entry
    def deliver(self, message: SpooledMessage, raw: bytes, decision: Decision) -> DeliveryOutcome:
        action = decision.action
        if action in (Action.DUPLICATE, Action.LOOP):
            return DeliveryOutcome("dropped", decision.reason or action.value)
        if action == Action.QUARANTINE:
            return DeliveryOutcome("quarantined", decision.reason or "no route")
        if action == Action.DEFERRED:
            return DeliveryOutcome("dropped", "delayed DSN: deferral events only, nothing sent to Odoo",
                                   events=self._bounce_events(message, decision, "deferred"))
        if action == Action.COMPLAINT:
            return DeliveryOutcome("dropped", "complaint (ARF): event only", events=self._complaint_events(
                message, decision))
        if action == Action.BOUNCE:
            return self._bounce(message, decision)
        if action == Action.AUTO_REPLY:
            return self._auto_reply(message, raw, decision)
        if action in (Action.REPLY, Action.CREATE):
            if self.mode == "passthrough":
                outcome = self._passthrough(message, raw, decision)
            elif action == Action.REPLY:
                outcome = self._explicit_reply(message, raw, decision)
            else:
                outcome = self._explicit_create(message, raw, decision)
            if action == Action.REPLY:
                outcome = self._with_replied_event(message, raw, decision, outcome)
            return outcome
        raise PermanentError(f"spool {message.id}: unknown decision {action!r}",
                             hint="route it again with `mailgate quarantine release` after upgrading")

    def _odoo(self) -> OdooClient:
        if self.client is None:
            raise TransientError("Odoo is not configured ([odoo] url/db/login)",
                                 hint="configure [odoo]; mail stays spooled and is delivered afterwards")
        return self.client if lease_fence.get() is None else cast(OdooClient, _Fenced(self.client))

    # ---------------------------------------------------------------------------------- helpers
    def _message_id(self, message: SpooledMessage, decision: Decision, mail: msgdict.ParsedMail | None = None
                    ) -> tuple[str, bool]:
        """(Message-ID, synthesised?): Odoo needs one to dedupe; a missing one is derived from the body hash.

        A mail quarantined as a Message-ID collision (another mail holds its id in Odoo) and then released by
        an operator gets an id of its own, derived from its spool id: under its own id Odoo would call it a
        duplicate again, and the release would only put it back in the quarantine."""
        domain = self.config.domains[0].name if self.config.domains else "mailgate.invalid"
        if message.retry_since is not None and WriteLedger(self.engine, message.id).get("collision") is not None:
            return f"<mailgate.{message.sha256[:24]}.{message.id}.released@{domain}>", True
        mid = decision.message_id or message.message_id or (mail.message_id if mail else None)
        if mid:
            return msgdict.normalize_message_id(mid) or mid, False
        return f"<mailgate.{message.sha256[:32]}@{domain}>", True

    def _existing(self, message_id: str, model: str | None = None, res_id: int | None = None
                  ) -> list[dict[str, Any]]:
        rows = self._odoo().find_messages([message_id], ["model", "res_id", "message_id", "is_internal"])
        if model is not None:
            rows = [r for r in rows if r.get("model") == model and (res_id is None or r.get("res_id") == res_id)]
        return rows

    def _same_mail_elsewhere(self, message: SpooledMessage) -> bool:
        """Another spooled copy of these very bytes (same sha256: the MTA delivered it twice) already wrote to
        Odoo: what Odoo holds under this Message-ID is this mail, not another sender's."""
        with reading(self.engine) as conn:
            row = conn.execute(select(odoo_writes.c.id).select_from(
                odoo_writes.join(messages, messages.c.id == odoo_writes.c.message)).where(
                messages.c.sha256 == message.sha256, messages.c.id != message.id).limit(1)).first()
        return row is not None

    def _collision(self, message: SpooledMessage, ledger: WriteLedger, mid: str,
                   rows: list[dict[str, Any]]) -> DeliveryOutcome:
        """Odoo already holds `mid`, and not from this mail (no write of ours, different body): another sender
        reused the Message-ID (scanners, broken clients). Odoo would call it a duplicate and this mail would be
        nowhere while the outcome read "delivered" on the first sender's record: quarantined instead.

        Except Odoo's own mail coming back (a notification to a follower whose address is an alias, a Bcc to
        the catchall): its Message-ID is one Odoo made, or one we relayed for it. Odoo drops those as
        duplicates on purpose (it breaks loops), so we drop them too rather than fill the quarantine."""
        where = ", ".join(f"{m} {i}" for m, i in _refs(rows)) or "a message without a record"
        if _ODOO_MADE.search(mid) or is_outbound(self.engine, mid) is not None:
            return DeliveryOutcome("dropped", f"Odoo's own mail came back: Odoo already holds {mid} ({where})")
        log.warning("spool %s: Message-ID %s is already in Odoo (%s) from another mail; quarantined",
                    message.id, mid, where)
        if ledger.get("collision") is None:  # a release delivers it under an id of its own (`_message_id`)
            ledger.record("collision", None, None, {"landed": [list(r) for r in _refs(rows)]})
        return DeliveryOutcome("quarantined", f"Message-ID collision: Odoo already holds {mid} ({where}) from "
                                              "another mail with a different body")

    def _index(self, message_id: str, refs: list[tuple[str, int]]) -> None:
        for model, res_id in refs:
            index_message(self.engine, message_id, model, res_id)

    def _bounce_address(self, message: SpooledMessage) -> str:
        """Odoo's bounce address for the domain the bounce came to (else the first domain with one)."""
        for rcpt in message.rcpt_tos:
            dom = self.aliases.domain(rcpt.rsplit("@", 1)[-1]) if "@" in rcpt else None
            if dom is not None and dom.bounce_address:
                return dom.bounce_address
        for dom in self.aliases.domains:
            if dom.bounce_address:
                return dom.bounce_address
        raise PermanentError("no bounce address configured: Odoo cannot be told about the bounce",
                             hint="set `bounce` on a [[domains]] entry (Odoo's bounce alias)")

    # ------------------------------------------------------------------------------ passthrough
    def _passthrough(self, message: SpooledMessage, raw: bytes, decision: Decision) -> DeliveryOutcome:
        client = self._odoo()
        ledger = WriteLedger(self.engine, message.id)
        mail_head = msgdict.parse_headers(raw)
        mid, synthesised = self._message_id(message, decision, mail_head)
        step = "process"
        done = ledger.get(step)
        fallback = self._fallback(decision)
        if done is None:
            # No look-up first: message_process itself answers False for a Message-ID it already has (spec
            # §1.2 step 3), which also covers an earlier attempt whose answer was lost on the wire. The intent
            # row tells that earlier attempt apart from another sender's mail reusing the Message-ID.
            earlier = ledger.get("processing") is not None and ledger.get("collision") is None
            if ledger.get("processing") is None:
                ledger.record("processing", None, None)
            raw_for_odoo = self._passthrough_raw(raw, decision, mail_head, mid if synthesised else None)
            result: Any = client.message_process(
                raw_for_odoo, model=fallback.model if fallback else None,
                custom_values=dict(fallback.defaults) if fallback else None,
                thread_id=fallback.res_id if fallback else None, context=self._context())
            existing = self._existing(mid)
            refs = _refs(existing)
            if result is False and existing and not earlier and not self._same_mail_elsewhere(message):
                ledger.record("collision", None, None, {"landed": [list(r) for r in refs]})
                return self._collision(message, ledger, mid, existing)
            landed = list(refs)
            ledger.record(step, refs[0][0] if refs else None, refs[0][1] if refs else None,
                          {"result": result, "landed": [list(r) for r in refs]})
        else:
            existing = self._existing(mid)
            refs = _refs(existing)
            recorded = json.loads(done.result or "{}")
            result = recorded.get("result", "recorded")
            landed = [(str(m), int(i)) for m, i in recorded.get("landed", [])]
        # Aliases Odoo's routing passes over (spec §1.7/§1.9) get the explicit create they would have had.
        skipped = self._odoo_skips(decision, fallback, self._odoo_recipients(decision, mail_head))
        side: DeliveryOutcome | None = None
        if skipped:
            log.warning("spool %s: Odoo ignores the gateway-only alias(es) %s beside its own: created explicitly",
                        message.id, ", ".join(t.alias or t.model for t in skipped))
            side = self._explicit_create(message, raw, replace(decision, targets=tuple(skipped)),
                                         not_ours=frozenset(landed))
        placed = refs + [r for r in (side.odoo_refs if side else ()) if r not in refs]
        side_note = f"; gateway-only alias Odoo ignores, {side.note}" if side else ""
        if not placed:
            why = {False: "Odoo returned False (refused by its contact policy, catchall-only, or a duplicate)",
                   None: "Odoo dropped it (loop check)"}.get(result, f"Odoo returned {result!r} but stored nothing")
            return DeliveryOutcome("dropped", f"passthrough: {why}{side_note}")
        self._index(mid, refs)
        note = "passthrough: in Odoo on " + ", ".join(f"{m} {i}" for m, i in refs) if refs else \
            "passthrough: Odoo stored nothing"
        note += side_note
        wanted = [(t.model, t.res_id) for t in decision.targets]
        if wanted and not any(m == wm and (wi is None or wi == i) for m, i in placed for wm, wi in wanted):
            note += "; the gateway had decided " + ", ".join(f"{m} {i or '(new)'}" for m, i in wanted)
            log.warning("spool %s: Odoo placed %s on %s; gateway decided %s", message.id, mid, refs, wanted)
        return DeliveryOutcome("delivered", note, odoo_refs=tuple(placed))

    def _fallback(self, decision: Decision) -> Target | None:
        """For new mail routed by a gateway alias: that alias's model (and defaults, forced thread) as Odoo's
        fallback, used only when none of Odoo's own aliases matches (an alias that exists in our config only,
        a default alias, a +tag address). Replies and Odoo-synced aliases need none."""
        if decision.action != Action.CREATE:
            return None
        for target in decision.targets:
            alias = self.aliases.alias(target.alias) if target.alias else None
            if alias is not None and alias.source == "config":
                return target
        return None

    def _odoo_own_alias_set(self) -> frozenset[str] | None:
        """The alias addresses Odoo itself holds (mail.alias), re-read every 5 minutes; None if unreadable."""
        read_at, found = self._odoo_own_aliases
        if found is None or time.monotonic() - read_at > 300:
            try:
                rows = self._odoo().search_read("mail.alias", [], ["alias_full_name"])
            except PermanentError as exc:
                log.warning("cannot read Odoo's mail.alias (%s): gateway-only aliases beside Odoo's are not "
                            "delivered separately in passthrough", exc)
                return None
            # the spelling the alias table uses (punycode domain): Odoo may hold an IDN domain in Unicode
            found = frozenset(normalize_address(str(r["alias_full_name"])) for r in rows if r.get("alias_full_name"))
            self._odoo_own_aliases = (time.monotonic(), found)
        return found

    def _odoo_recipients(self, decision: Decision, mail: msgdict.ParsedMail) -> set[str]:
        """The addresses Odoo's alias lookup reads (spec §1.1 `recipients`): the mail's Delivered-To, To, Cc,
        Resent-To/Cc, and the Delivered-To lines passthrough adds."""
        return set(mail.recipients) | set(self._delivered_to(decision, mail))

    def _odoo_skips(self, decision: Decision, fallback: Target | None, recipients: set[str]) -> list[Target]:
        """Targets whose alias exists in our config only and that Odoo's routing will pass over.

        Odoo routes new mail to every one of *its* aliases among the recipients and uses the caller's fallback
        model only when none matches (spec §1.7, §1.9); message_process takes one fallback. So a gateway-only
        alias is lost when one of Odoo's aliases is also addressed, or when it is not the fallback."""
        if decision.action != Action.CREATE:
            return []
        candidates = [t for t in decision.targets if t.alias and not t.res_id
                      and (conf := self.aliases.alias(t.alias)) is not None and conf.source == "config"]
        if not candidates:
            return []
        odoo_aliases = self._odoo_own_alias_set()
        if odoo_aliases is None:
            return []
        unknown = [t for t in candidates if t.alias and normalize_address(t.alias) not in odoo_aliases]
        odoo_routes = any(normalize_address(r) in odoo_aliases for r in recipients)
        return [t for t in unknown if odoo_routes or t != fallback]

    def _delivered_to(self, decision: Decision, mail: msgdict.ParsedMail) -> list[str]:
        """The recipients passthrough names in Delivered-To (Odoo never sees the envelope, spec §5.5).

        Delivered-To counts as To in Odoo, so two kinds of recipient get none: a bounce address (Odoo would
        take the mail for a bounce, spec §1.3), and on a reply an alias of another model that the headers name
        in Cc only: Odoo reads it there already, and as a To it would make the reply a forward, a new record
        for that alias (spec §1.5, test references_forward_cc)."""
        bounce_addrs = self.aliases.bounce_addresses()
        recipients = [t.alias for t in decision.targets if t.alias]
        recipients += [r.lower() for r in decision.recipients]
        cc_only = self._cc_only_other_model(decision, mail)
        return [r for r in dict.fromkeys(recipients) if r and r not in bounce_addrs
                and not r.startswith("bounce+") and r not in cc_only]

    def _cc_only_other_model(self, decision: Decision, mail: msgdict.ParsedMail) -> set[str]:
        """On a reply: the aliases of a model other than the thread's that the headers name in Cc only."""
        thread_models = {t.model for t in decision.targets if t.res_id}
        if decision.action == Action.CREATE or not thread_models:
            return set()
        to_like = {a.strip().lower() for a in mail.to.split(",")}
        out: set[str] = set()
        for addr in (a.strip().lower() for a in mail.cc.split(",")):
            if not addr or addr in to_like:
                continue
            res = resolve_address(self.aliases, addr, "cc")
            if res.alias is not None and res.alias.model not in thread_models:
                out.add(addr)
        return out

    def _passthrough_raw(self, raw: bytes, decision: Decision, mail: msgdict.ParsedMail,
                         synthesised_id: str | None) -> str:
        recipients = self._delivered_to(decision, mail)
        parent = next((t.parent_message_id for t in decision.targets if t.parent_message_id), None)
        fix = msgdict.needs_references_fixup(mail.references, mail.in_reply_to, parent)
        extra = (("Message-ID", synthesised_id),) if synthesised_id else ()
        text = msgdict.passthrough_raw(raw, recipients, known_parent_id=fix, extra_headers=extra)
        if len(text) > self.config.odoo.max_request_bytes:
            raise PermanentError(f"mail of {len(text)} bytes (7-bit) exceeds [odoo] max_request_bytes",
                                 hint="raise max_request_bytes if Odoo can take it, then `mailgate dead retry`")
        return text

    def _context(self) -> dict[str, Any]:
        return {} if self.config.odoo.notify_force_send else {"mail_notify_force_send": False}

    # -------------------------------------------------------------------------------- explicit
    def _alias_addresses(self) -> frozenset[str]:
        """Every alias address (config + Odoo): never an author (spec §3.4)."""
        return frozenset(a.address for a in self.aliases.aliases) | (self._odoo_own_alias_set() or frozenset())

    def _author(self, target: Target, address: str) -> int | None:
        """followers of the record (the one updated, else the alias's parent), then users, then partners;
        never an alias address (spec §1.8, §3.4)."""
        client = self._odoo()
        if not address or normalize_address(address) in self._alias_addresses():
            return None
        model, res_id = target.follow_record() or (target.model, None)
        if res_id:
            followers = client.search_read("mail.followers", [("res_model", "=", model), ("res_id", "=", res_id)],
                                           ["partner_id"])
            pids = [m2o_id(f.get("partner_id")) for f in followers]
            pids = [p for p in pids if p]
            if pids:
                hit = client.search("res.partner", [("id", "in", pids), ("email_normalized", "=", address)], limit=1)
                if hit:
                    return hit[0]
        # One call for "users, then partners": the partners with that address, a user's partner first.
        partners = client.search_read("res.partner", [("email_normalized", "=", address)], ["user_ids"],
                                      order="id", limit=20)
        if not partners:
            return None
        with_user = [p for p in partners if p.get("user_ids")]
        return int((with_user or partners)[0]["id"])

    def _contact_refusal(self, target: Target, author: int | None, address: str = "") -> str | None:
        """Why the contact policy refuses this sender (`author`, the partner found for the From `address`),
        or None when allowed."""
        policy = target.contact
        if policy == "everyone":
            return None
        if policy == "partners":
            return None if author else "sender is not a known partner"
        if policy == "followers":
            record = target.follow_record()  # the record updated, else the alias's parent (spec §1.8)
            if record is None:
                return "policy 'followers' needs a record to follow (alias without a forced thread or a parent)"
            if not author:
                return "sender is not a known partner"
            hit = self._odoo().search_count("mail.followers", [("res_model", "=", record[0]),
                                                               ("res_id", "=", record[1]),
                                                               ("partner_id", "=", author)])
            return None if hit else f"sender does not follow {record[0]} {record[1]}"
        if policy == "employees":
            return None if self._is_employee(address, author) else "sender is not an employee"
        return f"unknown contact policy {policy!r}"

    def _is_employee(self, address: str, author: int | None) -> bool:
        """Odoo's `employees` policy (hr, spec §1.8): the From address is an employee's work email, or the
        email of an employee's user. Compared case-insensitively but whole (`=ilike`), where Odoo's `ilike`
        is a substring test that lets bob@x.com in on the strength of an employee jimbob@x.com.

        Without the hr module (no `hr.employee`; Odoo then offers no `employees` policy, a config alias may
        still say it) the sender must be the partner of an internal user, as before."""
        client = self._odoo()
        address = address.strip()
        if not address:
            return False
        pattern = like_literal(address)  # Odoo's =ilike is SQL ILIKE: "%@corp.example" matched every employee
        try:
            if client.search_count("hr.employee", [("work_email", "=ilike", pattern)]):
                return True
            users = client.search("res.users", [("email", "=ilike", pattern)])
            return bool(users) and bool(client.search_count("hr.employee", [("user_id", "in", users)]))
        except PermanentError as exc:
            if "hr.employee" not in str(exc):
                raise
        if not author:
            return False
        return bool(client.search_count("res.users", [("partner_id", "=", author), ("share", "=", False)]))

    def _refuse(self, message: SpooledMessage, raw: bytes, mail: msgdict.ParsedMail, *, alias: str, mid: str,
                text: str | None = None) -> str:
        """The polite refusal, unless it would be backscatter; returns the note's suffix saying which.

        A null envelope sender (MAIL FROM:<>) falls back to no one: the From of a bounce or of spam with a
        forged From is a bystander. Auto-submitted, bulk and list mail is never answered either (RFC 3834)."""
        if is_null_sender(message.mail_from, message.source):
            return "; no refusal mail (null envelope sender); refusal recorded only"
        why_not = no_answer_reason(_HEADER_PARSER.parsebytes(raw))
        if why_not:
            return f"; no refusal mail ({why_not}); refusal recorded only"
        check_lease()  # a refusal mail is sent once: not by a worker another one took the message over from
        sent = self.refusals.refuse(sender=message.mail_from or mail.from_address, alias=alias,
                                    subject=mail.subject, original_message_id=mid, text=text)
        return "; refusal sent" if sent else ""

    def _attachments(self, ledger: WriteLedger, mail: msgdict.ParsedMail, model: str, res_id: int
                     ) -> tuple[list[int], dict[str, int]]:
        import base64

        ids: list[int] = []
        by_cid: dict[str, int] = {}
        for n, att in enumerate(mail.attachments):
            step = f"attach:{model}:{res_id}:{n}"
            aid = ledger.res_id(step)
            if aid is None:
                aid = self._odoo().create("ir.attachment", {
                    "name": att.name, "datas": base64.b64encode(att.content).decode("ascii"),
                    "mimetype": att.mimetype, "res_model": model, "res_id": res_id})
                ledger.record(step, "ir.attachment", aid)
            ids.append(aid)
            if att.cid:
                by_cid[att.cid] = aid
        return ids, by_cid

    def _access_tokens(self, attachment_ids: list[int]) -> dict[int, str]:
        """The access tokens of inline images, made as Odoo makes them for the images it rewrites itself
        (`ir.attachment.generate_access_token`, which keeps a token the attachment already has: a retry gets
        the same one)."""
        if not attachment_ids:
            return {}
        tokens = self._odoo().execute("ir.attachment", "generate_access_token", list(attachment_ids))
        return {aid: str(tok) for aid, tok in zip(attachment_ids, tokens or []) if tok}

    def _post(self, ledger: WriteLedger, mail: msgdict.ParsedMail, mid: str, model: str, res_id: int, *,
              subtype: str, author: int | None, parent_id: int | None = None,
              known: list[dict[str, Any]] | None = None) -> int:
        """Attachments, then message_post once (ledger, then Odoo's own record of the Message-ID).

        `known`: the mail.message rows with this Message-ID fetched earlier in this attempt (saves a call)."""
        step = f"post:{model}:{res_id}"
        posted = ledger.res_id(step)
        if posted is not None:
            return posted
        if known is None:
            existing = self._existing(mid, model, res_id)
        else:
            existing = [r for r in known if r.get("model") == model and r.get("res_id") == res_id]
        if existing:
            ledger.record(step, "mail.message", existing[0]["id"], {"found": True})
            return int(existing[0]["id"])
        att_ids, by_cid = self._attachments(ledger, mail, model, res_id)
        body = mail.body_html
        if by_cid:
            inline = [by_cid[c] for c in sorted(msgdict.referenced_cids(body)) if c in by_cid]
            body = msgdict.rewrite_cids(body, by_cid, self._access_tokens(inline))
        kwargs = msgdict.post_kwargs(mail, subtype_xmlid=subtype, author_id=author, body_html=body,
                                     parent_id=parent_id, attachment_ids=tuple(att_ids), message_id=mid)
        posted = self._odoo().message_post(model, res_id, context=GATEWAY_CONTEXT, **kwargs)
        ledger.record(step, "mail.message", posted)
        return posted

    def _subscribe(self, ledger: WriteLedger, model: str, res_id: int, author: int | None) -> None:
        if not author:
            return
        step = f"subscribe:{model}:{res_id}:{author}"
        if ledger.get(step) is None:
            self._odoo().message_subscribe(model, res_id, [author])
            ledger.record(step, model, res_id)

    def _explicit_create(self, message: SpooledMessage, raw: bytes, decision: Decision, *,
                         not_ours: frozenset[tuple[str, int]] = frozenset()) -> DeliveryOutcome:
        """message_new + post per target. `not_ours`: records Odoo's own routing put this mail on (passthrough
        delivering a gateway-only alias beside them): never reused as this alias's record."""
        client = self._odoo()
        ledger = WriteLedger(self.engine, message.id)
        mail = msgdict.parse_mail(raw)
        mid, _ = self._message_id(message, decision, mail)
        refs: list[tuple[str, int]] = []
        notes: list[str] = []
        known = self._existing(mid)  # one look-up serves every create and post check of this attempt
        if known and ledger.empty and not self._same_mail_elsewhere(message):
            return self._collision(message, ledger, mid, known)
        for target in decision.targets:
            label = target.alias or target.model
            author = self._author(target, mail.from_address)
            if author is None and target.create_partner and mail.from_address:
                step = f"partner:{mail.from_address}"
                author = ledger.res_id(step)
                if author is None:
                    name = email.utils.parseaddr(mail.email_from)[0] or mail.from_address  # quotes undone
                    author = client.create("res.partner", {"name": name, "email": mail.from_address})
                    ledger.record(step, "res.partner", author)
            refused = self._contact_refusal(target, author, mail.from_address)
            if refused:
                alias_conf = self.aliases.alias(target.alias) if target.alias else None
                sent = self._refuse(message, raw, mail, alias=label, mid=mid,
                                    text=alias_conf.bounced_content if alias_conf else None)
                notes.append(f"{label}: refused ({refused}){sent}")
                continue
            if target.res_id:  # forced thread: update, then post
                res_id = target.res_id
                step = f"update:{target.model}:{res_id}"
                if ledger.get(step) is None:
                    client.message_update(target.model, res_id, msgdict.msg_dict(mail, author_id=author))
                    ledger.record(step, target.model, res_id)
                subtype = COMMENT
            else:
                step = f"create:{target.model}:{label}"
                res_id = ledger.res_id(step)
                if res_id is None:
                    # A record Odoo holds this mail on is reused only if no other alias's create step made it:
                    # two aliases of one model make two records, a retry included.
                    others = ledger.claimed(f"create:{target.model}:", besides=step)
                    found = [r for r in known if r.get("model") == target.model and r.get("res_id")
                             and int(r["res_id"]) not in others and (target.model, int(r["res_id"])) not in not_ours]
                    intent = ledger.get(f"creating:{target.model}:{label}")
                    if found:
                        res_id = int(found[0]["res_id"])
                    elif intent is not None and (orphan := self._orphan(target.model, mail, intent)) \
                            and orphan not in others:
                        res_id = orphan
                    else:
                        if intent is None:
                            ledger.record(f"creating:{target.model}:{label}", target.model, None)
                        values = dict(target.defaults)
                        res_id = client.message_new(target.model, msgdict.msg_dict(mail, author_id=author),
                                                    values, context=GATEWAY_CONTEXT)
                    ledger.record(step, target.model, res_id)
                subtype = CREATION_SUBTYPES.get(target.model, COMMENT)
            self._post(ledger, mail, mid, target.model, res_id, subtype=subtype, author=author, known=known)
            self._subscribe(ledger, target.model, res_id, author)
            refs.append((target.model, res_id))
            notes.append(f"{label}: {target.model} {res_id}")
        if not refs:
            return DeliveryOutcome("dropped", "explicit: " + "; ".join(notes or ["no target"]))
        self._index(mid, refs)
        return DeliveryOutcome("delivered", "explicit: " + "; ".join(notes), odoo_refs=tuple(refs))

    def _orphan(self, model: str, mail: msgdict.ParsedMail, intent: Any) -> int | None:
        """The record an earlier attempt's `message_new` made when its answer never came back (timeout, lost
        connection): the one record of `model` named after the subject, created since that attempt, that
        carries no mail yet. Anything ambiguous → None, and a new record is made (a duplicate is better than
        a lost mail)."""
        since = intent.created_at
        if since is None:
            return None
        if since.tzinfo is not None:
            since = since.astimezone(dt.timezone.utc)
        since_text = (since - dt.timedelta(seconds=120)).strftime("%Y-%m-%d %H:%M:%S")
        # Without a subject Odoo 17's crm.lead / helpdesk.ticket / project.task name the record
        # `_("No Subject")`, the base message_new ''. The English text: the gateway's calls send no lang (a
        # translated name is simply not found, and a new record is made, as before).
        name = ("name", "=", mail.subject) if mail.subject else ("name", "in", ["No Subject", ""])
        try:
            rows = self._odoo().search_read(model, [("create_date", ">=", since_text), name],
                                            ["id"], order="id desc", limit=2)
        except PermanentError:  # a model without `name`: cannot tell
            return None
        if len(rows) != 1:
            return None
        rid = int(rows[0]["id"])
        posted = self._odoo().search_count("mail.message", [("model", "=", model), ("res_id", "=", rid),
                                                            ("message_type", "=", "email")])
        return None if posted else rid

    def _parent(self, target: Target) -> tuple[int | None, bool]:
        if not target.parent_message_id:
            return None, False
        rows = self._existing(target.parent_message_id, target.model, target.res_id)
        if not rows:
            return None, False
        return int(rows[0]["id"]), bool(rows[0].get("is_internal"))

    def _explicit_reply(self, message: SpooledMessage, raw: bytes, decision: Decision) -> DeliveryOutcome:
        client = self._odoo()
        ledger = WriteLedger(self.engine, message.id)
        mail = msgdict.parse_mail(raw)
        mid, _ = self._message_id(message, decision, mail)
        target = decision.targets[0]
        assert target.res_id is not None, "a reply decision names its record"
        known = self._existing(mid)
        if known and ledger.empty and not self._same_mail_elsewhere(message):
            return self._collision(message, ledger, mid, known)
        author = self._author(target, mail.from_address)
        refused = self._contact_refusal(target, author, mail.from_address) if target.alias else None
        if refused:
            sent = self._refuse(message, raw, mail, alias=target.alias or "", mid=mid)
            return DeliveryOutcome("dropped", f"explicit reply refused ({refused}){sent}")
        parent_id, internal = self._parent(target)
        step = f"update:{target.model}:{target.res_id}"
        try:
            if ledger.get(step) is None and ledger.get(f"post:{target.model}:{target.res_id}") is None:
                try:
                    client.message_update(target.model, target.res_id, msgdict.msg_dict(mail, author_id=author))
                except PermanentError as exc:
                    # models without message_update are fine ("The method … does not exist"); a deleted
                    # record ("Record does not exist", MissingError) is not
                    if "MissingError" in str(exc) or "does not exist" not in str(exc):
                        raise
                ledger.record(step, target.model, target.res_id)
            posted = self._post(ledger, mail, mid, target.model, target.res_id,
                                subtype=NOTE if internal else COMMENT, author=author, parent_id=parent_id,
                                known=known)
        except PermanentError as exc:
            if "MissingError" not in str(exc) or self._record_exists(target.model, target.res_id):
                raise
            return self._reply_to_deleted(message, raw, decision, target)
        self._subscribe(ledger, target.model, target.res_id, author)
        ref = (target.model, target.res_id)
        self._index(mid, [ref])
        return DeliveryOutcome("delivered", f"explicit reply: message {posted} on {target.model} {target.res_id}",
                               odoo_refs=(ref,))

    def _record_exists(self, model: str, res_id: int) -> bool:
        """Is the record still there (archived counts as there)?"""
        found = self._odoo().execute(model, "search", None, {"domain": [("id", "=", res_id)],
                                                             "context": {"active_test": False}})
        return bool(found)

    def _reply_to_deleted(self, message: SpooledMessage, raw: bytes, decision: Decision,
                          target: Target) -> DeliveryOutcome:
        """The record a reply answers was deleted (merged, cleaned up): do what Odoo's gateway does and create
        a new record of that model, as new mail through the alias it came to (its defaults) would. The thread
        index rows naming the deleted record are dropped, so the next reply is not routed there again."""
        forgotten = forget_record(self.engine, target.model, target.res_id)
        log.warning("spool %s: %s %s was deleted in Odoo; creating a new %s instead (%d thread index row(s) "
                    "dropped)", message.id, target.model, target.res_id, target.model, forgotten)
        alias = self.aliases.alias(target.alias) if target.alias else None
        if alias is not None and alias.model == target.model and not alias.force_thread_id:
            fresh = Target(model=target.model, alias=alias.address, contact=alias.contact, defaults=alias.defaults,
                           create_partner=alias.create_partner)
        else:
            fresh = Target(model=target.model, contact=target.contact)
        outcome = self._explicit_create(message, raw, replace(decision, action=Action.CREATE, targets=(fresh,)))
        return DeliveryOutcome(outcome.state, f"{target.model} {target.res_id} was deleted in Odoo; new record: "
                               + outcome.note, events=outcome.events, odoo_refs=outcome.odoo_refs)

    # ------------------------------------------------------------------------------ auto-reply
    def _auto_reply(self, message: SpooledMessage, raw: bytes, decision: Decision) -> DeliveryOutcome:
        mail = msgdict.parse_headers(raw)
        target = next((t for t in decision.targets if t.res_id), None)
        events = self._auto_reply_events(message, decision, mail, target)
        if self.config.routing.auto_reply != "note" or target is None or target.res_id is None:
            why = "no thread to note it on" if target is None else "routing.auto_reply = drop"
            return DeliveryOutcome("dropped", f"auto-reply ({decision.auto_reply_indicator}): {why}", events=events)
        full = msgdict.parse_mail(raw)
        ledger = WriteLedger(self.engine, message.id)
        mid, _ = self._message_id(message, decision, full)
        author = self._author(target, full.from_address)
        parent_id, _internal = self._parent(target)
        posted = self._post(ledger, full, mid, target.model, target.res_id, subtype=NOTE, author=author,
                            parent_id=parent_id)
        self._index(mid, [(target.model, target.res_id)])
        return DeliveryOutcome("delivered", f"auto-reply noted as message {posted} on {target.model} {target.res_id}",
                               events=events, odoo_refs=((target.model, target.res_id),))

    # --------------------------------------------------------------------------------- bounces
    def _bounce(self, message: SpooledMessage, decision: Decision) -> DeliveryOutcome:
        if not decision.bounces:
            # Nothing to count and nobody to tell: kept where an operator sees it (a decision stored before the
            # router quarantined these, or a detector that names no one), never dropped silently.
            return DeliveryOutcome("quarantined", "bounce with no identifiable recipient")
        events = self._bounce_events(message, decision, "bounced")
        hard = [b for b in decision.bounces if b.kind == "hard" and b.action == "failed"]
        if not hard:
            return DeliveryOutcome("dropped", "soft bounce: events only, not sent to Odoo (it would count it as hard)",
                                   events=events)
        client = self._odoo()
        ledger = WriteLedger(self.engine, message.id)
        address = self._bounce_address(message)
        notes = []
        for b in hard:
            step = f"bounce:{b.recipient.lower()}"
            if ledger.get(step) is not None:
                notes.append(f"{b.recipient}: already registered")
                continue
            intent = f"bounce-sent:{b.recipient.lower()}"
            if ledger.get(intent) is not None:
                # An earlier attempt handed the DSN over but never heard back (timeout, lost answer, crash).
                # Odoo keeps no record of a processed bounce except the notification it marks: when that
                # says "bounce", or nothing can tell, do not risk counting it twice.
                registered = self._bounce_registered(b)
                if registered is not False:
                    ledger.record(step, None, None, {"assumed": "earlier attempt",
                                                     "notification_bounced": registered})
                    notes.append(f"{b.recipient}: registered by an earlier attempt"
                                 + ("" if registered else " (assumed: nothing in Odoo to check)"))
                    continue
            else:
                ledger.record(intent, None, None)
            dsn = build_normalized_dsn(b, bounce_address=address, seed=f"spool:{message.id}",
                                       reporting_mta=self.config.outbound.helo_name or "mailgate")
            result = client.message_process(dsn.decode("ascii"), context=self._context())
            ledger.record(step, None, None, {"result": result})
            notes.append(f"{b.recipient}: hard bounce registered in Odoo")
        return DeliveryOutcome("delivered", "; ".join(notes), events=events)

    def _bounce_registered(self, b: BounceResult) -> bool | None:
        """Is the notification of (original message, bounced partner) already marked bounced? None: no such
        notification, so Odoo holds no trace to tell either way."""
        client = self._odoo()
        if not b.original_message_id:
            return None
        mids = [r["id"] for r in client.find_messages([b.original_message_id], ["id"])]
        pids = client.search("res.partner", [("email_normalized", "=", b.recipient.lower())])
        if not mids or not pids:
            return None
        rows = client.search_read("mail.notification", [("mail_message_id", "in", mids),
                                                        ("res_partner_id", "in", pids)], ["notification_status"])
        if not rows:
            return None
        return any(r.get("notification_status") == "bounce" for r in rows)

    # ---------------------------------------------------------------------------------- events
    def _bounce_events(self, message: SpooledMessage, decision: Decision, kind: str) -> tuple[EventDraft, ...]:
        out = []
        for b in decision.bounces:
            etype = "deferred" if (kind == "deferred" or b.action == "delayed") else "bounced"
            model, res_id = record_of(self.engine, b.original_message_id)
            out.append(EventDraft(
                type=etype, seed=spool_event_seed(message.id, etype, b.recipient),
                message_id=b.original_message_id, model=model, res_id=res_id, recipient=b.recipient,
                data=_bounce_data(b)))
        return tuple(out)

    def _complaint_events(self, message: SpooledMessage, decision: Decision) -> tuple[EventDraft, ...]:
        c = decision.complaint
        if c is None:
            return ()
        model, res_id = record_of(self.engine, c.original_message_id)
        return (EventDraft(type="complained", seed=f"spool:{message.id}:complained",
                           message_id=c.original_message_id, model=model, res_id=res_id,
                           recipient=c.original_recipient, data=c.to_json()),)

    def _auto_reply_events(self, message: SpooledMessage, decision: Decision, mail: msgdict.ParsedMail,
                           target: Target | None) -> tuple[EventDraft, ...]:
        replied = is_outbound(self.engine, decision.replied_message_id)
        if replied is None and target is None:
            return ()
        model = target.model if target else replied.model if replied else None
        res_id = target.res_id if target else replied.res_id if replied else None
        return (EventDraft(type="auto_replied", seed=f"spool:{message.id}:auto_replied",
                           message_id=decision.replied_message_id or (target.parent_message_id if target else None),
                           model=model, res_id=res_id,
                           recipient=replying_recipient(self.engine, decision.replied_message_id, mail.from_address)
                           if replied is not None else mail.from_address or None,
                           data={"message_id": decision.message_id or message.message_id, "from": mail.email_from,
                                 "subject": mail.subject, "indicator": decision.auto_reply_indicator}),)

    def _with_replied_event(self, message: SpooledMessage, raw: bytes, decision: Decision,
                            outcome: DeliveryOutcome) -> DeliveryOutcome:
        """`replied` only when the mail answers one we relayed (thread_index.outbound) and it was delivered."""
        replied = is_outbound(self.engine, decision.replied_message_id)
        if replied is None or outcome.state != "delivered":
            return outcome
        mail = msgdict.parse_headers(raw)
        mid, _ = self._message_id(message, decision, mail)
        model, res_id = outcome.odoo_refs[0] if outcome.odoo_refs else (replied.model, replied.res_id)
        odoo_message_id = None
        try:
            rows = self._existing(mid, model, res_id)
            odoo_message_id = int(rows[0]["id"]) if rows else None
        except TransientError:
            pass  # the event still fires; the id is a nicety
        event = EventDraft(type="replied", seed=f"spool:{message.id}:replied",
                           message_id=decision.replied_message_id, model=model, res_id=res_id,
                           recipient=replying_recipient(self.engine, replied.message_id, mail.from_address),
                           data={"message_id": mid, "from": mail.email_from, "subject": mail.subject,
                                 "odoo_message_id": odoo_message_id})
        return DeliveryOutcome(outcome.state, outcome.note, events=outcome.events + (event,),
                               odoo_refs=outcome.odoo_refs)


def like_literal(value: str) -> str:
    """`value` as a LIKE pattern that matches only itself: Odoo passes `=like`/`=ilike` values to SQL as they
    are, so `%` and `_` (both legal in a mail address) are wildcards unless escaped (backslash is
    PostgreSQL's default LIKE escape)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _bounce_data(b: BounceResult) -> dict[str, Any]:
    """The event data docs/events.md promises for a bounce report that came back: `via` says how it was
    recognised ("verp", "dsn", or the detector that read the NDR)."""
    return {"kind": b.kind, "reason": b.reason, "status": b.status, "diagnostic": b.diagnostic,
            "remote_mta": b.remote_mta, "action": b.action, "via": b.detector or "dsn"}


def _refs(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Distinct (model, res_id) of mail.message rows, in Odoo's order."""
    out: list[tuple[str, int]] = []
    for r in rows:
        if r.get("model") and r.get("res_id"):
            ref = (str(r["model"]), int(r["res_id"]))
            if ref not in out:
                out.append(ref)
    return out

