"""Status code and diagnostic text → (reason, hard/soft), from the fixed vocabulary in routing/model.py.

The enhanced status code (RFC 3463) is the most reliable signal, so it is read first; only a generic code
(x.0.0, or none) lets the diagnostic text decide.

*Hard* means "stop sending to this address": a permanent failure (a 5.x.x, or a failed action without a
code) whose reason is the recipient's address or account — it does not exist, its host does not, it has
moved, its domain takes no mail, the account is disabled or discontinued — or whose reason we cannot name
while the MTA states the delivery failed permanently. A permanent failure about *us* or the *message*
(blocklists, spam filters, policy, DMARC and authentication, size, content) is soft: the sender can fix it
and the address is good. So is a full mailbox (it empties), and so is anything delayed or 4.x.x.

`classify_status` is a pure function of (status, text): the outbound relay classifies SMTP replies with it,
so a refusal at delivery time and the same refusal coming back as a DSN get one reason and one kind.
"""

from __future__ import annotations

import re

from routing.model import BOUNCE_REASONS, BounceKind

#: Reasons about the recipient's address or account: after a permanent failure, the address is bad.
HARD_REASONS: frozenset[str] = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept", "suspend"})

#: The MTA says delivery to the recipient failed for good ("This is a permanent error; I've given up",
#: "Delivery to the following recipient failed permanently"). Read only when no reason could be named: a
#: reason about us or the message would have matched its own pattern first.
_PERMANENT_FAILURE = re.compile(
    r"(?<!not a )(?<!not )\bpermanent(?:\s+fatal)?\s+(?:delivery\s+)?(?:error|failure)"
    r"|\bfailed\s+permanently|\bpermanently\s+(?:failed|undeliverable)", re.IGNORECASE)

#: Enhanced status codes (class stripped: "1.1" means x.1.1) → reason.
STATUS_REASONS: dict[str, str] = {
    "1.0": "userunknown", "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown",
    "1.4": "userunknown", "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected", "1.8": "rejected",
    "1.9": "undefined", "1.10": "notaccept",
    "2.0": "mailboxfull", "2.1": "suspend", "2.2": "mailboxfull", "2.3": "exceedlimit", "2.4": "systemerror",
    "3.0": "systemerror", "3.1": "mailboxfull", "3.2": "systemerror", "3.3": "systemerror",
    "3.4": "mesgtoolarge", "3.5": "systemerror",
    "4.0": "networkerror", "4.1": "networkerror", "4.2": "networkerror", "4.3": "networkerror",
    "4.4": "hostunknown", "4.5": "networkerror", "4.6": "networkerror", "4.7": "expired",
    "5.0": "undefined", "5.1": "mailererror", "5.2": "mailererror", "5.3": "toomanyconn",
    "5.4": "mailererror", "5.5": "mailererror", "5.6": "mailererror",
    "6.0": "contenterror", "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror",
    "6.4": "contenterror", "6.5": "contenterror",
    "7.0": "securityerror", "7.1": "blocked", "7.2": "securityerror", "7.3": "securityerror",
    "7.4": "securityerror", "7.5": "securityerror", "7.6": "securityerror", "7.7": "securityerror",
    "7.8": "securityerror", "7.9": "securityerror", "7.10": "securityerror", "7.13": "suspend",
    "7.14": "securityerror", "7.15": "securityerror", "7.16": "securityerror", "7.17": "suspend",
    "7.18": "suspend", "7.20": "securityerror", "7.23": "policyviolation", "7.24": "policyviolation",
    "7.25": "blocked", "7.26": "securityerror", "7.27": "notaccept",
}

#: A code that says nothing specific: let the text decide.
_VAGUE_SUBJECTS: frozenset[str] = frozenset({"0.0", "1.0", "2.0", "3.0", "4.0", "5.0", "7.0", "7.1"})

