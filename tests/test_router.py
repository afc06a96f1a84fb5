"""Router precedence: one table row per DESIGN.md precedence step (first match wins), with pinned detectors.

Each row builds a mail that *also* qualifies for every later step, so it fails if the order is wrong.
"""

from __future__ import annotations

import hashlib

import pytest

from routing.bounce import VerpHit
from routing.model import LOOP_HEADER, Action, ThreadHit
from tests.test_router_support import FAKE, SeenOnce, decide, hit, mail

ALIAS = "groups@test.mycompany.com"
#: qualifies for reply (known thread), alias (To groups@), auto-reply and bounce unless a row removes it
EVERYTHING = f"""To: {ALIAS}
In-Reply-To: <parent@test>
X-Fake-Auto: yes
X-Fake-Arf: abuse
X-Fake-Bounce: hard gone@client.net
Subject: everything"""
THREAD = hit("<parent@test>", "mail.test.gateway", 9, outbound=True)  # same model as ALIAS


def _without(headers: str, *names: str) -> str:
    return "\n".join(line for line in headers.splitlines() if not line.split(":", 1)[0] in names)


def test_row1_duplicate_beats_everything():
    raw = mail(EVERYTHING + f"\n{LOOP_HEADER}: 1")
    sha = hashlib.sha256(raw).hexdigest()
    d = decide(raw, threads=THREAD, duplicates=SeenOnce("<dup@x>", sha))
    assert d.action != Action.DUPLICATE  # different Message-ID: not the one seen
    raw = mail(EVERYTHING + f"\n{LOOP_HEADER}: 1\nMessage-ID: <dup@x>")
    d = decide(raw, threads=THREAD, duplicates=SeenOnce("<dup@x>", hashlib.sha256(raw).hexdigest()))
    assert d.action == Action.DUPLICATE and d.reason == "duplicate"
    assert d.message_id == "<dup@x>"


def test_row1_same_message_id_other_body_is_not_a_duplicate():
    raw = mail(EVERYTHING + "\nMessage-ID: <dup@x>")
    d = decide(raw, duplicates=SeenOnce("<dup@x>", "0" * 64))
    assert d.action != Action.DUPLICATE


def test_row2_loop_our_header_beats_bounce():
    d = decide(mail(EVERYTHING + f"\n{LOOP_HEADER}: refusal"), threads=THREAD)
    assert d.action == Action.LOOP and d.reason == "own mail"


def test_row2_loop_odoo_tag_in_references():
    raw = mail(_without(EVERYTHING, "In-Reply-To")
               + "\nReferences: <a@x> <17.1-openerp-loop-detection-bounce-email@odoo.local>")
    assert decide(raw).action == Action.LOOP


def test_limits_quarantine_after_loop_checks():
    headers = EVERYTHING + "".join(f"\nX-Pad-{i}: x" for i in range(20))
    d = decide(mail(headers), threads=THREAD, max_headers=10)
    assert d.action == Action.QUARANTINE and d.reason == "limits: too many headers"
    assert decide(mail(headers + f"\n{LOOP_HEADER}: 1"), max_headers=10).action == Action.LOOP


def test_row3_bounce_beats_complaint_auto_reply_reply_and_alias():
    d = decide(mail(EVERYTHING), threads=THREAD)
    assert d.action == Action.BOUNCE
    assert [(b.recipient, b.kind, b.reason) for b in d.bounces] == [("gone@client.net", "hard", "userunknown")]


def test_row3_verp_recipient_is_resolved_and_passed_to_the_bounce_detector():
    seen: list[str] = []

    def verp(address: str) -> VerpHit | None:
        seen.append(address)
        return VerpHit("orig@client.net", "<out-1@test>") if address.startswith("bounce.test+ok") else None

    raw = mail("To: someone@test.mycompany.com\nSubject: Undeliverable")
    d = decide(raw, rcpt=("bounce.test+okTOKEN@test.mycompany.com",), verp=verp)
    assert seen == ["bounce.test+oktoken@test.mycompany.com"]
    assert d.action == Action.BOUNCE and d.bounces[0].recipient == "orig@client.net"
    assert d.bounces[0].original_message_id == "<out-1@test>"


def test_row3_delayed_only_is_deferred_not_bounce():
    d = decide(mail(_without(EVERYTHING, "X-Fake-Bounce") + "\nX-Fake-Bounce: delayed late@client.net"),
               threads=THREAD)
    assert d.action == Action.DEFERRED and d.bounces[0].action == "delayed"


