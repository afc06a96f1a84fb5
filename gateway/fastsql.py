"""Hot statements of the relay's bookkeeping, run on SQLite through the driver (other dialects: SQLAlchemy).

Measured (py-spy on the outbound store process, bench/relay.py): SQLAlchemy's per-execution work — building
the statement, its cache key, the execution context — cost more than SQLite's own work for the five inserts
of a relayed mail and the four statements recording its result (≈200 µs per mail against ≈30 µs). The SQL
here is compiled once per statement by SQLAlchemy itself and values go through the dialect's own bind
processors, so what SQLAlchemy reads back is exactly what it would have written; the calls join the
transaction already open on the connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.sql import Executable


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *, ids: bool = False,
                skip_existing: str | None = None) -> Any:
    """INSERT `rows` (all with the same keys); with `ids`, the new primary keys in row order (a list).

    With `skip_existing` (a uniquely indexed column), rows whose value is already there — or repeats one
    earlier in `rows` — are left out (ON CONFLICT DO NOTHING) and the number of rows inserted is returned."""
    if not rows:
        return 0 if skip_existing else []
    if conn.dialect.name != "sqlite":
        if skip_existing:
            return _insert_skipping(conn, table, rows, skip_existing)
        if not ids:
            conn.execute(insert(table), list(rows))
            return []
        if len(rows) == 1:
            return [conn.execute(insert(table), rows[0]).inserted_primary_key[0]]
        stmt = insert(table).returning(table.primary_key.columns.values()[0], sort_by_parameter_order=True)
        return list(conn.execute(stmt, list(rows)).scalars())
    return driver_insert(conn.connection.driver_connection, conn.dialect, table, rows, ids=ids,
                         skip_existing=skip_existing)


def driver_insert(dbapi: Any, dialect: Any, table: Table, rows: Sequence[Mapping[str, Any]], *, ids: bool = False,
                  skip_existing: str | None = None) -> Any:
    """`insert_rows` on a bare sqlite3 connection (the spool writer process holds one), in its open
    transaction."""
    if not rows:
        return 0 if skip_existing else []
    sql, columns, procs, defaults = _insert_plan(dialect, table, tuple(rows[0]))
    values = [[proc(v) if proc else v for proc, v in zip(procs, (*(row[c] for c in columns), *defaults))]
              for row in rows]
    if skip_existing:
        return int(dbapi.executemany(f"{sql} ON CONFLICT ({skip_existing}) DO NOTHING", values).rowcount)
    if ids:
        return [int(dbapi.execute(sql, v).lastrowid) for v in values]
    dbapi.executemany(sql, values)
    return []


def _insert_skipping(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], column: str) -> int:
    """PostgreSQL: the rows whose value is not stored yet (looked up first), in one multi-row INSERT … ON CONFLICT
    DO NOTHING RETURNING; the rows it returns are the new ones.

    PostgreSQL evaluates a serial column's default before it meets the conflict, so a bare ON CONFLICT DO
    NOTHING burned a sequence number for every row already there (an open pixel fetched again, a fact recorded
    twice). Each burned number of `events.seq` is a gap that readers of the event stream wait at. The look-up
    leaves only a concurrent insert of the same value to ON CONFLICT."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    key = table.c[column]
    firsts: dict[Any, Mapping[str, Any]] = {}
    for row in rows:  # the first row of each value, in order (a repeat would meet ON CONFLICT, and burn a number)
        firsts.setdefault(row[column], row)
    stored = set(conn.execute(select(key).where(key.in_(list(firsts)))).scalars())
    fresh = [dict(row) for value, row in firsts.items() if value not in stored]
    if not fresh:
        return 0
    stmt = pg_insert(table).values(fresh).on_conflict_do_nothing(index_elements=[column]).returning(key)
    return len(conn.execute(stmt).all())


def execute_many(conn: Connection, stmt: Executable, params: Sequence[Mapping[str, Any]]) -> None:
    """`conn.execute(stmt, params)` for an UPDATE/DELETE with named bindparams and no IN lists."""
    if not params:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(stmt, list(params))
        return
    sql, names, procs, fixed = _statement_plan(conn.dialect, stmt)
    values = [[proc(v) if proc else v for proc, v in zip(procs, (p[n] if n in p else fixed[n] for n in names))]
              for p in params]
    conn.connection.driver_connection.executemany(sql, values)  # type: ignore[union-attr]


_plans: dict[tuple[int, ...], tuple[Any, ...]] = {}


def _cached(key_objs: tuple[Any, ...], extra: tuple[str, ...], build: Any) -> Any:
    """Plans are cached by the identity of the dialect and the statement or table (statements compare with
    `==` into SQL expressions, so they cannot be dict keys themselves); the objects are kept alive with the
    plan, so an id is never reused while its entry exists."""
    key = (*map(id, key_objs), hash(extra))
    hit = _plans.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], key_objs)) or hit[1] != extra:
        hit = _plans[key] = (key_objs, extra, build())
    return hit[2]


def _insert_plan(dialect: Any, table: Table, given: tuple[str, ...]) -> tuple[str, tuple[str, ...], list[Any], list[Any]]:
    return _cached((dialect, table), given, lambda: _build_insert_plan(dialect, table, given))


def _build_insert_plan(dialect: Any, table: Table, given: tuple[str, ...]) -> tuple[str, tuple[str, ...], list[Any], list[Any]]:
    """SQL, the given columns, bind processors (given columns, then defaulted ones) and the scalar defaults
    SQLAlchemy would have filled in for columns the rows leave out."""
    defaulted = [c for c in table.columns if c.name not in given and c.default is not None and c.default.is_scalar]
    names = [*given, *(c.name for c in defaulted)]
    procs = [table.c[n].type.bind_processor(dialect) for n in names]
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
    return sql, given, procs, [c.default.arg for c in defaulted]  # type: ignore[union-attr]


def _statement_plan(dialect: Any, stmt: Executable) -> tuple[str, tuple[str, ...], list[Any], dict[str, Any]]:
    return _cached((dialect, stmt), (), lambda: _build_statement_plan(dialect, stmt))


def _build_statement_plan(dialect: Any, stmt: Executable) -> tuple[str, tuple[str, ...], list[Any], dict[str, Any]]:
    """SQL with positional parameters, their names in order, their bind processors, and the values of the
    ones the statement fixes itself (`.values(state="deferred")`)."""
    compiled = stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
    names = tuple(compiled.positiontup or ())
    procs = [compiled.binds[n].type.bind_processor(dialect) for n in names]
    fixed = {n: compiled.binds[n].effective_value for n in names if not compiled.binds[n].required}
    return compiled.string, names, procs, fixed
