"""Reference chains: which Message-IDs a mail answers, normalised the way the thread index stores them.

Odoo reads References *or* In-Reply-To (never both), keeps only `<...>` tokens, strips whitespace inside a
token (folded ids) and drops tokens containing `reply_to` (spec §1.4). We do the same normalisation, but read
References *and* In-Reply-To (Outlook truncates References, so the direct parent may only be in In-Reply-To),
recover ids written without brackets, and drop duplicates. Pure: strings in, tuples out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOKEN = re.compile(r"<([^<>]+)>")
_WS = re.compile(r"\s+")
_ANGLE_NO_WS = re.compile(r"<([^<>\s]+)>")
#: Odoo's own "too many mails" refusals carry this in References; replies to them are dropped (spec §1.10).
ODOO_LOOP_MARK = "-loop-detection-bounce-email@"


def normalize_message_id(value: str | None) -> str | None:
    """`<id@host>` stripped of folding and whitespace; bare ids get brackets. Odoo matches byte for byte.

    The one normalisation everywhere: the spool's dedupe key, routing's reference lookups and the
    `message_id` delivery hands Odoo must agree, or a redelivery would not be recognised as a duplicate.
    """
    if not value:
        return None
    text = _WS.sub("", value)
    m = _ANGLE_NO_WS.search(text)
    if m:
        return f"<{m.group(1)}>"
    text = text.strip("<>")
    return f"<{text}>" if text else None


def extract_ids(value: str | None) -> list[str]:
    """Message-IDs in one References/In-Reply-To value, in header order, normalised, duplicates kept.

    With brackets: every `<...>` token, whitespace removed inside it (repairs ids folded across lines).
    Without any bracket in the whole value: whitespace/comma separated words that look like `local@host`
    get brackets (some clients and list managers write bare ids). Tokens with `reply_to` are dropped as
    Odoo does: they are not message ids but Odoo's reply-to markers.
    """
    if not value:
        return []
    out: list[str] = []
    if "<" in value:
        for m in _TOKEN.finditer(value):
            token = _WS.sub("", m.group(1))
            if token and "reply_to" not in token:
                out.append(f"<{token}>")
        return out
    for word in re.split(r"[\s,;]+", value):
        word = word.strip("()\"'")
        if "@" in word and "reply_to" not in word and len(word) > 2:
            out.append(f"<{word}>")
    return out


def _dedupe_keep_last(ids: Iterable[str]) -> list[str]:
    """Drop repeats, keeping each id at its *last* position (the newest mention wins)."""
    seen: set[str] = set()
    rev: list[str] = []
    for mid in reversed(list(ids)):
        if mid not in seen:
            seen.add(mid)
            rev.append(mid)
    rev.reverse()
    return rev


def reference_chain(references: str | None, in_reply_to: str | None) -> tuple[str, ...]:
    """Oldest → newest: References in header order, then In-Reply-To ids (the direct parent) last.

    This is the order `routing.model.ThreadLookup.find` takes (newest last, as in a References header).
    """
    refs = extract_ids(references)
    irt = extract_ids(in_reply_to)
    return tuple(_dedupe_keep_last([*refs, *irt]))


def lookup_order(chain: Iterable[str]) -> tuple[str, ...]:
    """Newest first: the order in which a thread index should try the ids (for explanations)."""
    return tuple(reversed(tuple(chain)))


def has_odoo_loop_mark(*values: str | None) -> bool:
    """True when References/In-Reply-To carry Odoo's loop-detection tag (spec §1.2 step 4)."""
    return any(v and ODOO_LOOP_MARK in v for v in values)
