"""PostgreSQL (asyncpg): row locks with ``SKIP LOCKED``, arrays for batches, LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, LiteralString

import anyio
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._base import CHECKPOINT_STATES, Backend
from ._driver import Checkpoint
from ._rows import RETURN_CLAIMED
from ._transaction import WRAPPED, database_error, forget_session_values, set_session_value

IDLE_TIMEOUT_OPTION = "aioasync_idle_ms"
"""The execution option of our write transactions: the server's
``idle_in_transaction_session_timeout`` for them, in milliseconds."""


def configure_engine(engine: AsyncEngine) -> None:
    """Give our write transactions the idle timeout they ask for, and the application's
    transactions on the same engine the server's default.

    The setting is made for the session and remembered per pooled connection
    (``set_session_value``): a connection that serves our writes one after another pays no
    round trip for it, where a ``SET LOCAL`` in each transaction would."""
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_aioasync_configured", False):
        return

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if "aioasync_write" in options and not options["aioasync_write"]:
            return  # our reads: either setting will do
        milliseconds = options.get(IDLE_TIMEOUT_OPTION)
        value = "DEFAULT" if milliseconds is None else str(int(milliseconds))
        set_session_value(
            conn,
            "idle_timeout",
            value,
            f"SET idle_in_transaction_session_timeout = {value}",
        )

    event.listen(sync_engine, "rollback", forget_session_values)
    sync_engine._aioasync_configured = True  # type: ignore[attr-defined]


class PostgresBackend(Backend):
    dialect = "postgresql"
    supports_notify = True
    now = "now()"
    lock_rows = " FOR UPDATE"
    claim_pool_factor = 3  # concurrent claimers choose alike; SKIP LOCKED then skips past
    skip_locked = " SKIP LOCKED"
    share_lock = " FOR KEY SHARE"

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        super().__init__(engine, schema)
        configure_engine(engine)
        suffix = re.sub(r"[^a-z0-9_]", "_", (schema or "public").lower())
        self.channel = f"aioasync_tasks_{suffix}"[:63]
        self._quoted_schema = (
            engine.dialect.identifier_preparer.quote_identifier(schema) if schema else None
        )

    def bound_idle_transactions(self, seconds: float) -> None:
        # Only our own write transactions, never the application's on the same engine.
        self._write_options = {IDLE_TIMEOUT_OPTION: max(int(seconds * 1000), 1)}

    def _qualify(self, table: str) -> str:
        return f"{self._quoted_schema}.{table}" if self._quoted_schema else table

    def _float(self, param: LiteralString) -> LiteralString:
        return "CAST(" + param + " AS double precision)"

    def _plus_seconds(self, param: LiteralString) -> LiteralString:
        return "(" + self.now + " + make_interval(secs => " + self._float(param) + "))"

    def _in(self, column: LiteralString, param: LiteralString) -> LiteralString:
        return column + " = ANY(" + param + ")"

    @contextlib.asynccontextmanager
    async def listen(self, on_message: Callable[[str], None]) -> AsyncIterator[asyncio.Event]:
        # A connection of its own, out of the pool's rotation for as long as it listens; it is
        # invalidated (closed) afterwards, never handed to another user of the pool.
        try:
            conn = await self.engine.connect()
        except WRAPPED as exc:
            raise database_error(exc, self.engine.url, "could not listen on") from exc
        try:
            try:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                lost = asyncio.Event()
                driver.add_termination_listener(lambda _conn: lost.set())
                await driver.add_listener(
                    self.channel, lambda _conn, _pid, _channel, payload: on_message(payload)
                )
            except Exception as exc:  # asyncpg raises errors of its own here too
                raise database_error(exc, self.engine.url, "could not listen on") from exc
            yield lost
        finally:
            # Whatever ends it (a lost connection, an error, the node's stop cancelling it
            # half-way): the connection is closed, never left for the garbage collector.
            with anyio.CancelScope(shield=True):
                await conn.invalidate()
                await conn.close()

    async def _notify(self, conn: AsyncConnection, payload: str) -> None:
        # Delivered when the transaction commits, and only then.
        await self._exec(
            conn,
            "SELECT pg_notify(:channel, :payload)",
            {"channel": self.channel, "payload": payload},
        )

    async def _prepare_migration(self, conn: AsyncConnection) -> None:
        await self._exec(
            conn, "SELECT pg_advisory_xact_lock(hashtext(:key))", {"key": self.channel}
        )
        if self._quoted_schema:
            await conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self._quoted_schema}")
            await conn.exec_driver_sql(f"SET LOCAL search_path TO {self._quoted_schema}")

    _INSERT_MANY: LiteralString = (
        "INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,"
        " attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,"
        " run_at) SELECT v.type, v.user_name, v.group_name, v.state, NULL, v.context, v.priority,"
        " 0, v.max_attempts, v.has_cleanup, false, NULL, NULL, {now}, {now},"
        " COALESCE(v.run_at, {now}) FROM unnest(CAST(:type AS text[]), CAST(:user AS text[]),"
        " CAST(:group AS text[]), CAST(:state AS text[]), CAST(:context AS text[]),"
        " CAST(:priority AS integer[]), CAST(:max_attempts AS integer[]),"
        " CAST(:has_cleanup AS boolean[]), CAST(:run_at AS timestamptz[])) WITH ORDINALITY"
        " AS v(type, user_name, group_name, state, context, priority, max_attempts,"
        " has_cleanup, run_at, ord) ORDER BY v.ord RETURNING id"
    )

    single_statement_autocommit = True

    async def _insert(
        self, conn: AsyncConnection, params: list[dict[str, Any]], wake: bool
    ) -> list[int]:
        if len(params) != 1 or not wake:
            return await super()._insert(conn, params, wake)
        # One statement: the insert and its wake-up (delivered when it commits).
        result = await self._exec(
            conn,
            "WITH ins AS (" + self._INSERT + ") SELECT id, pg_notify(:channel, 'wake') FROM ins",
            {**params[0], "channel": self.channel},
        )
        return [result.scalar_one()]

    async def _insert_batch(self, conn: AsyncConnection, params: list[dict[str, Any]]) -> list[int]:
        columns = {key: [p[key] for p in params] for key in params[0]}
        result = await self._exec(conn, self._INSERT_MANY, columns)
        # Ids come from the sequence in the order the rows are inserted (ORDER BY ord).
        return sorted(row[0] for row in result)

    async def _prepare_claim(self, conn: AsyncConnection, node_id: int) -> bool:
        # One round trip: share-lock our node row (fencing) and lock the limited groups.
        result = await self._exec(
            conn,
            "SELECT (SELECT count(*) FROM (SELECT id FROM {nodes} WHERE id = :id"
            " FOR KEY SHARE) me), (SELECT count(*) FROM (SELECT name FROM {groups}"
            " WHERE max_running IS NOT NULL OR max_running_per_user IS NOT NULL"
            " ORDER BY name FOR UPDATE) limited)",
            {"id": node_id},
        )
        return bool(result.one()[0])

    def _seconds_until(self, column: LiteralString) -> LiteralString:
        return "EXTRACT(EPOCH FROM (" + column + " - " + self.now + "))"

    def _pairs_scan(self) -> LiteralString:
        # LATERAL lets each step read the next queue's key straight from the index.
        return (
            "(SELECT group_name, user_name FROM {tasks} WHERE state = 'pending'"
            " ORDER BY group_name, user_name LIMIT 1)"
            " UNION ALL SELECT n.group_name, n.user_name FROM pairs p CROSS JOIN LATERAL"
            " (SELECT group_name, user_name FROM {tasks} WHERE state = 'pending'"
            " AND (group_name, user_name) > (p.group_name, p.user_name)"
            " ORDER BY group_name, user_name LIMIT 1) n"
        )

    def _queue_tasks(self, ready: LiteralString, queue_order: LiteralString) -> LiteralString:
        return (
            "CROSS JOIN LATERAL (SELECT id, handoff, priority, run_at, group_name, user_name"
            " FROM {tasks} WHERE " + ready + " AND group_name = op.group_name"
            " AND user_name = op.user_name ORDER BY " + queue_order + " LIMIT :pool) c"
        )

    def _claim_update(self) -> LiteralString:
        # State and group are checked again under the row lock: a row another node claimed,
        # or that was moved to another group, since this statement's snapshot is skipped.
        return (
            "UPDATE {tasks} t SET state = :to_state, node_id = :node,"
            " attempts = t.attempts + 1, token = t.token + 1, handoff = false,"
            " started_at = COALESCE(t.started_at, {now}), updated_at = {now}"
            " FROM (SELECT r.id AS claim_id FROM {tasks} r JOIN chosen c ON c.id = r.id"
            " WHERE r.state = :from_state AND r.group_name = c.group_name"
            " AND NOT (r.id = ANY(CAST(:busy AS bigint[]))) ORDER BY c.pick LIMIT :limit"
            " FOR UPDATE OF r SKIP LOCKED) k"
            " WHERE t.id = k.claim_id" + RETURN_CLAIMED
        )

    def _cleanup_claim_statement(self) -> LiteralString:
        return (
            "UPDATE {tasks} t SET state = :to_state, node_id = :node,"
            " attempts = t.attempts + 1, token = t.token + 1, updated_at = {now}"
            " FROM (SELECT id AS claim_id FROM {tasks} WHERE state = 'deleting'"
            " AND node_id IS NULL AND run_at <= {now} AND type = ANY(:types)"
            " AND state = :from_state AND NOT (id = ANY(CAST(:busy AS bigint[])))"
            " ORDER BY run_at, id LIMIT :limit FOR UPDATE SKIP LOCKED) c"
            " WHERE t.id = c.claim_id" + RETURN_CLAIMED
        )

    async def _checkpoint(
        self, conn: AsyncConnection, node_id: int, contexts: Mapping[int, Checkpoint]
    ) -> set[int]:
        result = await self._exec(
            conn,
            "UPDATE {tasks} t SET context = v.context, updated_at = {now}"
            " FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS integer[]),"
            " CAST(:contexts AS text[])) AS v(id, token, context)"
            " WHERE t.id = v.id AND t.token = v.token AND t.node_id = :node"
            " AND t.state = ANY(:states) RETURNING t.id",
            {
                "ids": list(contexts),
                "tokens": [c.token for c in contexts.values()],
                "contexts": [c.context for c in contexts.values()],
                "node": node_id,
                "states": CHECKPOINT_STATES,
            },
        )
        return {row[0] for row in result}