#: Diagnostic text → reason, first match wins; ordered from the most to the least specific.
TEXT_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((reason, re.compile(rx, re.IGNORECASE)) for reason, rx in (
    ("virusdetected", r"\bvirus\b|malware|infected"),
    ("spamdetected", r"\bspam\b|unsolicited|junk mail|bulk mail|\bUCE\b|content.{0,20}(?:rejected|blocked) as"),
    ("hasmoved", r"has moved|no longer (?:at|with) |address (?:has )?changed|forwarding address"),
    ("mesgtoolarge", r"too (?:large|big)|size (?:limit|exceeds)|exceed(?:s|ed)? (?:the )?maximum (?:incoming )?message size|message size|message length exceeds"),
    ("mailboxfull", r"mailbox (?:is )?full|mail ?folder is full|full mailbox|over ?quota|quota (?:exceeded|violation|full)|exceed(?:s|ed|ing)? (?:their |the |his |her )?(?:storage |disk |mailbox )?quota|disk quota|insufficient (?:disk )?space|space not enough|too much mail stored|mailbox size limit"),
    # the recipient's account, never ours: "your account has been suspended" is about the sender
    ("suspend", r"(?<!your )(?<!sender )(?<!sending )(?<!sender's )\b(?:account|mailbox|user|recipient|address)\b"
                r"[^.;\n]{0,40}?\b(?:disabled|discontinued|suspended|inactive|deactivated|locked|expired|closed|not active)\b"
                r"|\b(?:disabled|discontinued|suspended|inactive|deactivated|closed|expired|locked)\s+"
                r"(?:e-?mail\s+)?(?:account|mailbox|user|recipient|address)\b"),
    ("userunknown", r"user(?:name)? (?:is )?unknown|unknown (?:or illegal )?(?:user|recipient|local[- ]part|mailbox|address|e-?mail)|no such (?:user|mailbox|recipient|account|address|person)|"
                    r"user not (?:found|known|exist)|(?:recipient|address|mailbox|user|account) (?:does not|doesn't|did not) exist|does not exist|doesn't have a .{1,60} account|not listed in|"
                    r"invalid (?:recipient|mailbox|user|address|final delivery|e-?mail)|recipient (?:name )?is not recognized|(?:recipient|user) (?:unknown|not recognized)|"
                    r"no mailbox|mailbox (?:unavailable|not found|does not exist)|addressee unknown|not a valid (?:user|mailbox|recipient)|"
                    r"no matches to nameserver|does not have a final email delivery point|unrouteable address|no longer valid|"
                    r"wrong or no longer valid|did not exactly match|not our customer|unknown local|address rejected|n'existe pas|not known"),
    ("hostunknown", r"host (?:or domain )?(?:name )?not found|unknown host|host unknown|domain (?:not found|does not exist|unknown)|name service error|"
                    r"no (?:mx|such domain|such host)|nameserver error|unrouteable (?:mail )?domain|could not find a gateway|domain name not found|nxdomain"),
    ("notaccept", r"does not accept (?:e-?)?mail|accepts no mail|null mx"),
    ("norelaying", r"relay(?:ing)? (?:access )?(?:denied|not permitted|not allowed)|not (?:permitted|allowed) to relay|unable to relay|relay not permitted"),
    ("toomanyconn", r"too many (?:connections|hops|recipients|messages)|connection limit|rate limit|message looping|mail loop|loop detected|loops back"),
    ("blocked", r"blacklist|blocklist|block ?listed|\bRBL\b|spamhaus|\bblocked\b|access denied|client host rejected|"
                r"reputation|not allowed to send|sender (?:address )?rejected|"
                r"(?:your|sender(?:'s)?|sending) account (?:has been |is )?(?:suspended|disabled|locked|blocked)"),
    ("policyviolation", r"grey-?listed|greylisting|policy|dmarc|moderat|not authori[sz]ed|members-only"),
    ("securityerror", r"authenticat|\bspf\b|dkim|\btls\b|ssl|encrypt"),
    ("filtered", r"not accepting mail from|filter|refused by recipient|rejected by the recipient|automatically rejected"),
    ("expired", r"expired|too long|timed? ?out|time-?out|delivery attempts|retry time|not (?:been )?delivered within|"
                r"has not been collected|aborted after|delayed|still being retried|has not yet been delivered|postponed"),
    ("networkerror", r"connection (?:refused|reset|failed|closed|lost)|could not connect|unable to connect|not reachable|unreachable|"
                     r"not responding|did not respond|establish an? smtp connection|network|name server|dns|try again|"
                     r"mail exchanger failed|server (?:unavailable|busy)"),
    ("syntaxerror", r"syntax|malformed|bad address|illegal address|\bRFC ?5?822\b"),
    ("contenterror", r"content|header|resent-from|mime|8bit|encoding|attachment"),
    # not a bare "program": every qmail and old Postfix notice opens "This is the qmail-send/Postfix program"
    ("mailererror", r"command died|command output|mailer error|child status|pipe to|\bexit status|local delivery failed|"
                    r"(?:deliver(?:y|ing)?|pipe) to (?:the )?program|program (?:exited|failed|died|returned|error)"),
    ("systemerror", r"system error|internal error|server error|temporary (?:local )?problem|i/o error|out of memory|not available"),
    ("rejected", r"rejected|refused|not accepted|denied|permission denied"),
))