def test_row3_mixed_failed_and_delayed_is_a_bounce_listing_both():
    d = decide(mail("To: x@test.mycompany.com\nX-Fake-Bounce: delayed a@c.net, hard b@c.net"))
    assert d.action == Action.BOUNCE
    assert [(b.recipient, b.action) for b in d.bounces] == [("a@c.net", "delayed"), ("b@c.net", "failed")]


def test_row4_complaint_beats_auto_reply_reply_and_alias():
    d = decide(mail(_without(EVERYTHING, "X-Fake-Bounce")), threads=THREAD)
    assert d.action == Action.COMPLAINT and d.complaint is not None
    assert d.complaint.feedback_type == "abuse"


def test_row4_feedback_report_skips_the_bounce_detectors():
    raw = mail(EVERYTHING + '\nContent-Type: multipart/report; report-type=feedback-report; boundary="b"',
               "--b\nContent-Type: text/plain\n\nspam report\n--b--\n")
    assert decide(raw, threads=THREAD).action == Action.COMPLAINT


def test_row5_auto_reply_goes_to_the_thread_it_answers():
    d = decide(mail(_without(EVERYTHING, "X-Fake-Bounce", "X-Fake-Arf")), threads=THREAD)
    assert d.action == Action.AUTO_REPLY
    assert d.auto_reply_indicator == "X-Fake-Auto: yes"
    assert [(t.model, t.res_id) for t in d.targets] == [("mail.test.gateway", 9)]
    assert d.replied_message_id == "<parent@test>"  # it answers an outbound mail we relayed


def test_row5_auto_reply_to_an_alias_never_creates():
    d = decide(mail(f"To: {ALIAS}\nX-Fake-Auto: yes\nSubject: Out of office"))
    assert d.action == Action.AUTO_REPLY and d.targets == () and d.replied_message_id is None


def test_row6_reply_beats_alias():
    d = decide(mail(_without(EVERYTHING, "X-Fake-Bounce", "X-Fake-Arf", "X-Fake-Auto")), threads=THREAD)
    assert d.action == Action.REPLY
    assert [(t.model, t.res_id, t.parent_message_id) for t in d.targets] == [("mail.test.gateway", 9, "<parent@test>")]
    assert d.replied_message_id == "<parent@test>"
    assert any("matches mail.test.gateway 9" in line for line in d.explanation)


def test_row6_outlook_truncated_references_uses_in_reply_to():
    # Odoo ignores In-Reply-To when References is present; the parent here is only in In-Reply-To.
    raw = mail("To: catchall.test@test.mycompany.com\nReferences: <unknown-root@x>\nIn-Reply-To: <parent@test>")
    d = decide(raw, threads=THREAD)
    assert d.action == Action.REPLY and d.targets[0].res_id == 9


def test_row7_alias_creates_one_target_per_alias():
    d = decide(mail(f"To: {ALIAS}, test@test.mycompany.com\nCc: groups@TEST.mycompany.com"))
    assert d.action == Action.CREATE
    assert [(t.model, t.alias) for t in d.targets] == [
        ("mail.test.gateway", ALIAS), ("mail.test.container", "test@test.mycompany.com")]


def test_row7_bcc_alias_only_in_envelope():
    d = decide(mail("To: someone@client.net"), rcpt=(ALIAS,))
    assert d.action == Action.CREATE and d.targets[0].alias == ALIAS
    assert d.recipients == (ALIAS,)


def test_row8_domain_default_alias():
    d = decide(mail("To: nobody@strict.example.org"))
    assert d.action == Action.CREATE and d.reason == "default alias"
    assert d.targets[0].alias == "help@strict.example.org"


@pytest.mark.parametrize("to,reason", [
    ("someone@client.net", "no recipient in our domains"),
    ("catchall.test@test.mycompany.com", "unknown thread (a reply whose parent Odoo does not hold)"),
    ("nobody@test.mycompany.com", "no alias matched"),
])
def test_row9_quarantine_with_reason(to, reason):
    d = decide(mail(f"To: {to}\nIn-Reply-To: <unknown@x>"))
    assert d.action == Action.QUARANTINE and d.reason == reason
    assert any("match no known thread" in line for line in d.explanation)
    assert d.explanation[-1].startswith("no route")


def test_reply_to_an_unknown_thread_via_the_catchall_says_so():
    """The catchall is Odoo's Reply-To: a reply there whose thread nobody holds lacks a thread, not an alias;
    new mail to the catchall alone is still 'catchall only'."""
    d = decide(mail("To: catchall.test@test.mycompany.com\nReferences: <gone@x>\nIn-Reply-To: <gone@x>"))
    assert d.action == Action.QUARANTINE and d.reason.startswith("unknown thread")
    assert "add an alias" not in d.explanation[-1] and "adding an alias" not in d.explanation[-1]
    assert "Message-IDs exist in Odoo" in d.explanation[-1]
    d = decide(mail("To: catchall.test@test.mycompany.com\nSubject: hello"))
    assert d.action == Action.QUARANTINE and d.reason == "catchall only"


