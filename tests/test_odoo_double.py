"""The Odoo double's own wire shapes, checked with raw HTTP against what the spec (§6, §7) recorded on live Odoo.

If these drift, the adapter tests would be testing against a fiction.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.odoo_double import OdooDouble, Store


def post(url: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
            return resp.status, json.loads(body), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        ctype = exc.headers.get("Content-Type", "")
        return exc.code, json.loads(body) if "json" in ctype else body.decode(), ctype


def rpc(d: OdooDouble, service: str, method: str, *args: Any) -> dict[str, Any]:
    _s, data, _c = post(d.url + "/jsonrpc", {"jsonrpc": "2.0", "method": "call", "id": 7,
                                             "params": {"service": service, "method": method, "args": list(args)}})
    return data


def kw(d: OdooDouble, model: str, method: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    return rpc(d, "object", "execute_kw", d.db, d.uid, d.password, model, method, args, kwargs or {})


def j2(d: OdooDouble, model: str, method: str, body: dict[str, Any], key: str | None = None) -> tuple[int, Any, str]:
    return post(f"{d.url}/json/2/{model}/{method}", body,
                {"Authorization": f"bearer {key or d.api_key}", "X-Odoo-Database": d.db})


@pytest.fixture
def d17() -> Iterator[OdooDouble]:
    with OdooDouble(version="17.0") as d:
        yield d


@pytest.fixture
def d19() -> Iterator[OdooDouble]:
    with OdooDouble(version="19.0") as d:
        yield d


RAW = ("From: Ann <ann@customer.example>\r\nTo: sales@example.test\r\nSubject: Chairs\r\n"
       "Message-ID: <chairs@customer.example>\r\n\r\nhello\r\n")


def test_jsonrpc_login_version_and_shapes(d17: OdooDouble) -> None:
    _s, info, _c = post(d17.url + "/web/webclient/version_info", {"jsonrpc": "2.0", "method": "call", "params": {}})
    assert info["result"]["server_version"] == "17.0" and info["result"]["server_version_info"][0] == 17
    assert rpc(d17, "common", "login", d17.db, d17.login, d17.password)["result"] == d17.uid
    assert rpc(d17, "common", "login", d17.db, d17.login, "wrong")["result"] is False
    ctx = rpc(d17, "object", "execute", d17.db, d17.uid, d17.password, "res.users", "context_get")
    assert ctx["result"]["lang"] == "en_US"
    lead = kw(d17, "crm.lead", "message_new", [{"subject": "S"}])["result"]
    assert isinstance(lead, str) and lead.startswith("crm.lead(") and lead.endswith(",)")  # recordset repr
    lid = int(lead[len("crm.lead("):-2])
    assert isinstance(kw(d17, "crm.lead", "message_post", [[lid]], {"body": "x"})["result"], int)
    assert isinstance(kw(d17, "res.partner", "create", [{"name": "P"}])["result"], int)


def test_jsonrpc_message_process_none_has_no_result_member(d17: OdooDouble) -> None:
    first = kw(d17, "mail.thread", "message_process", [False, RAW])
    assert isinstance(first["result"], int)
    assert kw(d17, "mail.thread", "message_process", [False, RAW])["result"] is False
    loop = RAW.replace("<chairs@", "<chairs2@").replace(
        "Subject:", "In-Reply-To: <1.2-openerp-loop-detection-bounce-email@h>\r\nSubject:")
    answer = kw(d17, "mail.thread", "message_process", [False, loop])
    assert "result" not in answer and "error" not in answer


def test_jsonrpc_error_payload(d17: OdooDouble) -> None:
    err = kw(d17, "mail.notification", "write", [[1], {"notification_status": "bounce"}])["error"]
    assert err["code"] == 200 and err["message"] == "Odoo Server Error"
    assert err["data"]["name"] == "odoo.exceptions.AccessError"
    assert set(err["data"]) >= {"name", "message", "arguments", "context", "debug"}
    denied = rpc(d17, "object", "execute_kw", d17.db, d17.uid, "wrong", "res.partner", "search", [[]], {})
    assert denied["error"]["data"]["name"] == "odoo.exceptions.AccessDenied"
    assert kw(d17, "res.partner", "_private", [])["error"]["data"]["name"] == "odoo.exceptions.AccessError"
    # JSON-2 does not exist before 19
    status, _b, _c = j2(d17, "res.partner", "search", {"domain": []})
    assert status == 404


def test_json2_shapes_and_status_codes(d19: OdooDouble) -> None:
    status, ids, ctype = j2(d19, "crm.lead", "message_new", {"msg_dict": {"subject": "S"}})
    assert status == 200 and "json" in ctype and isinstance(ids, list) and len(ids) == 1
    status, posted, _ = j2(d19, "crm.lead", "message_post", {"ids": ids, "body": "x"})
    assert status == 200 and isinstance(posted, list)
    status, created, _ = j2(d19, "res.partner", "create", {"vals_list": [{"name": "P"}]})
    assert status == 200 and isinstance(created, list)
    status, thread, _ = j2(d19, "mail.thread", "message_process", {"model": False, "message": RAW})
    assert status == 200 and isinstance(thread, int)
    loop = RAW.replace("<chairs@", "<c3@").replace("Subject:", "References: <x-loop-detection-bounce-email@h>\r\nSubject:")
    assert j2(d19, "mail.thread", "message_process", {"model": False, "message": loop})[:2] == (200, None)
    assert j2(d19, "res.partner", "search", {"domain": []}, key="wrong")[0] == 401
    status, err, _ = j2(d19, "res.partner", "_private", {})
    assert status == 403 and err["name"] == "odoo.exceptions.AccessError" and "debug" in err
    assert j2(d19, "no.model", "search", {"domain": []})[0] == 404
    assert j2(d19, "res.partner", "no_method", {})[0] == 404
    assert j2(d19, "res.partner", "search", {"nonsense_argument": 1})[0] == 422
    status, err, _ = j2(d19, "mail.thread", "message_process", {"model": False, "message": RAW.replace(
        "sales@", "nobody@").replace("<chairs@", "<c4@")})
    assert status == 500 and "No possible route" in err["message"]
    status, body, ctype = post(f"{d19.url}/json/2/res.partner/search", {"domain": []},
                               {"Authorization": f"bearer {d19.api_key}", "X-Odoo-Database": "other"})
    assert status == 404 and "html" in ctype  # db-filter rejection answers HTML, not JSON


def test_faults_nth_and_one_in(d17: OdooDouble) -> None:
    d17.fail_nth(2, "http500")
    assert "result" in kw(d17, "res.partner", "search_count", [[]])
    status, _b, _c = post(d17.url + "/jsonrpc", {"jsonrpc": "2.0", "method": "call", "params": {
        "service": "object", "method": "execute_kw",
        "args": [d17.db, d17.uid, d17.password, "res.partner", "search_count", [[]], {}]}})
    assert status == 500
    assert "result" in kw(d17, "res.partner", "search_count", [[]])
    d17.fail_one_in(2, "serialization")
    answers = [kw(d17, "res.partner", "search_count", [[]]) for _ in range(40)]
    assert 8 <= sum("error" in a for a in answers) <= 32
    d17.fail_one_in(2, "serialization")  # same seed: the same calls fail again (replayable)
    assert [("error" in a) for a in answers] == [("error" in kw(d17, "res.partner", "search_count", [[]]))
                                                 for _ in range(40)]
    assert all(a["error"]["data"]["name"] == "psycopg2.errors.SerializationFailure" for a in answers if "error" in a)


def test_message_process_bounce_reply_alias(d17: OdooDouble) -> None:
    d = d17
    bob = d.add_partner("Bob", "bob@customer.example")
    lead = kw(d, "mail.thread", "message_process", [False, RAW])["result"]
    [first] = d.messages_on("crm.lead", lead)
    reply = ("From: bob@customer.example\r\nTo: catchall@example.test\r\nSubject: Re\r\n"
             "Message-ID: <r1@customer.example>\r\nIn-Reply-To: <chairs@customer.example>\r\n\r\nok\r\n")
    assert kw(d, "mail.thread", "message_process", [False, reply])["result"] == lead
    posts = d.messages_on("crm.lead", lead)
    assert posts[-1]["parent_id"] == first["id"] and posts[-1]["author_id"] == bob
    # References holding only unknown ids hides a good In-Reply-To (spec §6): to the catchall only → refused
    stray = reply.replace("<r1@", "<r2@").replace("In-Reply-To:", "References: <unknown@x>\r\nIn-Reply-To:")
    assert kw(d, "mail.thread", "message_process", [False, stray])["result"] is False
    assert not d.records("mail.message", [("message_id", "=", "<r2@customer.example>")])
    bounce = ("From: MAILER-DAEMON@mx.example\r\nTo: someone@example.test\r\nSubject: fail\r\n"
              "Message-ID: <b1@mx>\r\nMIME-Version: 1.0\r\n"
              "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
              "--B\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
              "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
              "Final-Recipient: rfc822; bob@customer.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
              "--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <r1@customer.example>\r\n\r\n--B--\r\n")
    assert kw(d, "mail.thread", "message_process", [False, bounce])["result"] is False
    assert d.store.get("res.partner", bob)["message_bounce"] == 1
    assert not d.records("mail.message", [("message_id", "=", "<b1@mx>")])  # a bounce is never stored


def test_store_domains() -> None:
    s = Store()
    a = s.create("res.partner", {"name": "Ann", "email": "Ann@X.example"})
    b = s.create("res.partner", {"name": "Ben", "email": "ben@x.example"})
    assert s.search("res.partner", [("email_normalized", "=", "ann@x.example")]) == [a]
    assert s.search("res.partner", ["|", ("name", "=", "Ann"), ("name", "=", "Ben")]) == [a, b]
    assert s.search("res.partner", ["!", ("name", "ilike", "an")]) == [b]
    assert s.search("res.partner", ["&", ("name", "ilike", "b"), ("id", "in", [a, b])]) == [b]
    assert s.search("res.partner", [("id", "not in", [a])]) == [b]
    s.write("res.partner", [b], {"active": False})
    assert s.search("res.partner", []) == [a]
    assert s.search("res.partner", [("active", "=", False)]) == [b]


def _value_error(data: dict[str, Any], text: str) -> None:
    assert "result" not in data, data
    assert data["error"]["data"]["name"] == "builtins.ValueError", data
    assert text in data["error"]["data"]["message"], data


@pytest.mark.parametrize("version", ["17.0", "19.0"])
def test_unknown_fields_raise_as_odoo_does(version: str) -> None:
    """models.py / osv/expression.py refuse a field the model lacks: read/search_read fields, create/write
    values, domain leaves (a path checked model by model), order."""
    with OdooDouble(version=version) as d:
        ann = d.add_partner("Ann", "ann@customer.example")
        _value_error(kw(d, "res.partner", "read", [[ann], ["name", "no_such_field"]]),
                     "Invalid field 'no_such_field' on model 'res.partner'")
        _value_error(kw(d, "res.partner", "search_read", [[], ["emails"]]), "Invalid field 'emails'")
        _value_error(kw(d, "res.partner", "create", [{"name": "Bob", "e_mail": "bob@x"}]), "Invalid field 'e_mail'")
        _value_error(kw(d, "res.partner", "write", [[ann], {"e_mail": "x"}]), "Invalid field 'e_mail'")
        _value_error(kw(d, "res.partner", "search", [[("e_mail", "=", "x")]]),
                     "Invalid field res.partner.e_mail in leaf")
        _value_error(kw(d, "res.partner", "search_count", [[("name", "=", "Ann"), ("e_mail", "=", "x")]]),
                     "Invalid field res.partner.e_mail")
        _value_error(kw(d, "res.users", "search", [[("partner_id.e_mail", "=", "x")]]),
                     "Invalid field res.partner.e_mail")
        _value_error(kw(d, "res.partner", "search", [[]], {"order": "nope desc"}), "Invalid field 'nope'")
        _value_error(kw(d, "mail.alias", "search_read", [[], ["alias_user_id"]]), "Invalid field 'alias_user_id'")
        assert d.records("res.partner", [("name", "=", "Bob")]) == []  # nothing was created
        # JSON-2 reports the same exception class
        status, body, _c = j2(d, "res.partner", "read", {"ids": [ann], "fields": ["no_such_field"]}) \
            if version == "19.0" else (0, {"name": "builtins.ValueError"}, "")
        assert body["name"] == "builtins.ValueError"
        # the version switch: res.users.groups_id is group_ids from 19
        groups = "group_ids" if version == "19.0" else "groups_id"
        other = "groups_id" if version == "19.0" else "group_ids"
        assert "result" in kw(d, "res.users", "search_count", [[(groups, "in", [1])]])
        _value_error(kw(d, "res.users", "search_count", [[(other, "in", [1])]]), f"res.users.{other}")
        # computed fields the double sets stay readable; a many2one path follows the link
        row = kw(d, "res.partner", "read", [[ann], ["email_normalized", "email_formatted", "display_name"]])
        assert row["result"][0] == {"id": ann, "email_normalized": "ann@customer.example",
                                    "email_formatted": '"Ann" <ann@customer.example>', "display_name": "Ann"}
        alias = kw(d, "mail.alias", "search_read", [[("alias_name", "=", "sales")],
                                                     ["alias_full_name", "display_name", "alias_domain"]])
        assert alias["result"][0]["alias_full_name"] == "sales@example.test"
        assert alias["result"][0]["display_name"] == "sales@example.test"
        users = kw(d, "res.users", "search", [[("partner_id.email", "=ilike", "ADMIN@example.test")]])
        assert users["result"] == [d.uid]
        assert kw(d, "res.users", "search", [[("partner_id.email", "=", "ann@customer.example")]])["result"] == []


def test_message_post_author_computed_as_odoo_17(d17: OdooDouble) -> None:
    """mail_thread.py _message_compute_author: no author_id → the partner of email_from (users, then partners;
    never created) or empty; neither → the current user's partner and its formatted address."""
    d = d17
    lead = kw(d, "crm.lead", "create", [{"name": "Deal"}])["result"]
    ann = d.add_partner("Ann", "ann@customer.example")

    def post_(**kwargs: Any) -> dict[str, Any]:
        mid = kw(d, "crm.lead", "message_post", [[lead]], {"body": "x", **kwargs})["result"]
        return d.store.get("mail.message", mid)

    m = post_(email_from="Ann <ANN@customer.example>")
    assert m["author_id"] == ann and m["email_from"] == "Ann <ANN@customer.example>"
    partners = len(d.records("res.partner"))
    m = post_(email_from="stranger@nowhere.example")
    assert m["author_id"] is False and m["email_from"] == "stranger@nowhere.example"
    assert len(d.records("res.partner")) == partners  # no partner created
    m = post_()
    assert m["author_id"] == d.admin_partner and m["email_from"] == '"Mitchell Admin" <admin@example.test>'
    m = post_(author_id=ann)
    assert m["author_id"] == ann and m["email_from"] == '"Ann" <ann@customer.example>'
    noemail = kw(d, "res.partner", "create", [{"name": "Mute"}])["result"]
    err = kw(d, "crm.lead", "message_post", [[lead]], {"body": "x", "author_id": noemail})
    assert err["error"]["data"]["name"] == "odoo.exceptions.UserError"
