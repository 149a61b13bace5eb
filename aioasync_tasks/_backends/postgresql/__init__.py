"""The PostgreSQL driver (asyncpg): its statements are in ``queries.sql`` beside this file, its
schema in ``migrations/``. Row locks with ``SKIP LOCKED``, arrays for lists and batches,
LISTEN/NOTIFY to wake nodes and deliver stop requests at once. Through a transaction pooler
(``pgbouncer=transaction``) it keeps nothing in a session: the idle bound is set in each write
transaction, and it listens on a direct connection, or not at all (nodes poll)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from operator import attrgetter, itemgetter
from types import SimpleNamespace
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ..._urls import POOLER_OPTION
from .. import _rows
from .._driver import (
    TASK_DONE,
    TASK_PROGRESS,
    CheckpointParams,
    Claimed,
    ClaimParams,
    ClaimResult,
    CleanupClaimParams,
    Completion,
    ListenParams,
    NewTask,
    task_events,
)
from .._sqldriver import CERTAIN_ENDS, CLAIM, ClaimWindow, SqlDriver, whole
from .._transaction import (
    WRAPPED,
    database_error,
    forget_session_values,
    session_key,
    set_session_value,
)

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
"""A ``:name`` parameter of a statement (not the ``::`` of a cast)."""

DEADLOCK_DETECTED = "40P01"
"""PostgreSQL's SQLSTATE for the victim of a deadlock, whose whole transaction is aborted."""

LIMITED_PAUSE = 1.0
"""Seconds a node claims in two statements after a window with a limited group, before it
tries one statement again (docs/design.md §6.9)."""

PLAN_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}
"""The planner settings of the library's statements (docs/design.md §15): planned once per
connection, and planned to read the tasks table by its indexes whatever its size then — a plan
made on a young table of a few rows is kept while the table grows to millions. Each is made for
the session and remembered per pooled connection under its name (``set_session_value``)."""


def plan_settings(ours: bool) -> dict[str, str]:
    """The planner settings of a session that serves the library's statements (``ours``), or
    the application's transactions (the server's own)."""
    return {name: value if ours else "DEFAULT" for name, value in PLAN_SETTINGS.items()}


OUR_PLANS = plan_settings(ours=True)
"""The planner settings of a session that serves the library's statements."""


def set_statement(settings: Mapping[str, str]) -> str:
    """One ``SET`` per setting, as one simple query (asyncpg's ``execute`` without arguments:
    one round trip). A ``SET``, unlike a ``SELECT set_config(…)``, takes no snapshot, so an
    application's transaction may still choose its isolation level after it."""
    return "; ".join(f"SET {name} = {value}" for name, value in settings.items())


IDLE_TIMEOUT_OPTION = "aioasync_idle_ms"
"""The execution option of our write transactions: the server's
``idle_in_transaction_session_timeout`` for them, in milliseconds."""


def configure_engine(engine: AsyncEngine) -> None:
    """Give our write transactions the idle timeout they ask for and generic plans, and the
    application's transactions on the same engine the server's defaults.

    The setting is made for the session and remembered per pooled connection
    (``set_session_value``): a connection that serves our writes one after another pays no
    round trip for it, where a ``SET LOCAL`` in each transaction would. Through a transaction
    pooler the session is not ours — the next transaction may run on another, and this one's
    session serves other clients next — so each write transaction pays that ``SET LOCAL``
    (docs/design.md §9.5)."""
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_aioasync_configured", False):
        return

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if "aioasync_write" in options and not options["aioasync_write"]:
            return  # our reads: either setting will do
        milliseconds = options.get(IDLE_TIMEOUT_OPTION)
        if POOLER_OPTION in options:
            if milliseconds is not None:
                conn.exec_driver_sql(
                    f"SET LOCAL idle_in_transaction_session_timeout = {int(milliseconds)}"
                )
            return
        value = "DEFAULT" if milliseconds is None else str(int(milliseconds))
        set_session_value(
            conn,
            "idle_timeout",
            value,
            f"SET idle_in_transaction_session_timeout = {value}",
        )
        # Our statements are planned once per connection, not at every run (§15).
        for name, setting in plan_settings(bool(options.get("aioasync_write"))).items():
            set_session_value(conn, name, setting, set_statement({name: setting}))

    event.listen(sync_engine, "rollback", forget_session_values)
    sync_engine._aioasync_configured = True  # type: ignore[attr-defined]


