"""The storage of tasks, shared by both dialects: every statement the library runs.

A backend speaks the queue's language — ``claim``, ``checkpoint``, ``complete``, ``operate``,
``heartbeat``, ``rescue`` — and hides SQL. State changes go through the pure rules of
``_states``: the backend reads the rows it will change under a write lock (``FOR UPDATE`` on
PostgreSQL, the database write lock on SQLite), asks ``apply_operation``/``apply_event`` what to do,
and writes the answer in the same short transaction. A stale node or a racing user call therefore
never overwrites a newer state, and every owner-bound write also checks ``node_id``.

Statements are written once here with ``{now}``, ``{tasks}`` … placeholders; the dialect
subclasses fill in what differs (clock, arrays, locking, notifications).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import DatabaseError, TaskNotFound
from .._models import Group, NodeInfo, Operation, State, Task
from .._scheduling import SchedulingPolicy
from .._schema import GROUPS, NODES, TASKS, VERSIONS, Timestamp
from .._states import Event, Outcome, apply_event, apply_operation
from . import _rows
from ._driver import (
    Checkpoint,
    Claimed,
    ClaimResult,
    Completion,
    NewTask,
    OperationResult,
    Owned,
    TaskFilter,
)
from ._migrations import check_version, migration_files, refuse_newer, split_sql
from ._transaction import WRAPPED, InFlight, Transaction, cancel_safe, database_error

CHECKPOINT_STATES = [State.RUNNING.value, State.CANCELING.value, State.DELETING.value]
"""The states in which an execution may store a checkpoint (its task runs, or is being
cleaned up)."""


@dataclass(frozen=True, slots=True)
class _Write:
    """One row change decided by the state rules, ready for the batched UPDATE."""

    row: _rows.Locked
    outcome: Outcome
    node_id: int | None
    context: str | None = None
    error: str | None = None
    delay: float = 0.0
    group: str | None = None
    handoff: bool = False
    """Handed back by a graceful shutdown: claimed first by the next node."""
    refund: bool = False
    """Stopped on request (pause, shutdown): the attempt it was claimed for is given back, so
    pauses and restarts never use up a task's retries."""


def _claim_states(from_state: State, event: Event) -> dict[str, str]:
    """The states a claim statement moves a row between, as bound parameters, taken from the
    state table (the claim is one of its events, not a rule of its own written in SQL)."""
    outcome = apply_event(from_state, None, event, has_cleanup=True)
    assert outcome is not None
    assert outcome.state is not None
    assert outcome.owned
    return {"from_state": from_state.value, "to_state": outcome.state.value}


_CLAIM_STATES = _claim_states(State.PENDING, Event.CLAIM)
_CLEANUP_CLAIM_STATES = _claim_states(State.DELETING, Event.CLEANUP_CLAIM)


def _lost_error(row: _rows.Locked, outcome: Outcome) -> str | None:
    """The error stored when a task whose node was lost fails for good."""
    if outcome.state is not State.FAILED:
        return None
    return "cleanup: node lost" if row.state is State.DELETING else "node lost"


