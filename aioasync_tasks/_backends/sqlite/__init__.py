"""The SQLite driver (aiosqlite): its statements are in ``queries.sql`` beside this file, its
schema in ``migrations/``. WAL, a busy timeout, and every write transaction under the
database's write lock (``BEGIN IMMEDIATE``), which makes each claim and each transition atomic
across the processes sharing the file. Lists and batches travel as JSON arrays."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import await_only

from .._sqldriver import SqlDriver
from .._transaction import set_session_value

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


def _json(value: Any) -> str:
    """One JSON parameter; text stays as it is (no ``\\u`` escapes but those JSON requires)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


class SqliteDriver(SqlDriver):
    dialect = "sqlite"
    rows_per_transaction = 5_000
    """About 0.1 s of the write lock: a bulk ``create_tasks`` commits every 5,000 rows, so
    that no node's heartbeat waits behind it long enough to lose its lease."""

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        super().__init__(engine, schema)
        configure_engine(engine)

    def bind_list(self, values: Iterable[Any]) -> Any:
        return _json(list(values))

    def bind_rows(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
        # One parameter whatever the number of rows (SQLite allows 32,766 parameters).
        return {"rows": _json([list(row) for row in rows])}

    async def pause_between_chunks(self, held: float) -> None:
        # The lock is free at least as long as the chunk held it (and longer than the 100 ms
        # a long waiter sleeps in SQLite's busy handler), for the writers that waited meanwhile.
        await asyncio.sleep(max(held, 0.11))
