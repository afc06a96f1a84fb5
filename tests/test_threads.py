"""Reference chains (routing/threads.py) and header-only threading against imaptest's expected threads."""

from __future__ import annotations

import re

import pytest

from routing.threads import (
    extract_ids, has_odoo_loop_mark, lookup_order, normalize_message_id, reference_chain,
)
from tests.corpus import corpus_dir, labels


# ------------------------------------------------------------------------------------------ unit rules
def test_tokens_in_header_order_with_brackets():
    assert extract_ids("<a@x> <b@x>\r\n <c@x>") == ["<a@x>", "<b@x>", "<c@x>"]


def test_folded_id_inside_a_token_is_repaired():
    # Odoo test references_external_buggy_message_id: an id folded over two lines still matches.
    assert extract_ids("<CAFkrEf=abc\r\n xyz@mail.gmail.com>") == ["<CAFkrEf=abcxyz@mail.gmail.com>"]


def test_bare_ids_recovered_only_when_header_has_no_brackets():
    assert extract_ids("a@x b@x") == ["<a@x>", "<b@x>"]
    # with brackets present, bare words are not ids (Odoo's regex would not see them either)
    assert extract_ids("junk@x <a@x>") == ["<a@x>"]


def test_reply_to_tokens_dropped_as_odoo_does():
    assert extract_ids("<a@x> <reply_to-123@odoo> <b@x>") == ["<a@x>", "<b@x>"]


def test_chain_reads_references_and_in_reply_to_newest_last_without_duplicates():
    # Outlook truncates References: the direct parent may only be in In-Reply-To.
    chain = reference_chain("<root@x> <mid@x> <root@x>", "<parent@x>")
    assert chain == ("<mid@x>", "<root@x>", "<parent@x>")
    assert lookup_order(chain) == ("<parent@x>", "<root@x>", "<mid@x>")


def test_in_reply_to_already_in_references_is_moved_to_newest():
    assert reference_chain("<a@x> <b@x>", "<a@x>") == ("<b@x>", "<a@x>")


def test_empty_headers_give_empty_chain():
    assert reference_chain(None, "") == ()
    assert extract_ids("   ") == []


def test_odoo_loop_mark():
    assert has_odoo_loop_mark("<1-openerp-loop-detection-bounce-email@host>", None)
    assert not has_odoo_loop_mark("<a@x>", "<b@x>")


@pytest.mark.parametrize("value", ["<a@b>", " <a@b> ", "a@b", "<a@\r\n b>", "junk <a@b> more", "<>", "",
                                   None, "<a b@c>", "<<a@b>>"])
def test_normalize_message_id_agrees_with_the_spool_dedupe_key(value):
    """The spool's key, read from the raw header block, is routing's normalisation of the header value."""
    from gateway.spool import header_facts

    raw = (f"Message-ID: {value}\r\n" if value else "").encode() + b"Subject: x\r\n\r\nbody\r\n"
    assert header_facts(raw)[0] == normalize_message_id(value)


# ---------------------------------------------------------------------------- imaptest-threading corpus
def split_mbox(data: bytes) -> list[bytes]:
    """Messages of an mbox, split on `From ` separator lines (imaptest mboxes have no escaped bodies)."""
    parts = re.split(rb"(?m)^From [^\r\n]*\r?\n", data)
    return [p for p in parts if p.strip()]


class _Container:
    __slots__ = ("parent", "seq")

    def __init__(self) -> None:
        self.parent: _Container | None = None
        self.seq: int | None = None


def _is_ancestor(a: _Container, b: _Container) -> bool:
    node = b.parent
    while node is not None:
        if node is a:
            return True
        node = node.parent
    return False


def thread_groups(messages: list[tuple[str | None, tuple[str, ...]]]) -> list[set[int]]:
    """Top-level thread groups by sequence number, from Message-ID and reference chains alone.

    RFC 5256 REFERENCES steps 1–2 without subject merging: link each chain pairwise when that makes no loop,
    then make the newest reference the message's parent (replacing an earlier link; skipped if it would
    loop); a repeated Message-ID gets a fresh container, as imaptest expects.
    """
    by_id: dict[str, _Container] = {}
    mine: list[_Container] = []

    def get(mid: str) -> _Container:
        return by_id.setdefault(mid, _Container())

    for seq, (mid, chain) in enumerate(messages, 1):
        if mid is None or (mid in by_id and by_id[mid].seq is not None):
            c = _Container()
        else:
            c = get(mid)
        c.seq = seq
        mine.append(c)
        prev: _Container | None = None
        for ref in chain:
            rc = get(ref)
            if prev is not None and rc.parent is None and rc is not prev and not _is_ancestor(rc, prev):
                rc.parent = prev
            prev = rc
        c.parent = None
        if prev is not None and prev is not c and not _is_ancestor(c, prev):
            c.parent = prev
    groups: dict[int, set[int]] = {}
    for c in mine:
        root = c
        while root.parent is not None:
            root = root.parent
        assert c.seq is not None
        groups.setdefault(id(root), set()).add(c.seq)
    return list(groups.values())


#: Labels that a header-only threader cannot reproduce, with the reason.
SUBJECT_DEPENDENT = {
    "mbox/thread3.mbox": "two messages share one Message-ID; imaptest joins them only by base subject 'foo'",
    "mbox/thread4.mbox": "the reply references a missing parent; imaptest joins it to 'foo' by base subject",
}

IMAPTEST_FILES = ["mbox/thread.mbox", "mbox/thread2.mbox", "mbox/thread3.mbox", "mbox/thread4.mbox",
                  "mbox/thread5.mbox", "mbox/thread6.mbox", "mbox/thread7.mbox", "mbox/thread8.mbox",
                  "mbox/thread-orderedsubject.mbox", "mbox/thread-orderedsubject2.mbox"]


@pytest.mark.parametrize("name", IMAPTEST_FILES)
def test_imaptest_thread_groups_from_headers_alone(name):
    from routing.parse import parse_mail

    folder = corpus_dir("imaptest-threading")
    label = next(row for row in labels("imaptest-threading") if row["file"] == name)
    if label["algorithm"] != "REFERENCES":
        pytest.skip(f"{name}: {label['algorithm']} threads by subject only; nothing to check from headers")
    if name in SUBJECT_DEPENDENT:
        pytest.skip(f"{name}: {SUBJECT_DEPENDENT[name]}")
    raws = split_mbox((folder / name).read_bytes())[: label["messages_considered"]]
    msgs = []
    for raw in raws:
        p = parse_mail(raw)
        msgs.append((p.message_id, reference_chain(p.references, p.in_reply_to)))
    got = sorted(sorted(g) for g in thread_groups(msgs))
    want = sorted(sorted(g) for g in label["expected_groups_by_seq"])
    assert got == want