def _split_status(status: str | None) -> tuple[str | None, str | None]:
    if not status:
        return None, None
    parts = status.strip().split(".")
    if len(parts) != 3 or parts[0] not in ("2", "4", "5"):
        return None, None
    return parts[0], f"{int(parts[1]) if parts[1].isdigit() else parts[1]}.{int(parts[2]) if parts[2].isdigit() else parts[2]}"


def reason_from_text(text: str | None) -> str | None:
    """The first reason whose pattern matches the diagnostic text, or None."""
    if not text:
        return None
    for reason, rx in TEXT_REASONS:
        if rx.search(text):
            return reason
    return None


def classify_status(status: str | None, diagnostic: str | None, *, delayed: bool = False) -> tuple[str, BounceKind]:
    """(reason, kind) for one failed recipient, or one SMTP reply (status, text).

    The code decides first (x.1.1 → userunknown); a vague code (x.0.0, x.7.1, x.2.0…) or none lets the
    text decide. Hard: a permanent failure whose reason is in HARD_REASONS, or "undefined" with a text stating
    the delivery failed permanently; everything else, and anything 4.x.x or delayed, is soft.
    """
    cls, subject = _split_status(status)
    reason: str | None = None
    if subject and subject not in _VAGUE_SUBJECTS:
        reason = STATUS_REASONS.get(subject)
    text_reason = reason_from_text(diagnostic)
    if reason is None or (reason in ("mailererror", "systemerror", "networkerror") and text_reason in HARD_REASONS | {"mailboxfull"}):
        reason = text_reason or (STATUS_REASONS.get(subject) if subject else None) or "undefined"
    if reason not in BOUNCE_REASONS:  # defensive: the tables above only hold vocabulary words
        reason = "undefined"
    permanent = not delayed and cls != "4"
    about_the_address = reason in HARD_REASONS or (
        reason == "undefined" and bool(_PERMANENT_FAILURE.search(diagnostic or "")))
    soft = not (permanent and about_the_address)
    if cls == "4" and subject in ("4.4", "4.7") and not delayed and reason == "hostunknown":
        reason = "expired"  # a 4.4.x that finally gave up is a delivery that timed out, not a missing host
    return reason, ("soft" if soft else "hard")


def kind_of(reason: str, status: str | None = None, *, delayed: bool = False) -> BounceKind:
    """Hard only for reasons about the address or account (HARD_REASONS), never for a 4.x.x or a delay.
    Without the text it cannot tell an "undefined" failure the MTA called permanent: `classify_status` can."""
    if delayed or (status or "").startswith("4") or reason not in HARD_REASONS:
        return "soft"
    return "hard"
