"""Issue 7, security: nobody relays through us, forged tokens yield nothing, hostile names and addresses stay
inert data. (Tracking-token, click-redirect and webhook-signature attacks are in test_tracking.py,
test_relay.py and test_events.py; DMARC against a forged From in test_sender_auth.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert, inspect

from gateway.config import parse_config
from gateway.relay import resolve_verp
from gateway.schema import outbound_mails, outbound_recipients
from gateway.serve import start_gateway
from gateway.spool import get_raw, list_messages
from gateway.store import open_store, utcnow
from routing.parse import extract_content, parse_mail, sanitize_filename
from routing.tokens import make_token, verp_address
from tests.smtp_wire import WireClient, make_mail

pytestmark = pytest.mark.reliability

SECRET = b"0123456789abcdef-test-secret"


def _config(tmp_path: Path) -> dict:
    return {
        "listeners": [{"name": "smtp", "kind": "smtp", "host": "127.0.0.1", "port": 0}],
        "storage": {"url": f"sqlite:///{tmp_path}/sec.db"},
        "admin": {"enabled": False},
        "domains": [{"name": "example.test", "strict": True},
                    {"name": "open.test", "strict": False, "default_alias": "inbox"}],
        "aliases": [{"address": "sales@example.test", "model": "crm.lead"},
                    {"address": "o'brien@example.test", "model": "crm.lead"},
                    {"address": "inbox@open.test", "model": "helpdesk.ticket"}],
    }


async def _session(port: int) -> WireClient:
    c = await WireClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO attacker.test"))[0] == 250
    return c


async def test_no_open_relay_and_literal_addresses(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path), base_dir=str(tmp_path))
    gw = await start_gateway(config, workers=False)
    port = gw.ports["smtp"]
    canary = tmp_path / "pwned"
    try:
        c = await _session(port)
        # Not RFC 5321 (parentheses are not atext): refused, never silently read as a comment ("$@client.test").
        code, text = await c.cmd(f"MAIL FROM:<$(touch {canary})@client.test>")
        assert code == 553 and text.startswith("5.1.3")
        shell = f'"$(touch {canary}); `touch {canary}`"@client.test'
        assert (await c.cmd(f"MAIL FROM:<{shell}>"))[0] == 250
        code, text = await c.cmd("RCPT TO:<victim@gmail.test>")
        assert code == 550 and text.startswith("5.7.1")                     # no relaying
        code, text = await c.cmd("RCPT TO:<victim@example.test.evil.test>")
        assert code == 550 and text.startswith("5.7.1")                     # suffix tricks are foreign
        code, _ = await c.cmd("RCPT TO:<o'brien'--@example.test>")
        assert code == 550                                                  # no wildcard/SQL matching
        assert (await c.cmd("RCPT TO:<o'brien@example.test>"))[0] == 250     # the alias, matched literally
        hostile = "\"x'; DROP TABLE messages;--\"@open.test"
        assert (await c.cmd(f"RCPT TO:<{hostile}>"))[0] == 250               # non-strict domain: accepted
        assert (await c.send_data(make_mail(message_id="<sec1@client.test>")))[0] == 250
        await c.close()
        [msg] = list_messages(gw.engine)
        assert msg.mail_from == shell
        assert msg.rcpt_tos == ("o'brien@example.test", hostile)
        assert "messages" in inspect(gw.engine).get_table_names()           # nothing was executed
        assert not canary.exists()
        assert get_raw(gw.engine, msg.id) == make_mail(message_id="<sec1@client.test>")
    finally:
        await gw.stop(drain_seconds=1)


def test_tampered_or_foreign_verp_tokens_resolve_to_nothing(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/verp.db")
    with engine.begin() as conn:
        mail_id = conn.execute(insert(outbound_mails).values(
            message_id="<out1@example.test>", model="crm.lead", res_id=7, mail_from="sales@example.test",
            created_at=utcnow())).inserted_primary_key[0]
        rid = conn.execute(insert(outbound_recipients).values(
            mail=mail_id, recipient="bob@client.test", state="delivered")).inserted_primary_key[0]
    genuine = verp_address(SECRET, rid, "example.test")
    hit = resolve_verp(engine, SECRET, genuine)
    assert hit is not None and hit.recipient == "bob@client.test" and hit.original_message_id == "<out1@example.test>"
    local, domain = genuine.split("@")
    token = local.removeprefix("bounce+")
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    forged_other_row = make_token(b"not-our-secret-000000", "verp", rid)
    for address in (f"bounce+{flipped}@{domain}", f"bounce+{forged_other_row}@{domain}",
                    f"bounce+{token[:-4]}@{domain}", f"bounce+{make_token(SECRET, 'click', rid)}@{domain}",
                    "bounce@example.test", f"bounce+{'a' * 200}@{domain}"):
        assert resolve_verp(engine, SECRET, address) is None, address
    assert resolve_verp(engine, None, genuine) is None


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "etc_passwd"),
    ("..\\..\\windows\\system32\\evil.dll", "windows_system32_evil.dll"),
    ("invoice\x00.pdf\x07", "invoice_.pdf_"),
    ("/absolute/path.txt", "absolute_path.txt"),
    ("...", "attachment"),
    ("normal report.pdf", "normal report.pdf"),
])
def test_attachment_filenames_are_sanitised(name: str, expected: str) -> None:
    assert sanitize_filename(name) == expected


def test_hostile_attachment_names_in_a_parsed_mail() -> None:
    raw = (b"From: a@client.test\r\nTo: sales@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
           b"--b\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename=\"../../../root/.ssh/authorized_keys\"\r\n\r\nkey\r\n"
           b"--b\r\nContent-Type: text/plain; name=\"a\x01b|c;rm -rf.txt\"\r\n"
           b"Content-Disposition: attachment\r\n\r\nx\r\n--b--\r\n")
    content = extract_content(parse_mail(raw))
    names = [a.filename for a in content.attachments]
    assert names and all("/" not in n and "\\" not in n and not any(ord(ch) < 32 for ch in n) for n in names)
    assert "root_.ssh_authorized_keys" in names


def test_auth_failures_window_per_address():
    """The cross-session AUTH limit: counted per address, forgotten as failures leave the window, bounded."""
    from gateway.auth_throttle import AuthFailures

    now = [1000.0]
    throttle = AuthFailures(3, 60.0, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("192.0.2.1")
    assert throttle.blocked_for("192.0.2.1") == 0.0
    now[0] += 10
    throttle.failed("192.0.2.1")
    assert throttle.blocked_for("192.0.2.1") == pytest.approx(50.0)  # until the first failure is 60 s old
    assert throttle.blocked_for("192.0.2.2") == 0.0                   # another address is not affected
    now[0] += 50.5
    assert throttle.blocked_for("192.0.2.1") == 0.0
    throttle.failed("192.0.2.1")  # in the window now: the one at +10 s and this one
    assert throttle.blocked_for("192.0.2.1") == 0.0
    throttle.failed("192.0.2.1")
    assert throttle.blocked_for("192.0.2.1") == pytest.approx(9.5)  # until the one at +10 s is 60 s old
    throttle.configure(5, 60.0)   # reload with a higher limit: the count stays, the address is free again
    assert throttle.blocked_for("192.0.2.1") == 0.0

    throttle.max_clients = 4
    for k in range(10):
        throttle.failed(f"198.51.100.{k}")
    assert len(throttle._failures) <= 4
