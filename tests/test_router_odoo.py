"""Odoo 17 gateway scenarios (odoo-gateway-spec.md §4) that apply to an external gateway's routing decision.

Each test is named after the Odoo test it mirrors. Where we deliberately beat Odoo (§5) the docstring says
so and the assertion shows our behaviour. Scenarios about record values, authors, followers, refusal mails
and Odoo's own parsing output belong to delivery and are not repeated here.
"""

from __future__ import annotations

import pytest

from aliases.load import merge_aliases
from routing.model import Action
from tests.test_router_support import TABLE, SeenOnce, decide, hit, mail

GROUPS = "groups@test.mycompany.com"          # alias of mail.test.gateway
TEST = "test@test.mycompany.com"              # alias of mail.test.container
CATCHALL = "catchall.test@test.mycompany.com"
BOUNCE = "bounce.test@test.mycompany.com"


def targets(d):
    return [(t.model, t.res_id, t.alias) for t in d.targets]


# ---------------------------------------------------------------------------------- B. basic creation
def test_process_alias_basic():
    d = decide(mail(f"To: {GROUPS}\nSubject: Frogs"))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


# ---------------------------------------------------------------------------------- C. aliases
@pytest.mark.parametrize("headers", [f"To: {GROUPS}", f"To: x@client.net\nCc: {GROUPS}",
                                     f"To: x@client.net, {GROUPS}"])
def test_alias_config_bounced_to(headers):
    """The alias is named whether it was in To, in Cc or one of several To (Cc counts for alias lookup)."""
    d = decide(mail(headers))
    assert targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_alias_partners_bounce():
    """The contact policy travels with the target; delivery refuses unknown senders (aliases.policy)."""
    d = decide(mail("To: partners@test.mycompany.com"))
    assert d.action == Action.CREATE and d.targets[0].contact == "partners"


def test_alias_update():
    d = decide(mail("To: forced@test.mycompany.com\nSubject: cats"))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.container", 42, "forced@test.mycompany.com")]


# ---------------------------------------------------------------------------------- E. alias routing
def test_route_alias_no_domain():
    """An Odoo alias without a domain is never synced (Odoo never matches it either) → no route."""
    merged = merge_aliases(TABLE, [{"alias_name": "nodomain", "alias_full_name": "nodomain",
                                    "model": "mail.test.gateway"}])
    assert merged.warnings
    d = decide(mail("To: nodomain@test.mycompany.com"), table=merged.table)
    assert d.action == Action.QUARANTINE


def test_forward_bypass_reply_first():
    d = decide(mail(f"To: {GROUPS}, {TEST}\nIn-Reply-To: <a-msg@test>"),
               threads=hit("<a-msg@test>", "mail.test.container", 5))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_forward_bypass_reply_second():
    d = decide(mail(f"To: {TEST}, {GROUPS}\nIn-Reply-To: <a-msg@test>"),
               threads=hit("<a-msg@test>", "mail.test.container", 5))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_forward_bypass_update_alias():
    d = decide(mail(f"To: forced@test.mycompany.com, {GROUPS}\nIn-Reply-To: <a-msg@test>"),
               threads=hit("<a-msg@test>", "mail.test.container", 5))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_alias_multiple_new():
    d = decide(mail(f"To: {GROUPS}, {TEST}"))
    assert targets(d) == [("mail.test.gateway", None, GROUPS), ("mail.test.container", None, TEST)]


# ---------------------------------------------------------------------------------- F. bounces, catchall
# Odoo drops mail to its bounce address that names no bounced recipient; we never drop silently: it is
# quarantined with the reason, never routed to a record, nothing counted.
def test_route_bounce():
    d = decide(mail(f"To: {BOUNCE}\nSubject: whatever"))
    assert d.action == Action.QUARANTINE and d.targets == () and d.bounces == ()
    assert "no identifiable recipient" in (d.reason or "")


def test_route_bounce_other_recipients():
    d = decide(mail(f"To: {GROUPS}, {BOUNCE}"))
    assert d.action == Action.QUARANTINE and d.targets == ()


def test_process_bounce_alias():
    """A plain (non-DSN) mail to the bounce address: dropped by Odoo; quarantined here, nothing counted."""
    d = decide(mail(f"To: {BOUNCE}\nSubject: plain"), rcpt=(BOUNCE,))
    assert d.action == Action.QUARANTINE and d.bounces == () and "unrecognised" in (d.reason or "")


def test_bounce_address_in_cc_only_is_not_a_bounce():
    """Odoo: 'A Cc is not enough' for bounce-address detection."""
    d = decide(mail(f"To: {GROUPS}\nCc: {BOUNCE}"))
    assert d.action == Action.CREATE


