"""The MySQL driver (aiomysql), for MySQL 8 and MariaDB 10.6 or newer: its statements are in
``queries.sql`` beside this file, its schema in ``migrations/``.

Neither database has ``UPDATE … RETURNING`` (MariaDB has it for INSERT and DELETE only), and
MariaDB has no ``LATERAL``: a claim, a cleanup claim and a checkpoint are a locking ``SELECT`` of
the rows to change (``FOR UPDATE SKIP LOCKED`` for claims), the ``UPDATE`` of exactly those rows,
and a ``SELECT`` of what was written, in one transaction. Our write transactions run under READ
COMMITTED (the engine's ``begin`` listener): each statement sees what committed before it began,
which is what makes a claim after the group locks count every task the previous claim took,
and locking reads take no gap locks, which would block inserts. Lists and batches travel as
JSON arrays read with ``JSON_TABLE``. There are no notifications: nodes poll.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..._errors import DatabaseError
from ..._models import Schedule
from .. import _rows
from .._driver import (
    TASK_PROGRESS,
    CheckpointParams,
    ClaimCursor,
    Claimed,
    ClaimParams,
    ClaimResult,
    CleanupClaimParams,
    PutScheduleParams,
    Queue,
)
from .._migrations import migration_files, missing_versions, refuse_newer, split_sql
from .._sqldriver import (
    CLAIM,
    CLEANUP_CLAIM,
    ClaimWindow,
    SqlDriver,
    _unique_violation,
    next_due_in,
    whole,
)
from .._transaction import cancel_safe, set_session_value

IDLE_TIMEOUT_OPTION = "aioasync_idle_s"
"""The execution option of our write transactions: MariaDB's ``idle_transaction_timeout`` for
them, in whole seconds."""
WRITE_ISOLATION = "READ COMMITTED"
MIGRATION_LOCK_TIMEOUT = 60
"""Seconds a migration waits for another node's migration of the same database."""
DEADLOCK = 1213
"""InnoDB's deadlock: the victim's whole transaction is rolled back."""
UNIQUE_LOCK_TIMEOUT = 50
"""Seconds a create with a unique key waits for another creator of the same key (InnoDB's
default lock wait)."""


