"""SQLite (aiosqlite): WAL, a busy timeout, and every write transaction under the database's
write lock (``BEGIN IMMEDIATE``), which makes each claim and each transition atomic across the
processes sharing the file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, LiteralString

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import await_only

from ._base import CHECKPOINT_STATES, Backend
from ._driver import Checkpoint
from ._rows import RETURN_CLAIMED
from ._transaction import set_session_value

BUSY_TIMEOUT_MS = 60_000
"""How long a transaction of the application's waits for SQLite's write lock."""
SHORT_BUSY_TIMEOUT_MS = 20
"""How long SQLite itself waits for its lock in a write transaction of ours before we retry.

SQLite's busy handler makes a writer that has waited long retry only every 100 ms, so it
loses the lock to every newcomer: a node's heartbeat behind a bulk insert from another
process would miss window after window and lose its lease. Our writes begin with SQLite
waiting briefly and retry every ``BUSY_RETRY_INTERVAL``, for up to ``BUSY_TIMEOUT_MS`` in all
(docs/explanation.md, "A bulk create on SQLite")."""
BUSY_RETRY_INTERVAL = 0.002


def configure_engine(engine: AsyncEngine) -> None:
    """Make the driver leave transactions to us, so that writes can take the lock up front.

    SQLAlchemy's recipe for SQLite transactions: the driver's own implicit BEGIN is turned off
    and our ``begin`` listener issues ``BEGIN IMMEDIATE`` (or a plain ``BEGIN`` for reads).
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_aioasync_configured", False):
        return

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        record.info["aioasync_busy_timeout"] = BUSY_TIMEOUT_MS  # see set_session_value
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except Exception as exc:
            # Connections opening a new file at once race to switch it to WAL, and the losers
            # get "database is locked" at once (this switch does not wait). The mode belongs
            # to the file, so the winner's switch applies to every connection.
            if "locked" not in str(exc):
                raise
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        # ``aioasync_write`` is set by the storage layer's own transactions; the application's
        # transactions on the same engine have none.
        ours = conn.get_execution_options().get("aioasync_write")
        if ours is False:
            conn.exec_driver_sql("BEGIN")
        elif ours is None:
            _set_busy_timeout(conn, BUSY_TIMEOUT_MS)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            _set_busy_timeout(conn, SHORT_BUSY_TIMEOUT_MS)
            _begin_immediate_retrying(conn)

    sync_engine._aioasync_configured = True  # type: ignore[attr-defined]


def _set_busy_timeout(conn: Connection, milliseconds: int) -> None:
    set_session_value(conn, "busy_timeout", milliseconds, f"PRAGMA busy_timeout = {milliseconds}")


def _begin_immediate_retrying(conn: Connection) -> None:
    # On the driver's cursor: a refused BEGIN is the expected case here, not a failed
    # statement for SQLAlchemy to handle.
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    locked_error = conn.dialect.loaded_dbapi.OperationalError
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    try:
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except locked_error as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            else:
                return
            await_only(asyncio.sleep(BUSY_RETRY_INTERVAL))
    finally:
        cursor.close()


def _json_rows(rows: Iterable[list[Any]]) -> str:
    """Rows of values as one JSON array, for a statement that reads them with ``json_each``.
    Text stays as it is (no ``\\u`` escapes but those JSON requires)."""
    return json.dumps(list(rows), ensure_ascii=False, allow_nan=False)