async def _own_plans(info: dict[str, Any], raw: Any) -> None:
    """Give the session of a pooled connection (its ``info``, its asyncpg connection ``raw``)
    the library's planner settings, unless it has them: ``set_session_value`` for a
    connection outside SQLAlchemy's transactions, the settings that are missing in one
    round trip."""
    missing = {n: v for n, v in OUR_PLANS.items() if info.get(session_key(n)) != v}
    if missing:
        for name in missing:
            info.pop(session_key(name), None)  # unknown until the SET has run
        await raw.execute(set_statement(missing))
        info.update({session_key(n): v for n, v in missing.items()})


class PostgresDriver(SqlDriver):
    dialect = "postgresql"
    supports_notify = True
    claim_pool_factor = 3  # concurrent claimers choose alike; SKIP LOCKED then skips past

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        super().__init__(engine, schema)
        configure_engine(engine)
        pooler = engine.get_execution_options().get(POOLER_OPTION)
        self._per_session = pooler is None
        """Whether a session's settings stay ours between statements (not through a
        transaction pooler, whose next transaction may run in another session: §9.5)."""
        self._listen_engine: AsyncEngine | None = engine if pooler is None else pooler.listen
        """Where ``LISTEN`` runs: a session of its own, which a transaction pooler cannot give
        (its ``listen_host``, or None: nodes and waiters poll, docs/design.md §14)."""
        self.supports_notify = self._listen_engine is not None
        suffix = re.sub(r"[^a-z0-9_]", "_", (schema or "public").lower())
        self.channel = f"aioasync_tasks_{suffix}"[:63]
        self.events_channel = f"aioasync_watch_{suffix}"[:63]
        """Task events for watchers (docs/design.md §18), apart from the nodes' channel: a
        client that waits for a task hears no wake-ups, and a worker no task events."""
        self.notify_params: Mapping[str, Any] = {"channel": self.channel}
        self._positionals: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        self._limited_until = 0.0
        """Until when (``time.monotonic``) claims are made in two statements: the last
        window had a group with a limit."""
        self._quoted_schema = (
            engine.dialect.identifier_preparer.quote_identifier(schema) if schema else None
        )

    async def insert_at_once(self, new_tasks: Sequence[NewTask], wake: bool) -> list[int]:
        # Outside a transaction (no BEGIN, no COMMIT) and on asyncpg's own connection, as a
        # prepared statement: one round trip (docs/design.md §13.1).
        name, params, woke = self.insert_statement([self._new_row(t) for t in new_tasks], wake)
        rows = await self.fetch(name, params)
        if woke:
            return list(rows[0]["ids"])
        return sorted(row["id"] for row in rows)

    async def claim_at_once(self, params: ClaimParams) -> ClaimResult | None:
        # One round trip, on asyncpg's own connection: no BEGIN, no COMMIT, no SQLAlchemy.
        # After a window with a limited group, two statements for a while (§6.9).
        if time.monotonic() < self._limited_until:
            return None
        p = params
        size = self.window_size(p.limit)
        bound = {
            **self.prepare_params(p, size, self.group_params(p.groups)),
            "limit": p.limit,
            "pool": p.limit * self.claim_pool_factor,
            "busy": self.bind_list(p.busy),
            **self._watched_events(TASK_PROGRESS),
            **CLAIM,
        }
        head, *taken = await self.fetch("claim_at_once", bound, p.policy.order_by)
        if not head["registered"]:
            return ClaimResult([], None)
        if head["limited"]:
            self._limited_until = time.monotonic() + LIMITED_PAUSE
            return None
        queues = list(zip(head["window_groups"] or (), head["window_users"] or (), strict=True))
        window = ClaimWindow(queues, full=len(queues) >= size)
        # Read as SQLAlchemy's rows are, by attribute: a namespace is made in C, and each of
        # its attributes is read at C speed (a __getattr__ of ours cost 5 µs a task).
        rows = [SimpleNamespace(**r) for r in taken]
        return self.claim_result(p, rows, window, head["next_due"])

    async def claim_cleanups_at_once(self, params: CleanupClaimParams) -> list[Claimed]:
        # One round trip where the transaction takes four (BEGIN, the claim, a NOTIFY, COMMIT).
        bound = {**self.cleanup_params(params), **self._watched_events(TASK_PROGRESS)}
        rows = await self.fetch("claim_cleanups_at_once", bound)
        return [_rows.claimed(SimpleNamespace(**r)) for r in sorted(rows, key=lambda r: r["id"])]

    async def checkpoint_at_once(self, params: CheckpointParams) -> set[int]:
        bound = {**self._checkpoint_params(params), **self._watched_events(TASK_PROGRESS)}
        rows = await self.fetch("checkpoint_at_once", bound)
        return {row["id"] for row in rows}

    @whole
    async def complete_at_once(self, node_id: int, completions: list[Completion]) -> set[int]:
        # A compare-and-set per row in one autocommit statement: one round trip where the
        # locked path takes four (BEGIN, the lock, the update, COMMIT; §15.1). Ids ascending
        # and each once (batch_row): a task's last completion, as the locked path takes it.
        completions = sorted(
            {c.task_id: c for c in completions}.values(), key=attrgetter("task_id")
        )
        bound = {
            "node": node_id,
            "ids": [c.task_id for c in completions],
            "tokens": [c.token for c in completions],
            "states": [CERTAIN_ENDS[c.event].value for c in completions],
            "contexts": [c.context for c in completions],
            "errors": [c.error for c in completions],
            "progress": [c.progress for c in completions],
            "messages": [c.message for c in completions],
            **self._watched_events(TASK_DONE),
        }
        rows = await self.fetch("complete_at_once", bound)
        return {row["id"] for row in rows}

    def _watched_events(self, kind: str) -> dict[str, str]:
        """The parameters of the fragment ``watched_events``: the events of ``kind`` on the
        watchers' channel, each ``kind:`` then the ids, as ``task_events`` makes them."""
        return {"events_channel": self.events_channel, "events_kind": f"{kind}:"}

    async def fetch(self, name: str, params: Mapping[str, Any], order_by: str = "") -> list[Any]:
        """The rows (asyncpg's records) of the statement ``name``, run outside a transaction
        (it commits on its own) on the asyncpg connection of a pooled connection, past
        SQLAlchemy's layers: no ``Connection``, no ``BEGIN`` or ``COMMIT`` and their events
        (they cost more than the round trip; docs/design.md §13.1). asyncpg prepares the
        statement once per connection (unless through a transaction pooler, §9.5) and binds
        the values as they are; a statement of the library runs with its planner settings
        (``PLAN_SETTINGS``, §15)."""
        import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - loaded by then; not for SQLite

        sql, names = self._positional(name, order_by)
        url = self.engine.url
        try:
            pooled = await self.engine.raw_connection()
        except WRAPPED as exc:
            raise database_error(exc, url, "could not connect to") from exc
        raw: Any = pooled.driver_connection
        broken = True  # unless it ends well, or with an error of the statement's own
        try:
            if self._per_session:
                await _own_plans(pooled.info, raw)
            rows = list(await raw.fetch(sql, *(params[n] for n in names)))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            broken = not isinstance(exc, asyncpg.PostgresError) or isinstance(
                exc, asyncpg.PostgresConnectionError
            )
            raise self.statement_failed(exc, sql) from exc
        else:
            broken = False
            return rows
        finally:
            # A connection cut off in the middle of a statement (a cancelled caller, a lost
            # server) is closed, never handed out again; so is every one after the node stopped
            # (its engine may be disposed of).
            with anyio.CancelScope(shield=True):
                if broken or self.in_flight.closed:
                    await greenlet_spawn(pooled.invalidate)
                await greenlet_spawn(pooled.close)

    def _positional(self, name: str, order_by: str) -> tuple[str, tuple[str, ...]]:
        """The statement ``name`` (with the policy's ``order_by``) with asyncpg's ``$1, $2 …``
        for its ``:name`` parameters, and the names in their order."""
        found = self._positionals.get((name, order_by))
        if found is None:
            names: list[str] = []

            def number(match: re.Match[str]) -> str:
                if match.group(1) not in names:
                    names.append(match.group(1))
                return f"${names.index(match.group(1)) + 1}"

            sql = self.queries.statement(name, order_by=order_by).text
            found = self._positionals[name, order_by] = (
                _PARAMETER.sub(number, sql),
                tuple(names),
            )
        return found

    async def update_rows(self, conn: AsyncConnection, updates: list[dict[str, Any]]) -> None:
        # One statement for the batch (a completion flush of 100 tasks was 100 statements),
        # the rows' ids ascending (batch_row; the rows are locked ones, each once).
        updates = sorted(updates, key=itemgetter("id"))
        arrays = {name: [u[name] for u in updates] for name in updates[0]}
        arrays["ids"] = arrays.pop("id")
        await self._run(conn, "update_tasks", arrays)

    def deadlock_victim(self, cause: BaseException | None) -> bool:
        # Rows are locked in id order by most statements, but a checkpoint batch's UPDATE
        # locks them in its scan's order, and a unique create waits for the holder of its key:
        # PostgreSQL then aborts one transaction, whole (docs/design.md §13.3). asyncpg's own
        # error (fetch) or SQLAlchemy's around it.
        return getattr(getattr(cause, "orig", cause), "sqlstate", None) == DEADLOCK_DETECTED

    def bound_idle_transactions(self, seconds: float) -> None:
        # Only our own write transactions, never the application's on the same engine.
        self._write_options = {IDLE_TIMEOUT_OPTION: max(int(seconds * 1000), 1)}

    async def notify(self, conn: AsyncConnection, payload: str) -> None:
        await self._run(conn, "notify", {"channel": self.channel, "payload": payload})

    async def lock_unique_keys(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        # Qualified by the schema's channel: systems in other schemas never wait on ours.
        names = sorted({f"{self.channel}:{type}:{key}" for type, key in keys})
        await self._run(conn, "lock_unique_keys", {"keys": names})

    async def try_prune_lock(self, conn: AsyncConnection) -> bool:
        # Row locks let two pruners run at once; the advisory lock makes them take turns, and
        # the one that finds it taken skips its round instead of waiting.
        result = await self._run(conn, "prune_lock", {"key": f"{self.channel}:prune"})
        return bool(result.scalar_one())

    async def notify_task_events(self, conn: AsyncConnection, kind: str, ids: list[int]) -> None:
        for payload in task_events(kind, ids):
            await self._run(conn, "notify", {"channel": self.events_channel, "payload": payload})

    async def prepare_migration(self, conn: AsyncConnection) -> None:
        await self._run(conn, "migration_lock", {"key": self.channel})
        if self._quoted_schema:
            await conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self._quoted_schema}")
            await conn.exec_driver_sql(f"SET LOCAL search_path TO {self._quoted_schema}")

    def listen(
        self, on_message: Callable[[str], None]
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """While inside, the notifications on this schema's channel reach ``on_message``; the
        event it yields is set when the listening connection is lost."""
        return self._listen(self.channel, on_message)

    def listen_tasks(
        self, params: ListenParams
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """The task events of this schema, for watchers (docs/design.md §18)."""
        return self._listen(self.events_channel, params.on_message)

    @contextlib.asynccontextmanager
    async def _listen(
        self, channel: str, on_message: Callable[[str], None]
    ) -> AsyncIterator[asyncio.Event]:
        # A connection of its own, out of the pool's rotation for as long as it listens; it is
        # invalidated (closed) afterwards, never handed to another user of the pool.
        engine = self._listen_engine
        if engine is None:
            raise NotImplementedError("no listen_host for LISTEN behind a transaction pooler")
        try:
            conn = await engine.connect()
        except WRAPPED as exc:
            raise database_error(exc, engine.url, "could not listen on") from exc
        try:
            try:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                lost = asyncio.Event()
                driver.add_termination_listener(lambda _conn: lost.set())
                await driver.add_listener(
                    channel, lambda _conn, _pid, _channel, payload: on_message(payload)
                )
            except Exception as exc:  # asyncpg raises errors of its own here too
                raise database_error(exc, engine.url, "could not listen on") from exc
            yield lost
        finally:
            # Whatever ends it (a lost connection, an error, the node's stop cancelling it
            # half-way): the connection is closed, never left for the garbage collector.
            with anyio.CancelScope(shield=True):
                await conn.invalidate()
                await conn.close()
