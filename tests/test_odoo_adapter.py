"""The Odoo adapter (`gateway.odoo`) against the Odoo double — and against a live Odoo when one is configured.

Live Odoo: set MAILGATE_ODOO_URL, MAILGATE_ODOO_DB, MAILGATE_ODOO_LOGIN, MAILGATE_ODOO_PASSWORD (an admin-level
user's password or API key; MAILGATE_ODOO_PROTOCOL = jsonrpc | json2 | auto, default auto) and run
`pytest -m live_odoo tests/test_odoo_adapter.py`. The live database needs the mail and crm modules and an alias
domain; tests create records with unique names and leave them there (use a throwaway database). Without the
variables the live cases are skipped and only the double runs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import OdooConfig
from gateway.errors import PermanentError, TransientError
from gateway.odoo import connect, one_id
from gateway.odoo.client import OdooClient, m2o_id
from gateway.odoo.json2 import Json2Client
from gateway.odoo.jsonrpc import JsonRpcClient
from routing.model import BounceResult
from routing.normalized_dsn import build_normalized_dsn
from tests.odoo_double import OdooDouble

LIVE_VARS = ("MAILGATE_ODOO_URL", "MAILGATE_ODOO_DB", "MAILGATE_ODOO_LOGIN", "MAILGATE_ODOO_PASSWORD")


def live_configured() -> bool:
    return all(os.environ.get(v) for v in LIVE_VARS)


class Target:
    """One Odoo to test against: a double (with its handle) or a live server (double is None)."""

    def __init__(self, client: OdooClient, double: OdooDouble | None, secret: str):
        self.client = client
        self.double = double
        self.secret = secret

    def alias_domain(self) -> dict[str, Any]:
        rows = self.client.search_read("mail.alias.domain", [], ["name", "bounce_email", "catchall_email"], limit=1)
        if not rows:
            pytest.skip("the Odoo under test has no mail.alias.domain")
        return rows[0]

    def sales_alias(self) -> str:
        rows = self.client.search_read("mail.alias", [("alias_name", "=", "sales")], ["alias_full_name"], limit=1)
        if not rows:
            pytest.skip("the Odoo under test has no sales@ alias")
        return str(rows[0]["alias_full_name"])


@pytest.fixture(params=[
    "double-17-jsonrpc", "double-19-json2", "double-19-jsonrpc",
    pytest.param("live", marks=pytest.mark.live_odoo),
])
def odoo(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "live":
        if not live_configured():
            pytest.skip("live Odoo not configured (MAILGATE_ODOO_URL, _DB, _LOGIN, _PASSWORD)")
        cfg = OdooConfig(url=os.environ["MAILGATE_ODOO_URL"], db=os.environ["MAILGATE_ODOO_DB"],
                         login=os.environ["MAILGATE_ODOO_LOGIN"], password_env="MAILGATE_ODOO_PASSWORD",
                         protocol=os.environ.get("MAILGATE_ODOO_PROTOCOL", "auto"), timeout=60)  # type: ignore[arg-type]
        client = connect(cfg)
        yield Target(client, None, os.environ["MAILGATE_ODOO_PASSWORD"])
        client.close()
        return
    _, version, protocol = request.param.split("-")
    d = OdooDouble(version=f"{version}.0").start()
    secret = d.api_key if protocol == "json2" else d.password
    cls = Json2Client if protocol == "json2" else JsonRpcClient
    client = cls(url=d.url, db=d.db, login=d.login, secret=secret, timeout=5)
    yield Target(client, d, secret)
    client.close()
    d.stop()


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------ shapes
def test_one_id_flattens_every_odoo_shape() -> None:
    assert one_id(5) == 5 and one_id([5]) == 5 and one_id("crm.lead(5,)") == 5
    assert one_id(False) is None and one_id(None) is None and one_id([]) is None
    assert m2o_id([3, "Name"]) == 3 and m2o_id(False) is None
    with pytest.raises(PermanentError):
        one_id({"id": 5})


def test_create_read_search_with_domain_operators(odoo: Target) -> None:
    c = odoo.client
    tag = uniq("adapter")
    a = c.create("res.partner", {"name": f"{tag} Ann", "email": f"{tag}.ann@customer.example"})
    b = c.create("res.partner", {"name": f"{tag} Ben", "email": f"{tag}.ben@customer.example"})
    assert isinstance(a, int) and isinstance(b, int) and a != b
    assert c.search("res.partner", [("name", "ilike", tag)], order="id") == [a, b]
    assert c.search("res.partner", ["|", ("id", "=", a), ("id", "=", b)], order="id") == [a, b]
    assert c.search("res.partner", ["&", ("name", "ilike", tag), "!", ("id", "=", a)]) == [b]
    assert c.search_count("res.partner", [("id", "in", [a, b])]) == 2
    rows = c.search_read("res.partner", [("email_normalized", "=", f"{tag}.ann@customer.example")],
                         ["name", "email"])
    assert [r["id"] for r in rows] == [a] and rows[0]["name"] == f"{tag} Ann"
    assert c.write("res.partner", [b], {"name": f"{tag} Benjamin"})
    assert c.read("res.partner", [b], ["name"])[0]["name"] == f"{tag} Benjamin"


def test_message_new_post_and_find(odoo: Target) -> None:
    c = odoo.client
    tag = uniq("lead")
    partner = c.create("res.partner", {"name": tag, "email": f"{tag}@customer.example"})
    lead = c.message_new("crm.lead", {"subject": tag, "email_from": f"{tag} <{tag}@customer.example>",
                                      "author_id": partner}, {"type": "lead"},
                         context={"mail_create_nosubscribe": True, "mail_create_nolog": True})
    row = c.read("crm.lead", [lead], ["name", "partner_id", "email_from"])[0]
    assert row["name"] == tag and m2o_id(row["partner_id"]) == partner
    mid = f"<{tag}@customer.example>"
    posted = c.message_post("crm.lead", lead, body="<p>hi <b>there</b></p>", body_is_html=True,
                            message_type="email", subtype_xmlid="mail.mt_comment", message_id=mid,
                            author_id=partner, context={"mail_create_nosubscribe": True})
    assert isinstance(posted, int)
    [found] = c.find_messages([mid, "<nothing-here@x>"])
    assert found["id"] == posted and found["model"] == "crm.lead" and found["res_id"] == lead
    assert c.message_subscribe("crm.lead", lead, [partner])
    followers = c.search_read("mail.followers", [("res_model", "=", "crm.lead"), ("res_id", "=", lead)],
                              ["partner_id"])
    assert partner in [m2o_id(f["partner_id"]) for f in followers]


def test_message_process_new_duplicate_loop(odoo: Target) -> None:
    c = odoo.client
    sales = odoo.sales_alias()
    tag = uniq("mp")
    raw = (f"From: {tag} <{tag}@customer.example>\r\nTo: {sales}\r\nSubject: {tag}\r\n"
           f"Message-ID: <{tag}@customer.example>\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
    rid = c.message_process(raw)
    assert isinstance(rid, int)
    [msg] = c.find_messages([f"<{tag}@customer.example>"])
    assert msg["model"] == "crm.lead" and msg["res_id"] == rid
    assert c.message_process(raw) is False                       # duplicate
    loop = raw.replace(f"<{tag}@", f"<{tag}-2@").replace(
        "Subject:", "References: <1.2-openerp-loop-detection-bounce-email@odoo>\r\nSubject:")
    assert c.message_process(loop) is None                       # loop drop: no `result` member at all


def test_normalized_dsn_raises_message_bounce(odoo: Target) -> None:
    c = odoo.client
    dom = odoo.alias_domain()
    tag = uniq("bounce")
    addr = f"{tag}@customer.example"
    partner = c.create("res.partner", {"name": tag, "email": addr})
    before = c.read("res.partner", [partner], ["message_bounce"])[0]["message_bounce"]
    dsn = build_normalized_dsn(BounceResult(recipient=addr, kind="hard", reason="userunknown", status="5.1.1",
                                            original_message_id=f"<{tag}-orig@x>"),
                               bounce_address=str(dom["bounce_email"]), seed=tag)
    assert c.message_process(dsn.decode("ascii")) is False
    after = c.read("res.partner", [partner], ["message_bounce"])[0]["message_bounce"]
    assert after == before + 1


# ------------------------------------------------------------------------------------------ errors
def test_errors_are_typed(odoo: Target) -> None:
    c = odoo.client
    with pytest.raises(PermanentError, match="(?i)private"):
        c.execute("res.partner", "_compute_display_name", None, {})
    with pytest.raises(PermanentError):
        c.search("no.such.model", [])
    with pytest.raises(PermanentError):
        c.execute("res.partner", "no_such_method", None, {})
    with pytest.raises(PermanentError, match="(?i)mail.notification|access|not allowed"):
        ids = c.search("mail.notification", [], limit=1) or [1]
        c.write("mail.notification", ids, {"notification_status": "bounce"})
    no_route = (f"From: x@customer.example\r\nTo: nobody-{uuid.uuid4().hex}@nowhere.invalid\r\n"
                f"Subject: x\r\nMessage-ID: <{uniq('nr')}@x>\r\n\r\nx\r\n")
    with pytest.raises(PermanentError, match="No possible route"):
        c.message_process(no_route)


def test_request_size_cap(odoo: Target) -> None:
    c = odoo.client
    c.max_request_bytes = 1000
    with pytest.raises(PermanentError, match="max_request_bytes"):
        c.message_process("x" * 5000)


def test_wrong_secret_is_transient_and_says_so(odoo: Target) -> None:
    c = odoo.client
    cls = type(c)
    bad = cls(url=c.url, db=c.db, login=c.login, secret="wrong-" + uuid.uuid4().hex, timeout=10)
    with pytest.raises(TransientError, match="(?i)refused|denied|apikey|unauthorized"):
        bad.search_count("res.partner", [])


# ------------------------------------------------------------------------------------ faults (double)
@pytest.mark.parametrize("kind", ["http500", "serialization", "drop"])
def test_faults_are_transient(odoo: Target, kind: str) -> None:
    if odoo.double is None:
        pytest.skip("fault injection needs the double")
    odoo.double.fail_next(1, kind)
    with pytest.raises(TransientError):
        odoo.client.search_count("res.partner", [])
    assert odoo.client.search_count("res.partner", []) >= 1  # next call fine


def test_down_slow_and_back(odoo: Target) -> None:
    d = odoo.double
    if d is None:
        pytest.skip("fault injection needs the double")
    c = odoo.client
    assert c.search_count("res.partner", []) >= 1
    d.go_down()
    with pytest.raises(TransientError, match="(?i)reach|refused|closed|disconnected|reset"):
        c.search_count("res.partner", [])
    d.come_up()
    assert c.search_count("res.partner", []) >= 1
    d.slow(0.6)
    c.timeout = 0.2
    slow_client = type(c)(url=c.url, db=c.db, login=c.login, secret=odoo.secret, timeout=0.2)
    with pytest.raises(TransientError):
        slow_client.search_count("res.partner", [])
    d.slow(0)


def test_connect_picks_transport_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_TEST_ODOO_KEY", "double-api-key")
    for version, expected in (("17.0", JsonRpcClient), ("19.0", Json2Client)):
        with OdooDouble(version=version) as d:
            cfg = OdooConfig(url=d.url, db=d.db, login=d.login, password_env="MAILGATE_TEST_ODOO_KEY")
            client = connect(cfg)
            assert type(client) is expected
            assert client.search_count("res.users", [("login", "=", d.login)]) == 1


# ------------------------------------------------------------------------------ check-config, alias sync
def test_check_reports_rights(odoo: Target) -> None:
    from gateway.odoo.check import check_client

    report = check_client(odoo.client, url=odoo.client.url, login=odoo.client.login)
    assert not report["problems"], report
    assert any("can read mail.alias" in line for line in report["lines"])
    if odoo.double is not None:
        assert "user has base.group_system" in report["lines"]
        user = odoo.double.store.get("res.users", odoo.double.uid)
        user["groups"] = ["base.group_user"]
        report = check_client(odoo.client, url=odoo.client.url, login=odoo.client.login)
        assert any("base.group_system" in p for p in report["problems"])


def test_check_odoo_access_never_raises_when_down() -> None:
    from gateway.odoo.check import check_odoo_access

    class Cfg:
        odoo = OdooConfig(url="http://127.0.0.1:9", db="x", login="admin", password_env="MAILGATE_NO_SUCH_VAR_X")

    report = check_odoo_access(Cfg())
    assert report["problems"] and "cannot connect" in report["problems"][0]


def test_alias_sync_rows_merge_into_the_alias_table(odoo: Target) -> None:
    from aliases.load import merge_aliases
    from aliases.model import AliasTable, Domain
    from gateway.odoo.alias_sync import AliasSync

    sync = AliasSync(odoo.client, interval=3600)
    rows = sync.rows()
    sales = [r for r in rows if r.get("alias_name") == "sales"]
    if not sales:
        pytest.skip("no sales@ alias in the Odoo under test")
    assert sales[0]["model"] == "crm.lead"
    domain = sales[0]["alias_domain"]
    merged = merge_aliases(AliasTable(domains=(Domain(name=domain),)), rows)
    assert merged.table.alias(f"sales@{domain}") is not None
    assert merged.table.alias(f"sales@{domain}").model == "crm.lead"  # type: ignore[union-attr]
    if odoo.double is not None:
        odoo.double.go_down()
        assert sync.rows(force=True) == rows and sync.last_error  # stale rows kept while Odoo is down
        odoo.double.come_up()


def test_check_shows_odoo_aliases_merged_with_config(odoo: Target) -> None:
    from gateway.config import parse_config
    from gateway.odoo.check import alias_lines

    dom = str(odoo.alias_domain()["name"]).lower()
    odoo.sales_alias()
    cfg = parse_config({"domains": [{"name": dom}],
                        "aliases": [{"address": f"sales@{dom}", "model": "crm.lead"}]}, base_dir=".")
    lines = alias_lines(odoo.client, cfg)
    assert f"alias sales@{dom} is also in Odoo; the config's definition wins" in lines
    if odoo.double is not None:
        assert f"alias support@{dom} -> helpdesk.ticket contact=everyone (odoo)" in lines


# ------------------------------------------------------------------ gateway-wide faults are transient
class _PageServer:
    """Something in front of Odoo (a proxy, a login portal, a maintenance page) answering every request with
    `status` and a body that is not Odoo's JSON."""

    def __init__(self, status: int, ctype: str, body: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Page(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cls", [Json2Client, JsonRpcClient])
@pytest.mark.parametrize("ctype, body", [("text/html", b"<html><body>Down for maintenance</body></html>"),
                                         ("application/json", b"")], ids=["html", "empty-json"])
def test_a_200_that_is_not_json_is_transient(cls: type[OdooClient], ctype: str, body: bytes) -> None:
    """A 200 page is about the gateway's path to Odoo, not about this mail: as a PermanentError it parked
    every message in the spool dead while the maintenance page lasted."""
    from gateway.odoo.client import server_version_info

    page = _PageServer(200, ctype, body)
    try:
        client = cls(url=page.url, db="mailgate", login="admin", secret="k", timeout=5)
        with pytest.raises(TransientError, match="HTTP 200"):
            client.search_count("res.partner", [])
        with pytest.raises(TransientError, match="HTTP 200"):
            server_version_info(page.url, 5)
    finally:
        page.close()


def test_lazy_client_without_its_secret_is_transient_and_names_the_variable(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """MAILGATE_ODOO_PASSWORD unset: every delivery's connect failed with a ConfigError, which the worker took
    for a crash, and every message in the spool went dead after 5 attempts."""
    from gateway.config import parse_config
    from gateway.pipeline import odoo_client

    monkeypatch.delenv("MAILGATE_TEST_NO_SUCH_KEY", raising=False)
    cfg = parse_config({"odoo": {"url": "http://127.0.0.1:9", "db": "mailgate", "login": "admin",
                                 "protocol": "jsonrpc", "password_env": "MAILGATE_TEST_NO_SUCH_KEY"}},
                       base_dir=str(tmp_path))
    client = odoo_client(cfg)
    with pytest.raises(TransientError, match="MAILGATE_TEST_NO_SUCH_KEY is not set"):
        client.search_count("res.partner", [])
    page = _PageServer(200, "text/html", b"<html>login portal</html>")
    try:  # `protocol = "auto"` probes the version first; a page there is no reason to park mail either
        auto = parse_config({"odoo": {"url": page.url, "db": "mailgate", "login": "admin", "protocol": "auto",
                                      "password_env": "MAILGATE_TEST_KEY"}}, base_dir=str(tmp_path))
        monkeypatch.setenv("MAILGATE_TEST_KEY", "k")
        with pytest.raises(TransientError):
            odoo_client(auto).search_count("res.partner", [])
    finally:
        page.close()


def test_debug_log_level_never_writes_the_odoo_secret_or_mail() -> None:
    """`mailgate --log-level DEBUG` wrote odoorpc's request dumps: the password in common.login's and every
    execute_kw's args (odoorpc masks only params['password']), and whole mail bodies."""
    import io
    import logging

    from gateway.logs import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("odoorpc").level)
    buf = io.StringIO()
    secret = "S3cr3t-" + uuid.uuid4().hex
    try:
        setup_logging("DEBUG")
        root.handlers[0].setStream(buf)  # type: ignore[attr-defined]
        with OdooDouble(password=secret) as d:
            client = JsonRpcClient(url=d.url, db=d.db, login=d.login, secret=secret, timeout=5)
            assert client.search_count("res.partner", []) >= 1
            client.message_process("From: a@customer.example\r\nTo: sales@example.test\r\nSubject: salary\r\n"
                                   "Message-ID: <debug-log@x>\r\n\r\nconfidential salary data\r\n")
            client.close()
        logging.getLogger("gateway.test").debug("debug lines of our own still get through")
    finally:
        root.handlers[:], level, odoorpc_level = saved
        root.setLevel(level)
        logging.getLogger("odoorpc").setLevel(odoorpc_level)
    out = buf.getvalue()
    assert "debug lines of our own still get through" in out
    assert secret not in out and "confidential salary data" not in out


@pytest.mark.parametrize("message", [" \n", "", "\n\n", "  "])
def test_an_odoo_error_with_a_blank_message_is_still_typed(message: str) -> None:
    """A UserError raised with only whitespace made from_odoo_error raise IndexError: delivery took the crash
    path and parked the mail dead after 5 attempts, with a traceback instead of Odoo's answer."""
    from gateway.odoo.errors import from_odoo_error

    err = from_odoo_error("odoo.exceptions.UserError", message, where="crm.lead.message_new")
    assert isinstance(err, PermanentError)
    assert "UserError: (no message)" in str(err)
    assert isinstance(from_odoo_error("odoo.exceptions.ConcurrencyError", message, where="x"), TransientError)


@pytest.mark.parametrize("cls", [Json2Client, JsonRpcClient])
@pytest.mark.parametrize("status, ctype, body", [
    (404, "text/html", b"<html><body>Not Found</body></html>"),
    (415, "text/html", b"<html><body>Unsupported Media Type</body></html>"),
    (404, "application/json", json.dumps({"name": "werkzeug.exceptions.NotFound", "message": (
        "The requested URL was not found on the server. If you entered the URL manually please check your "
        "spelling and try again.")}).encode()),
    (415, "application/json", json.dumps({"name": "werkzeug.exceptions.UnsupportedMediaType",
                                          "message": "Unsupported Media Type"}).encode()),
], ids=["404-html", "415-html", "404-json-generic", "415-json"])
def test_a_404_or_415_for_the_url_itself_is_transient_and_names_the_url(
        cls: type[OdooClient], status: int, ctype: str, body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A wrong db-filter or dbname, a reverse-proxy route missing, or JSON-RPC sent to a JSON-2-only path
    answers 404 or 415 to every call: as a PermanentError it parked each message dead after one attempt for
    what is the gateway's configuration. It is transient, and the log names the URL and what to check."""
    import logging

    from gateway.odoo import errors
    from gateway.odoo.client import server_version_info

    errors._endpoint_warned.clear()
    page = _PageServer(status, ctype, body)
    try:
        client = cls(url=page.url, db="mailgate", login="admin", secret="k", timeout=5)
        with caplog.at_level(logging.WARNING, logger="gateway.odoo.errors"):
            with pytest.raises(TransientError, match=f"HTTP {status} from {page.url}/") as raised:
                client.search_count("res.partner", [])
            with pytest.raises(TransientError, match=f"HTTP {status} from {page.url}/"):
                server_version_info(page.url, 5)
        assert "[odoo] protocol" in str(raised.value)
        warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.odoo.errors"]
        assert warnings and all(page.url in w and "[odoo]" in w for w in warnings)
    finally:
        page.close()


def test_a_wrong_database_behind_the_json2_db_filter_is_transient() -> None:
    """Odoo 19 answers JSON-2 for a database its db-filter does not serve with its HTML 404."""
    with OdooDouble(version="19.0") as d:
        client = Json2Client(url=d.url, db="no-such-db", login=d.login, secret=d.api_key, timeout=5)
        with pytest.raises(TransientError, match="(?s)HTTP 404 from .*/json/2/res.partner/search_count.*db-filter"):
            client.search_count("res.partner", [])
        client.close()


@pytest.mark.parametrize("name, message", [
    ("werkzeug.exceptions.NotFound", "the model 'no.such.model' does not exist"),
    ("werkzeug.exceptions.NotFound", "The method 'no.such.model.search_count' does not exist"),
    ("odoo.exceptions.MissingError", "Record does not exist or has been deleted."),
])
def test_a_json2_404_that_names_the_call_stays_permanent(name: str, message: str) -> None:
    """Odoo 19's JSON-2 controller answers 404 with its own JSON for a model or method it does not have, and
    for a record gone: that is about this call, and retrying cannot help."""
    page = _PageServer(404, "application/json", json.dumps({"name": name, "message": message}).encode())
    try:
        client = Json2Client(url=page.url, db="mailgate", login="admin", secret="k", timeout=5)
        with pytest.raises(PermanentError, match=name):
            client.search_count("no.such.model", [])
    finally:
        page.close()


def test_odoo_19_lock_error_is_retried() -> None:
    """Odoo 19 answers a row another transaction holds with LockError, HTTP 409 on JSON-2: a retry gets past
    it, where it parked the mail dead."""
    from gateway.errors import TransientError
    from gateway.odoo.errors import from_odoo_error

    assert isinstance(from_odoo_error("odoo.exceptions.LockError", "Record locked", where="crm.lead.write"),
                      TransientError)
    assert isinstance(from_odoo_error("werkzeug.exceptions.Conflict", "locked", where="crm.lead.write", status=409),
                      TransientError)


def test_sighup_with_a_new_odoo_section_reconnects_the_workers_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP that changed [odoo] (a new URL, database or key) reached the RCPT alias sync but the workers
    kept their old Odoo connection until a restart; now the next call connects with the new settings, and an
    unchanged [odoo] keeps the connection."""
    import gateway.odoo.client as client_module
    from gateway.config import parse_config
    from gateway.pipeline import odoo_client, reload_aliases

    connected: list[str] = []

    class Fake:
        def __init__(self, url: str):
            self.url = url

        def version(self) -> str:
            return self.url

    def connect(odoo: Any) -> Fake:
        connected.append(odoo.url)
        return Fake(odoo.url)

    monkeypatch.setattr(client_module, "connect", connect)

    def config(url: str, aliases: int = 0) -> Any:
        return parse_config({"odoo": {"url": url, "db": "d", "login": "l"}, "domains": [{"name": "example.test"}],
                             "aliases": [{"address": f"a{i}@example.test", "model": "crm.lead"}
                                         for i in range(aliases)]}, base_dir="/tmp")

    client = odoo_client(config("http://old.example:8069"))
    assert client is not None and client.version() == "http://old.example:8069"
    reload_aliases(config("http://old.example:8069", aliases=1))  # [odoo] unchanged: the connection stays
    assert client.version() == "http://old.example:8069" and connected == ["http://old.example:8069"]
    reload_aliases(config("http://new.example:8069"))
    assert client.version() == "http://new.example:8069"
    assert connected == ["http://old.example:8069", "http://new.example:8069"]
