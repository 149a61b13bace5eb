"""SQLite (aiosqlite): WAL, a busy timeout, and every write transaction under the database's
write lock (``BEGIN IMMEDIATE``), which makes each claim and each transition atomic across the
processes sharing the file."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any, LiteralString

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._base import CHECKPOINT_STATES, RETURN_CLAIMED, Backend, Checkpoint

BUSY_TIMEOUT_MS = 60_000


def configure_engine(engine: AsyncEngine) -> None:
    """Make the driver leave transactions to us, so that writes can take the lock up front.

    SQLAlchemy's recipe for SQLite transactions: the driver's own implicit BEGIN is turned off
    and our ``begin`` listener issues ``BEGIN IMMEDIATE`` (or a plain ``BEGIN`` for reads).
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_aioasync_configured", False):
        return

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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
        write = conn.get_execution_options().get("aioasync_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    sync_engine._aioasync_configured = True  # type: ignore[attr-defined]


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

    _INSERT_CHUNK = 1_000
    """Rows per multi-row INSERT (8 parameters a row, well below SQLite's 32,766)."""

    rows_per_transaction = 5_000
    """About 0.2 s of the write lock: a bulk ``create_tasks`` commits every 5,000 rows, so
    that no node's heartbeat waits behind it long enough to lose its lease."""

    async def _let_others_write(self, held: float) -> None:
        # The lock is free at least as long as the chunk held it (and longer than the 100 ms
        # a long waiter sleeps in SQLite's busy handler), for the writers that waited meanwhile.
        await asyncio.sleep(max(held, 0.11))

    async def _insert_batch(self, conn: AsyncConnection, params: list[dict[str, Any]]) -> list[int]:
        # One INSERT … VALUES (…), (…) … RETURNING per chunk; row i's parameters are `name_i`.
        head, values = self._INSERT.removesuffix(" RETURNING id").split(" VALUES ", 1)
        ids: list[int] = []
        for start in range(0, len(params), self._INSERT_CHUNK):
            chunk = params[start : start + self._INSERT_CHUNK]
            rows = ", ".join(re.sub(r":(\w+)", rf":\1_{i}", values) for i in range(len(chunk)))
            numbered = {
                f"{key}_{i}": value for i, row in enumerate(chunk) for key, value in row.items()
            }
            result = await self._exec(conn, head + " VALUES " + rows + " RETURNING id", numbered)
            ids.extend(sorted(r[0] for r in result))  # autoincrement ids follow the VALUES order
        return ids

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
        # One UPDATE … FROM (VALUES …) per chunk, as PostgreSQL does with arrays.
        accepted: set[int] = set()
        items = list(contexts.items())
        for start in range(0, len(items), self._INSERT_CHUNK):
            chunk = items[start : start + self._INSERT_CHUNK]
            rows = ", ".join(f"(:id_{i}, :token_{i}, :context_{i})" for i in range(len(chunk)))
            params: dict[str, Any] = {"node": node_id, "states": CHECKPOINT_STATES}
            for i, (task_id, checkpoint) in enumerate(chunk):
                params[f"id_{i}"] = task_id
                params[f"token_{i}"] = checkpoint.token
                params[f"context_{i}"] = checkpoint.context
            result = await self._exec(
                conn,
                "WITH v(id, token, context) AS (VALUES " + rows + ") UPDATE {tasks}"
                " SET context = v.context, updated_at = {now} FROM v"
                " WHERE {tasks}.id = v.id AND {tasks}.token = v.token AND node_id = :node"
                " AND state IN :states RETURNING {tasks}.id",
                params,
            )
            accepted.update(r[0] for r in result)
        return accepted
