"""The Message-ID a relayed mail is indexed under is the normalised one every inbound lookup uses
(routing.threads.normalize_message_id): replies, bounces and events find their thread by it."""

from __future__ import annotations

import pytest

from gateway.relay import RelayPlan, Submission, read_submission, record_submissions
from gateway.store import open_store
from gateway.thread_lookup import is_outbound, record_of
from tests.test_relay_support import SECRET


@pytest.fixture
def engine(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'gw.db'}", synchronous="NORMAL")
    yield eng
    eng.dispose()


@pytest.mark.parametrize("header", [
    b"Message-ID: abc.123-openerp-5-crm.lead@odoo.example.com",                  # bare id, no brackets
    b"Message-ID: <abc.123-openerp-5-crm.lead@odoo.example.com> (added by relay)",  # a comment after it
    b"Message-ID:\r\n <abc.123-openerp-5-crm.lead@\r\n odoo.example.com>",          # folded inside the id
])
def test_a_relayed_mail_is_found_by_the_id_a_reply_names(engine, header: bytes) -> None:
    """The id was indexed as written (bare, with its comment, with folding whitespace): a reply whose
    In-Reply-To names `<abc.123-openerp-5-crm.lead@odoo.example.com>` found no thread."""
    raw = header + b"\r\nFrom: a@example.test\r\nSubject: x\r\n\r\nx\r\n"
    plan = RelayPlan(secret=SECRET.encode(), verp_domain="example.test", track=False, tracking_base="http://t")
    with engine.begin() as conn:
        copies = record_submissions(conn, [Submission(raw, "bounce@example.test", ("jo@customer.test",),
                                                      read_submission(raw), plan)])[0]
    wanted = "<abc.123-openerp-5-crm.lead@odoo.example.com>"
    assert copies[0].message_id == wanted  # the events' mail.message_id too
    assert is_outbound(engine, wanted) is not None
    assert record_of(engine, wanted) == ("crm.lead", 5)
