"""A wire-level Odoo *double* for tests and benchmarks: a real HTTP server on 127.0.0.1:<free port>.

Odoo cannot be installed here, so the gateway's adapter is tested against this double. It speaks the
endpoints odoorpc 0.10 calls (`/web/webclient/version_info`, `/jsonrpc` `common.login`/`common.version`,
`object.execute` for `res.users.context_get`, `object.execute_kw`) and Odoo 19's JSON-2 API
(`POST /json/2/<model>/<method>`, bearer API key, `X-Odoo-Database`), with the return shapes and error
payloads the spec (odoo-gateway-spec.md §3, §6, §7) recorded from live Odoo 17 and 19:

* JSON-RPC errors answer HTTP 200 with ``{"error": {"code": 200, "message": "Odoo Server Error",
  "data": {name, message, arguments, context, debug}}}``; a method returning None answers with **no
  ``result`` member**.
* JSON-2 answers the bare result, errors as HTTP status + ``{name, message, arguments, context, debug}``
  (401 bad key, 403 private/access, 404 unknown model/method, 422 validation/bad arguments, 500 other).
* Version < 19: ``create``/``message_post`` return an int, ``message_new`` the repr ``"crm.lead(5,)"``;
  version ≥ 19: every one of them returns a list of ids.

`message_process` emulates Odoo's mail gateway (spec §1.2/§1.13 as corrected by §6): duplicate → False,
loop header → None, bounce (bounce alias in Delivered-To/To, From mailer-daemon, multipart/report) →
message_bounce += 1 and the notification marked → False, reply by References (else In-Reply-To) unless an
alias of another model is in Delivered-To/To (a forward: new mail for those aliases only), catchall
only → False, alias by Delivered-To/To/Cc → create + post, fallback model, else "No possible route".

Fault injection (all thread-safe): `go_down()` / `come_up()` (connection refused, same port), `slow(s)`,
`fail_next(n, kind)`, `fail_nth(n, kind)`, `fail_one_in(n, kind)` (random, seeded); kinds: ``http500`` (HTML 500),
``serialization`` (Odoo's retried-out SerializationFailure), ``drop`` (close the socket, nothing done),
``lost_response`` (do the call, then close the socket: the client cannot know it happened).
"""

from __future__ import annotations

import ast
import base64
import email
import email.policy
import email.utils
import itertools
import json
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# ------------------------------------------------------------------------------------------- errors