def test_route_write_to_catchall():
    """Odoo sends a catchall refusal; we keep the mail in quarantine with the reason (nothing lost)."""
    d = decide(mail(f"To: {CATCHALL}\nSubject: Should Bounce"))
    assert d.action == Action.QUARANTINE and d.reason == "catchall only"


def test_write_to_catchall_other_recipients_first():
    d = decide(mail(f"To: {CATCHALL}, {GROUPS}"))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_write_to_catchall_other_recipients_second():
    d = decide(mail(f"To: {GROUPS}, {CATCHALL}"))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_write_to_catchall_cc_alias_beats_odoo():
    """§5.6: Odoo refuses 'To: catchall, Cc: alias'; we route to the Cc alias."""
    d = decide(mail(f"To: {CATCHALL}\nCc: {GROUPS}"))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


# ---------------------------------------------------------------------------------- G. threading
def test_in_reply_to():
    d = decide(mail("To: valid.other@test.mycompany.com\nIn-Reply-To: <known@test>"),
               threads=hit("<known@test>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, None)]
    assert d.targets[0].parent_message_id == "<known@test>"


def test_references():
    d = decide(mail("To: valid.other@test.mycompany.com\n"
                    "References: <foreign1@else> <known@test>\n\t<foreign2@else>"),
               threads=hit("<known@test>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, None)]


def test_references_external():
    d = decide(mail(f"To: {CATCHALL}\nReferences: <CAExternal+123@mail.gmail.com>"),
               threads=hit("<CAExternal+123@mail.gmail.com>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY


def test_references_external_buggy_message_id():
    raw = mail(f"To: {CATCHALL}\nReferences: <CAFkrEf-abc\n xyz@mail.gmail.com>")
    d = decide(raw, threads=hit("<CAFkrEf-abcxyz@mail.gmail.com>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, None)]


def test_references_forward():
    d = decide(mail(f"To: {TEST}\nReferences: <known@test>"), threads=hit("<known@test>", "mail.test.gateway", 3))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.container", None, TEST)]


def test_references_forward_same_model():
    d = decide(mail(f"To: {GROUPS}\nReferences: <known@test>"), threads=hit("<known@test>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, GROUPS)]


def test_references_forward_cc():
    d = decide(mail(f"To: {CATCHALL}\nCc: {TEST}\nReferences: <known@test>"),
               threads=hit("<known@test>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, None)]


def test_reply_to_new_thread():
    # 1. a reply to a normal post sent to the catchall threads onto the record
    d = decide(mail(f"To: {CATCHALL}\nIn-Reply-To: <post@test>"), threads=hit("<post@test>", "mail.test.gateway", 3))
    assert d.action == Action.REPLY
    # 2. a post with reply_to_force_new has a `reply_to` Message-ID: the reply creates a new groups@ record
    d = decide(mail(f"To: {GROUPS}\nIn-Reply-To: <1.2-reply_to@test>\nReferences: <1.2-reply_to@test>"),
               threads=hit("<1.2-reply_to@test>", "mail.test.gateway", 3))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]


def test_external_notification_reply():
    """A reply with no To at all still threads (the parent's internal flag is delivery's business)."""
    d = decide(mail("Subject: Re: note\nIn-Reply-To: <note@test>"),
               threads=hit("<note@test>", "mail.test.gateway", 3, is_internal=True))
    assert d.action == Action.REPLY and d.targets[0].parent_message_id == "<note@test>"


def test_route_reply_model_none():
    d = decide(mail(f"To: {GROUPS}\nIn-Reply-To: <private@test>"), threads=hit("<private@test>", None, None))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]
    assert d.targets[0].parent_message_id is None


# ---------------------------------------------------------------------------------- I. corner cases
def test_extra_model_res_id():
    """No pattern-based threading on `-openerp-<id>-<model>@` ids that are not stored."""
    d = decide(mail("To: nobody@test.mycompany.com\nIn-Reply-To: <123-openerp-7-mail.test.gateway@host>"))
    assert d.action == Action.QUARANTINE


def test_duplicate():
    raw = mail(f"To: {GROUPS}\nMessage-ID: <dup@agrolait.com>")
    import hashlib

    assert decide(raw).action == Action.CREATE
    d = decide(raw, duplicates=SeenOnce("<dup@agrolait.com>", hashlib.sha256(raw).hexdigest()))
    assert d.action == Action.DUPLICATE


def test_crash_no_data():
    """Odoo raises ValueError (mail lost or NDR); we quarantine with a reason."""
    d = decide(mail("To: noone@test.mycompany.com\nSubject: no route"))
    assert d.action == Action.QUARANTINE and d.reason == "no alias matched"


def test_hebrew_iso8859_8_i():
    from routing.parse import parse_mail

    p = parse_mail(mail(f"To: {GROUPS}\nSubject: =?iso-8859-8-i?B?+ezl7SDy5ezt?="))
    assert p.subject == "שלום עולם"


def test_routing_loop_alias():
    """A reply carrying Odoo's loop-detection tag is ignored without anything sent."""
    d = decide(mail(f"To: {GROUPS}\nReferences: <orig@x> <1-openerp-loop-detection-bounce-email@odoo>"))
    assert d.action == Action.LOOP


def test_bounce_from_mailer_demon():
    """Needs the real bounce detectors (From MAILER-DAEMON to an alias → bounce, not a new record)."""
    from routing.router import DEFAULT_DETECTORS
    from tests.test_router_support import real_or_skip

    raw = mail(f"From: MAILER-DAEMON@mail.client.net\nTo: {GROUPS}\nSubject: Undelivered Mail Returned to Sender",
               "This is the mail system at host mail.client.net.\n\nI'm sorry to have to inform you that your "
               "message could not\nbe delivered to one or more recipients.\n\n<gone@client.net>: host "
               "mx.client.net said: 550 5.1.1 User unknown\n")
    from routing.parse import parse_mail

    real_or_skip(DEFAULT_DETECTORS.classify_bounce, parse_mail(raw).msg, verp=None, to_bounce_address=False)
    d = decide(raw, detectors=DEFAULT_DETECTORS)
    assert d.action == Action.BOUNCE and d.targets == ()


# ------------------------------------------------- E. local-part aliases (Odoo's alias_incoming_local)
def _local_table(allowed: tuple[str, ...] = (), incoming_local: bool = True):  # type: ignore[no-untyped-def]
    """TABLE with `groups@` as Odoo syncs it, flagged alias_incoming_local, and the allowed-domains list."""
    from dataclasses import replace

    from aliases.load import alias_from_odoo_row

    odoo_groups = alias_from_odoo_row({"alias_name": "groups", "alias_full_name": GROUPS,
                                       "model": "mail.test.gateway", "alias_incoming_local": incoming_local})
    aliases = tuple(odoo_groups if a.address == GROUPS else a for a in TABLE.aliases)
    return replace(TABLE, aliases=aliases, incoming_local_domains=allowed)


def test_route_alias_alias_incoming_local():
    """`groups@another.domain.com` reaches the `groups` alias when it is incoming_local; not otherwise."""
    d = decide(mail("To: groups@another.domain.com"), table=_local_table())
    assert d.action == Action.CREATE and targets(d) == [("mail.test.gateway", None, GROUPS)]
    assert any("incoming_local" in line for line in d.explanation)
    d = decide(mail("To: groups@another.domain.com"), table=_local_table(incoming_local=False))
    assert d.action == Action.QUARANTINE


@pytest.mark.parametrize("allowed, matches", [
    ((), True),                                    # ICP empty: any domain
    (("another.domain.com",), True),               # ICP lists the domain
    (("other.example",), False),                   # ICP lists other domains only
])
def test_alias_with_allowed_domains(allowed, matches):
    d = decide(mail("To: groups@another.domain.com"), table=_local_table(allowed))
    assert (d.action == Action.CREATE) is matches
    # the full address always matches, whatever the list says
    full = decide(mail(f"To: {GROUPS}"), table=_local_table(allowed))
    assert full.action == Action.CREATE and targets(full) == [("mail.test.gateway", None, GROUPS)]


def test_incoming_local_never_opens_rcpt_for_foreign_domains():
    from aliases.resolve import rcpt_verdict

    table = _local_table()
    assert rcpt_verdict(table, "groups@another.domain.com")[0] == "no_relay"
    assert rcpt_verdict(table, GROUPS)[0] == "accept"


def test_references_forward_cc_over_smtp():
    # Over SMTP the MTA puts the Cc'd alias in the envelope too; its header position (Cc) still decides,
    # so the reply stays on A (Odoo: an other-model alias only in Cc does not make a forward)
    d = decide(mail(f"To: {CATCHALL}\nCc: {TEST}\nReferences: <known@test>"),
               threads=hit("<known@test>", "mail.test.gateway", 3), rcpt=(CATCHALL, TEST))
    assert d.action == Action.REPLY and targets(d) == [("mail.test.gateway", 3, None)]
    # an alias in the envelope alone (Bcc) still counts as To: new mail for that alias
    d = decide(mail(f"To: {CATCHALL}\nReferences: <known@test>"),
               threads=hit("<known@test>", "mail.test.gateway", 3), rcpt=(CATCHALL, TEST))
    assert d.action == Action.CREATE and targets(d) == [("mail.test.container", None, TEST)]


def test_bounce_address_in_cc_over_smtp_is_no_bounce():
    # the bounce address Cc'd on an ordinary mail, and so in the envelope: "a Cc is not enough" (spec §1.3)
    d = decide(mail(f"To: {GROUPS}\nCc: {BOUNCE}\nSubject: hello"), rcpt=(GROUPS, BOUNCE))
    assert d.action == Action.CREATE
