"""ARF (RFC 5965) feedback reports → Complaint."""

from __future__ import annotations

import email

from routing.arf import parse_arf
from tests.bounce_fixtures import fixture


def test_feedback_report_fields():
    complaint = parse_arf(fixture("arf.eml"))
    assert complaint is not None
    assert complaint.feedback_type == "abuse"
    assert complaint.original_recipient == "quinn@hotmail.example"
    assert complaint.original_message_id == "<offer-46@mail.example.com>"
    assert complaint.user_agent == "SomeGenerator/1.0"
    assert complaint.source_ip == "192.0.2.25"
    assert complaint.reported_domain == "mail.example.com"


def test_dsn_and_plain_mail_are_not_complaints():
    assert parse_arf(fixture("dsn_multi.eml")) is None
    assert parse_arf(fixture("human_reply.eml")) is None


def test_headers_only_original_and_missing_fields():
    raw = (b"From: fbl@isp.example\nContent-Type: multipart/report; report-type=\"feedback-report\"; boundary=z\n\n"
           b"--z\nContent-Type: text/plain\n\nreport\n--z\nContent-Type: message/feedback-report\n\n"
           b"Feedback-Type: Fraud\nVersion: 1\n--z\nContent-Type: text/rfc822-headers\n\n"
           b"Message-ID: <m-1@mail.example.com>\nSubject: hi\n--z--\n")
    complaint = parse_arf(email.message_from_bytes(raw))
    assert complaint is not None
    assert (complaint.feedback_type, complaint.original_message_id, complaint.original_recipient) == \
        ("fraud", "<m-1@mail.example.com>", None)


def test_broken_report_never_raises():
    raw = b"Content-Type: multipart/report; report-type=feedback-report\n\nno boundary"
    complaint = parse_arf(email.message_from_bytes(raw))
    assert complaint is None or complaint.feedback_type == "abuse"
