"""The alias contact policy as data: who may write to an alias, and what delivery must look up to decide.

The router only names the policy on each `Target` (routing stays free of Odoo lookups); delivery asks Odoo
for the facts (is the sender a known partner, a follower of the record, an employee; did SPF/DKIM/DMARC
pass) and calls `evaluate`. Semantics follow Odoo's `_alias_get_error` (spec §1.8), with one improvement
Odoo lacks: when authentication results are known and failed, a forged From cannot pass `partners` or
stricter policies (spec §5.9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aliases.model import ContactPolicy

Need = Literal["author", "follower", "employee"]


@dataclass(frozen=True)
class ContactRule:
    """What must be true of the sender for a target with this policy."""

    policy: ContactPolicy
    needs: tuple[Need, ...]
    needs_record: bool   # `followers` checks the record (or the alias parent); without one it is a config error

    def describe(self) -> str:
        if self.policy == "everyone":
            return "anyone may write"
        return {
            "partners": "only senders known as a partner in Odoo",
            "followers": "only followers of the record (or of the alias's parent record)",
            "employees": "only employees (work email or user email)",
        }[self.policy]


RULES: dict[str, ContactRule] = {
    "everyone": ContactRule("everyone", (), False),
    "partners": ContactRule("partners", ("author",), False),
    "followers": ContactRule("followers", ("author", "follower"), True),
    "employees": ContactRule("employees", ("employee",), False),
}


def rule_for(policy: str) -> ContactRule:
    """The rule for a policy name; unknown names fail closed as `partners` would not: raise."""
    try:
        return RULES[policy]
    except KeyError:
        raise ValueError(f"unknown contact policy {policy!r}: use everyone, partners, followers or employees") \
            from None


@dataclass(frozen=True)
class SenderFacts:
    """What delivery found out about the sender (None = not looked up / unknown)."""

    author_found: bool = False
    is_follower: bool | None = None
    is_employee: bool | None = None
    record_exists: bool = True
    authenticated: bool | None = None   # DMARC/SPF/DKIM aligned pass; None = not checked


@dataclass(frozen=True)
class PolicyVerdict:
    allowed: bool
    config_error: bool = False   # Odoo marks the alias invalid and says "try again later"
    reason: str = ""


def evaluate(policy: str, facts: SenderFacts) -> PolicyVerdict:
    """Allowed or refused, with the reason a refusal mail and `explain` can show."""
    rule = rule_for(policy)
    if rule.policy == "everyone":
        return PolicyVerdict(True, reason="policy everyone")
    if facts.authenticated is False:
        return PolicyVerdict(False, reason=f"policy {rule.policy}: sender failed authentication (forged From?)")
    if rule.needs_record and not facts.record_exists:
        return PolicyVerdict(False, config_error=True,
                             reason="policy followers: the alias has no parent record to check followers on")
    if "author" in rule.needs and not facts.author_found:
        return PolicyVerdict(False, reason=f"policy {rule.policy}: sender is not a known partner")
    if "follower" in rule.needs and not facts.is_follower:
        return PolicyVerdict(False, reason="policy followers: sender does not follow the record")
    if "employee" in rule.needs and not facts.is_employee:
        return PolicyVerdict(False, reason="policy employees: sender is not an employee")
    return PolicyVerdict(True, reason=f"policy {rule.policy}: sender allowed")
