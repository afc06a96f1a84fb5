"""The IMAP puller's store: checkpoints, the seen-list, and the spool insert that records both atomically.

Exactly-once from a mailbox rests on one transaction per batch: the spool rows, one `imap_seen` row per UID,
and the checkpoint's `last_uid` are committed together. A crash before the commit leaves nothing (the batch is
fetched again); a crash after it leaves `imap_seen.after_done = false` rows, whose after-action (flag, move,
delete) is redone on restart, never the spooling. Synchronous: the puller calls these from its own thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, and_, insert, select, update

from gateway.schema import imap_checkpoints, imap_seen
from gateway.spool import Envelope, insert_messages, sha256_of
from gateway.store import reading, utcnow


@dataclass(frozen=True)
class Checkpoint:
    """How far a source has been spooled: every UID ≤ last_uid under this UIDVALIDITY is in imap_seen."""

    source: str
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True)
class Pulled:
    """A fetched message ready to spool."""

    uid: int
    raw: bytes
    envelope: Envelope


@dataclass(frozen=True)
class BatchResult:
    """What one spool transaction did with a batch."""

    spooled: dict[int, int]      # uid → new spool id
    duplicates: dict[int, int]   # uid → spool id of the same bytes seen under an older UIDVALIDITY
    already_seen: tuple[int, ...]  # UIDs another run recorded first (a restart racing a late commit)

    @property
    def to_act(self) -> list[int]:
        """UIDs whose after-action is now due."""
        return sorted([*self.spooled, *self.duplicates])


def load_checkpoint(engine: Engine, source: str) -> Checkpoint | None:
    with reading(engine) as conn:
        row = conn.execute(select(imap_checkpoints).where(imap_checkpoints.c.source == source)).first()
    return Checkpoint(source, int(row.uidvalidity), int(row.last_uid)) if row else None


def begin_validity(engine: Engine, source: str, uidvalidity: int) -> tuple[Checkpoint, bool]:
    """The checkpoint for the mailbox as SELECT shows it; True when UIDVALIDITY changed since last time.

    On a change UIDs restart meaningless, so `last_uid` goes back to 0; the old `imap_seen` rows stay, and
    their hashes keep the re-numbered mailbox from being spooled a second time.
    """
    now = utcnow()
    with engine.begin() as conn:
        row = conn.execute(select(imap_checkpoints).where(imap_checkpoints.c.source == source)).first()
        if row is None:
            conn.execute(insert(imap_checkpoints).values(source=source, uidvalidity=uidvalidity, last_uid=0,
                                                         updated_at=now))
            return Checkpoint(source, uidvalidity, 0), False
        if int(row.uidvalidity) == uidvalidity:
            return Checkpoint(source, uidvalidity, int(row.last_uid)), False
        conn.execute(update(imap_checkpoints).where(imap_checkpoints.c.source == source)
                     .values(uidvalidity=uidvalidity, last_uid=0, updated_at=now))
        return Checkpoint(source, uidvalidity, 0), True


def spool_pulled(engine: Engine, source: str, uidvalidity: int, items: Sequence[Pulled],
                 through_uid: int) -> BatchResult:
    """Spool a batch and record it in imap_seen in one transaction; advance last_uid to `through_uid`.

    `through_uid` is the highest UID the batch may pass: UIDs a person expunged between SEARCH and FETCH are
    simply passed, but the caller keeps it below a UID still on the server that the FETCH did not return
    (passing that one would lose it: nothing at or below the checkpoint is searched for again). Same bytes
    already seen under another UIDVALIDITY are not spooled again but are recorded (with the old spool id) so
    their after-action still runs.
    """
    now = utcnow()
    spooled: dict[int, int] = {}
    duplicates: dict[int, int] = {}
    with engine.begin() as conn:
        uids = [p.uid for p in items]
        present = set(conn.execute(select(imap_seen.c.uid).where(
            imap_seen.c.source == source, imap_seen.c.uidvalidity == uidvalidity,
            imap_seen.c.uid.in_(uids))).scalars()) if uids else set()
        hashes = {p.uid: sha256_of(p.raw) for p in items}
        earlier: dict[str, int | None] = {}
        wanted = [h for u, h in hashes.items() if u not in present]
        if wanted:
            for sha, message in conn.execute(select(imap_seen.c.sha256, imap_seen.c.message).where(
                    imap_seen.c.source == source, imap_seen.c.uidvalidity != uidvalidity,
                    imap_seen.c.sha256.in_(wanted))):
                earlier.setdefault(sha, message)
        fresh: list[Pulled] = []
        for p in items:
            if p.uid in present:
                continue
            sha = hashes[p.uid]
            if sha in earlier:
                ident = earlier[sha]
                duplicates[p.uid] = int(ident) if ident is not None else 0
            else:
                fresh.append(p)
        ids = insert_messages(conn, [(p.raw, p.envelope) for p in fresh], hashes=[hashes[p.uid] for p in fresh],
                              now=now)
        spooled = {p.uid: ident for p, ident in zip(fresh, ids)}
        seen_rows = [dict(source=source, uidvalidity=uidvalidity, uid=uid, sha256=hashes[uid],
                          message=spooled[uid] if uid in spooled else duplicates[uid] or None, after_done=False)
                     for uid in sorted([*spooled, *duplicates])]
        if seen_rows:
            conn.execute(insert(imap_seen), seen_rows)
        conn.execute(update(imap_checkpoints).where(
            imap_checkpoints.c.source == source, imap_checkpoints.c.uidvalidity == uidvalidity,
            imap_checkpoints.c.last_uid < through_uid).values(last_uid=through_uid, updated_at=now))
    return BatchResult(spooled, duplicates, tuple(sorted(present)))


def pending_after(engine: Engine, source: str, uidvalidity: int) -> list[int]:
    """UIDs spooled (or deduplicated) whose after-action has not been confirmed: redo these first."""
    with reading(engine) as conn:
        return sorted(conn.execute(select(imap_seen.c.uid).where(
            imap_seen.c.source == source, imap_seen.c.uidvalidity == uidvalidity,
            imap_seen.c.after_done.is_(False))).scalars())


def mark_after_done(engine: Engine, source: str, uidvalidity: int, uids: Sequence[int]) -> None:
    if not uids:
        return
    with engine.begin() as conn:
        conn.execute(update(imap_seen).where(and_(
            imap_seen.c.source == source, imap_seen.c.uidvalidity == uidvalidity,
            imap_seen.c.uid.in_(list(uids)))).values(after_done=True))
