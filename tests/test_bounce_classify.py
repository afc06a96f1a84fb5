"""classify_bounce end to end on our fixtures: VERP, bounce address, heuristics, never raising."""

from __future__ import annotations

import email

import pytest

from routing.bounce import VerpHit, classify_bounce, ndr_indicator
from tests.bounce_fixtures import FIXTURES, fixture


def test_heuristic_ndr_gives_kind_and_reason():
    report = classify_bounce(fixture("exim.eml"))
    assert report is not None and report.via == "exim"
    (r,) = report.results
    assert (r.recipient, r.kind, r.reason, r.status, r.action) == ("ghost@example.org", "hard", "userunknown",
                                                                  "5.1.1", "failed")
    assert r.original_message_id == "<offer-44@mail.example.com>"
    assert r.detector == "exim"


def test_bounce_with_auto_submitted_is_still_a_bounce():
    assert fixture("exim.eml")["Auto-Submitted"] == "auto-replied"
    assert classify_bounce(fixture("exim.eml")).results


def test_verp_recipient_is_authoritative_and_dsn_supplies_status():
    report = classify_bounce(fixture("dsn_multi.eml"),
                             verp=VerpHit(recipient="full@example.org", original_message_id="<sent-1@x>"))
    assert report.via == "verp"
    (r,) = report.results
    assert (r.recipient, r.kind, r.reason, r.status, r.original_message_id) == \
        ("full@example.org", "soft", "mailboxfull", "5.2.2", "<sent-1@x>")


def test_verp_recipient_replaces_a_forwarded_final_address():
    report = classify_bounce(fixture("exim.eml"), verp=VerpHit(recipient="alias@example.org"))
    (r,) = report.results
    assert (r.recipient, r.reason, r.kind) == ("alias@example.org", "userunknown", "hard")


def test_verp_ndr_without_readable_failure_is_soft_undefined():
    report = classify_bounce(fixture("ndr_no_recipient.eml"), verp=VerpHit(recipient="x@example.org"))
    (r,) = report.results
    assert (r.recipient, r.kind, r.reason) == ("x@example.org", "soft", "undefined")


@pytest.mark.parametrize("name", ["ooo_reply.eml", "human_reply.eml"])
def test_verp_auto_reply_or_normal_mail_is_not_a_bounce(name):
    assert classify_bounce(fixture(name), verp=VerpHit(recipient="x@example.org")) is None
    assert classify_bounce(fixture(name), to_bounce_address=True) is None


def test_ndr_naming_nobody_is_an_empty_report_not_none():
    report = classify_bounce(fixture("ndr_no_recipient.eml"))
    assert report is not None and report.results == () and report.via == "ndr-unattributed"
    assert classify_bounce(fixture("ndr_no_recipient.eml"), to_bounce_address=True).via == "bounce-address"


def test_arf_is_not_a_bounce():
    assert classify_bounce(fixture("arf.eml")) is None


def test_x_failed_recipients_alone_is_enough():
    report = classify_bounce(fixture("x_failed_only.eml"))
    assert [r.recipient for r in report.results] == ["mia@example.org", "nick@example.org"]
    assert all(r.kind == "soft" and r.reason == "undefined" for r in report.results)  # never hard on a guess


def test_ndr_indicator_reasons():
    assert ndr_indicator(fixture("qmail.eml")).startswith("From:")
    assert ndr_indicator(fixture("human_reply.eml")) is None
    assert ndr_indicator(fixture("arf.eml")) is None


@pytest.mark.parametrize("raw", [
    b"",
    b"\xff\xfe\x00garbage",
    b"Content-Type: multipart/report; report-type=delivery-status\n\nno boundary at all",
    b"From: MAILER-DAEMON@x\nContent-Type: multipart/report; boundary=\"b\"\n\n--b\n"
    b"Content-Type: message/delivery-status\n\nFinal-Recipient: \nAction:\nStatus: 9.9.9\n--b",
    b"From: MAILER-DAEMON@x\nContent-Type: text/plain; charset=unknown-8bit\n"
    b"Content-Transfer-Encoding: base64\n\n!!!not base64!!!",
    b"From: =?bogus?Q?x?= <postmaster@x>\nSubject: =?utf-8?b?invalid?=\n\n<a@b.example>:\n",
])
def test_malformed_input_never_raises(raw):
    msg = email.message_from_bytes(raw)
    classify_bounce(msg)
    classify_bounce(msg, verp=VerpHit(recipient="v@example.org"), to_bounce_address=True)