def test_every_decision_carries_message_id_and_explanation():
    for raw in (mail(EVERYTHING), mail("To: nobody@x.org"), mail(f"To: {ALIAS}")):
        d = decide(raw, threads=THREAD)
        assert d.message_id and d.explanation


def test_a_failing_detector_quarantines_rather_than_guessing():
    from routing.router import Detectors

    def boom(msg, **kw):
        raise RuntimeError("parser bug")

    d = decide(mail(f"To: {ALIAS}"), detectors=Detectors(bounce=boom, arf=FAKE.arf, auto_reply=FAKE.auto_reply))
    assert d.action == Action.QUARANTINE and d.reason == "bounce detector error"
    assert any("bounce detector failed (RuntimeError: parser bug)" in line for line in d.explanation)
    assert d.message_id and d.recipients


def test_decision_json_round_trip():
    from routing.model import Decision

    d = decide(mail(EVERYTHING), threads={"<parent@test>": ThreadHit("<parent@test>", "m", 1)})
    assert Decision.from_json(d.to_json()) == d


def test_a_detector_missing_from_the_build_is_skipped_and_said_so():
    from routing.router import Detectors

    def missing(msg, **kw):
        raise NotImplementedError

    d = decide(mail(f"To: {ALIAS}"), detectors=Detectors(bounce=missing, arf=missing, auto_reply=missing))
    assert d.action == Action.CREATE
    assert "bounce detector not available in this build; skipped" in d.explanation


def test_long_recipient_lists_are_summarised_in_the_explanation():
    cc = ", ".join(f"p{i}@client.net" for i in range(50))
    d = decide(mail(f"To: {ALIAS}\nCc: {cc}"))
    assert d.action == Action.CREATE
    assert "… and 31 more recipient(s)" in d.explanation
    assert len(d.explanation) < 30


# ------------------------------------------------------------ a delivery complaint is not a bounce
COMPLAINTS = ["My parcel was not delivered", "Order 1234: delivery delayed", "Paket unzustellbar?",
              "Re: Undelivered Mail Returned to Sender"]


@pytest.mark.parametrize("subject", COMPLAINTS)
def test_a_customer_writing_about_a_delivery_is_routed_like_any_mail(subject):
    """A person's subject alone never makes a bounce: the mail goes where it would go without that subject."""
    from routing.router import DEFAULT_DETECTORS

    thread = hit("<known@test>", "mail.test.gateway", 3)
    for extra, threads in (("\nIn-Reply-To: <known@test>", thread), ("", None)):
        def route_with(subj):
            raw = mail(f"From: Alice <alice@customer.example>\nTo: {ALIAS}\nSubject: {subj}{extra}",
                       "Hi,\nmy order to bob@client.net could not be delivered.\n"
                       "Your server said: 550 5.1.1 user unknown\n")
            return decide(raw, threads=threads, detectors=DEFAULT_DETECTORS, mail_from="alice@customer.example")

        d, plain = route_with(subject), route_with("Question about my order")
        assert d.action == plain.action == (Action.REPLY if threads else Action.CREATE)
        assert d.targets == plain.targets and d.bounces == ()
        assert any("a person can write that subject" in line for line in d.explanation)


NDR_SHAPED = ("The following address failed:\n\n   bob@client.net\n\n550 5.1.1 user unknown\n")


def test_the_same_subject_from_a_null_sender_is_a_bounce():
    from routing.router import DEFAULT_DETECTORS

    raw = mail(f"From: mailer@isp.example.net\nTo: {ALIAS}\nSubject: Mail could not be delivered", NDR_SHAPED)
    d = decide(raw, detectors=DEFAULT_DETECTORS, mail_from="")
    assert d.action == Action.BOUNCE and [b.recipient for b in d.bounces] == ["bob@client.net"]
    d = decide(raw.replace(b"From: ", b"Return-Path: <>\r\nFrom: ", 1), detectors=DEFAULT_DETECTORS)
    assert d.action == Action.BOUNCE


