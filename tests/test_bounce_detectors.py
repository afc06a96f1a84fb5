"""Each NDR detector alone, on a hand-written sample of its family; and that none fires on other families'
samples where it should not."""

from __future__ import annotations

import pytest

from routing.detectors import DETECTORS
from routing.detectors.aol import AolDetector
from routing.detectors.base import cut_returned, notice_text
from routing.detectors.domino import DominoDetector
from routing.detectors.exchange import ExchangeDetector
from routing.detectors.exim import EximDetector
from routing.detectors.groupwise import GroupwiseDetector
from routing.detectors.phquery import PhqueryDetector
from routing.detectors.postfix import PostfixDetector
from routing.detectors.qmail import QmailDetector
from routing.detectors.recipient_list import RecipientListDetector
from routing.detectors.sendmail import SendmailDetector
from routing.detectors.simple import SimpleDetector
from routing.detectors.smtp32 import Smtp32Detector
from routing.detectors.x_failed_recipients import XFailedRecipientsDetector
from tests.bounce_fixtures import fixture


def _addrs(hits):
    return [h.recipient for h in hits]


@pytest.mark.parametrize("detector, name, expected", [
    (EximDetector(), "exim.eml", ["ghost@example.org"]),
    (QmailDetector(), "qmail.eml", ["first@example.org", "second@example.org"]),
    (QmailDetector(), "courier.eml", ["sam@example.org"]),  # Courier shares qmail's "<addr>:" layout
    (PostfixDetector(), "postfix_old.eml", ["nohost@nowhere.example"]),
    (ExchangeDetector(), "exchange_old.eml", ["bob@corp.example.com"]),
    (ExchangeDetector(), "exchange_new.eml", ["carol@corp.example.com"]),
    (DominoDetector(), "domino.eml", ["dave@corp.example.com"]),
    (GroupwiseDetector(), "groupwise.eml", ["erin@gw.example.edu"]),
    (AolDetector(), "aol.eml", ["frank@aol.example"]),
    (Smtp32Detector(), "smtp32.eml", ["grace@example.net"]),
    (SendmailDetector(), "sendmail.eml", ["heidi@box.example.net", "heidi@example.net"]),
    (PhqueryDetector(), "phquery.eml", ["ivan@cs.uni.example.edu", "ivan@uni.example.edu"]),
    (RecipientListDetector(), "recipient_list.eml", ["judy@example.org"]),
    (SimpleDetector(), "simple_sentence.eml", ["leo@example.org"]),
    (XFailedRecipientsDetector(), "x_failed_only.eml", ["mia@example.org", "nick@example.org"]),
])
def test_detector_finds_its_family(detector, name, expected):
    assert sorted(_addrs(detector.detect(fixture(name)))) == sorted(expected)


def test_exim_diagnostic_and_status_come_from_the_transcript():
    (hit,) = EximDetector().detect(fixture("exim.eml"))
    assert hit.status == "5.1.1" and "User unknown" in (hit.diagnostic or "") and not hit.delayed


def test_exim_delay_warning_is_delayed():
    (hit,) = EximDetector().detect(fixture("exim_warning.eml"))
    assert (hit.recipient, hit.delayed) == ("later@example.org", True)


def test_qmail_reasons_are_per_address():
    first, second = QmailDetector().detect(fixture("qmail.eml"))
    assert first.status == "5.1.1"
    assert "over quota" in (second.diagnostic or "")


def test_returned_message_is_never_read():
    # qmail.eml's returned copy names third@example.org: it did not bounce
    assert "third@example.org" not in _addrs(QmailDetector().detect(fixture("qmail.eml")))
    assert "--- Below this line" not in cut_returned(notice_text(fixture("qmail.eml")))


@pytest.mark.parametrize("name", ["exim.eml", "qmail.eml", "postfix_old.eml", "exchange_old.eml", "domino.eml",
                                  "smtp32.eml", "sendmail.eml", "recipient_list.eml"])
def test_no_detector_returns_the_ndr_sender_or_postmaster(name):
    for detector in DETECTORS:
        for hit in detector.detect(fixture(name)):
            assert not hit.recipient.lower().startswith(("postmaster@", "mailer-daemon@"))
            assert hit.recipient != "sales@mail.example.com"


@pytest.mark.parametrize("name", ["ooo_reply.eml", "human_reply.eml", "arf.eml"])
def test_detectors_stay_silent_on_mail_that_is_not_an_ndr(name):
    for detector in DETECTORS:
        assert detector.detect(fixture(name)) == (), detector.name


def test_detector_list_is_ordered_specific_first():
    names = [d.name for d in DETECTORS]
    assert names.index("simple") > names.index("qmail")
    assert names.index("simple") > names.index("exim")
    assert len(set(names)) == len(names)