def test_every_fixture_classifies_without_raising():
    for path in sorted(FIXTURES.glob("*.eml")):
        classify_bounce(email.message_from_bytes(path.read_bytes()))


def _mangled_fixtures():
    """Every fixture truncated at several points and with bytes flipped (fixed seed): broken MIME trees,
    cut headers, missing boundaries, invalid encodings."""
    import random
    rng = random.Random(3464)
    for path in sorted(FIXTURES.glob("*.eml")):
        raw = path.read_bytes()
        for cut in (len(raw) // 5, len(raw) // 3, len(raw) // 2, len(raw) * 4 // 5):
            yield raw[:cut]
        flipped = bytearray(raw)
        for _ in range(max(1, len(raw) // 50)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        yield bytes(flipped)


def test_each_stage_survives_mangled_input_without_the_safety_net():
    """classify_bounce has a last-resort except; the stages themselves must not need it."""
    from routing.bounce import original_message_id
    from routing.detectors import DETECTORS
    from routing.dsn import parse_dsn

    for raw in _mangled_fixtures():
        msg = email.message_from_bytes(raw)
        parse_dsn(msg)
        original_message_id(msg)
        ndr_indicator(msg)
        for detector in DETECTORS:
            detector.detect(msg)


def test_x_failed_recipients_completes_what_the_prose_left_out():
    report = classify_bounce(fixture("exim_two_failed.eml"))
    got = {r.recipient: (r.reason, r.kind) for r in report.results}
    assert got == {"one@example.org": ("userunknown", "hard"), "two@example.org": ("undefined", "soft")}


def test_human_mail_to_a_verp_address_quoting_ndr_shapes_is_not_a_bounce():
    raw = (b"From: Rita <rita@example.org>\nTo: bounce+tok@mail.example.com\nSubject: Re: your newsletter\n\n"
           b"Why do I get this? I was told:\n\n<rita@example.org>:\nSorry, no mailbox here by that name.\n")
    assert classify_bounce(email.message_from_bytes(raw), verp=VerpHit(recipient="rita@example.org")) is None


def test_a_subject_alone_is_flagged_so_the_router_can_ask_the_envelope():
    human = email.message_from_string(
        "From: Alice <alice@customer.example>\nTo: sales@example.com\nSubject: Delivery failure for order 77\n\n"
        "The following address failed:\n\n   bob@client.net\n\nYour server said: 550 5.1.1 user unknown\n")
    assert classify_bounce(human).subject_only
    assert not classify_bounce(human, to_bounce_address=True).subject_only
    human["Return-Path"] = "<>"
    assert not classify_bounce(human).subject_only  # the delivering MTA saw a null sender
    assert not classify_bounce(fixture("exim.eml")).subject_only


def _prose_ndr(reason_line: str, address_line: str) -> email.message.Message:
    return email.message_from_string(
        "From: Mail Delivery System <mailer-daemon@mx.example.net>\nTo: sales@example.com\n"
        "Subject: Undeliverable mail\n\nYour message could not be delivered.\n"
        f"{reason_line}\n\n{address_line}\n\nRegards, the mail system\n")


@pytest.mark.parametrize("reason_line, reason, kind", [
    ("The remote server said: 550 Recipient unknown", "userunknown", "hard"),
    ("Remote mailbox is full, try again later", "mailboxfull", "soft"),
])
def test_the_notice_explains_a_lone_recipient_when_the_detector_slice_does_not(reason_line, reason, kind):
    # the detector's slice is "(Originally addressed to ...)"; the reason is a paragraph away in the notice
    report = classify_bounce(_prose_ndr(reason_line, "(Originally addressed to ghost@example.org)"))
    (r,) = report.results
    assert (r.recipient, r.reason, r.kind) == ("ghost@example.org", reason, kind)


def test_a_diagnostic_that_names_a_reason_is_not_overridden_by_the_notice():
    report = classify_bounce(_prose_ndr("The remote server said: 550 Recipient unknown",
                                        "Quota violation for ghost@example.org"))
    (r,) = report.results
    assert (r.reason, r.kind) == ("mailboxfull", "soft")