class SqliteBackend(Backend):
    dialect = "sqlite"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    expanding_lists = True

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        super().__init__(engine, schema)
        configure_engine(engine)

    def _in(self, column: LiteralString, param: LiteralString) -> LiteralString:
        return column + " IN " + param

    # Without statistics SQLite may pick the (state, id) index and sort the whole backlog.
    _queue_index = "{tasks} INDEXED BY aioasync_tasks_queue_idx"

    rows_per_transaction = 5_000
    """About 0.1 s of the write lock: a bulk ``create_tasks`` commits every 5,000 rows, so
    that no node's heartbeat waits behind it long enough to lose its lease."""

    async def _let_others_write(self, held: float) -> None:
        # The lock is free at least as long as the chunk held it (and longer than the 100 ms
        # a long waiter sleeps in SQLite's busy handler), for the writers that waited meanwhile.
        await asyncio.sleep(max(held, 0.11))

    _INSERT_MANY: LiteralString = (
        "INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,"
        " attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,"
        " run_at) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
        " json_extract(value, '$[2]'), json_extract(value, '$[3]'), NULL,"
        " json_extract(value, '$[4]'), json_extract(value, '$[5]'), 0,"
        " json_extract(value, '$[6]'), json_extract(value, '$[7]'), false, NULL, NULL, {now},"
        " {now}, COALESCE(json_extract(value, '$[8]'), {now}) FROM json_each(:rows)"
        " ORDER BY key RETURNING id"
    )
    _MANY_KEYS = (
        "type",
        "user",
        "group",
        "state",
        "context",
        "priority",
        "max_attempts",
        "has_cleanup",
        "run_at",
    )
    """The order of the values of a row in ``_INSERT_MANY``'s JSON array."""

    async def _insert_batch(self, conn: AsyncConnection, params: list[dict[str, Any]]) -> list[int]:
        # The rows travel as one JSON array, like PostgreSQL's arrays for unnest: one statement
        # with one parameter, whatever the number of rows (SQLite allows 32,766 parameters).
        rows = _json_rows([p[key] for key in self._MANY_KEYS] for p in params)
        result = await self._exec(conn, self._INSERT_MANY, {"rows": rows})
        return sorted(r[0] for r in result)  # autoincrement ids follow the rows' order

    def _pairs_scan(self) -> LiteralString:
        # SQLite seeks a row-value range on its first column only; the next queue is either
        # the next user of the same group or the first user of the next group.
        def first(condition: LiteralString) -> LiteralString:
            return (
                "(SELECT id FROM "
                + self._queue_index
                + " WHERE state = 'pending' AND "
                + condition
                + " ORDER BY group_name, user_name LIMIT 1)"
            )

        return (
            "SELECT group_name, user_name FROM {tasks} WHERE id = "
            + first("1")
            + " UNION ALL SELECT n.group_name, n.user_name FROM pairs p JOIN {tasks} n ON n.id ="
            " COALESCE("
            + first("group_name = p.group_name AND user_name > p.user_name")
            + ", "
            + first("group_name > p.group_name")
            + ")"
        )

    def _queue_tasks(self, ready: LiteralString, queue_order: LiteralString) -> LiteralString:
        # No LATERAL in SQLite: a correlated `id IN (… LIMIT n)` looks the rows up by id.
        return (
            "JOIN {tasks} c ON c.id IN (SELECT id FROM "
            + self._queue_index
            + " WHERE "
            + ready
            + " AND group_name = op.group_name AND user_name = op.user_name"
            " ORDER BY " + queue_order + " LIMIT :pool)"
        )

    def _claim_update(self) -> LiteralString:
        # The write lock is held from BEGIN IMMEDIATE: no other claimer can interleave.
        return (
            "UPDATE {tasks} SET state = :to_state, node_id = :node, attempts = attempts + 1,"
            " token = token + 1, handoff = false, started_at = COALESCE(started_at, {now}),"
            " updated_at = {now} WHERE id IN (SELECT id FROM chosen WHERE NOT (id IN :busy)"
            " ORDER BY pick LIMIT :limit) AND state = :from_state" + RETURN_CLAIMED
        )

    def _cleanup_claim_statement(self) -> LiteralString:
        return (
            "UPDATE {tasks} SET state = :to_state, node_id = :node, attempts = attempts + 1,"
            " token = token + 1, updated_at = {now}"
            " WHERE id IN (SELECT id FROM {tasks} WHERE state = 'deleting' AND node_id IS NULL"
            " AND run_at <= {now} AND type IN :types AND NOT (id IN :busy)"
            " ORDER BY run_at, id LIMIT :limit) AND state = :from_state" + RETURN_CLAIMED
        )

    async def _checkpoint(
        self, conn: AsyncConnection, node_id: int, contexts: Mapping[int, Checkpoint]
    ) -> set[int]:
        # One UPDATE … FROM the rows as a JSON array, as PostgreSQL does with arrays.
        rows = _json_rows([task_id, c.token, c.context] for task_id, c in contexts.items())
        result = await self._exec(
            conn,
            "WITH v(id, token, context) AS (SELECT json_extract(value, '$[0]'),"
            " json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(:rows))"
            " UPDATE {tasks} SET context = v.context, updated_at = {now} FROM v"
            " WHERE {tasks}.id = v.id AND {tasks}.token = v.token AND node_id = :node"
            " AND state IN :states RETURNING {tasks}.id",
            {"rows": rows, "node": node_id, "states": CHECKPOINT_STATES},
        )
        return {r[0] for r in result}
