"""RFC 3464 parsing and the DSN path of classify_bounce, on our own fixtures."""

from __future__ import annotations

import email

from routing.bounce import classify_bounce, original_message_id
from routing.dsn import parse_dsn
from tests.bounce_fixtures import fixture


def test_every_recipient_block_is_read_not_only_the_first():
    rows = parse_dsn(fixture("dsn_multi.eml"))
    assert [(r.recipient, r.action, r.status) for r in rows] == [
        ("gone@example.org", "failed", "5.1.1"),
        ("full@example.org", "failed", "5.2.2"),
        ("slow@example.com", "delayed", "4.4.1"),
        ("fine@example.com", "delivered", "2.0.0"),
    ]
    assert rows[0].remote_mta == "mx1.example.org"
    assert rows[0].reporting_mta == "mx.example.net"
    assert rows[0].diagnostic == ("smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected: "
                                  "User unknown in local recipient table")


def test_classify_gives_one_result_per_failed_or_delayed_recipient():
    report = classify_bounce(fixture("dsn_multi.eml"))
    assert report is not None and report.via == "dsn"
    got = {r.recipient: (r.action, r.kind, r.reason) for r in report.results}
    assert got == {
        "gone@example.org": ("failed", "hard", "userunknown"),
        "full@example.org": ("failed", "soft", "mailboxfull"),
        "slow@example.com": ("delayed", "soft", "networkerror"),
    }
    assert {r.original_message_id for r in report.results} == {"<offer-42@mail.example.com>"}
    assert not report.deferred_only


def test_all_delayed_report_is_deferred_only():
    report = classify_bounce(fixture("dsn_delayed.eml"))
    assert report is not None and report.deferred_only
    (result,) = report.results
    assert (result.recipient, result.kind, result.action) == ("slow@example.com", "soft", "delayed")


def test_original_id_from_rfc822_headers_part_and_microsoft_header():
    assert original_message_id(fixture("dsn_delayed.eml")) == "<offer-43@mail.example.com>"


def test_malformed_report_content_type_is_still_a_dsn():
    report = classify_bounce(fixture("dsn_malformed_ctype.eml"))
    assert report is not None
    (result,) = report.results
    assert (result.recipient, result.status, result.kind, result.reason) == \
        ("nobody@example.org", "5.1.1", "hard", "userunknown")


def test_success_only_dsn_is_not_a_bounce():
    raw = (b"From: MAILER-DAEMON@mx.example.net\nSubject: Successful Mail Delivery Report\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
           b"--b\nContent-Type: text/plain\n\nDelivered.\n--b\nContent-Type: message/delivery-status\n\n"
           b"Reporting-MTA: dns; mx.example.net\n\nFinal-Recipient: rfc822; ok@example.org\n"
           b"Action: delivered\nStatus: 2.0.0\n--b--\n")
    assert classify_bounce(email.message_from_bytes(raw)) is None


def test_blocks_without_a_blank_line_between_them_are_split():
    raw = (b"From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
           b"--b\nContent-Type: message/delivery-status\n\n"
           b"Reporting-MTA: dns; mx.example.net\n\n"
           b"Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n"
           b"Final-Recipient: rfc822; b@example.org\nAction: failed\nStatus: 5.2.2\n--b--\n")
    rows = parse_dsn(email.message_from_bytes(raw))
    assert [(r.recipient, r.status) for r in rows] == [("a@example.org", "5.1.1"), ("b@example.org", "5.2.2")]
