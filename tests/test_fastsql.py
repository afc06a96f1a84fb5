"""The relay's driver-level statements write exactly what SQLAlchemy would have written (on SQLite they bypass
it; on PostgreSQL they are SQLAlchemy): same values back, ids in row order, defaults filled, fixed values of
an UPDATE kept, and they join the caller's transaction."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine, bindparam, insert, select, update

from gateway.fastsql import execute_many, insert_rows
from gateway.schema import outbound_mails, outbound_recipients, thread_index

T0 = dt.datetime(2026, 11, 22, 12, 30, 1, 123456, tzinfo=dt.timezone.utc)


def mail_row(i: int) -> dict[str, object]:
    return {"message_id": f"<m{i}@x>", "model": "crm.lead", "res_id": i, "mail_from": "b@example.test",
            "created_at": T0 + dt.timedelta(seconds=i)}


def test_inserted_rows_read_back_as_sqlalchemy_writes_them(engine: Engine) -> None:
    with engine.begin() as conn:
        fast = insert_rows(conn, outbound_mails, [mail_row(i) for i in range(3)], ids=True)
        slow = [conn.execute(insert(outbound_mails), mail_row(i)).inserted_primary_key[0] for i in range(3, 6)]
        insert_rows(conn, thread_index, [{"message_id": "<m0@x>", "model": None, "res_id": None, "outbound": True,
                                          "outbound_mail": fast[0], "created_at": T0}])  # is_internal: default
    assert fast == sorted(fast) and len(set(fast)) == 3 and slow[0] > fast[-1]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(outbound_mails))}
        thread = conn.execute(select(thread_index)).one()
    for ident, i in zip(fast + slow, range(6)):
        got = rows[ident]
        expect = mail_row(i)
        assert (got.message_id, got.res_id, got.mail_from) == (expect["message_id"], i, "b@example.test")
        created = got.created_at if got.created_at.tzinfo else got.created_at.replace(tzinfo=dt.timezone.utc)
        assert created == expect["created_at"]
    assert (thread.outbound, thread.is_internal, thread.outbound_mail) == (True, False, fast[0])


def test_update_keeps_the_statements_own_values_and_joins_the_transaction(engine: Engine) -> None:
    with engine.begin() as conn:
        (mail,) = insert_rows(conn, outbound_mails, [mail_row(1)], ids=True)
        rids = insert_rows(conn, outbound_recipients, [
            {"mail": mail, "recipient": f"r{i}@x", "state": "queued", "attempts": 0, "next_attempt_at": T0,
             "opens": 0, "clicks": 0} for i in range(3)], ids=True)
    stmt = (update(outbound_recipients).where(outbound_recipients.c.id == bindparam("rid"))
            .values(state="deferred", attempts=bindparam("attempts"), next_attempt_at=bindparam("next_at")))
    later = T0 + dt.timedelta(minutes=5)
    with pytest.raises(RuntimeError):
        with engine.begin() as conn:
            execute_many(conn, stmt, [{"rid": rids[0], "attempts": 9, "next_at": later}])
            raise RuntimeError("roll it back")
    with engine.begin() as conn:
        execute_many(conn, stmt, [{"rid": r, "attempts": 2, "next_at": later} for r in rids[:2]])
    with engine.connect() as conn:
        got = {r.id: r for r in conn.execute(select(outbound_recipients))}
    for r in rids[:2]:
        nxt = got[r].next_attempt_at
        assert (got[r].state, got[r].attempts) == ("deferred", 2)
        assert (nxt if nxt.tzinfo else nxt.replace(tzinfo=dt.timezone.utc)) == later
    assert (got[rids[2]].state, got[rids[2]].attempts) == ("queued", 0)  # and the rolled-back 9 is nowhere