class Backend:
    """Shared implementation; use ``PostgresBackend`` or ``SqliteBackend``."""

    dialect: str
    supports_notify = False
    _timestamp = Timestamp()

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        self.engine = engine
        self.schema = schema
        self._statements: dict[str, sa.TextClause] = {}
        self.in_flight = InFlight()

    # -- dialect hooks ----------------------------------------------------------------------

    now: LiteralString = "now()"
    """SQL for the database clock."""

    def _float(self, param: LiteralString) -> LiteralString:
        """A float parameter (PostgreSQL must be told its type)."""
        return param

    def _plus_seconds(self, param: LiteralString) -> LiteralString:
        """SQL for the database clock plus ``param`` seconds."""
        return "(" + self.now + " + " + self._float(param) + ")"

    def _in(self, column: LiteralString, param: LiteralString) -> LiteralString:
        raise NotImplementedError

    def listen(
        self, on_message: Callable[[str], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Where ``supports_notify``: while inside, the database's notifications on this schema's
        channel reach ``on_message`` (``wake``, ``stop:<node id>``); the event it yields is set
        when the listening connection is lost. Raises ``DatabaseError`` when it cannot listen."""
        raise NotImplementedError(f"{self.dialect} has no notifications")

    expanding_lists = False
    """Lists bound as ``IN :name`` expand to one parameter per item (no arrays in SQLite)."""
    lock_rows: LiteralString = ""
    """Appended to row-locking SELECTs (``FOR UPDATE`` on PostgreSQL)."""
    skip_locked: LiteralString = ""
    share_lock: LiteralString = ""
    """Appended to a SELECT that must keep the row from being deleted until commit."""

    def _qualify(self, table: str) -> str:
        return table

    async def _notify(self, conn: AsyncConnection, payload: str) -> None:
        """Tell the other nodes (PostgreSQL NOTIFY); a no-op where not supported."""

    def _to_db_time(self, value: datetime) -> Any:
        return self._timestamp.process_bind_param(value, self.engine.dialect)

    # -- plumbing ---------------------------------------------------------------------------

    def _sql(self, template: LiteralString) -> sa.TextClause:
        """A statement from a template, with tables and the clock filled in (cached)."""
        statement = self._statements.get(template)
        if statement is None:
            text = template.format(
                tasks=self._qualify(TASKS),
                nodes=self._qualify(NODES),
                groups=self._qualify(GROUPS),
                versions=self._qualify(VERSIONS),
                now=self.now,
            )
            statement = sa.text(text)
            expanding = re.findall(r"\bIN :(\w+)", text) if self.expanding_lists else []
            if expanding:
                statement = statement.bindparams(
                    *(sa.bindparam(name, expanding=True) for name in expanding)
                )
            self._statements[template] = statement
        return statement

    async def _exec(
        self, conn: AsyncConnection, template: LiteralString, params: Any = None
    ) -> sa.CursorResult[*tuple[Any, ...]]:
        try:
            return await conn.execute(self._sql(template), params)
        except WRAPPED as exc:
            verb = template.split(None, 1)[0].upper()
            raise database_error(exc, self.engine.url, f"{verb} failed on") from exc

    def write(self) -> Transaction:
        """A short write transaction (it holds the write lock on SQLite)."""
        return Transaction(self.engine, self.in_flight, write=True, options=self._write_options)

    _write_options: Mapping[str, Any] = {}
    """Execution options of the write transactions, for the dialect's ``begin`` listener."""

    def bound_idle_transactions(self, seconds: float) -> None:
        """Dialect hook: have the server end a write transaction of ours that stays idle for
        ``seconds`` — its node was cut off in the middle of it — so that the row locks it
        holds never keep a rescuer from the node's tasks."""

    def read(self) -> Transaction:
        return Transaction(self.engine, self.in_flight, write=False)

    single_statement_autocommit = False
    """Whether a write of one statement runs without BEGIN/COMMIT (one round trip)."""

    def single(self) -> Transaction:
        """For a write that is one statement, and so atomic on its own."""
        return Transaction(
            self.engine,
            self.in_flight,
            write=True,
            autocommit=self.single_statement_autocommit,
            options=self._write_options,
        )

    # -- schema -----------------------------------------------------------------------------

    @cancel_safe
    async def schema_version(self) -> int | None:
        """The applied migration version, or None when the schema is empty."""
        async with self.read() as conn:
            exists = await conn.run_sync(
                lambda sync: sa.inspect(sync).has_table(VERSIONS, schema=self.schema)
            )
            if not exists:
                return None
            result = await self._exec(conn, "SELECT max(version) FROM {versions}")
            value = result.scalar()
            return int(value) if value is not None else None

    @cancel_safe
    async def migrate(self) -> list[int]:
        """Apply the missing migrations; returns the versions applied."""
        applied: list[int] = []
        async with self.write() as conn:
            await self._prepare_migration(conn)
            exists = await conn.run_sync(
                lambda sync: sa.inspect(sync).has_table(VERSIONS, schema=self.schema)
            )
            current = 0
            if exists:
                result = await self._exec(conn, "SELECT max(version) FROM {versions}")
                current = result.scalar() or 0
            refuse_newer(current)
            for version, sql in migration_files(self.dialect):
                if version <= current:
                    continue
                for statement in split_sql(sql):
                    await conn.exec_driver_sql(statement)
                await self._exec(
                    conn,
                    "INSERT INTO {versions} (version, applied_at) VALUES (:v, {now})",
                    {"v": version},
                )
                applied.append(version)
        return applied

    async def _prepare_migration(self, conn: AsyncConnection) -> None:
        """Dialect hook: serialise concurrent migrations, point DDL at the schema."""

    async def check_schema(self) -> None:
        check_version(await self.schema_version())

    # -- creating and reading tasks ---------------------------------------------------------

    _INSERT: LiteralString = (
        "INSERT INTO {tasks} (type, user_name, group_name, state, requested, context, priority,"
        " attempts, max_attempts, has_cleanup, handoff, error, node_id, created_at, updated_at,"
        " run_at) VALUES (:type, :user, :group, :state, NULL, :context, :priority, 0,"
        " :max_attempts, :has_cleanup, false, NULL, NULL, {now}, {now},"
        " COALESCE(:run_at, {now})) RETURNING id"
    )

    @cancel_safe
    async def insert_many(
        self, new_tasks: Sequence[NewTask], connection: AsyncConnection | None = None
    ) -> list[int]:
        """Insert tasks in one transaction (the caller's, when ``connection`` is given)."""
        if not new_tasks:
            return []
        params = [
            {
                "type": t.type,
                "user": t.user,
                "group": t.group,
                "state": t.state.value,
                "context": t.context,
                "priority": t.priority,
                "max_attempts": t.max_attempts,
                "has_cleanup": t.has_cleanup,
                "run_at": None if t.run_at is None else self._to_db_time(t.run_at),
            }
            for t in new_tasks
        ]
        wake = any(t.state is State.PENDING for t in new_tasks)
        if connection is not None:
            return await self._insert(connection, params, wake)
        if len(params) == 1:
            async with self.single() as conn:
                return await self._insert(conn, params, wake)
        return await self._insert_in_chunks(params, wake)

    rows_per_transaction: int | None = None
    """The most rows ``create_tasks`` inserts in one transaction of its own (None: all). On
    SQLite a transaction holds the database's write lock, which every node's heartbeat needs."""

    async def _insert_in_chunks(self, params: list[dict[str, Any]], wake: bool) -> list[int]:
        size = self.rows_per_transaction or len(params)
        ids: list[int] = []
        for start in range(0, len(params), size):
            began = time.monotonic()
            try:
                async with self.write() as conn:
                    ids += await self._insert(conn, params[start : start + size], wake)
            except DatabaseError as exc:
                if not ids:
                    raise
                raise DatabaseError(
                    f"{exc} ({len(ids)} of {len(params)} tasks were created before the failure,"
                    f" ids {ids[0]}..{ids[-1]})",
                    transient=exc.transient,
                ) from exc
            if start + size < len(params):
                await self._let_others_write(time.monotonic() - began)
        return ids

    async def _let_others_write(self, held: float) -> None:
        """Between two chunks of a bulk insert, which held the write lock for ``held`` seconds:
        a pause long enough for the other writers."""

    async def _insert(
        self, conn: AsyncConnection, params: list[dict[str, Any]], wake: bool
    ) -> list[int]:
        if len(params) == 1:
            ids = [(await self._exec(conn, self._INSERT, params[0])).scalar_one()]
        else:
            ids = await self._insert_batch(conn, params)
        if wake:
            await self._notify(conn, "wake")
        return ids

    async def _insert_batch(self, conn: AsyncConnection, params: list[dict[str, Any]]) -> list[int]:
        """Dialect hook: insert several rows in few statements; the ids in input order."""
        raise NotImplementedError

    @cancel_safe
    async def get_task(self, task_id: int) -> Task:
        async with self.read() as conn:
            result = await self._exec(
                conn,
                "SELECT " + _rows.TASK_COLUMNS + " FROM {tasks} WHERE id = :id",
                {"id": task_id},
            )
            row = result.first()
        if row is None:
            raise TaskNotFound(task_id)
        return _rows.task(row)

    def _filter_sql(self, f: TaskFilter) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if f.user is not None:
            clauses.append("user_name = :user")
            params["user"] = f.user
        if f.group is not None:
            clauses.append("group_name = :group")
            params["group"] = f.group
        if f.types is not None:
            clauses.append(self._in("type", ":types"))
            params["types"] = list(f.types)
        if f.states is not None and len(f.states) == 1:
            # "state = x", not "state = ANY([x])": only an equality lets PostgreSQL read the
            # (state, id) index in id order for ORDER BY id DESC LIMIT (SAOP scans are unordered).
            clauses.append("state = :state")
            params["state"] = f.states[0].value
        elif f.states is not None:
            clauses.append(self._in("state", ":states"))
            params["states"] = [s.value for s in f.states]
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return where, params

    @cancel_safe
    async def get_tasks(self, f: TaskFilter) -> list[Task]:
        where, params = self._filter_sql(f)
        params |= {"limit": f.limit, "offset": f.offset}
        # The filter shape picks one of a few cached statements; values stay parameters.
        template = "SELECT " + _rows.TASK_COLUMNS + " FROM {tasks}" + where
        template += " ORDER BY id DESC LIMIT :limit OFFSET :offset"
        async with self.read() as conn:
            result = await self._exec(conn, template, params)
            return [_rows.task(row) for row in result]

    @cancel_safe
    async def count_tasks(self, f: TaskFilter) -> int:
        where, params = self._filter_sql(f)
        async with self.read() as conn:
            result = await self._exec(conn, "SELECT count(*) FROM {tasks}" + where, params)
            return int(result.scalar_one())

    # -- state changes ----------------------------------------------------------------------

    async def _lock(
        self, conn: AsyncConnection, ids: Sequence[int], owner: int | None = None
    ) -> list[_rows.Locked]:
        template: LiteralString = "SELECT " + _rows.LOCK_COLUMNS + " FROM {tasks} WHERE "
        template += self._in("id", ":ids")
        params: dict[str, Any] = {"ids": list(ids)}
        if owner is not None:
            template += " AND node_id = :owner"
            params["owner"] = owner
        template += " ORDER BY id" + self.lock_rows
        result = await self._exec(conn, template, params)
        return [_rows.Locked.from_row(row) for row in result]

    _UPDATE: LiteralString = (
        "UPDATE {tasks} SET state = :state, requested = :requested, node_id = :node_id,"
        " attempts = :attempts, handoff = :handoff, group_name = :group,"
        " context = COALESCE(:context, context), error = COALESCE(:error, error),"
        " run_at = CASE WHEN {delay} < 0 THEN run_at ELSE {plus_delay} END,"
        " done_at = CASE WHEN :done THEN {now} ELSE done_at END,"
        " updated_at = {now} WHERE id = :id AND token = :token AND state = :expected"
    )

    async def _write(self, conn: AsyncConnection, writes: Iterable[_Write]) -> None:
        """Apply decided outcomes: one DELETE for removed rows, one batched UPDATE for the rest."""
        removed: list[int] = []
        updates: list[dict[str, Any]] = []
        for w in writes:
            o = w.outcome
            if o.state is None:
                removed.append(w.row.id)
                continue
            if not o.changed and w.group is None:
                continue
            attempts = 0 if o.reset_attempts else w.row.attempts
            delay = w.delay if o.retry else -1.0  # negative: run_at is kept
            if o.state is State.DELETING and w.row.state is not State.DELETING:
                delay = 0.0  # a deleted task's cleanup is due now, not at its old run_at
            if w.refund and not o.reset_attempts:  # a reset count has nothing to give back
                attempts -= 1
            updates.append(
                {
                    "id": w.row.id,
                    "state": o.state.value,
                    "requested": o.requested.value if o.requested else None,
                    "node_id": w.node_id if o.owned else None,
                    "attempts": attempts,
                    "handoff": w.handoff,
                    "group": w.group if w.group is not None else w.row.group,
                    "context": w.context,
                    "error": w.error,
                    "delay": delay,
                    "done": o.state in (State.FINISHED, State.FAILED),
                    "token": w.row.token,
                    "expected": w.row.state.value,
                }
            )
        if removed:
            await self._exec(
                conn, "DELETE FROM {tasks} WHERE " + self._in("id", ":ids"), {"ids": removed}
            )
        if updates:
            await self._exec(conn, self._update_statement(), updates)

    def _update_statement(self) -> LiteralString:
        return self._UPDATE.replace("{plus_delay}", self._plus_seconds(":delay")).replace(
            "{delay}", self._float(":delay")
        )

    @cancel_safe
    async def operate(
        self,
        task_id: int,
        operation: Operation,
        *,
        force: bool = False,
        group: str | None = None,
    ) -> OperationResult:
        """Apply a user operation to one task, atomically (docs/explanation.md, "States and
        transitions")."""
        async with self.write() as conn:
            if group is not None:
                # Taken in the order claims take it (group, then task): a task moved into a
                # limited group is counted by the next claim, never by neither.
                await self._exec(
                    conn,
                    "SELECT name FROM {groups} WHERE name = :name" + self.lock_rows,
                    {"name": group},
                )
            rows = await self._lock(conn, [task_id])
            if not rows:
                raise TaskNotFound(task_id)
            row = rows[0]
            outcome = apply_operation(
                row.state,
                row.requested,
                operation,
                has_cleanup=row.has_cleanup,
                force=force,
                task_id=task_id,
            )
            moved = group is not None and group != row.group
            await self._write(
                conn, [_Write(row, outcome, row.node_id, group=group if moved else None)]
            )
            if outcome.changed and outcome.state in (State.PENDING, State.DELETING):
                await self._notify(conn, "wake")
            if outcome.stop and row.node_id is not None:
                await self._notify(conn, f"stop:{row.node_id}")
            return OperationResult(outcome, row.node_id)

    # -- execution --------------------------------------------------------------------------

    @cancel_safe
    async def claim(  # noqa: PLR0917 - private, one argument per part of the claim
        self,
        node_id: int,
        types: Sequence[str],
        limit: int,
        policy: SchedulingPolicy,
        groups: Sequence[str] | None = None,
        busy: Sequence[int] = (),
    ) -> ClaimResult:
        """Claim up to ``limit`` due PENDING tasks of ``types`` (and of ``groups``, when given)
        for ``node_id`` (event CLAIM), in the ``policy``'s order, skipping paused groups and
        never exceeding group limits.

        Exactness of the limits: on PostgreSQL the claim first locks the rows of the groups
        that have limits (``FOR UPDATE``, in name order), so claimers that could exceed one
        run one after the other, and the claim statement's fresh snapshot (READ COMMITTED)
        counts every task the previous claimer took. On SQLite the write lock does the same.
        A task whose group changed since the statement's snapshot is skipped under its row
        lock, and so is every task in ``busy`` (the node still runs an execution of it).
        """
        if limit <= 0 or not types:
            return ClaimResult([], None)
        params: dict[str, Any] = {
            "node": node_id,
            "types": list(types),
            "limit": limit,
            "pool": limit * self.claim_pool_factor,
            "busy": list(busy),
            **_CLAIM_STATES,
        }
        if groups is not None:
            params["groups"] = list(groups)
        statement = self._claim_statement(policy.order_by, only_groups=groups is not None)
        async with self.write() as conn:
            if not await self._prepare_claim(conn, node_id):
                return ClaimResult([], None)
            result = await self._exec(conn, statement, params)
            rows = sorted(result, key=lambda r: (not r.handoff, -r.priority, r.id))
            next_due = None
            if len(rows) < limit:
                due = await self._exec(conn, self._next_due_statement(), {"types": list(types)})
                next_due = due.scalar()
        claimed = [_rows.claimed(r) for r in rows]
        return ClaimResult(claimed, None if next_due is None else max(float(next_due), 0.0))

    async def _node_registered(self, conn: AsyncConnection, node_id: int) -> bool:
        """Whether the node's row still exists, kept (share lock) until the claim commits.

        Fencing: a node another node has declared dead (its row deleted and its tasks released)
        claims nothing more under its old id, even before its own heartbeat tells it so.
        """
        result = await self._exec(
            conn, "SELECT id FROM {nodes} WHERE id = :id" + self.share_lock, {"id": node_id}
        )
        return result.first() is not None

    async def _prepare_claim(self, conn: AsyncConnection, node_id: int) -> bool:
        """Whether the node may claim (its row exists); PostgreSQL also locks the rows of the
        groups with limits here, so that the claim statement that follows sees every claim
        that committed before it (see ``claim``)."""
        return await self._node_registered(conn, node_id)

    def _seconds_until(self, column: LiteralString) -> LiteralString:
        return column + " - " + self.now

    def _next_due_statement(self) -> LiteralString:
        return (
            "SELECT " + self._seconds_until("min(run_at)") + " FROM {tasks}"
            " WHERE state = 'pending' AND run_at > {now} AND " + self._in("type", ":types")
        )

    def _claim_statement(
        self, order_by: LiteralString, *, only_groups: bool = False
    ) -> LiteralString:
        types = self._in("type", ":types")
        queue_order: LiteralString = "handoff DESC, priority DESC, id"
        ready: LiteralString = "state = 'pending' AND run_at <= {now} AND " + types
        queues = self._queue_index
        return (
            # Every (group, user) queue with pending tasks: a loose scan of the queue index.
            "WITH RECURSIVE pairs(group_name, user_name) AS (" + self._pairs_scan() + "),"
            # What runs now, per queue and per group (all nodes).
            " active AS (SELECT group_name, user_name, count(*) AS n FROM {tasks}"
            " WHERE state IN ('running', 'canceling') GROUP BY group_name, user_name),"
            " group_active AS (SELECT group_name, sum(n) AS n FROM active GROUP BY group_name),"
            # Queues their group lets run: not paused, below both limits.
            " open_pairs AS (SELECT p.group_name, p.user_name, COALESCE(a.n, 0) AS user_running,"
            " g.max_running - COALESCE(ga.n, 0) AS group_room,"
            " g.max_running_per_user - COALESCE(a.n, 0) AS user_room"
            " FROM pairs p LEFT JOIN {groups} g ON g.name = p.group_name"
            " LEFT JOIN active a ON a.group_name = p.group_name AND a.user_name = p.user_name"
            " LEFT JOIN group_active ga ON ga.group_name = p.group_name"
            " WHERE NOT COALESCE(g.paused, false)"
            + (" AND " + self._in("p.group_name", ":groups") if only_groups else "")
            + " AND (g.max_running IS NULL OR g.max_running > COALESCE(ga.n, 0))"
            " AND (g.max_running_per_user IS NULL OR g.max_running_per_user > COALESCE(a.n, 0))),"
            # Each open queue's first due task; the best `limit` queues hold the best tasks.
            " heads AS (SELECT h.id, h.handoff, h.priority, h.run_at, h.group_name, h.user_name,"
            " op.user_running, 1 AS user_rank FROM open_pairs op JOIN {tasks} h"
            " ON h.id = (SELECT id FROM "
            + queues
            + " WHERE "
            + ready
            + " AND group_name = op.group_name"
            " AND user_name = op.user_name ORDER BY " + queue_order + " LIMIT 1)),"
            " top_pairs AS (SELECT group_name, user_name FROM heads"
            " ORDER BY " + order_by + " LIMIT :pool),"
            # Up to `limit` due tasks of each of those queues, ranked within their queue.
            " candidates AS (SELECT c.id, c.handoff, c.priority, c.run_at, c.group_name,"
            " c.user_name, op.user_running, op.group_room, op.user_room,"
            " row_number() OVER (PARTITION BY c.group_name, c.user_name"
            " ORDER BY c.handoff DESC, c.priority DESC, c.id) AS user_rank"
            " FROM top_pairs tp JOIN open_pairs op"
            " ON op.group_name = tp.group_name AND op.user_name = tp.user_name "
            + self._queue_tasks(ready, queue_order)
            + "),"
            # The limits, applied in policy order.
            " allowed AS (SELECT id, handoff, priority, run_at, group_name, user_name,"
            " user_running, user_rank, group_room,"
            " row_number() OVER (PARTITION BY group_name ORDER BY " + order_by + ") AS group_rank"
            " FROM candidates WHERE user_room IS NULL OR user_rank <= user_room),"
            # `pool` candidates in policy order (`pick`); the claim takes the first `limit` of
            # them it can lock, so rows another claimer holds are skipped past, not lost.
            " chosen AS (SELECT id, group_name,"
            " row_number() OVER (ORDER BY " + order_by + ") AS pick"
            " FROM allowed WHERE group_room IS NULL OR group_rank <= group_room ORDER BY "
            + order_by
            + " LIMIT :pool) "
            + self._claim_update()
        )

    claim_pool_factor = 1
    """Candidates a claim considers per task it may take (more where claimers skip each
    other's locked rows)."""

    _queue_index: LiteralString = "{tasks}"
    """The tasks table, read through the queue index (SQLite must be told to use it)."""

    def _pairs_scan(self) -> LiteralString:
        """SQL of the recursive CTE ``pairs(group_name, user_name)``: one row per (group, user)
        queue with pending tasks, each found by one seek in the queue index."""
        return (
            "SELECT group_name, user_name FROM {tasks} WHERE id = (SELECT id FROM "
            + self._queue_index
            + " WHERE state = 'pending' ORDER BY group_name, user_name LIMIT 1)"
            " UNION ALL SELECT n.group_name, n.user_name FROM pairs p JOIN {tasks} n"
            " ON n.id = (SELECT id FROM " + self._queue_index + " WHERE state = 'pending'"
            " AND (group_name, user_name) > (p.group_name, p.user_name)"
            " ORDER BY group_name, user_name LIMIT 1)"
        )

    def _queue_tasks(self, ready: LiteralString, queue_order: LiteralString) -> LiteralString:
        """SQL joining each open queue ``op`` to its first ``:pool`` ready tasks as ``c``."""
        raise NotImplementedError

    def _claim_update(self) -> LiteralString:
        """The UPDATE that takes the ``chosen`` rows (event CLAIM: PENDING → RUNNING)."""
        raise NotImplementedError

    @cancel_safe
    async def claim_cleanups(
        self, node_id: int, types: Sequence[str], limit: int, busy: Sequence[int] = ()
    ) -> list[Claimed]:
        """Claim unowned, due DELETING tasks to run their cleanup handler (CLEANUP_CLAIM)."""
        if limit <= 0 or not types:
            return []
        async with self.write() as conn:
            if not await self._node_registered(conn, node_id):
                return []
            result = await self._exec(
                conn,
                self._cleanup_claim_statement(),
                {
                    "node": node_id,
                    "types": list(types),
                    "limit": limit,
                    "busy": list(busy),
                    **_CLEANUP_CLAIM_STATES,
                },
            )
            rows = sorted(result, key=lambda r: r.id)
        return [_rows.claimed(r) for r in rows]

    def _cleanup_claim_statement(self) -> LiteralString:
        raise NotImplementedError

    @cancel_safe
    async def checkpoint(self, node_id: int, contexts: Mapping[int, Checkpoint]) -> set[int]:
        """Store checkpoints of executions on ``node_id``; returns the ids whose write was
        accepted: rows still owned by ``node_id`` under the execution's claim token, running,
        canceling, or deleting for a cleanup handler. One statement per batch."""
        if not contexts:
            return set()
        async with self.write() as conn:
            return await self._checkpoint(conn, node_id, contexts)

    async def _checkpoint(
        self, conn: AsyncConnection, node_id: int, contexts: Mapping[int, Checkpoint]
    ) -> set[int]:
        raise NotImplementedError

    @cancel_safe
    async def complete(
        self, node_id: int, completions: Sequence[Completion], *, cleanup_attempts: int
    ) -> set[int]:
        """Apply the ends of executions on ``node_id``; returns the accepted task ids.

        A completion applies only to the row its execution claimed: still owned by ``node_id``
        under the same claim token. Any other (rescued, force-deleted, fenced, claimed again
        since) is left alone, so a completion retried after its first try committed, or sent
        by an execution that lost its task, changes nothing.
        """
        if not completions:
            return set()
        by_id = {c.task_id: c for c in completions}
        async with self.write() as conn:
            rows = await self._lock(conn, list(by_id), owner=node_id)
            writes: list[_Write] = []
            wake = False
            for row in rows:
                c = by_id[row.id]
                if row.token != c.token:
                    continue
                cleanup = c.event in (
                    Event.CLEANUP_FINISHED,
                    Event.CLEANUP_FAILED,
                ) or (c.event is Event.NODE_LOST and row.state is State.DELETING)
                limit = cleanup_attempts if cleanup else row.max_attempts
                outcome = apply_event(
                    row.state,
                    row.requested,
                    c.event,
                    has_cleanup=row.has_cleanup,
                    can_retry=row.attempts < limit,
                )
                if outcome is None:
                    continue
                wake = wake or outcome.state in (State.PENDING, State.DELETING)
                lost = c.event is Event.NODE_LOST
                writes.append(
                    _Write(
                        row,
                        outcome,
                        node_id,
                        context=c.context,
                        error=_lost_error(row, outcome) if lost else c.error,
                        delay=c.delay,
                        handoff=c.event is Event.STOPPED and outcome.state is State.PENDING,
                        refund=c.event is Event.STOPPED
                        and outcome.state in (State.PENDING, State.PAUSED),
                    )
                )
            await self._write(conn, writes)
            if wake:
                await self._notify(conn, "wake")
            return {w.row.id for w in writes}

    # -- nodes ------------------------------------------------------------------------------

    @cancel_safe
    async def register_node(
        self,
        name: str,
        concurrency: int,
        types: Sequence[str],
        *,
        heartbeat_interval: float,
        node_timeout: float,
    ) -> int:
        async with self.write() as conn:
            result = await self._exec(
                conn,
                "INSERT INTO {nodes} (name, concurrency, types, started_at, heartbeat_at,"
                " heartbeat_interval, node_timeout) VALUES (:name, :concurrency, :types,"
                " {now}, {now}, :heartbeat_interval, :node_timeout) RETURNING id",
                {
                    "name": name,
                    "concurrency": concurrency,
                    "types": json.dumps(list(types)),
                    "heartbeat_interval": heartbeat_interval,
                    "node_timeout": node_timeout,
                },
            )
            return int(result.scalar_one())

    @cancel_safe
    async def heartbeat(self, node_id: int) -> list[Owned] | None:
        """Renew the node's row and read the tasks it owns; None when the row is gone
        (the node was declared dead: it must fence itself)."""
        async with self.write() as conn:
            result = await self._exec(
                conn,
                "UPDATE {nodes} SET heartbeat_at = {now} WHERE id = :id RETURNING id",
                {"id": node_id},
            )
            if result.first() is None:
                return None
            return await self._owned(conn, node_id)

    @cancel_safe
    async def owned(self, node_id: int) -> list[Owned]:
        """The tasks a node owns, with pending stop requests (for the stop poll)."""
        async with self.read() as conn:
            return await self._owned(conn, node_id)

    async def _owned(self, conn: AsyncConnection, node_id: int) -> list[Owned]:
        result = await self._exec(
            conn,
            "SELECT id, state, requested, token FROM {tasks} WHERE node_id = :id",
            {"id": node_id},
        )
        return [_rows.owned(r) for r in result]

    @cancel_safe
    async def deregister(self, node_id: int, *, cleanup_attempts: int) -> None:
        """Remove the node's row at the end of a graceful stop. Whatever it still owns (a task
        claimed while it began to stop, or cancelled by ``stop(timeout=…)``) is handed back
        like any task the shutdown stopped, without using up an attempt."""
        async with self.write() as conn:
            await self._release_nodes(
                conn, [node_id], graceful=True, cleanup_attempts=cleanup_attempts
            )

    @cancel_safe
    async def release_claims(self, node_id: int, claims: Mapping[int, int]) -> int:
        """Hand back tasks ``node_id`` claimed but never ran (``claims``: task id → token):
        a claim that came back after the node's lease ran out, or a row the node found it owns
        without an execution. Each goes back as a hand-off, with its attempt refunded."""
        if not claims:
            return 0
        async with self.write() as conn:
            rows = await self._lock(conn, list(claims), owner=node_id)
            writes = []
            for row in rows:
                if row.token != claims[row.id]:
                    continue
                cleanup = row.state is State.DELETING
                outcome = apply_event(
                    row.state,
                    row.requested,
                    Event.NODE_LOST if cleanup else Event.STOPPED,
                    has_cleanup=row.has_cleanup,
                    can_retry=True,
                )
                if outcome is not None:
                    handoff = outcome.state is State.PENDING
                    writes.append(_Write(row, outcome, None, handoff=handoff, refund=True))
            return await self._write_and_wake(conn, writes)

    async def _release_tasks(
        self,
        conn: AsyncConnection,
        node_ids: Sequence[int],
        *,
        graceful: bool = False,
        cleanup_attempts: int,
        orphans: bool = False,
    ) -> int:
        """Release the tasks of ``node_ids`` (NODE_LOST; STOPPED for a graceful stop), and with
        ``orphans`` also every owned task whose node row no longer exists."""
        where: LiteralString = self._in("node_id", ":nodes")
        if orphans:
            where = (
                "(" + where + " OR (node_id IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM {nodes} n WHERE n.id = {tasks}.node_id)))"
            )
        result = await self._exec(
            conn,
            "SELECT "
            + _rows.LOCK_COLUMNS
            + " FROM {tasks} WHERE "
            + where
            + " ORDER BY id"
            + self.lock_rows,
            {"nodes": list(node_ids)},
        )
        rows = [_rows.Locked.from_row(r) for r in result]
        writes: list[_Write] = []
        for row in rows:
            handoff = graceful and row.state is State.RUNNING
            limit = cleanup_attempts if row.state is State.DELETING else row.max_attempts
            outcome = apply_event(
                row.state,
                row.requested,
                Event.STOPPED if handoff else Event.NODE_LOST,
                has_cleanup=row.has_cleanup,
                can_retry=graceful or row.attempts < limit,
            )
            if outcome is not None:
                # A graceful stop gives back the attempt of whatever it hands back or pauses
                # (a task whose pause it cut short), and of a cleanup it interrupted.
                refund = graceful and (
                    outcome.state in (State.PENDING, State.PAUSED) or row.state is State.DELETING
                )
                error = _lost_error(row, outcome)
                writes.append(
                    _Write(row, outcome, None, error=error, handoff=handoff, refund=refund)
                )
        return await self._write_and_wake(conn, writes)

    async def _write_and_wake(self, conn: AsyncConnection, writes: list[_Write]) -> int:
        """Apply ``writes`` of tasks given back to the queue, and wake the claimers."""
        await self._write(conn, writes)
        if writes:
            await self._notify(conn, "wake")
        return len(writes)

    async def _release_nodes(
        self,
        conn: AsyncConnection,
        node_ids: Sequence[int],
        *,
        graceful: bool = False,
        cleanup_attempts: int,
        orphans: bool = False,
    ) -> int:
        count = await self._release_tasks(
            conn, node_ids, graceful=graceful, cleanup_attempts=cleanup_attempts, orphans=orphans
        )
        if node_ids:
            await self._exec(
                conn,
                "DELETE FROM {nodes} WHERE " + self._in("id", ":nodes"),
                {"nodes": list(node_ids)},
            )
        return count

    @cancel_safe
    async def rescue(self, node_id: int, *, cleanup_attempts: int) -> int:
        """Declare dead every other node whose heartbeat is older than its own ``node_timeout``
        (database clock): release its tasks (NODE_LOST) and remove its row. Tasks owned by a
        node whose row is gone are released too. ``node_id`` — the rescuer — never rescues
        itself. Returns the number of tasks released."""
        async with self.write() as conn:
            result = await self._exec(
                conn,
                "SELECT id FROM {nodes} WHERE id <> :me AND heartbeat_at < "
                + self._plus_seconds("-node_timeout")
                + " ORDER BY id"
                + self.lock_rows
                + self.skip_locked,
                {"me": node_id},
            )
            dead = [r[0] for r in result]
            return await self._release_nodes(
                conn, dead, cleanup_attempts=cleanup_attempts, orphans=True
            )

    @cancel_safe
    async def get_nodes(self) -> list[NodeInfo]:
        async with self.read() as conn:
            result = await self._exec(
                conn,
                "SELECT id, name, concurrency, types, started_at, heartbeat_at,"
                " heartbeat_interval, node_timeout FROM {nodes} ORDER BY id",
            )
            return [_rows.node(r) for r in result]

    # -- groups -----------------------------------------------------------------------------

    _GROUP_DEFAULTS: Mapping[str, Any] = {
        "paused": False,
        "max_running": None,
        "max_running_per_user": None,
    }

    @cancel_safe
    async def set_group(self, /, name: str, **fields: Any) -> Group:
        """Create or update a group's row with ``fields`` (paused, max_running, …)."""
        async with self.write() as conn:
            group = await self._set_group(conn, name, fields)
            if not group.paused:  # resumed, or limits changed: there may be room now
                await self._notify(conn, "wake")
        return group

    async def _set_group(
        self, conn: AsyncConnection, name: str, fields: Mapping[str, Any]
    ) -> Group:
        # An upsert: two nodes setting a new group at once both succeed, one after the other.
        await self._exec(
            conn,
            "INSERT INTO {groups} (name, paused, max_running, max_running_per_user, updated_at)"
            " VALUES (:name, :paused, :max_running, :max_running_per_user, {now})"
            " ON CONFLICT (name) DO NOTHING",
            {"name": name, **self._GROUP_DEFAULTS},
        )
        current = await self._exec(
            conn,
            "SELECT paused, max_running, max_running_per_user FROM {groups}"
            " WHERE name = :name" + self.lock_rows,
            {"name": name},
        )
        row = current.one()
        values = {
            "paused": bool(row.paused),
            "max_running": row.max_running,
            "max_running_per_user": row.max_running_per_user,
            **fields,
        }
        await self._exec(
            conn,
            "UPDATE {groups} SET paused = :paused, max_running = :max_running,"
            " max_running_per_user = :max_running_per_user, updated_at = {now}"
            " WHERE name = :name",
            {"name": name, **values},
        )
        return Group(
            name, bool(values["paused"]), values["max_running"], values["max_running_per_user"]
        )

    @cancel_safe
    async def get_groups(self) -> list[Group]:
        """Every group that has tasks or settings, with its settings (defaults when unset)."""
        async with self.read() as conn:
            result = await self._exec(
                conn,
                "SELECT n.name, g.paused, g.max_running, g.max_running_per_user FROM"
                " (SELECT name FROM {groups} UNION SELECT DISTINCT group_name FROM {tasks}) n"
                " LEFT JOIN {groups} g ON g.name = n.name ORDER BY n.name",
            )
            return [_rows.group(r) for r in result]

    @cancel_safe
    async def pause_group(self, group: str, *, stop_running: bool) -> list[tuple[int, int]]:
        """Pause ``group``; with ``stop_running`` also pause every task of it that runs now, in
        the same transaction (all or nothing). Returns the stopped tasks with their owners."""
        async with self.write() as conn:
            await self._set_group(conn, group, {"paused": True})
            if not stop_running:
                return []
            result = await self._exec(
                conn,
                "SELECT " + _rows.LOCK_COLUMNS + " FROM {tasks} WHERE group_name = :group"
                " AND state = :state ORDER BY id" + self.lock_rows,
                {"group": group, "state": State.RUNNING.value},
            )
            writes = []
            for row in (_rows.Locked.from_row(r) for r in result):
                outcome = apply_operation(
                    row.state, row.requested, Operation.PAUSE, has_cleanup=row.has_cleanup
                )
                writes.append(_Write(row, outcome, row.node_id))
            await self._write(conn, writes)
            stopped = [(w.row.id, w.row.node_id) for w in writes if w.row.node_id is not None]
            for owner in sorted({owner for _, owner in stopped}):
                await self._notify(conn, f"stop:{owner}")
            return stopped