class OdooDoubleError(Exception):
    """An exception as Odoo would raise it: `name` is the dotted class name Odoo reports."""

    name = "odoo.exceptions.UserError"
    status = 500  # JSON-2 HTTP status

    def __init__(self, message: str, *, name: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if name:
            self.name = name
        if status:
            self.status = status


class AccessError(OdooDoubleError):
    name = "odoo.exceptions.AccessError"
    status = 403


class AccessDenied(OdooDoubleError):
    name = "odoo.exceptions.AccessDenied"
    status = 401


class UserError(OdooDoubleError):
    name = "odoo.exceptions.UserError"
    status = 422


class ValidationError(OdooDoubleError):
    name = "odoo.exceptions.ValidationError"
    status = 422


class MissingError(OdooDoubleError):
    name = "odoo.exceptions.MissingError"
    status = 404


class NotFound(OdooDoubleError):
    name = "werkzeug.exceptions.NotFound"
    status = 404


# --------------------------------------------------------------------------------------- recordsets
@dataclass(frozen=True)
class Recordset:
    """What an Odoo method returns when it returns records (serialised per transport and version)."""

    model: str
    ids: tuple[int, ...]

    def __repr__(self) -> str:  # Odoo's repr, which JSON-RPC sends for un-decorated methods
        return f"{self.model}({''.join(f'{i},' for i in self.ids)})"


#: many2one fields per model → comodel (read answers [id, display_name])
M2O: dict[str, dict[str, str]] = {
    "res.users": {"partner_id": "res.partner"},
    "crm.lead": {"partner_id": "res.partner"},
    "helpdesk.ticket": {"partner_id": "res.partner"},
    "mail.message": {"author_id": "res.partner", "parent_id": "mail.message",
                     "subtype_id": "mail.message.subtype"},
    "mail.followers": {"partner_id": "res.partner"},
    "hr.employee": {"user_id": "res.users"},
    "mail.notification": {"mail_message_id": "mail.message", "res_partner_id": "res.partner"},
    "mail.alias": {"alias_domain_id": "mail.alias.domain", "alias_model_id": "ir.model",
                   "alias_parent_model_id": "ir.model"},
}

MODELS = ("res.partner", "res.users", "crm.lead", "helpdesk.ticket", "mail.message", "mail.followers",
          "mail.notification", "ir.attachment", "mail.alias", "mail.alias.domain", "ir.model",
          "mail.message.subtype", "mail.thread", "hr.employee")  # hr.employee: the hr module (delete it to go without)
#: models that are mail.thread (message_* methods) and mail.thread.blacklist (message_bounce)
THREAD_MODELS = ("res.partner", "crm.lead", "helpdesk.ticket")
BLACKLIST_MODELS = ("res.partner", "crm.lead")
#: the field that holds the sender address on creation (Odoo's _primary_email)
PRIMARY_EMAIL = {"res.partner": "email", "crm.lead": "email_from", "helpdesk.ticket": "partner_email"}
#: models whose message_new names a subjectless record "No Subject" (Odoo 17 crm, helpdesk)
NO_SUBJECT_MODELS = ("crm.lead", "helpdesk.ticket")
CREATION_SUBTYPE = {"crm.lead": "crm.mt_lead_create", "helpdesk.ticket": "helpdesk.mt_ticket_new"}
SUBTYPES = {"mail.mt_comment": (1, "Discussions", False), "mail.mt_note": (2, "Note", True),
            "crm.mt_lead_create": (3, "Lead Created", False), "helpdesk.mt_ticket_new": (4, "Ticket Created", False)}

#: the fields each served model has in Odoo 17 (those that matter here; checked against odoo/odoo 17.0's model
#: definitions). Unknown names raise ValueError as Odoo's ORM does: in read/search_read `fields`, create/write
#: values and domain leaves. `fields_for(model, major)` applies the differences between versions.
MAGIC_FIELDS = ("id", "display_name", "create_date", "create_uid", "write_date", "write_uid")
_THREAD_FIELDS = ("message_ids", "message_follower_ids", "message_partner_ids", "message_is_follower",
                  "has_message", "message_attachment_count", "message_has_error", "message_main_attachment_id")
_PARTNER_FIELDS = (
    "name", "email", "email_normalized", "email_formatted", "phone", "mobile", "user_ids", "user_id", "is_company",
    "company_type", "parent_id", "child_ids", "commercial_partner_id", "company_id", "company_name", "type",
    "street", "street2", "city", "zip", "state_id", "country_id", "lang", "tz", "ref", "vat", "website",
    "comment", "function", "title", "category_id", "active", "employee", "color", "image_1920",
    "message_bounce", "is_blacklisted")
FIELDS: dict[str, tuple[str, ...]] = {
    "res.partner": _PARTNER_FIELDS + _THREAD_FIELDS,
    # _inherits res.partner: every partner field reads through partner_id
    "res.users": _PARTNER_FIELDS + _THREAD_FIELDS + (
        "login", "password", "partner_id", "share", "groups_id", "company_ids", "signature", "notification_type",
        "login_date"),
    "crm.lead": _THREAD_FIELDS + (
        "name", "type", "email_from", "email_normalized", "email_cc", "partner_id", "partner_name", "contact_name",
        "phone", "mobile", "description", "team_id", "user_id", "stage_id", "company_id", "tag_ids", "priority",
        "probability", "expected_revenue", "date_deadline", "referred", "website", "street", "city", "country_id",
        "lang_id", "function", "title", "active", "message_bounce", "is_blacklisted", "medium_id", "source_id",
        "campaign_id", "lost_reason_id"),
    # enterprise (helpdesk): what the double already had
    "helpdesk.ticket": _THREAD_FIELDS + (
        "name", "partner_email", "partner_id", "partner_name", "team_id", "description", "user_id", "stage_id",
        "ticket_type_id", "tag_ids", "priority", "company_id", "email_cc", "active"),
    "mail.message": (
        "subject", "date", "body", "preview", "attachment_ids", "parent_id", "child_ids", "model", "res_id",
        "record_name", "message_type", "subtype_id", "mail_activity_type_id", "is_internal", "email_from",
        "author_id", "author_avatar", "author_guest_id", "partner_ids", "notification_ids", "needaction",
        "starred", "starred_partner_ids", "tracking_value_ids", "message_id", "reply_to", "reply_to_force_new",
        "mail_server_id", "email_layout_xmlid", "email_add_signature", "record_company_id", "reaction_ids",
        "has_error"),
    "mail.followers": ("res_model", "res_id", "partner_id", "subtype_ids", "name", "email", "is_active"),
    "mail.notification": ("author_id", "mail_message_id", "mail_mail_id", "res_partner_id", "notification_type",
                          "notification_status", "is_read", "read_date", "failure_type", "failure_reason"),
    "ir.attachment": ("name", "description", "res_name", "res_model", "res_field", "res_id", "company_id", "type",
                      "url", "public", "access_token", "raw", "datas", "db_datas", "store_fname", "file_size",
                      "checksum", "mimetype", "index_content", "original_id", "local_url"),
    "mail.alias": ("alias_name", "alias_full_name", "alias_domain_id", "alias_domain", "alias_model_id",
                   "alias_defaults", "alias_force_thread_id", "alias_parent_model_id", "alias_parent_thread_id",
                   "alias_contact", "alias_incoming_local", "alias_bounced_content", "alias_status"),
    "mail.alias.domain": ("name", "company_ids", "sequence", "bounce_alias", "bounce_email", "catchall_alias",
                          "catchall_email", "default_from", "default_from_email"),
    "ir.model": ("name", "model", "order", "info", "field_id", "inherited_model_ids", "state", "access_ids",
                 "rule_ids", "transient", "modules", "view_ids", "count", "is_mail_thread", "is_mail_activity",
                 "is_mail_blacklist"),
    "mail.message.subtype": ("name", "description", "internal", "parent_id", "relation_field", "res_model",
                             "default", "sequence", "hidden", "track_recipients"),
    "mail.thread": _THREAD_FIELDS,
    "hr.employee": ("name", "active", "user_id", "work_email", "work_contact_id", "work_phone", "mobile_phone",
                    "private_email", "department_id", "job_id", "job_title", "company_id", "parent_id", "coach_id",
                    "resource_id", "employee_type"),
}


def fields_for(model: str, major: int) -> frozenset[str]:
    """The model's field names on this major version (the `major` switch: 17 is the reference)."""
    names = set(FIELDS.get(model, ())) | set(MAGIC_FIELDS)
    if major >= 19 and model == "res.users":
        names = (names - {"groups_id"}) | {"group_ids"}            # renamed in Odoo 19
    if major < 17 and model == "mail.alias":                       # alias domains are new in 17
        names -= {"alias_domain_id", "alias_full_name", "alias_incoming_local", "alias_status"}
        names |= {"alias_user_id"}
    return frozenset(names)


_ANGLE_TOKEN = re.compile(r"<[^<>]+>")


def normalize_email(value: str | None) -> str | None:
    if not value:
        return None
    addr = email.utils.parseaddr(str(value))[1]
    return addr.lower() or None


def _addresses(values: list[str]) -> list[str]:
    return [a.lower() for _n, a in email.utils.getaddresses([str(v) for v in values if v]) if a]


# ---------------------------------------------------------------------------------------- the store
def _like_regex(pattern: str) -> str:
    """A SQL LIKE pattern (backslash escape) as a regular expression."""
    out, chars = [], iter(pattern)
    for ch in chars:
        if ch == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


class Store:
    """In-memory models with Odoo's search domains (prefix notation) and read shapes."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in MODELS}
        self._seq = itertools.count(1)

    # -- writes
    def create(self, model: str, vals: dict[str, Any]) -> int:
        rid = next(self._seq)
        rec = {"id": rid, "active": True, "create_date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        rec.update(vals)
        self._compute(model, rec)
        self.tables[model][rid] = rec
        return rid

    def write(self, model: str, ids: list[int], vals: dict[str, Any]) -> None:
        for rid in ids:
            rec = self.tables[model].get(rid)
            if rec is None:
                raise MissingError(f"Record does not exist or has been deleted.\n(Record: {model}({rid},), User: 2)")
            rec.update(vals)
            self._compute(model, rec)

    def _compute(self, model: str, rec: dict[str, Any]) -> None:
        email_field = {"res.partner": "email", "crm.lead": "email_from", "res.users": "email"}.get(model)
        if email_field:
            rec["email_normalized"] = normalize_email(rec.get(email_field)) or False
        if model in ("res.partner", "res.users"):  # tools.formataddr: the name always quoted
            rec["email_formatted"] = f'"{rec.get("name") or "False"}" <{rec["email"]}>' if rec.get("email") else False
        if model == "mail.alias":
            dom = self.tables["mail.alias.domain"].get(rec.get("alias_domain_id") or 0)
            rec["alias_full_name"] = f"{rec['alias_name']}@{dom['name']}" if dom else rec["alias_name"]
            rec["alias_domain"] = dom["name"] if dom else False
        if model == "mail.alias.domain":
            rec["bounce_email"] = f"{rec.get('bounce_alias', 'bounce')}@{rec['name']}"
            rec["catchall_email"] = f"{rec.get('catchall_alias', 'catchall')}@{rec['name']}"
        if model in BLACKLIST_MODELS:
            rec.setdefault("message_bounce", 0)

    # -- Odoo's checks of field names (the RPC methods run them; the double's own bookkeeping does not)
    def check_fields(self, model: str, names: Any, major: int) -> None:
        """read/search_read `fields`, create/write values: models.py raises ValueError for a name the model
        lacks (check_field_access_rights on read, _create/write on values)."""
        known = fields_for(model, major)
        for name in names or ():
            if name not in known:
                raise OdooDoubleError(f"Invalid field {name!r} on model {model!r}", name="builtins.ValueError")

    def check_domain(self, model: str, domain: Any, major: int) -> None:
        """osv/expression.py: a leaf on an unknown field raises ValueError; a path is checked model by model
        (its first parts must be many2one fields the double can follow)."""
        for leaf in domain or ():
            if not isinstance(leaf, (list, tuple)) or len(leaf) != 3 or leaf[0] in (0, 1):
                continue
            current = model
            parts = str(leaf[0]).split(".")
            for i, part in enumerate(parts):
                if part not in fields_for(current, major):
                    raise OdooDoubleError(f"Invalid field {current}.{part} in leaf {tuple(leaf)!s}",
                                          name="builtins.ValueError")
                if i < len(parts) - 1:
                    nxt = M2O.get(current, {}).get(part)
                    if nxt is None:
                        raise OdooDoubleError(f"the Odoo double follows only many2one paths: {current}.{part} "
                                              f"in {tuple(leaf)!s}", name="builtins.NotImplementedError")
                    current = nxt

    def check_order(self, model: str, order: str | None, major: int) -> None:
        """models.py _order_to_sql: an unknown field in `order` raises ValueError too."""
        for part in (order or "").split(","):
            if part.strip():
                self.check_fields(model, [part.split()[0]], major)

    # -- reads
    def get(self, model: str, rid: int) -> dict[str, Any] | None:
        return self.tables.get(model, {}).get(rid)

    def search(self, model: str, domain: list[Any], *, order: str | None = None, limit: int | None = None,
               offset: int = 0) -> list[int]:
        recs = [r for r in self.tables[model].values() if self.match(model, r, domain)]
        if order:
            for part in reversed([p.strip() for p in order.split(",") if p.strip()]):
                fname, *direction = part.split()
                desc = bool(direction) and direction[0].lower() == "desc"
                recs.sort(key=lambda r: (r.get(fname) is None, r.get(fname) or 0), reverse=desc)
        else:
            recs.sort(key=lambda r: r["id"])
        recs = recs[offset:]
        if limit:
            recs = recs[:limit]
        return [r["id"] for r in recs]

    def match(self, model: str, rec: dict[str, Any], domain: list[Any]) -> bool:
        if not any(isinstance(t, (list, tuple)) and len(t) == 3 and t[0] == "active" for t in domain):
            if rec.get("active") is False:
                return False
        stack: list[bool] = []
        for token in reversed(list(domain)):
            if token == "!":
                stack.append(not stack.pop())
            elif token in ("&", "|"):
                a, b = stack.pop(), stack.pop()
                stack.append((a and b) if token == "&" else (a or b))
            elif isinstance(token, (list, tuple)) and len(token) == 3:
                stack.append(self._leaf(model, rec, token))
            else:
                raise ValueError(f"Invalid leaf {token!r}")
        return all(stack)

    def _leaf(self, model: str, rec: dict[str, Any], leaf: Any) -> bool:
        fname, op, value = leaf
        if fname in (1, 0) and fname == value:  # TRUE_LEAF / FALSE_LEAF
            return op == "=" and fname == 1
        if isinstance(fname, str) and "." in fname:
            # a many2one path: the leaf on the linked record (Odoo's subquery); an empty link matches nothing
            head, rest = fname.split(".", 1)
            comodel = M2O.get(model, {}).get(head)
            if comodel is None:
                raise OdooDoubleError(f"the Odoo double follows only many2one paths: {model}.{head} in {leaf!r}",
                                      name="builtins.NotImplementedError")
            target = self.tables[comodel].get(rec.get(head) or 0)
            return target is not None and self._leaf(comodel, target, (rest, op, value))
        have = rec.get(fname, False)
        if op == "=":
            if isinstance(have, list):
                return value in have or (value is False and not have)
            return have == value or (value is False and have in (None, False, 0, ""))
        if op == "!=":
            return not self._leaf(model, rec, (fname, "=", value))
        if op in ("in", "not in"):
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if isinstance(have, list):
                hit = any(v in have for v in values)
            else:
                hit = have in values or (False in values and have in (None, False))
            return hit if op == "in" else not hit
        if op in ("ilike", "not ilike", "like", "not like", "=ilike", "=like"):
            # SQL LIKE, as Odoo runs it: `%` and `_` are wildcards, backslash escapes; (not) (i)like wrap the
            # value in `%…%` without escaping it (odoo/osv/expression.py __leaf_to_sql)
            pattern = str(value) if op.startswith("=") else f"%{value}%"
            flags = re.S | (re.I if "ilike" in op else 0)
            hit = re.fullmatch(_like_regex(pattern), str(have or ""), flags) is not None
            return not hit if op.startswith("not") else hit
        if op in (">", "<", ">=", "<="):
            if have in (None, False):
                return False
            return {">": have > value, "<": have < value, ">=": have >= value, "<=": have <= value}[op]
        raise ValueError(f"Invalid operator {op!r}")

    def read(self, model: str, ids: list[int], fields: list[str] | None) -> list[dict[str, Any]]:
        out = []
        for rid in ids:
            rec = self.tables[model].get(rid)
            if rec is None:
                raise MissingError(f"Record does not exist or has been deleted.\n(Record: {model}({rid},), User: 2)")
            out.append(self._shape(model, rec, fields))
        return out

    def _shape(self, model: str, rec: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
        names = fields or [k for k in rec if k != "datas_raw"]
        row: dict[str, Any] = {"id": rec["id"]}
        m2o = M2O.get(model, {})
        for f in names:
            value = rec.get(f, False)
            if f == "display_name":  # computed: mail.alias shows its address, the others their name
                value = rec.get("alias_full_name") if model == "mail.alias" else self.display_name(model, rec)
            if model == "res.partner" and f == "user_ids":  # one2many, computed from res.users
                value = [u["id"] for u in self.tables["res.users"].values() if u.get("partner_id") == rec["id"]]
            if f in m2o:
                target = self.tables[m2o[f]].get(value) if value else None
                value = [value, self.display_name(m2o[f], target)] if target else False
            row[f] = value
        return row

    @staticmethod
    def display_name(model: str, rec: dict[str, Any] | None) -> str:
        if not rec:
            return ""
        return str(rec.get("name") or rec.get("subject") or rec.get("model") or f"{model},{rec['id']}")


# ------------------------------------------------------------------------------------------- faults
@dataclass
class Faults:
    delay: float = 0.0
    next_failures: list[tuple[str, str | None]] = field(default_factory=list)  # (kind, method or None)
    nth: dict[int, str] = field(default_factory=dict)   # absolute call number → kind
    one_in: int = 0
    one_in_kind: str = "http500"


FAULT_KINDS = ("http500", "serialization", "drop", "lost_response")


# ------------------------------------------------------------------------------------------- double
class OdooDouble:
    """An Odoo double: in-memory models + Odoo's RPC endpoints + fault injection. Not Odoo."""

    def __init__(self, *, version: str = "17.0", db: str = "mailgate", login: str = "admin",
                 password: str = "admin", api_key: str = "double-api-key", domain: str = "example.test"):
        self.version = version
        self.major = int(version.split(".")[0].split("~")[-1].replace("saas", "") or 0)
        self.db, self.login, self.password, self.api_key = db, login, password, api_key
        self.store = Store()
        self.lock = threading.RLock()
        self.faults = Faults()
        self.calls: list[tuple[str, str]] = []   # (model, method) of every object call, in order
        self.call_count = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.down = False
        self._fault_rng = random.Random(0)
        self._seed(domain)

    # -------------------------------------------------------------------------------- lifecycle
    def start(self) -> "OdooDouble":
        self._serve(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "OdooDouble":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _serve(self, port: int) -> None:
        double = self

        class Handler(_Handler):
            pass

        Handler.double = double
        server = _QuietServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"odoo-double-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def go_down(self) -> None:
        """Stop listening: clients now get 'connection refused' (like Odoo stopped); kept-alive connections
        are cut at their next request."""
        self.down = True
        self.stop()

    def come_up(self) -> None:
        """Listen again on the same port (state kept, like Odoo restarted on the same database)."""
        for _ in range(50):
            try:
                self._serve(self.port)
                self.down = False
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"odoo double cannot rebind port {self.port}")

    # ------------------------------------------------------------------------------------ faults
    def slow(self, seconds: float) -> None:
        self.faults.delay = seconds

    def fail_next(self, count: int = 1, kind: str = "http500", method: str | None = None) -> None:
        """The next `count` object calls (of `method`, when given) fail with `kind`."""
        assert kind in FAULT_KINDS, kind
        with self.lock:
            self.faults.next_failures.extend([(kind, method)] * count)

    def fail_nth(self, n: int, kind: str = "http500") -> None:
        """The n-th object call from now fails (1 = the next one)."""
        assert kind in FAULT_KINDS, kind
        with self.lock:
            self.faults.nth[self.call_count + n] = kind

    def fail_one_in(self, n: int, kind: str = "http500", *, seed: int = 0) -> None:
        """Each object call fails with probability 1/n (0 turns it off). Random, not periodic — a periodic
        fault would always hit the same step of a retried sequence of calls, which real faults do not —
        but seeded, so a failing test run can be replayed."""
        with self.lock:
            self.faults.one_in, self.faults.one_in_kind = n, kind
            self._fault_rng = random.Random(seed)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults = Faults()

    def _fault_for(self, method: str) -> str | None:
        with self.lock:
            self.call_count += 1
            n = self.call_count
            kind = self.faults.nth.pop(n, None)
            if kind:
                return kind
            for i, (k, m) in enumerate(self.faults.next_failures):
                if m is None or m == method:
                    del self.faults.next_failures[i]
                    return k
            if self.faults.one_in and self._fault_rng.random() < 1.0 / self.faults.one_in:
                return self.faults.one_in_kind
        return None

    # -------------------------------------------------------------------------------------- seed
    def _seed(self, domain: str) -> None:
        s = self.store
        for model in MODELS:
            s.create("ir.model", {"model": model, "name": model})
        for xmlid, (_sid, name, internal) in SUBTYPES.items():
            s.tables["mail.message.subtype"][_sid] = {"id": _sid, "name": name, "internal": internal,
                                                      "xmlid": xmlid, "active": True}
        self.domain_id = s.create("mail.alias.domain", {"name": domain, "bounce_alias": "bounce",
                                                        "catchall_alias": "catchall"})
        self.admin_partner = s.create("res.partner", {"name": "Mitchell Admin", "email": f"admin@{domain}"})
        self.uid = s.create("res.users", {"login": self.login, "name": "Mitchell Admin",
                                          "partner_id": self.admin_partner, "email": f"admin@{domain}",
                                          "share": False, "groups": ["base.group_system"]})
        self.add_alias("sales", "crm.lead", defaults={"type": "lead"})
        self.add_alias("support", "helpdesk.ticket")

    def add_alias(self, name: str, model: str, *, defaults: dict[str, Any] | None = None,
                  force_thread_id: int = 0, contact: str = "everyone") -> int:
        model_id = self.store.search("ir.model", [("model", "=", model)])[0]
        return self.store.create("mail.alias", {
            "alias_name": name, "alias_domain_id": self.domain_id, "alias_model_id": model_id,
            "alias_defaults": repr(defaults or {}), "alias_force_thread_id": force_thread_id,
            "alias_contact": contact, "alias_incoming_local": False, "alias_status": "not_tested",
        })

    def add_partner(self, name: str, email_addr: str) -> int:
        with self.lock:
            return self.store.create("res.partner", {"name": name, "email": email_addr})

    def add_user(self, name: str, email_addr: str, login: str | None = None) -> int:
        with self.lock:
            pid = self.store.create("res.partner", {"name": name, "email": email_addr})
            return self.store.create("res.users", {"login": login or email_addr, "name": name,
                                                   "partner_id": pid, "email": email_addr, "share": False})

    # ----------------------------------------------------------------------------- inspection
    def records(self, model: str, domain: list[Any] | None = None) -> list[dict[str, Any]]:
        with self.lock:
            ids = self.store.search(model, domain or [])
            return [dict(self.store.tables[model][i]) for i in ids]

    def messages_on(self, model: str, res_id: int) -> list[dict[str, Any]]:
        return self.records("mail.message", [("model", "=", model), ("res_id", "=", res_id)])

    # ----------------------------------------------------------------------------- dispatch
    def authenticate(self, db: str, login: str, secret: str) -> int | bool:
        if db != self.db:
            return False
        if login == self.login and secret in (self.password, self.api_key):
            return self.uid
        return False

    def execute(self, model: str, method: str, ids: list[int] | None, params: dict[str, Any]) -> Any:
        """Run one object method as the RPC user (the shared core of both transports)."""
        if method.startswith("_") or method == "init" or (self.major >= 19 and method in ("browse", "exists")):
            raise AccessError(f"Private methods (such as '{model}.{method}') cannot be called remotely.")
        if model not in self.store.tables or (model == "mail.alias.domain" and self.major < 17):
            raise UserError(f"Object {model} doesn't exist", status=404)
        fn: Callable[..., Any] | None = getattr(self, "m_" + method, None)
        if fn is None or (method.startswith("message_") and method not in ("message_process",)
                          and model not in THREAD_MODELS):
            raise OdooDoubleError(f"The method '{method}' does not exist on the model '{model}'",
                                  name="builtins.AttributeError", status=404)
        context = params.pop("context", None) or {}
        with self.lock:
            self.calls.append((model, method))
            try:
                if ids is not None:
                    return fn(model, list(ids), context=context, **params)
                return fn(model, context=context, **params)
            except TypeError as exc:
                raise OdooDoubleError(str(exc), name="builtins.TypeError", status=422) from None

    # ------------------------------------------------------------------------------ ORM methods
    def m_search(self, model: str, domain: list[Any] | None = None, offset: int = 0, limit: int | None = None,
                 order: str | None = None, *, context: dict[str, Any]) -> list[int]:
        self.store.check_domain(model, domain, self.major)
        self.store.check_order(model, order, self.major)
        return self.store.search(model, domain or [], order=order, limit=limit, offset=offset)

    def m_search_count(self, model: str, domain: list[Any] | None = None, limit: int | None = None, *,
                       context: dict[str, Any]) -> int:
        self.store.check_domain(model, domain, self.major)
        return len(self.store.search(model, domain or [], limit=limit))

    def m_search_read(self, model: str, domain: list[Any] | None = None, fields: list[str] | None = None,
                      offset: int = 0, limit: int | None = None, order: str | None = None, *,
                      context: dict[str, Any]) -> list[dict[str, Any]]:
        self.store.check_fields(model, fields, self.major)
        self.store.check_domain(model, domain, self.major)
        self.store.check_order(model, order, self.major)
        ids = self.store.search(model, domain or [], order=order, limit=limit, offset=offset)
        return self.store.read(model, ids, fields)

    def m_read(self, model: str, ids: list[int], fields: list[str] | None = None, *,
               context: dict[str, Any]) -> list[dict[str, Any]]:
        self.store.check_fields(model, fields, self.major)
        return self.store.read(model, ids, fields)

    def m_create(self, model: str, vals_list: Any = None, *, context: dict[str, Any]) -> Any:
        if model == "mail.notification":
            raise AccessError("You are not allowed to create 'Message Notifications' (mail.notification) records.")
        many = isinstance(vals_list, list)
        ids = [self._create_checked(model, dict(v)) for v in (vals_list if many else [vals_list])]
        if many or self.major >= 19:
            return ids
        return ids[0]

    def _create_checked(self, model: str, vals: dict[str, Any]) -> int:
        self.store.check_fields(model, vals, self.major)
        if model == "ir.attachment":
            if "datas" in vals:
                try:
                    vals["datas_raw"] = base64.b64decode(vals["datas"], validate=True)
                except ValueError:
                    raise ValidationError("Invalid base64 in ir.attachment datas") from None
            vals.setdefault("mimetype", "application/octet-stream")
        if model in ("res.partner", "crm.lead", "helpdesk.ticket") and not vals.get("name"):
            raise ValidationError(f"Missing required value for the field 'name' on {model}")
        return self.store.create(model, vals)

    def m_generate_access_token(self, model: str, ids: list[int], *, context: dict[str, Any]) -> list[str]:
        """ir.attachment.generate_access_token: a uuid4 per attachment, kept once made; the tokens in order."""
        if model != "ir.attachment":
            raise OdooDoubleError(f"The method 'generate_access_token' does not exist on the model '{model}'",
                                  name="builtins.AttributeError", status=404)
        tokens = []
        for aid in ids:
            att = self.store.get("ir.attachment", aid)
            if att is None:
                raise MissingError(f"Record does not exist or has been deleted. (Record: ir.attachment({aid},))")
            if not att.get("access_token"):
                att["access_token"] = str(uuid.uuid4())
            tokens.append(att["access_token"])
        return tokens

    def m_write(self, model: str, ids: list[int], vals: dict[str, Any] | None = None, *,
                context: dict[str, Any]) -> bool:
        if model == "mail.notification":
            # A record rule limits writes to the user's own rows: refused even to admin (spec §6).
            raise AccessError("Due to security restrictions, you are not allowed to modify "
                              "'Message Notifications' (mail.notification) records.")
        self.store.check_fields(model, vals, self.major)
        self.store.write(model, ids, dict(vals or {}))
        return True

    def m_has_group(self, model: str, ids: list[int], group_ext_id: str = "", *,
                    context: dict[str, Any]) -> bool:
        user = self.store.get("res.users", ids[0]) if ids else None
        if user is None:
            raise MissingError("Record does not exist or has been deleted.")
        return group_ext_id in (user.get("groups") or [])

    def m_context_get(self, model: str, *, context: dict[str, Any]) -> dict[str, Any]:
        return {"lang": "en_US", "tz": "Europe/Brussels", "uid": self.uid}

    # ----------------------------------------------------------------------------- mail.thread
    def _returns_record(self, model: str, rid: int, *, int_before_19: bool) -> Any:
        if self.major >= 19:
            return [rid]
        return rid if int_before_19 else repr(Recordset(model, (rid,)))

    def m_message_new(self, model: str, msg_dict: dict[str, Any] | None = None,
                      custom_values: dict[str, Any] | None = None, *, context: dict[str, Any]) -> Any:
        rid = self._message_new(model, dict(msg_dict or {}), dict(custom_values or {}), context)
        return self._returns_record(model, rid, int_before_19=False)

    def _message_new(self, model: str, msg: dict[str, Any], custom: dict[str, Any],
                     context: dict[str, Any]) -> int:
        vals = dict(custom)
        # crm.lead's and helpdesk.ticket's message_new: `subject or _("No Subject")`; the base method: the
        # subject as it is, an empty one included
        vals.setdefault("name", msg.get("subject") or ("No Subject" if model in NO_SUBJECT_MODELS else ""))
        email_field = PRIMARY_EMAIL.get(model)
        if email_field and email_field not in vals:
            vals[email_field] = msg.get("email_from") or msg.get("from") or False
        if model in ("crm.lead", "helpdesk.ticket") and msg.get("author_id"):
            vals.setdefault("partner_id", msg["author_id"])
        rid = self._create_checked(model, vals)
        if not context.get("mail_create_nosubscribe"):
            self._subscribe(model, rid, [self.admin_partner])
        if not context.get("mail_create_nolog"):
            self._post(model, rid, body="<p>Record created</p>", message_type="notification",
                       subtype_xmlid=CREATION_SUBTYPE.get(model, "mail.mt_note"), author_id=self.admin_partner,
                       message_id=self._new_message_id(model, rid), notify=False)
        return rid

    def m_message_update(self, model: str, ids: list[int], msg_dict: dict[str, Any] | None = None,
                         update_vals: dict[str, Any] | None = None, *, context: dict[str, Any]) -> bool:
        for rid in ids:
            if not self.store.get(model, rid):
                raise MissingError(f"Record does not exist or has been deleted. (Record: {model}({rid},))")
        if update_vals:
            self.store.check_fields(model, update_vals, self.major)
            self.store.write(model, ids, dict(update_vals))
        return True

    def m_message_subscribe(self, model: str, ids: list[int], partner_ids: list[int] | None = None,
                            subtype_ids: list[int] | None = None, *, context: dict[str, Any]) -> bool:
        for rid in ids:
            self._subscribe(model, rid, list(partner_ids or []))
        return True

    def _subscribe(self, model: str, rid: int, partner_ids: list[int]) -> None:
        for pid in partner_ids:
            if not self.store.search("mail.followers", [("res_model", "=", model), ("res_id", "=", rid),
                                                        ("partner_id", "=", pid)]):
                self.store.create("mail.followers", {"res_model": model, "res_id": rid, "partner_id": pid})

    def m_message_post(self, model: str, ids: list[int], *, context: dict[str, Any], body: str = "",
                       subject: str | None = None, message_type: str = "notification",
                       subtype_xmlid: str | None = None, subtype_id: int | None = None,
                       email_from: str | None = None, author_id: int | None = None,
                       message_id: str | None = None, date: str | None = None, parent_id: int | None = None,
                       attachment_ids: list[int] | None = None, partner_ids: list[int] | None = None,
                       attachments: list[Any] | None = None, body_is_html: bool = False,
                       is_internal: bool | None = None, notify_author: bool = False, **_ignored: Any) -> Any:
        if len(ids) != 1:
            raise ValueError("Expected singleton")
        rid = ids[0]
        if not self.store.get(model, rid):
            raise MissingError(f"Record does not exist or has been deleted. (Record: {model}({rid},))")
        if not body_is_html:
            body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        body = re.sub(r"(?is)<script.*?</script>", "", body)
        if not context.get("mail_create_nosubscribe"):
            self._subscribe(model, rid, [self.admin_partner])
        att_ids = list(attachment_ids or [])
        for item in attachments or []:  # the 3-element latin-1 tuple that survives JSON (spec §6)
            name, content = item[0], item[1]
            info = item[2] if len(item) > 2 else {}
            raw = content.encode(info.get("encoding", "utf-8")) if isinstance(content, str) else bytes(content)
            att_ids.append(self.store.create("ir.attachment", {
                "name": name, "datas": base64.b64encode(raw).decode(), "datas_raw": raw,
                "mimetype": "application/octet-stream", "res_model": model, "res_id": rid}))
        author_id, email_from = self._message_compute_author(author_id, email_from)
        mid = self._post(model, rid, body=body, subject=subject, message_type=message_type,
                         subtype_xmlid=subtype_xmlid, subtype_id=subtype_id, email_from=email_from,
                         author_id=author_id, message_id=message_id, date=date,
                         parent_id=parent_id, attachment_ids=att_ids, partner_ids=partner_ids,
                         is_internal=is_internal,
                         # Odoo 17 skips the *acting user's* partner (the RPC user, active), not the author,
                         # so a following customer gets a copy of their own mail; 18+ skip the real author.
                         skip_partner=(0 if notify_author else
                                       self.admin_partner if self.major < 18 else (author_id or 0)))
        return self._returns_record("mail.message", mid, int_before_19=True)

    def _message_compute_author(self, author_id: int | None, email_from: str | None) -> tuple[int | bool, str | bool]:
        """mail_thread.py (17) `_message_compute_author(author_id, email_from, raise_on_email=True)`: no author_id
        → the partner found for email_from (`_mail_find_partner_from_emails`, records=None: users, then partners;
        none is created) or empty; neither → the current user's partner and its email_formatted. An author
        without email_from → the author's email_formatted; no email_from at all → UserError (not superuser)."""
        if author_id is None:
            if email_from:
                author_id = self._find_author(None, None, normalize_email(email_from) or "") or False
            else:
                author_id = self.admin_partner
                email_from = self._email_formatted(author_id)
        if email_from is None and author_id:
            email_from = self._email_formatted(author_id)
        if not email_from:
            raise UserError("Unable to send message, please configure the sender's email address.")
        return author_id, email_from

    def _email_formatted(self, partner_id: int) -> str | bool:
        """res.partner.email_formatted: tools.formataddr((name or "False", email)), quoted name; False without email."""
        partner = self.store.get("res.partner", partner_id) or {}
        if not partner.get("email"):
            return False
        return f'"{partner.get("name") or "False"}" <{partner["email"]}>'

    def _new_message_id(self, model: str, rid: int) -> str:
        return f"<{random.randint(10**14, 10**15 - 1)}.{time.time():.15f}-openerp-{rid}-{model}@double>"

    def _post(self, model: str, rid: int, *, body: str, message_type: str, author_id: int | None,
              message_id: str | None, subject: str | None = None, subtype_xmlid: str | None = None,
              subtype_id: int | None = None, email_from: str | None = None, date: str | None = None,
              parent_id: int | None = None, attachment_ids: list[int] | None = None,
              partner_ids: list[int] | None = None, is_internal: bool | None = None,
              notify: bool = True, skip_partner: int | None = None) -> int:
        if subtype_id is None:
            subtype_id = SUBTYPES.get(subtype_xmlid or "mail.mt_note", SUBTYPES["mail.mt_note"])[0]
        internal = self.store.tables["mail.message.subtype"][subtype_id]["internal"]
        for aid in attachment_ids or []:
            att = self.store.get("ir.attachment", aid)
            if att is None:
                raise MissingError(f"Record does not exist or has been deleted. (Record: ir.attachment({aid},))")
            att.update(res_model=model, res_id=rid)
        mid = self.store.create("mail.message", {
            "model": model, "res_id": rid, "body": body, "subject": subject or False,
            "message_type": message_type, "subtype_id": subtype_id, "email_from": email_from or False,
            "author_id": author_id or False, "message_id": message_id or self._new_message_id(model, rid),
            "date": date or time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "parent_id": parent_id or False,
            "attachment_ids": list(attachment_ids or []), "partner_ids": list(partner_ids or []),
            "is_internal": bool(is_internal) if is_internal is not None else internal,
        })
        if notify:
            followers = self.store.search("mail.followers", [("res_model", "=", model), ("res_id", "=", rid)])
            for fid in followers:
                pid = self.store.tables["mail.followers"][fid]["partner_id"]
                if pid == (author_id if skip_partner is None else skip_partner):
                    continue
                self.store.create("mail.notification", {"mail_message_id": mid, "res_partner_id": pid,
                                                        "notification_type": "email",
                                                        "notification_status": "sent"})
        return mid

    # --------------------------------------------------------------------------- message_process
    def m_message_process(self, model_name: str, *, context: dict[str, Any], model: Any = None,
                          message: Any = None, custom_values: dict[str, Any] | None = None,
                          save_original: bool = False, strip_attachments: bool = False,
                          thread_id: int | None = None) -> Any:
        if isinstance(message, dict) and "__binary__" in message:
            raw = base64.b64decode(message["__binary__"])
        elif isinstance(message, str):
            raw = message.encode("utf-8")
        elif isinstance(message, (bytes, bytearray)):
            raw = bytes(message)
        else:
            raise OdooDoubleError("message_process() missing required argument: 'message'",
                                  name="builtins.TypeError", status=422)
        return self._message_process(model or False, raw, dict(custom_values or {}), thread_id)

    def _message_process(self, fallback_model: str | bool, raw: bytes, custom_values: dict[str, Any],
                         thread_id: int | None) -> int | bool | None:
        msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
        message_id = (msg.get("Message-Id") or "").strip() or f"<{time.time()}@localhost>"
        if self.store.search("mail.message", [("message_id", "=", message_id)]):
            return False                                                       # 1. duplicate
        refs_raw = str(msg.get("References") or "")
        irt_raw = str(msg.get("In-Reply-To") or "")
        if "-loop-detection-bounce-email@" in refs_raw + irt_raw:
            return None                                                        # 2. loop
        to = _addresses(msg.get_all("Delivered-To", []) + msg.get_all("To", []))
        recipients = _addresses(msg.get_all("Delivered-To", []) + msg.get_all("To", []) + msg.get_all("Cc", [])
                                + msg.get_all("Resent-To", []) + msg.get_all("Resent-Cc", []))
        domains = list(self.store.tables["mail.alias.domain"].values())
        from_addr = normalize_email(str(msg.get("From") or "")) or ""
        ctype = str(msg.get("Content-Type") or "").lower()
        if any(a in {d["bounce_email"] for d in domains} for a in to) \
                or from_addr.split("@")[0] == "mailer-daemon" \
                or msg.get_content_type() == "multipart/report" or "report-type=delivery-status" in ctype:
            self._handle_bounce(msg)                                           # 3. bounce
            return False
        author_email = from_addr
        email_from = str(msg.get("From") or "")
        ids = [re.sub(r"\s+", "", t) for t in _ANGLE_TOKEN.findall(refs_raw.strip() or irt_raw)]
        ids = [i for i in ids if "reply_to" not in i]
        parent = None
        if ids:
            hit = self.store.search("mail.message", [("message_id", "in", ids)], order="id desc", limit=1)
            parent = self.store.get("mail.message", hit[0]) if hit else None
        all_aliases = list(self.store.tables["mail.alias"].values())
        forward = []  # an alias of another model in Delivered-To/To (never Cc) makes a reply new mail (§1.5)
        if parent and parent.get("model") and parent.get("res_id"):
            forward = [a for a in all_aliases if a["alias_full_name"].lower() in to
                       and self.store.tables["ir.model"][a["alias_model_id"]]["model"] != parent["model"]]
        if parent and parent.get("model") and parent.get("res_id") and not forward:  # 4. reply
            model, rid = parent["model"], parent["res_id"]
            if not self.store.get(model, rid):
                rid = self._message_new(model, self._msg_dict(msg, message_id, author_email), {},
                                        {"mail_create_nosubscribe": True, "mail_create_nolog": True})
            self._gateway_post(model, rid, msg, message_id, email_from, author_email,
                               parent_id=parent["id"], internal_parent=bool(parent.get("is_internal")))
            return rid
        if not forward and recipients and to and all(a in {d["catchall_email"] for d in domains} for a in to):
            return False                                                       # 5. catchall refusal
        aliases = forward or [a for a in all_aliases if a["alias_full_name"].lower() in recipients]
        last: int | bool = False
        if aliases:                                                            # 6. aliases
            for alias in aliases:
                model = self.store.tables["ir.model"][alias["alias_model_id"]]["model"]
                author = self._find_author(model, None, author_email)
                if alias["alias_contact"] == "partners" and not author:
                    continue  # refused (Odoo sends a refusal mail; the double only records nothing)
                rid = alias.get("alias_force_thread_id") or 0
                if not rid:
                    msg_dict = self._msg_dict(msg, message_id, author_email)
                    msg_dict["author_id"] = author
                    rid = self._message_new(model, msg_dict, ast.literal_eval(alias["alias_defaults"] or "{}"),
                                            {"mail_create_nosubscribe": True, "mail_create_nolog": True})
                    alias["alias_status"] = "valid"
                self._gateway_post(model, rid, msg, message_id, email_from, author_email, creation=True)
                last = rid
            return last
        if fallback_model:                                                     # 7. fallback model
            model = str(fallback_model)
            rid = thread_id or self._message_new(model, self._msg_dict(msg, message_id, author_email),
                                                 custom_values, {"mail_create_nosubscribe": True,
                                                                 "mail_create_nolog": True})
            self._gateway_post(model, rid, msg, message_id, email_from, author_email, creation=not thread_id)
            return rid
        raise OdooDoubleError(                                                 # 8. no route
            f"No possible route found for incoming message from {email_from} to {msg.get('To')} "
            f"(Message-Id {message_id}:). Create an appropriate mail.alias or force the destination model.",
            name="builtins.ValueError", status=500)

    def _msg_dict(self, msg: Message, message_id: str, author_email: str) -> dict[str, Any]:
        return {"subject": str(msg.get("Subject") or ""), "email_from": str(msg.get("From") or ""),
                "message_id": message_id, "author_id": self._find_author(None, None, author_email)}

    def _find_author(self, model: str | None, rid: int | None, email_addr: str) -> int | bool:
        """followers of the record, then users, then partners; never an alias address (spec §3.4)."""
        if not email_addr:
            return False
        if email_addr in {a["alias_full_name"].lower() for a in self.store.tables["mail.alias"].values()}:
            return False
        if model and rid:
            for fid in self.store.search("mail.followers", [("res_model", "=", model), ("res_id", "=", rid)]):
                pid = self.store.tables["mail.followers"][fid]["partner_id"]
                if self.store.tables["res.partner"].get(pid, {}).get("email_normalized") == email_addr:
                    return pid
        users = self.store.search("res.users", [("email_normalized", "=", email_addr)], limit=1)
        if users:
            return self.store.tables["res.users"][users[0]]["partner_id"]
        partners = self.store.search("res.partner", [("email_normalized", "=", email_addr)], limit=1)
        return partners[0] if partners else False

    def _gateway_post(self, model: str, rid: int, msg: Message, message_id: str, email_from: str,
                      author_email: str, *, parent_id: int | None = None, internal_parent: bool = False,
                      creation: bool = False) -> int:
        author = self._find_author(model, rid, author_email)
        body, parts = _extract_payload(msg)
        att_ids = [self.store.create("ir.attachment", {
            "name": name, "datas": base64.b64encode(data).decode(), "datas_raw": data, "mimetype": mimetype,
            "res_model": model, "res_id": rid}) for name, data, mimetype in parts]
        if creation:
            subtype = CREATION_SUBTYPE.get(model, "mail.mt_comment")
        else:
            subtype = "mail.mt_note" if internal_parent else "mail.mt_comment"
        mid = self._post(model, rid, body=body, subject=str(msg.get("Subject") or ""), message_type="email",
                         subtype_xmlid=subtype, email_from=email_from, author_id=author or False,
                         message_id=message_id, parent_id=parent_id, attachment_ids=att_ids)
        if author:
            self._subscribe(model, rid, [author])
        return mid

    def _handle_bounce(self, msg: Message) -> None:
        bounced_email = None
        original_ids: list[str] = []
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "message/delivery-status" and bounced_email is None:
                blocks = [p for p in part.get_payload()] if part.is_multipart() else []
                if len(blocks) >= 2:
                    bounced_email = normalize_email(str(blocks[1].get("Final-Recipient", "")).split(";")[-1])
            elif ctype in ("text/rfc822-headers", "message/rfc822") and not original_ids:
                if ctype == "message/rfc822" and part.is_multipart():
                    inner = part.get_payload()[0]
                else:
                    inner = email.message_from_string(part.get_payload(decode=True).decode("utf-8", "replace")
                                                      if not part.is_multipart() else "",
                                                      policy=email.policy.SMTP)
                for h in ("Message-Id", "X-Microsoft-Original-Message-ID"):
                    original_ids += _ANGLE_TOKEN.findall(str(inner.get(h) or ""))
        if not bounced_email:
            return  # Odoo only logs (spec §1.3)
        counted: set[tuple[str, int]] = set()
        partners = self.store.search("res.partner", [("email_normalized", "=", bounced_email)])
        for model in BLACKLIST_MODELS:
            for rid in self.store.search(model, [("email_normalized", "=", bounced_email)]):
                self.store.tables[model][rid]["message_bounce"] += 1
                counted.add((model, rid))
        hit = self.store.search("mail.message", [("message_id", "in", original_ids)], order="id desc", limit=1) \
            if original_ids else []
        if hit:
            orig = self.store.tables["mail.message"][hit[0]]
            key = (orig.get("model"), orig.get("res_id"))
            if key[0] in BLACKLIST_MODELS and key not in counted and self.store.get(*key):
                self.store.tables[key[0]][key[1]]["message_bounce"] += 1
            for nid in self.store.search("mail.notification", [("mail_message_id", "=", hit[0]),
                                                               ("res_partner_id", "in", partners)]):
                self.store.tables["mail.notification"][nid].update(
                    notification_status="bounce", failure_type="mail_bounce", failure_reason="bounced")

    # -------------------------------------------------------------------------------- wire shapes
    def jsonrpc_error(self, exc: OdooDoubleError) -> dict[str, Any]:
        return {"code": 200, "message": "Odoo Server Error", "data": {
            "name": exc.name, "debug": f"Traceback (most recent call last):\n  (odoo double)\n{exc.name}: {exc.message}",
            "message": exc.message, "arguments": [exc.message], "context": {}}}


def _extract_payload(msg: Message) -> tuple[str, list[tuple[str, bytes, str]]]:
    """Body (HTML wins in alternatives, text wrapped in <pre>) and attachments, like message_parse."""
    body = ""
    attachments: list[tuple[str, bytes, str]] = []
    parts = [msg] if not msg.is_multipart() else list(msg.walk())
    for part in parts:
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename or part.get_content_disposition() == "attachment" or not ctype.startswith("text/"):
            attachments.append((filename or "attachment", payload, ctype))
        elif ctype == "text/html":
            body = payload.decode(part.get_content_charset() or "utf-8", "replace")
        elif ctype == "text/plain" and not body:
            text = payload.decode(part.get_content_charset() or "utf-8", "replace")
            body = "<pre>" + text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
    return body, attachments


# ------------------------------------------------------------------------------------- HTTP handler
class _QuietServer(ThreadingHTTPServer):
    """Clients that time out or go away mid-answer are expected here (fault tests): no tracebacks."""

    daemon_threads = True
    request_queue_size = 128  # odoorpc opens a connection per call: a backlog of 5 drops SYNs under load

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


_JSON2 = re.compile(r"^/json/2/(?P<model>[\w.]+)/(?P<method>\w+)$")


class _Handler(BaseHTTPRequestHandler):
    double: OdooDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        if self.path == "/web/version":
            d = self.double
            self._send_json(200, {"version": d.version, "version_info": [d.major, 0, 0, "final", 0, ""]})
        else:
            self._send(404, b"<html><body>Not Found</body></html>", "text/html")

    def do_POST(self) -> None:
        d = self.double
        body = self._read_body()
        if d.down:
            self._drop()
            return
        if d.faults.delay:
            time.sleep(d.faults.delay)
        if self.path == "/web/webclient/version_info":
            req = json.loads(body or b"{}")
            self._send_json(200, {"jsonrpc": "2.0", "id": req.get("id"), "result": {
                "server_version": d.version, "server_version_info": [d.major, 0, 0, "final", 0, ""],
                "server_serie": d.version, "protocol_version": 1}})
        elif self.path == "/jsonrpc":
            self._jsonrpc(body)
        elif (m := _JSON2.match(self.path)) and d.major >= 19:
            self._json2(m.group("model"), m.group("method"), body)
        else:
            self._send(404, b"<html><body>Not Found</body></html>", "text/html")

    # ---- fault gate shared by both transports; returns True when the request was answered/dropped
    def _fault(self, method: str, run: Callable[[], None]) -> bool:
        kind = self.double._fault_for(method)
        if kind is None:
            return False
        if kind == "http500":
            self._send(500, b"<html><body><h1>500 Internal Server Error</h1></body></html>", "text/html")
        elif kind == "drop":
            self._drop()
        elif kind == "lost_response":
            try:
                run()
            except OdooDoubleError:
                pass
            self._drop()
        elif kind == "serialization":
            exc = OdooDoubleError("could not serialize access due to concurrent update",
                                  name="psycopg2.errors.SerializationFailure", status=500)
            return self._error(exc)  # type: ignore[func-returns-value]
        return True

    _transport = "jsonrpc"

    def _error(self, exc: OdooDoubleError) -> bool:
        if self._transport == "jsonrpc":
            self._send_json(200, {"jsonrpc": "2.0", "id": self._req_id, "error": self.double.jsonrpc_error(exc)})
        else:
            self._send_json(exc.status, {"name": exc.name, "message": exc.message, "arguments": [exc.message],
                                         "context": {}, "debug": f"Traceback (odoo double)\n{exc.name}: {exc.message}"})
        return True

    _req_id: Any = None

    def _jsonrpc(self, body: bytes) -> None:
        d = self.double
        self._transport = "jsonrpc"
        try:
            req = json.loads(body)
        except ValueError:
            self._send(400, b"<html>Bad Request</html>", "text/html")
            return
        self._req_id = req.get("id")
        params = req.get("params") or {}
        service, method, args = params.get("service"), params.get("method"), list(params.get("args") or [])

        def reply(result: Any) -> None:
            out: dict[str, Any] = {"jsonrpc": "2.0", "id": self._req_id}
            if result is not None:  # Odoo omits `result` entirely for None (spec §6)
                out["result"] = result
            self._send_json(200, out)

        try:
            if service == "common":
                if method == "login":
                    reply(d.authenticate(*args[:3]))
                elif method == "authenticate":
                    reply(d.authenticate(*args[:3]))
                elif method == "version":
                    reply({"server_version": d.version, "server_version_info": [d.major, 0, 0, "final", 0, ""],
                           "server_serie": d.version, "protocol_version": 1})
                else:
                    raise OdooDoubleError(f"Method not found: {method}", name="builtins.KeyError")
                return
            if service != "object" or method not in ("execute", "execute_kw"):
                raise OdooDoubleError(f"Method not found: {service}.{method}", name="builtins.KeyError")
            db, uid, secret, model, meth = args[:5]
            if db != d.db or d.authenticate(db, d.login, secret) != uid:
                raise AccessDenied("Access Denied")
            if method == "execute":
                call_args, kwargs = list(args[5:]), {}
            else:
                call_args = list(args[5]) if len(args) > 5 else []
                kwargs = dict(args[6]) if len(args) > 6 and args[6] else {}
            ids, params_ = _bind(d, model, meth, call_args, kwargs)
            result_box: list[Any] = []

            def run() -> None:
                result_box.append(d.execute(model, meth, ids, params_))

            if self._fault(meth, run):
                return
            run()
            reply(result_box[0])
        except OdooDoubleError as exc:
            self._error(exc)
        except Exception as exc:  # what Odoo reports for any other exception
            self._error(OdooDoubleError(str(exc), name=f"builtins.{type(exc).__name__}"))

    def _json2(self, model: str, method: str, body: bytes) -> None:
        d = self.double
        self._transport = "json2"
        try:
            auth = self.headers.get("Authorization") or ""
            if not auth.lower().startswith("bearer ") or auth[7:].strip() != d.api_key:
                raise OdooDoubleError("Invalid apikey", name="werkzeug.exceptions.Unauthorized", status=401)
            if (self.headers.get("X-Odoo-Database") or d.db) != d.db:
                self._send(404, b"<html><body>Not Found</body></html>", "text/html")
                return
            if "json" not in (self.headers.get("Content-Type") or ""):
                self._send(415, b"<html><body>Unsupported Media Type</body></html>", "text/html")
                return
            try:
                params = json.loads(body or b"{}")
            except ValueError:
                raise OdooDoubleError("Invalid JSON body", name="werkzeug.exceptions.BadRequest", status=400) from None
            if not isinstance(params, dict):
                raise OdooDoubleError("The body must be a JSON object", name="werkzeug.exceptions.BadRequest",
                                      status=400)
            ids = params.pop("ids", None)
            result_box: list[Any] = []

            def run() -> None:
                result_box.append(d.execute(model, method, ids, dict(params)))

            if self._fault(method, run):
                return
            run()
            self._send_json(200, result_box[0])
        except OdooDoubleError as exc:
            self._error(exc)
        except Exception as exc:
            self._error(OdooDoubleError(str(exc), name=f"builtins.{type(exc).__name__}", status=500))


#: positional parameter names per method (after `ids` for record methods), as in Odoo's signatures
_SIGNATURES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "search": (False, ("domain", "offset", "limit", "order")),
    "search_count": (False, ("domain", "limit")),
    "search_read": (False, ("domain", "fields", "offset", "limit", "order")),
    "read": (True, ("fields",)),
    "create": (False, ("vals_list",)),
    "write": (True, ("vals",)),
    "context_get": (False, ()),
    "has_group": (True, ("group_ext_id",)),
    "message_new": (False, ("msg_dict", "custom_values")),
    "message_update": (True, ("msg_dict", "update_vals")),
    "message_subscribe": (True, ("partner_ids", "subtype_ids")),
    "message_post": (True, ()),
    "generate_access_token": (True, ()),
    "message_process": (False, ("model", "message", "custom_values", "save_original", "strip_attachments",
                                "thread_id")),
}


def _bind(d: OdooDouble, model: str, method: str, args: list[Any], kwargs: dict[str, Any]
          ) -> tuple[list[int] | None, dict[str, Any]]:
    """Turn execute_kw's (args, kwargs) into (ids, named params) the way Odoo's call_kw does."""
    takes_ids, names = _SIGNATURES.get(method, (False, ()))
    ids = None
    if takes_ids:
        if not args:
            raise OdooDoubleError(f"{method}() missing 1 required positional argument: 'ids'",
                                  name="builtins.TypeError")
        ids = args[0] if isinstance(args[0], list) else [args[0]]
        args = args[1:]
    if len(args) > len(names):
        raise OdooDoubleError(f"{method}() takes {len(names)} positional arguments but {len(args)} were given",
                              name="builtins.TypeError")
    params = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in params:
            raise OdooDoubleError(f"{method}() got multiple values for argument '{k}'", name="builtins.TypeError")
        params[k] = v
    return ids, params
