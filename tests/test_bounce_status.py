"""The status code / diagnostic text → (reason, hard|soft) table."""

from __future__ import annotations

import pytest

from routing.bounce_status import HARD_REASONS, STATUS_REASONS, TEXT_REASONS, classify_status, reason_from_text
from routing.model import BOUNCE_REASONS


def test_every_table_entry_is_in_the_fixed_vocabulary():
    assert set(STATUS_REASONS.values()) <= BOUNCE_REASONS
    assert {reason for reason, _ in TEXT_REASONS} <= BOUNCE_REASONS
    assert HARD_REASONS <= BOUNCE_REASONS


@pytest.mark.parametrize("status, diagnostic, reason, kind", [
    ("5.1.1", None, "userunknown", "hard"),
    ("5.1.2", None, "hostunknown", "hard"),
    ("5.1.6", None, "hasmoved", "hard"),
    ("5.1.10", "Recipient address has null MX", "notaccept", "hard"),
    ("5.2.2", "552 Mailbox full", "mailboxfull", "soft"),
    ("5.2.1", "account disabled", "suspend", "hard"),  # the recipient's account: stop sending
    ("5.3.4", None, "mesgtoolarge", "soft"),
    ("5.4.7", None, "expired", "soft"),
    ("5.7.1", "550 5.7.1 Our system has detected that this message is likely unsolicited mail", "spamdetected", "soft"),
    ("5.7.1", "554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org", "blocked", "soft"),
    ("5.7.1", "550 5.7.1 Unable to relay", "norelaying", "soft"),
    ("5.7.26", "DMARC policy", "securityerror", "soft"),
    ("4.2.2", "452 4.2.2 Mailbox full", "mailboxfull", "soft"),
    ("4.7.1", "450 4.7.1 Greylisted, please try again later", "policyviolation", "soft"),
    ("4.1.1", "450 4.1.1 user unknown (temporary lookup failure)", "userunknown", "soft"),  # 4.x.x is never hard
    ("5.0.0", "550 unknown user <x@example.org>", "userunknown", "hard"),
    ("5.0.0", "Requested action not taken: mailbox unavailable", "userunknown", "hard"),
    ("5.0.0", None, "undefined", "soft"),
    (None, "Quota exceeded", "mailboxfull", "soft"),
    (None, "Host not found", "hostunknown", "hard"),
    (None, "Connection timed out", "expired", "soft"),
    (None, "something nobody recognises", "undefined", "soft"),
    ("5.3.0", "553 5.3.0 <edwin@zzzzzzz.com>... Unknown E-Mail Address", "userunknown", "hard"),
])
def test_status_and_text_map_to_reason_and_kind(status, diagnostic, reason, kind):
    assert classify_status(status, diagnostic) == (reason, kind)


@pytest.mark.parametrize("status, text, reason, kind", [
    # about the address or account: hard once the failure is permanent
    ("5.2.1", "550 5.2.1 The email account that you tried to reach is disabled", "suspend", "hard"),
    (None, "Sorry your message to u@x.example cannot be delivered. This account has been disabled or discontinued",
     "suspend", "hard"),
    ("4.2.1", "450 4.2.1 account disabled", "suspend", "soft"),
    # a reason nobody can name, but the MTA says the recipient failed for good
    (None, "This is a permanent error; I've given up. Sorry it didn't work out.", "undefined", "hard"),
    ("5.0.0", "Delivery to the following recipient failed permanently:", "undefined", "hard"),
    ("5.0.0", "This is not a permanent error", "undefined", "soft"),
    # permanent, but about us or the message: the address is good
    ("5.7.1", "Permanent failure: message rejected as spam", "spamdetected", "soft"),
    ("5.3.4", "Permanent error: message too big for this system", "mesgtoolarge", "soft"),
    ("5.7.1", "550 5.7.1 Sender account suspended", "blocked", "soft"),
    ("5.0.0", "Your account has been suspended: permanent failure", "blocked", "soft"),
    ("5.2.2", "Permanent failure: mailbox full", "mailboxfull", "soft"),
])
def test_hard_means_the_address_or_account_failed_permanently(status, text, reason, kind):
    assert classify_status(status, text) == (reason, kind)


def test_a_delayed_permanent_sounding_notice_is_soft():
    assert classify_status(None, "This is a permanent error", delayed=True) == ("undefined", "soft")
    assert classify_status("5.2.1", "account disabled", delayed=True) == ("suspend", "soft")


def test_a_delay_is_always_soft_even_for_an_unknown_user():
    assert classify_status("5.1.1", "user unknown", delayed=True) == ("userunknown", "soft")


def test_specific_code_beats_text():
    # the code says mailbox full; the text happens to contain "unknown"
    assert classify_status("5.2.2", "mailbox of unknown size is full")[0] == "mailboxfull"


def test_generic_system_code_yields_to_a_clear_user_unknown_text():
    assert classify_status("5.4.0", "550 no such user here")[0] == "userunknown"


@pytest.mark.parametrize("text, reason", [
    ("This account has been disabled or discontinued", "suspend"),
    ("This user doesn't have a yahoo.com account", "userunknown"),
    ("Message contains a virus", "virusdetected"),
    ("554 Too many hops 26 (25 max)", "toomanyconn"),
    ("Command died with status 17", "mailererror"),
    ("message exceeds maximum message size", "mesgtoolarge"),
    ("delivery to program failed: exit 75", "mailererror"),
    # every qmail and old Postfix notice introduces itself as a "program": that names no reason
    ("Hi. This is the qmail-send program at mx.example.net.", None),
    ("This is the Postfix program at host mx.example.net.", None),
])
def test_text_patterns(text, reason):
    assert reason_from_text(text) == reason