def test_a_subject_only_ndr_whose_text_names_a_failed_recipient_is_quarantined_not_a_new_record():
    """Only the Subject says NDR and no machine sign backs it, yet a detector reads a failed recipient in
    NDR-shaped prose: a probable bounce an operator should look at, not a lead made of a bounce."""
    from routing.router import DEFAULT_DETECTORS

    raw = mail(f"From: mailer@isp.example.net\nTo: {ALIAS}\nSubject: Mail could not be delivered", NDR_SHAPED)
    d = decide(raw, detectors=DEFAULT_DETECTORS, mail_from="alice@isp.example.net")
    assert d.action == Action.QUARANTINE and d.reason.startswith("probable bounce: ")
    assert d.targets == () and d.bounces == ()
    assert any("bob@client.net" in line for line in d.explanation)


@pytest.mark.parametrize("subject, threads, action", [
    ("Fwd: Mail could not be delivered", None, Action.CREATE),  # a customer passing the notice on
    ("Mail could not be delivered", hit("<known@test>", "mail.test.gateway", 3), Action.REPLY),  # a conversation
])
def test_a_person_passing_on_or_answering_with_an_ndr_text_is_routed_as_mail(subject, threads, action):
    from routing.router import DEFAULT_DETECTORS

    raw = mail(f"From: Alice <alice@customer.example>\nTo: {ALIAS}\nSubject: {subject}\n"
               "In-Reply-To: <known@test>", NDR_SHAPED)
    d = decide(raw, threads=threads, detectors=DEFAULT_DETECTORS, mail_from="alice@customer.example")
    assert d.action == action and d.bounces == ()
    assert any("a person can write that subject" in line for line in d.explanation)


def test_a_bounce_naming_no_recipient_is_quarantined_not_dropped():
    from routing.router import DEFAULT_DETECTORS

    raw = mail(f"From: MAILER-DAEMON@mx.other.net\nTo: {ALIAS}\nSubject: Warning: could not send message",
               "Some text only.\n")
    d = decide(raw, detectors=DEFAULT_DETECTORS)
    assert d.action == Action.QUARANTINE and d.reason == "bounce with no identifiable recipient"
    assert d.targets == () and d.bounces == ()


def test_every_decision_field_survives_the_json_round_trip():
    """Decisions are stored as JSON and read back for delivery and retries: nothing may be lost on the way
    (a lost create_partner made a retried mail to a `partners` alias refused). Every field is set to a
    non-default value, and a field added later without JSON support fails here."""
    import dataclasses
    import json

    from routing.model import BounceResult, Complaint, Decision, Target

    target = Target(model="crm.lead", res_id=5, alias="partners@test.mycompany.com", contact="partners",
                    defaults=(("type", "lead"), ("team_id", 3)), create_partner=True,
                    parent_message_id="<parent@test>", parent_model="crm.team", parent_res_id=2)
    bounce = BounceResult("gone@client.net", "hard", "userunknown", "5.1.1", "550 5.1.1 no such user",
                          "<out@test>", "delayed", "mx.client.net", "dsn")
    complaint = Complaint("abuse", "victim@client.net", "<out@test>", "Yahoo!-Mail-Feedback/1.0", "192.0.2.1",
                          "test.mycompany.com")
    d = Decision(action=Action.CREATE, explanation=("why",), targets=(target,), bounces=(bounce,),
                 complaint=complaint, tag="vip", reason="alias", recipients=("partners@test.mycompany.com",),
                 auto_reply_indicator="X-Autoreply: yes", replied_message_id="<out@test>",
                 message_id="<in@client.net>")
    for obj in (d, target, bounce, complaint):
        unset = [f.name for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING
                 and getattr(obj, f.name) == f.default]
        assert not unset, f"{type(obj).__name__}: set {unset} in this test"
    back = Decision.from_json(json.loads(json.dumps(d.to_json())))
    assert back == d
    assert back.targets[0].create_partner


@pytest.mark.parametrize("headers", [
    "Precedence: bulk\nList-Id: <users.lists.example.org>\nIn-Reply-To: <elsewhere@lists.example.org>",
    "X-MS-Exchange-Inbox-Rules-Loop: support@customer.example\n"
    "X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent",
])
def test_list_mail_and_exchange_rule_forwards_create_a_record(headers):
    """Mailing-list posts and mail an Exchange inbox rule forwards are people's mail, not auto-replies."""
    from routing.router import DEFAULT_DETECTORS

    raw = mail(f"From: Alice <alice@customer.example>\nTo: {ALIAS}\nSubject: Need help with invoice\n{headers}")
    d = decide(raw, detectors=DEFAULT_DETECTORS, mail_from="alice@customer.example")
    assert d.action == Action.CREATE and [t.model for t in d.targets] == ["mail.test.gateway"]