def configure_engine(engine: AsyncEngine) -> None:
    """Give our write transactions READ COMMITTED and (MariaDB) the idle bound they ask for, and
    the application's transactions on the same engine the server's defaults.

    Both are set for the session and remembered per pooled connection (``set_session_value``),
    so a connection that serves our writes one after another pays no round trip for them."""
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_aioasync_configured", False):
        return

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        ours = options.get("aioasync_write")
        if ours is False:
            return  # our reads: either level will do
        default = conn.dialect.default_isolation_level or "REPEATABLE READ"
        level = WRITE_ISOLATION if ours else default
        set_session_value(
            conn, "isolation", level, f"SET SESSION TRANSACTION ISOLATION LEVEL {level}"
        )
        if conn.dialect.is_mariadb:  # type: ignore[attr-defined]
            seconds = options.get(IDLE_TIMEOUT_OPTION) if ours else None
            value = "DEFAULT" if seconds is None else str(int(seconds))
            set_session_value(
                conn, "idle_timeout", value, f"SET SESSION idle_transaction_timeout = {value}"
            )

    sync_engine._aioasync_configured = True  # type: ignore[attr-defined]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _json_value(value: Any) -> Any:
    """A batch's value as JSON_TABLE reads it: a DATETIME as its text, a BOOL as 0 or 1."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, bool):
        return int(value)
    return value


def _queue_params(queues: Sequence[Any], branches: int) -> dict[str, Any]:
    """The parameters of the ``claim`` statement's ``branches`` copies of ``claim_queue``
    (``{n}``: its number): the queues that ``claim_queues`` chose, then NULL names, which match
    no row (the optimizer sees an impossible condition)."""
    params: dict[str, Any] = {}
    for n in range(branches):
        q = queues[n] if n < len(queues) else None
        params[f"group_{n}"] = q and q.group_name
        params[f"user_{n}"] = q and q.user_name
        params[f"user_running_{n}"] = q and q.user_running
        params[f"group_room_{n}"] = q and q.group_room
        params[f"user_room_{n}"] = q and q.user_room
    return params


class MysqlDriver(SqlDriver):
    dialect = "mysql"
    claim_pool_factor = 3  # concurrent claimers choose alike; SKIP LOCKED then skips past

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        super().__init__(engine, schema)
        configure_engine(engine)

    def bind_list(self, values: Iterable[Any]) -> Any:
        return _json(list(values))

    def bind_rows(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
        return {"rows": _json([[_json_value(v) for v in row] for row in rows])}

    def bound_idle_transactions(self, seconds: float) -> None:
        # MariaDB ends a transaction of ours left idle this long; MySQL 8 has no such setting
        # (docs/design.md §9.5).
        self._write_options = {IDLE_TIMEOUT_OPTION: max(math.ceil(seconds), 1)}

    # -- schema: MySQL commits at every DDL statement, so the lock is the session's ----------

    @cancel_safe
    async def migrate(self) -> list[int]:
        """Apply the missing migrations under a named lock of the session (``GET_LOCK``), which
        outlives the commit MySQL makes at each DDL statement. A migration that fails half-way
        leaves the statements before the failure applied: MySQL's DDL is not transactional."""
        key = {"key": f"aioasync_tasks:{self.engine.url.database or ''}"[:64]}
        applied: list[int] = []
        async with self.write() as conn:
            got = (
                await self._run(conn, "migration_lock", {**key, "timeout": MIGRATION_LOCK_TIMEOUT})
            ).scalar()
            if got != 1:
                raise DatabaseError(
                    f"another node's migration held the lock for {MIGRATION_LOCK_TIMEOUT} s",
                    transient=True,
                )
            try:
                recorded = await self._applied_versions(conn) or set()
                refuse_newer(max(recorded, default=0))
                files = dict(migration_files(self.dialect))
                for version in missing_versions(files, recorded):
                    for statement in split_sql(files[version]):
                        await conn.exec_driver_sql(statement)
                    await self._run(conn, "record_migration", {"version": version})
                    applied.append(version)
            finally:
                await self._run(conn, "migration_unlock", key)
        return applied

    def _lock_name(self, *parts: str) -> str:
        """A named lock of this database (names are the server's: at most 64 characters)."""
        text = "\0".join((self.engine.url.database or "", *parts))
        return "aioasync_tasks:" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    # -- inserts: no RETURNING on MySQL 8 --------------------------------------------------

    async def _insert_rows(
        self, conn: AsyncConnection, rows: Sequence[Sequence[Any]], wake: bool
    ) -> list[int]:
        if len(rows) == 1 or conn.dialect.is_mariadb:  # type: ignore[attr-defined]
            return await super()._insert_rows(conn, rows, wake)  # MariaDB: INSERT … RETURNING
        # MySQL 8 has no RETURNING and gives only the last insert id: one row at a time.
        return [i for row in rows for i in await super()._insert_rows(conn, [row], wake)]

    def deadlock_victim(self, cause: BaseException | None) -> bool:
        # A create with unique keys locks the live holders of its keys, a user operation its
        # group's row and its task's, which other nodes' claims, completions and rescues lock
        # too, in their own order (InnoDB's next-key locks reach beyond the rows read): InnoDB
        # then picks a victim, whose transaction it rolls back whole (docs/design.md §16.1).
        # Every write transaction of the driver's own (``whole``) is tried again.
        orig = getattr(cause, "orig", None)
        return bool(isinstance(orig, Exception) and orig.args and orig.args[0] == DEADLOCK)

    # -- unique keys: named locks of the session, a refused insert -------------------------

    def _key_locks(self, keys: Sequence[tuple[str, str | None]]) -> Any:
        return self.bind_list(sorted({self._lock_name("unique", t, k or "") for t, k in keys}))

    async def lock_unique_keys(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        # Creators of one key would otherwise wait on each other's index entries, and three
        # of them can deadlock there (docs/design.md §4.4, §16.1). Named locks outlive the
        # transaction: unlock_unique_keys releases them after the inserts.
        names = self._key_locks(keys)
        result = await self._run(
            conn, "unique_key_locks", {"keys": names, "timeout": UNIQUE_LOCK_TIMEOUT}
        )
        if not all(r.got == 1 for r in result):
            await self.unlock_unique_keys(conn, keys)
            raise DatabaseError(
                f"another create of the same unique key held its lock for {UNIQUE_LOCK_TIMEOUT} s",
                transient=True,
            )

    async def unlock_unique_keys(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        await self._release(conn, "unique_key_unlocks", {"keys": self._key_locks(keys)})

    async def _release(self, conn: AsyncConnection, name: str, params: dict[str, Any]) -> None:
        """Release named locks; when that fails, the connection is closed instead (the server
        releases a session's locks when it ends), never returned to the pool with them."""
        try:
            await self._run(conn, name, params)
        except DatabaseError:
            await conn.invalidate()
            raise

    async def _insert_if_free(self, conn: AsyncConnection, params: Mapping[str, Any]) -> int | None:
        # The unique index refuses the row (error 1062): InnoDB undoes the statement, not the
        # transaction.
        try:
            return self.inserted_id(await self._run(conn, "insert_unique_task", params))
        except DatabaseError as exc:
            if _unique_violation(exc):
                return None
            raise

    # -- retention: one pruner at a time ------------------------------------------------------

    async def try_prune_lock(self, conn: AsyncConnection) -> bool:
        # Row locks let two pruners run at once; a named lock, tried without waiting, makes
        # them take turns (released by release_prune_lock at the end of the round).
        result = await self._run(conn, "prune_lock", {"key": self._lock_name("prune")})
        return result.scalar() == 1

    async def release_prune_lock(self, conn: AsyncConnection) -> None:
        await self._release(conn, "prune_unlock", {"key": self._lock_name("prune")})

    # -- claims: lock, update, read back --------------------------------------------------

    async def _take(
        self, conn: AsyncConnection, statement: str, ids: list[int], bound: dict[str, Any]
    ) -> list[Any]:
        """Claim the locked rows ``ids`` with ``statement`` and read them back."""
        if not ids:
            return []
        listed = self.bind_list(ids)
        await self._run(conn, statement, {**bound, "ids": listed})
        return list(await self._run(conn, "claimed_rows", {"ids": listed}))

    async def _claim_window(
        self, conn: AsyncConnection, after: ClaimCursor, size: int, groups: dict[str, Any]
    ) -> ClaimWindow:
        """The claim's window of queues, as PostgreSQL's walk finds it (docs/design.md §6.3,
        §16.1): the open groups in the walk's order (``claim_groups``), then for the first
        ``size`` of them (each has a queue at least), up to each one's quota of its queues from
        its cursor on (``claim_window``, one loose scan per group), up to ``size`` queues in
        all."""
        params = {"after_group": after.group, "window": size, **groups}
        found = (await self._run(conn, "claim_groups", params)).all()
        walk = [r for r in found if r.later] + [r for r in found if not r.later]
        reached = [
            (row.name, after.users.get(row.name, ""), min(int(row.quota), size))
            for row in walk[:size]
        ]
        if not reached:
            return ClaimWindow([], full=False)
        # Cached by the number of groups: a power of two, the extra ones nameless (no rows).
        branches = 1 << (len(reached) - 1).bit_length()
        bound: dict[str, Any] = {}
        padding: list[tuple[str | None, str, int]] = [(None, "", 0)] * (branches - len(reached))
        for n, (group, cursor, quota) in enumerate([*reached, *padding]):
            bound |= {f"group_{n}": group, f"after_{n}": cursor, f"quota_{n}": quota}
        rows = await self._run(conn, "claim_window", bound, queues=branches)
        kept: dict[int, int] = {}
        queues: list[Queue] = []
        for row in rows:  # by group in the walk's order, the users after the cursor first
            if kept.get(row.g, 0) < reached[row.g][2] and len(queues) < size:
                kept[row.g] = kept.get(row.g, 0) + 1
                queues.append((row.group_name, row.user_name))
        return ClaimWindow(queues, full=len(queues) >= size or len(reached) < len(walk))

    @cancel_safe
    @whole
    async def claim(self, params: ClaimParams) -> ClaimResult:
        """As ``SqlDriver.claim`` (docs/design.md §6, §16.1): the node row share-locked, the
        window of queues walked (``claim_window``), its groups that have limits locked in name
        order, the queues to read chosen among the window's (``claim_queues``), the
        candidates chosen from the first tasks of those queues (``claim``), locked with ``SKIP
        LOCKED`` (a row that is no longer PENDING, moved to another group, or busy is
        skipped), the first ``limit`` of them by the policy's order taken."""
        p, limit = params, params.limit
        if limit <= 0 or not p.types:
            return ClaimResult([], None)
        types = self.bind_list(p.types)
        groups = self.group_params(p.groups)
        async with self.write() as conn:
            registered = (await self._run(conn, "claim_prepare", {"node": p.node_id})).scalar()
            if not registered:
                return ClaimResult([], None)
            pool = limit * self.claim_pool_factor
            window = await self._claim_window(conn, p.after, self.window_size(limit), groups)
            queues: Sequence[Any] = []
            if window.queues:
                in_window = {
                    "window_groups": self.bind_list(g for g, _ in window.queues),
                    "window_users": self.bind_list(u for _, u in window.queues),
                }
                limited = {"window_groups": in_window["window_groups"]}
                await self._run(conn, "lock_limited_groups", limited)
                queues = (
                    await self._run(
                        conn,
                        "claim_queues",
                        {"types": types, "pool": pool, **in_window, **groups},
                        order_by=p.policy.order_by,
                    )
                ).all()
            candidates: list[tuple[int, str]] = []
            if queues:
                # Statements are cached by their number of queues: a power of two, the queues
                # beyond len(queues) with no name (no rows), so that few texts are ever made.
                branches = 1 << (len(queues) - 1).bit_length()
                chosen = await self._run(
                    conn,
                    "claim",
                    {"types": types, "pool": pool, **_queue_params(queues, branches)},
                    order_by=p.policy.order_by,
                    queues=branches,
                )
                candidates = [(r.id, r.group_name) for r in chosen]
            locked: dict[int, Any] = {}
            if candidates:
                result = await self._run(
                    conn,
                    "lock_claims",
                    {
                        "ids": self.bind_list(i for i, _ in candidates),
                        "busy": self.bind_list(p.busy),
                        "from_state": CLAIM["from_state"],
                    },
                )
                locked = {r.id: r for r in result}
            ids = [i for i, group in candidates if i in locked and locked[i].group_name == group]
            bound = {"node": p.node_id, **CLAIM}
            rows = await self._take(conn, "take_claims", ids[:limit], bound)
            await self._notify_claimed(conn, rows)
            next_due = None
            if len(rows) < limit:
                next_due = (await self._run(conn, "next_due", {"types": types})).scalar()
        # Hand-offs first, as they were before the claim cleared the flag.
        rows.sort(key=lambda r: (not locked[r.id].handoff, -r.priority, r.id))
        claimed = [_rows.claimed(r) for r in rows]
        return ClaimResult(
            claimed, next_due_in(next_due), window.advance(p.after, claimed, limit), window.full
        )

    @cancel_safe
    @whole
    async def claim_cleanups(self, params: CleanupClaimParams) -> list[Claimed]:
        p = params
        if p.limit <= 0 or not p.types:
            return []
        async with self.write() as conn:
            if (await self._run(conn, "node_registered", {"node": p.node_id})).first() is None:
                return []
            result = await self._run(
                conn,
                "claim_cleanups",
                {
                    "types": self.bind_list(p.types),
                    "limit": p.limit,
                    "busy": self.bind_list(p.busy),
                    "from_state": CLEANUP_CLAIM["from_state"],
                },
            )
            ids = [r.id for r in result]
            bound = {"node": p.node_id, **CLEANUP_CLAIM}
            rows = await self._take(conn, "take_cleanups", ids, bound)
            await self._notify_claimed(conn, rows)
        return [_rows.claimed(r) for r in sorted(rows, key=lambda r: r.id)]

    @cancel_safe
    @whole
    async def checkpoint(self, params: CheckpointParams) -> set[int]:
        """As ``SqlDriver.checkpoint``: the accepted rows are locked first, then written by one
        ``UPDATE``; the ids returned are those locked."""
        if not params.checkpoints:
            return set()
        bound = self._checkpoint_params(params)
        async with self.write() as conn:
            locked = (await self._run(conn, "lock_checkpoints", bound)).all()
            if locked:
                await self._run(conn, "checkpoint", bound)
            watched = [r.id for r in locked if r.watched]
            if watched:  # as SqlDriver.checkpoint (nothing here: watchers poll)
                await self.notify_task_events(conn, TASK_PROGRESS, watched)
        return {r.id for r in locked}

    # -- schedules: no RETURNING ---------------------------------------------------------------

    @cancel_safe
    @whole
    async def put_schedule(self, params: PutScheduleParams) -> Schedule:
        """As ``SqlDriver.put_schedule``: the upsert, then the row read back in its
        transaction."""
        period = params.period
        values = {
            "name": params.name,
            "type": params.type,
            "cron": period.cron,
            "every": period.every,
            "timezone": period.timezone,
            "context": params.context,
            "user": params.user,
            "group": params.group,
            "priority": params.priority,
            "max_attempts": params.max_attempts,
            "declared": params.declared,
            "next_tick": self._db_time(params.next_tick),
        }
        async with self.write() as conn:
            await self._run(conn, "put_schedule", values)
            row = (await self._run(conn, "get_schedule", {"name": params.name})).one()
        return _rows.schedule(row)

    # -- no RETURNING ------------------------------------------------------------------------

    def inserted_id(self, result: sa.CursorResult[Any]) -> int:
        return int(result.lastrowid)

    def found(self, result: sa.CursorResult[Any]) -> bool:
        # The dialect counts matched rows (CLIENT_FOUND_ROWS), not changed ones.
        return bool(result.rowcount)
