"""``SqlDriver``: the driver protocol implemented once for the SQL databases.

Each operation is one short transaction that runs named statements from the database's own
``queries.sql`` (``_queries``). State changes go through the pure rules of ``_states``: the
driver reads the rows it will change under a write lock (``FOR UPDATE`` on PostgreSQL, the
database write lock on SQLite), asks ``apply_operation``/``apply_event`` what to do, and writes
the answer as a compare-and-set on the row's state and claim token, in the same transaction. A
stale node or a racing user call therefore never overwrites a newer state
(docs/design.md §5, §7).

A database's subclass, in its own folder, says how it binds lists and batches of rows, how it
notifies other nodes, and how its engine is set up; it writes no SQL of its own here.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import DatabaseError, DuplicateTask, TaskNotFound
from .._models import Group, NodeInfo, Operation, Schedule, State, Task
from .._periodic import Period, plan
from .._schema import VERSIONS, Timestamp, tasks_table, time_from_db
from .._states import (
    LIVE_STATES,
    REPLACEABLE_STATES,
    Event,
    Outcome,
    apply_event,
    apply_operation,
    give_back,
    release_event,
)
from . import _rows
from ._driver import (
    TASK_DONE,
    TASK_PROGRESS,
    CheckpointParams,
    ClaimCursor,
    Claimed,
    ClaimParams,
    ClaimResult,
    CleanupClaimParams,
    CompleteParams,
    Completion,
    DeleteParams,
    DeleteResult,
    DeregisterParams,
    EndedCount,
    Fired,
    InsertParams,
    Limits,
    ListenParams,
    NewTask,
    OperateParams,
    OperationResult,
    Owned,
    PauseGroupParams,
    PruneParams,
    PruneResult,
    PutScheduleParams,
    Queue,
    QueueStats,
    RegisterParams,
    RegisterTypesParams,
    ReleaseClaimsParams,
    RescueParams,
    SetGroupParams,
    StatsParams,
    StoredTaskType,
    TaskFilter,
    TaskTypesQuery,
    TickParams,
    TickResult,
    UnscheduleParams,
    WatchParams,
)
from ._migrations import (
    check_version,
    migration_files,
    missing_versions,
    refuse_newer,
    split_sql,
)
from ._queries import Queries
from ._transaction import WRAPPED, InFlight, Transaction, cancel_safe, database_error

GROUP_TRIES = 10
"""How often setting a group tries again when its row was removed between its creation and its
lock (another node set the group back to its default settings meanwhile)."""
DEADLOCK_RETRIES = 5
"""How often a transaction of ours that the database chose as a deadlock's victim is tried
again (``SqlDriver.rolled_back_retry``)."""
UNIQUE_TRIES = 10
"""How often a create with a unique key tries again when the live task that held the key
became final between the insert and the lock (each try is two statements)."""

_DONE = (State.FINISHED, State.FAILED, None)
"""Outcomes that end a wait: a final state, or the row removed (None)."""
CHECKPOINT_STATES = (State.RUNNING, State.CANCELING, State.DELETING)
"""The states in which an execution may store a checkpoint (its task runs, or is being
cleaned up)."""

_NEW_TASK_COLUMNS = (
    "type",
    "user",
    "group",
    "state",
    "context",
    "priority",
    "max_attempts",
    "has_cleanup",
    "run_at",
    "trace_parent",
)
"""The values of one new task in a batch, in the order ``insert_tasks`` reads them."""


def transition(from_state: State, event: Event) -> dict[str, str]:
    """The states a claim statement moves a row between, as bound parameters taken from the
    state table: a claim is one of its events, not a rule of its own written in SQL."""
    outcome = apply_event(from_state, None, event, has_cleanup=True)
    assert outcome is not None
    assert outcome.state is not None
    assert outcome.owned
    return {"from_state": from_state.value, "to_state": outcome.state.value}


def _certain_end(event: Event) -> State | None:
    """The final state ``event`` moves a task to when it still runs as claimed (RUNNING, no
    stop request), whatever its attempts and cleanup handler; None where those decide, or the
    end is not final, or the task is handed back (docs/design.md §15.1)."""
    outcomes = {
        apply_event(State.RUNNING, None, event, has_cleanup=has_cleanup, can_retry=can_retry)
        for has_cleanup in (False, True)
        for can_retry in (False, True)
    }
    if len(outcomes) != 1:
        return None
    (outcome,) = outcomes
    if outcome is None or outcome.state not in (State.FINISHED, State.FAILED):
        return None
    back = give_back(State.RUNNING, event, outcome, graceful=False)
    if outcome.owned or outcome.requested or outcome.reset_attempts or back.handoff or back.refund:
        return None
    return outcome.state


CERTAIN_ENDS = {event: end for event in Event if (end := _certain_end(event)) is not None}
"""The events whose outcome on a task that still runs as claimed is known without reading
its row: FINISHED and REJECTED (a FAILED may be retried, a STOPPED is handed back)."""

_D = TypeVar("_D", bound="SqlDriver")
_P = ParamSpec("_P")
_T = TypeVar("_T")


def whole(
    method: Callable[Concatenate[_D, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[_D, _P], Coroutine[Any, Any, _T]]:
    """``method`` is one write transaction of the driver's own, whole: tried again when the
    database rolled it back entirely as a deadlock's victim (``SqlDriver.rolled_back_retry``,
    docs/design.md §13.3)."""

    @functools.wraps(method)
    async def run(self: _D, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._retry_rolled_back(lambda: method(self, *args, **kwargs))

    return run


PRUNED = {
    state: apply_operation(state, None, Operation.DELETE, has_cleanup=True, force=True)
    for state in (State.FINISHED, State.FAILED)
}
"""Retention applies *delete, force* to FINISHED and FAILED tasks: they are removed, and no
cleanup handler runs (docs/design.md §4.5)."""

BROKEN_SCHEDULE_DELAY = timedelta(hours=1)
"""How far a schedule whose period a node cannot compute is put off (it is reported)."""
CLAIM = transition(State.PENDING, Event.CLAIM)
CLEANUP_CLAIM = transition(State.DELETING, Event.CLEANUP_CLAIM)


@dataclass(frozen=True, slots=True)
class _Write:
    """One row change decided by the state rules, ready for the compare-and-set UPDATE."""

    row: _rows.Locked
    outcome: Outcome
    node_id: int | None
    context: str | None = None
    error: str | None = None
    delay: float = 0.0
    progress: float | None = None
    message: str | None = None
    group: str | None = None
    handoff: bool = False
    """Handed back by a graceful shutdown: claimed first by the next node."""
    refund: bool = False
    """The attempt it was claimed for is given back (``_states.give_back``)."""


def next_due_in(seconds: Any) -> float | None:
    """The seconds until the next delayed task is due, as a claim reports it (None: none, or
    the claim was full and the claimer looks again anyway)."""
    return None if seconds is None else max(float(seconds), 0.0)


MAX_CURSOR_GROUPS = 10_000
"""The most groups whose place a claim cursor keeps (beyond it, those of the last window)."""


@dataclass(frozen=True, slots=True)
class ClaimWindow:
    """The (group, user) queues one claim looked at, in the order it walked them
    (docs/design.md §6.3)."""

    queues: list[Queue]
    full: bool
    """As many queues as the window holds: there may be others it did not reach."""

    def advance(self, cursor: ClaimCursor, claimed: Sequence[Claimed], limit: int) -> ClaimCursor:
        """Where the next claim's walk starts. A claim that took all it could (``limit``)
        chose among the queues it looked at: the walk goes on after the last queue it took
        from, in each group up to that queue's, so that those it passed by are looked at
        again; in a group it took nothing from, after the last queue it looked at. A short
        claim took all the queues it looked at could give: the walk goes on after them."""
        if not self.queues:
            return cursor
        walked = self.queues
        full = len(claimed) >= limit
        taken = {(c.group, c.user) for c in claimed} if full else set()
        if taken:
            walked = walked[: max(i for i, q in enumerate(walked) if q in taken) + 1]
        users = dict(cursor.users) if len(cursor.users) < MAX_CURSOR_GROUPS else {}
        served: set[str] = set()
        for group, user in walked:
            if (group, user) in taken:
                users[group] = user
                served.add(group)
            elif group not in served:
                users[group] = user
        return ClaimCursor(walked[-1][0], users)


def _unique_violation(exc: DatabaseError) -> bool:
    """Whether ``exc`` is the unique index of unique keys refusing a row (docs/design.md §4.4):
    PostgreSQL names the index, SQLite the columns."""
    cause = exc.__cause__
    text = str(cause)
    return isinstance(cause, sa.exc.IntegrityError) and (
        "aioasync_tasks_unique_idx" in text or "aioasync_tasks.unique_key" in text
    )


def _lost_error(row: _rows.Locked, outcome: Outcome) -> str | None:
    """The error stored when a task whose node was lost fails for good."""
    if outcome.state is not State.FAILED:
        return None
    return "cleanup: node lost" if row.state is State.DELETING else "node lost"


class SqlDriver:
    """The queue operations on an SQL database; use ``PostgresDriver`` or ``SqliteDriver``."""

    dialect: ClassVar[str]
    """The folder of the database's ``queries.sql`` and migrations."""
    supports_notify: bool = False
    """Whether ``listen`` works (docs/design.md §14); nodes without it poll."""
    claim_pool_factor: ClassVar[int] = 1
    """Candidates a claim considers per task it may take (more where claimers skip each
    other's locked rows)."""
    claim_window: ClassVar[int] = 64
    """The fewest (group, user) queues a claim looks at (at least its pool): the bound on a
    claim's cost whatever the number of queues (docs/design.md §6.3)."""
    rows_per_transaction: ClassVar[int | None] = None
    """The most rows ``create_tasks`` inserts in one transaction of its own (None: all)."""

    def __init__(self, engine: AsyncEngine, schema: str | None = None) -> None:
        self.engine = engine
        self.schema = schema
        self.in_flight = InFlight()
        quote = engine.dialect.identifier_preparer.quote_schema
        prefix = quote(schema) + "." if schema else ""
        self.queries = Queries(self.dialect, prefix)
        self._tasks = (
            tasks_table.to_metadata(sa.MetaData(), schema=schema) if schema else tasks_table
        )
        self._timestamp = Timestamp()
        self._write_options: Mapping[str, Any] = {}
        """Execution options of the write transactions, for the database's ``begin`` listener."""

    # -- what a database says of itself ------------------------------------------------------

    def bind_list(self, values: Iterable[Any]) -> Any:
        """A list of values as one bound parameter (an array; JSON where there are none)."""
        return list(values)

    def bind_rows(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """A batch of rows as parameters: one array per column ``names`` by default."""
        return {name: [row[i] for row in rows] for i, name in enumerate(names)}

    async def notify(self, conn: AsyncConnection, payload: str) -> None:
        """Tell the other nodes (``wake``, ``stop:<node>``) when ``conn``'s transaction commits;
        nothing where the database cannot (nodes poll)."""

    async def notify_task_events(self, conn: AsyncConnection, kind: str, ids: list[int]) -> None:
        """Tell the watchers of ``ids`` (``TASK_DONE``, ``TASK_PROGRESS``) when ``conn``'s
        transaction commits; nothing where the database cannot (watchers poll)."""

    notify_params: Mapping[str, Any] = {}
    """What a statement that notifies binds besides its own parameters (the channel)."""

    def listen(
        self, on_message: Callable[[str], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Where ``supports_notify``: the notifications of the other nodes, while inside."""
        raise NotImplementedError(f"{self.dialect} has no notifications")

    def listen_tasks(self, params: ListenParams) -> AbstractAsyncContextManager[asyncio.Event]:
        """Where ``supports_notify``: the task events for watchers, while inside."""
        raise NotImplementedError(f"{self.dialect} has no notifications")

    async def prepare_migration(self, conn: AsyncConnection) -> None:
        """Serialise concurrent migrations and point their DDL at the schema, where needed."""

    async def pause_between_chunks(self, held: float) -> None:
        """Between two chunks of a bulk insert, which held the write lock for ``held`` seconds:
        a pause long enough for the other writers, where they need one."""

    def bound_idle_transactions(self, seconds: float) -> None:
        """Have the server end a write transaction of ours that stays idle for ``seconds`` (its
        node was cut off in the middle of it), where the server can."""

    def inserted_id(self, result: sa.CursorResult[Any]) -> int:
        """The id of the row an ``INSERT`` of one row made (its ``RETURNING id``)."""
        return int(result.scalar_one())

    def found(self, result: sa.CursorResult[Any]) -> bool:
        """Whether an ``UPDATE`` or ``DELETE`` of one row found it (its ``RETURNING``)."""
        return result.first() is not None

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(
        self,
        conn: AsyncConnection,
        name: str,
        params: Any = None,
        *,
        order_by: str = "",
        queues: int = 0,
    ) -> sa.CursorResult[Any]:
        statement = self.queries.statement(name, order_by=order_by, queues=queues)
        return await self._execute(conn, statement, params)

    async def _execute(
        self, conn: AsyncConnection, statement: sa.Executable, params: Any = None
    ) -> sa.CursorResult[Any]:
        try:
            return await conn.execute(statement, params)
        except WRAPPED as exc:
            raise self.statement_failed(exc, str(statement)) from exc

    def statement_failed(self, exc: BaseException, sql: str) -> DatabaseError:
        """The ``DatabaseError`` of the statement ``sql`` that failed with ``exc``: "UPDATE
        failed on PostgreSQL at …". Raise it ``from exc``."""
        verb = sql.lstrip().split(None, 1)[0].upper()
        return database_error(exc, self.engine.url, f"{verb} failed on")

    def write(self) -> Transaction:
        """A short write transaction (it holds the write lock on SQLite)."""
        return Transaction(self.engine, self.in_flight, write=True, options=self._write_options)

    def read(self) -> Transaction:
        return Transaction(self.engine, self.in_flight, write=False)

    def _db_time(self, value: datetime | None) -> Any:
        if value is None:
            return None
        return self._timestamp.process_bind_param(value, self.engine.dialect)

    # -- schema -----------------------------------------------------------------------------

    async def _applied_versions(self, conn: AsyncConnection) -> set[int] | None:
        """The migration versions recorded, or None when the versions table is missing."""
        exists = await conn.run_sync(
            lambda sync: sa.inspect(sync).has_table(VERSIONS, schema=self.schema)
        )
        if not exists:
            return None
        return {int(v) for v in (await self._run(conn, "applied_versions")).scalars()}

    @cancel_safe
    async def schema_version(self) -> int | None:
        """The newest applied migration version, or None when the schema is empty."""
        async with self.read() as conn:
            applied = await self._applied_versions(conn)
        return None if applied is None else max(applied, default=None)

    @cancel_safe
    async def migrate(self) -> list[int]:
        """Apply the shipped migrations not recorded yet, in version order; returns the
        versions applied (docs/design.md §4.3)."""
        applied: list[int] = []
        async with self.write() as conn:
            await self.prepare_migration(conn)
            recorded = await self._applied_versions(conn) or set()
            refuse_newer(max(recorded, default=0))
            files = dict(migration_files(self.dialect))
            for version in missing_versions(files, recorded):
                for statement in split_sql(files[version]):
                    await conn.exec_driver_sql(statement)
                await self._run(conn, "record_migration", {"version": version})
                applied.append(version)
        return applied

    @cancel_safe
    async def check_schema(self) -> None:
        async with self.read() as conn:
            applied = await self._applied_versions(conn)
        check_version(applied, (version for version, _ in migration_files(self.dialect)))

    # -- creating and reading tasks ---------------------------------------------------------

    @cancel_safe
    async def insert_many(self, params: InsertParams) -> list[int]:
        """Insert tasks in one transaction (the caller's, when ``connection`` is given).

        A task with a ``unique_key`` that a live task of its type holds already is not inserted:
        its ``on_conflict`` says what happens instead (docs/design.md §4.4); its place in the
        result is the live task's id, or ``DuplicateTask`` is raised and nothing is inserted.
        """
        new_tasks, connection = params.tasks, params.connection
        if not new_tasks:
            return []
        wake = any(t.state is State.PENDING for t in new_tasks)
        if connection is not None:
            return await self._insert(connection, new_tasks, wake)
        size = self.rows_per_transaction or len(new_tasks)
        ids: list[int] = []
        for start in range(0, len(new_tasks), size):
            began = time.monotonic()
            try:
                ids += await self._insert_chunk(new_tasks[start : start + size], wake)
            except DatabaseError as exc:
                if not ids:
                    raise
                raise DatabaseError(
                    f"{exc} ({len(ids)} of {len(new_tasks)} tasks were created before the"
                    f" failure, ids {ids[0]}..{ids[-1]})",
                    transient=exc.transient,
                ) from exc
            if start + size < len(new_tasks):
                await self.pause_between_chunks(time.monotonic() - began)
        return ids

    async def _insert_chunk(self, new_tasks: Sequence[NewTask], wake: bool) -> list[int]:
        """Insert ``new_tasks`` in a write transaction of our own (tried again as
        ``_retry_rolled_back`` says), or by ``insert_at_once`` when none has a unique key."""
        plain = all(t.unique_key is None for t in new_tasks)

        async def insert() -> list[int]:
            if plain:
                ids = await self.insert_at_once(new_tasks, wake)
                if ids is not None:
                    return ids
            async with self.write() as conn:
                return await self._insert(conn, new_tasks, wake)

        return await self._retry_rolled_back(insert)

    async def insert_at_once(self, new_tasks: Sequence[NewTask], wake: bool) -> list[int] | None:
        """Insert tasks without a unique key (waking the claimers when ``wake``) as one
        statement, atomic by itself, outside any transaction: their ids, in order; None when
        the driver has no such statement (they are then inserted in a transaction)."""
        return None

    def insert_statement(
        self, rows: Sequence[Sequence[Any]], wake: bool
    ) -> tuple[str, dict[str, Any], bool]:
        """The statement that inserts ``rows`` (each ``_new_row``'s values) and its parameters:
        ``insert_task`` for one row, ``insert_tasks`` for more — in its ``_and_wake`` form when
        ``wake`` and the driver has one, which wakes the claimers itself and returns the ids
        as one ascending array (the third value says so)."""
        name = "insert_task" if len(rows) == 1 else "insert_tasks"
        if len(rows) == 1:
            params = dict(zip(_NEW_TASK_COLUMNS, rows[0], strict=True))
        else:
            params = self.bind_rows(_NEW_TASK_COLUMNS, rows)
        if wake and f"{name}_and_wake" in self.queries.sql:
            return f"{name}_and_wake", params | dict(self.notify_params), True
        return name, params, False

    async def _retry_rolled_back(self, transaction: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``transaction`` (a write transaction of our own, whole); again, after a pause,
        when the database rolled it back entirely and says to try again
        (``rolled_back_retry``): nothing of it was committed."""
        attempt = 0
        while True:
            try:
                return await transaction()
            except DatabaseError as exc:
                delay = self.rolled_back_retry(exc, attempt)
                if delay is None:
                    raise
            attempt += 1
            await asyncio.sleep(delay)

    def rolled_back_retry(self, exc: DatabaseError, attempt: int) -> float | None:
        """After ``exc`` ended try number ``attempt`` (from 0) of a transaction of ours: when
        the database chose it as a deadlock's victim (``deadlock_victim``) and rolled it back
        entirely, so that nothing of it was committed, the seconds to wait before trying
        again (jittered, at most 10, 20, 40 … ms), up to ``DEADLOCK_RETRIES`` times; else None,
        to raise it."""
        if attempt >= DEADLOCK_RETRIES or not self.deadlock_victim(exc.__cause__):
            return None
        return random.uniform(0.0, 0.01 * 2**attempt)

    def deadlock_victim(self, cause: BaseException | None) -> bool:
        """Whether the driver's error ``cause`` says the database rolled the transaction back
        whole as a deadlock's victim. Never, by default."""
        return False

    def _new_row(self, t: NewTask) -> tuple[Any, ...]:
        """A new task's values, in the order of ``_NEW_TASK_COLUMNS``."""
        return (
            t.type,
            t.user,
            t.group,
            t.state.value,
            t.context,
            t.priority,
            t.max_attempts,
            t.has_cleanup,
            self._db_time(t.run_at),
            t.trace_parent,
        )

    async def _insert(
        self, conn: AsyncConnection, new_tasks: Sequence[NewTask], wake: bool
    ) -> list[int]:
        """Insert ``new_tasks`` in ``conn``'s transaction, in their order: runs of tasks
        without a unique key in one statement each, a task with one by itself."""
        keyed = [t for t in new_tasks if t.unique_key is not None]
        if not keyed:
            return await self._insert_rows(conn, [self._new_row(t) for t in new_tasks], wake)
        keys = [(t.type, t.unique_key) for t in keyed]
        await self.lock_unique_keys(conn, keys)
        ids: list[int] = []
        try:
            plain: list[tuple[Any, ...]] = []
            for t in new_tasks:
                if t.unique_key is None:
                    plain.append(self._new_row(t))
                    continue
                if plain:
                    ids += await self._insert_rows(conn, plain, wake=False)
                    plain = []
                ids.append(await self._insert_unique(conn, t))
            if plain:
                ids += await self._insert_rows(conn, plain, wake=False)
        finally:
            await self.unlock_unique_keys(conn, keys)
        if wake:
            await self.notify(conn, "wake")
        return ids

    async def lock_unique_keys(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        """Before inserting tasks with these (type, unique key) pairs: serialise the creators
        of the same keys, where the database would otherwise let two of them deadlock on the
        unique index (docs/design.md §4.4). Nothing where the write lock serialises them."""

    async def unlock_unique_keys(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str | None]]
    ) -> None:
        """After the inserts of ``lock_unique_keys``'s keys, failed or not: release locks that
        the end of the transaction does not (a session's named locks on MySQL)."""

    async def _insert_if_free(self, conn: AsyncConnection, params: Mapping[str, Any]) -> int | None:
        """Insert one task with a unique key; its id, or None when a live task of its type
        holds the key (nothing inserted)."""
        inserted = (await self._run(conn, "insert_unique_task", params)).first()
        return None if inserted is None else int(inserted.id)

    async def _insert_unique(self, conn: AsyncConnection, t: NewTask) -> int:
        """Insert one task with a unique key, or apply its ``on_conflict`` to the live task
        that holds the key; the id of the task that holds it afterwards."""
        assert t.unique_key is not None
        params = dict(zip(_NEW_TASK_COLUMNS, self._new_row(t), strict=True))
        params["unique_key"] = t.unique_key
        for _ in range(UNIQUE_TRIES):
            inserted = await self._insert_if_free(conn, params)
            if inserted is not None:
                return inserted
            found = await self._run(
                conn, "lock_unique_task", {"type": t.type, "unique_key": t.unique_key}
            )
            row = found.first()
            if row is None:
                continue  # the holder became final (or was deleted) since: insert again
            holder = _rows.Locked.from_row(row)
            if t.on_conflict == "skip":
                return holder.id
            if t.on_conflict == "error" or holder.state not in REPLACEABLE_STATES:
                raise DuplicateTask(t.type, t.unique_key, holder.id, holder.state)
            replaced = await self._run(
                conn,
                "replace_task",
                {
                    **params,
                    "id": holder.id,
                    "token": holder.token,
                    "expected": holder.state.value,
                },
            )
            if self.found(replaced):
                return holder.id
        raise DatabaseError(
            f"the live {t.type!r} task with unique_key {t.unique_key!r} kept changing while"
            f" it was created {UNIQUE_TRIES} times; try again",
            transient=True,
        )

    async def _insert_rows(
        self, conn: AsyncConnection, rows: Sequence[Sequence[Any]], wake: bool
    ) -> list[int]:
        name, params, woke = self.insert_statement(rows, wake)
        result = await self._run(conn, name, params)
        if woke:  # one round trip, the wake-up in it
            return list(result.scalar_one())
        # The ids of many rows, sorted, are in the rows' order (the sequence numbers them so).
        ids = [self.inserted_id(result)] if len(rows) == 1 else sorted(r.id for r in result)
        if wake:
            await self.notify(conn, "wake")
        return ids

    @cancel_safe
    async def get_task(self, task_id: int) -> Task:
        async with self.read() as conn:
            row = (await self._run(conn, "get_task", {"id": task_id})).first()
        if row is None:
            raise TaskNotFound(task_id)
        return _rows.task(row)

    def _where(self, f: TaskFilter) -> list[sa.ColumnElement[bool]]:
        """A filter of the task listings, in SQLAlchemy's expression language: its shape
        varies with the filter, and the dialect renders it."""
        c = self._tasks.c
        where: list[sa.ColumnElement[bool]] = []
        if f.user is not None:
            where.append(c.user_name == f.user)
        if f.group is not None:
            where.append(c.group_name == f.group)
        if f.types is not None:
            where.append(c.type.in_(f.types))
        if f.states is not None and len(f.states) == 1:
            # "state = x", not "state IN (x)": only an equality lets PostgreSQL read the
            # (state, id) index in id order for ORDER BY id DESC LIMIT.
            where.append(c.state == f.states[0].value)
        elif f.states is not None:
            where.append(c.state.in_([s.value for s in f.states]))
        return where

    @cancel_safe
    async def get_tasks(self, f: TaskFilter) -> list[Task]:
        c = self._tasks.c
        columns = [c[name] for name in _rows.TASK_FIELDS]
        query = sa.select(*columns).where(*self._where(f))
        query = query.order_by(c.id.desc()).limit(f.limit).offset(f.offset)
        async with self.read() as conn:
            return [_rows.task(row) for row in await self._execute(conn, query)]

    @cancel_safe
    async def count_tasks(self, f: TaskFilter) -> int:
        query = sa.select(sa.func.count()).select_from(self._tasks).where(*self._where(f))
        async with self.read() as conn:
            return int((await self._execute(conn, query)).scalar_one())

    # -- state changes ----------------------------------------------------------------------

    async def _lock(
        self, conn: AsyncConnection, ids: Sequence[int], owner: int | None = None
    ) -> list[_rows.Locked]:
        params: dict[str, Any] = {"ids": self.bind_list(ids)}
        if owner is None:
            result = await self._run(conn, "lock_tasks", params)
        else:
            result = await self._run(conn, "lock_owned_tasks", {**params, "owner": owner})
        return [_rows.Locked.from_row(row) for row in result]

    async def _write(self, conn: AsyncConnection, writes: Iterable[_Write]) -> None:
        """Apply decided outcomes: one DELETE for removed rows, one batched UPDATE for the rest."""
        removed: list[int] = []
        updates: list[dict[str, Any]] = []
        watched: list[_Write] = []
        for w in writes:
            if w.row.watched:
                watched.append(w)
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
                    "progress": w.progress,
                    "message": w.message,
                    "delay": delay,
                    "done": o.state in (State.FINISHED, State.FAILED),
                    "token": w.row.token,
                    "expected": w.row.state.value,
                }
            )
        if removed:
            await self._run(conn, "delete_tasks", {"ids": self.bind_list(removed)})
        if updates:
            await self.update_rows(conn, updates)
        if watched:
            await self._notify_watchers(conn, watched)

    async def update_rows(self, conn: AsyncConnection, updates: list[dict[str, Any]]) -> None:
        """Write decided outcomes of locked rows (``update_task``'s parameters, a dict per
        row): one statement each, sent as one batch."""
        await self._run(conn, "update_task", updates)

    async def _notify_watchers(self, conn: AsyncConnection, writes: list[_Write]) -> None:
        """Task events for the watched rows among ``writes`` (docs/design.md §18): done for
        a task that ended (FINISHED, FAILED) or was removed, progress for any other change."""
        done = [w.row.id for w in writes if w.outcome.state in _DONE]
        moved = [
            w.row.id
            for w in writes
            if w.outcome.state not in _DONE and (w.outcome.changed or w.group is not None)
        ]
        if done:
            await self.notify_task_events(conn, TASK_DONE, done)
        if moved:
            await self.notify_task_events(conn, TASK_PROGRESS, moved)

    async def _write_and_wake(self, conn: AsyncConnection, writes: list[_Write]) -> int:
        """Apply ``writes`` of tasks given back to the queue, and wake the claimers."""
        await self._write(conn, writes)
        if writes:
            await self.notify(conn, "wake")
        return len(writes)

    @cancel_safe
    @whole
    async def operate(self, params: OperateParams) -> OperationResult:
        """Apply a user operation to one task, atomically (docs/design.md §3)."""
        task_id, group = params.task_id, params.group
        async with self.write() as conn:
            if group is not None:
                # Taken in the order claims take it (group, then task): a task moved into a
                # limited group is counted by the next claim, never by neither.
                await self._run(conn, "lock_group", {"name": group})
            rows = await self._lock(conn, [task_id])
            if not rows:
                raise TaskNotFound(task_id)
            row = rows[0]
            outcome = apply_operation(
                row.state,
                row.requested,
                params.operation,
                has_cleanup=row.has_cleanup,
                force=params.force,
                task_id=task_id,
            )
            moved = group is not None and group != row.group
            key = None
            if outcome.changed and outcome.state in LIVE_STATES and row.state not in LIVE_STATES:
                key = await self._unique_key_free(conn, task_id)  # a FAILED task run again
            try:
                await self._write(
                    conn, [_Write(row, outcome, row.node_id, group=group if moved else None)]
                )
            except DatabaseError as exc:
                if key is not None and _unique_violation(exc):
                    # A creator took the key after our check, and committed first.
                    raise DuplicateTask(*key, None) from exc
                raise
            if outcome.changed and outcome.state in (State.PENDING, State.DELETING):
                await self.notify(conn, "wake")
            if outcome.stop and row.node_id is not None:
                await self.notify(conn, f"stop:{row.node_id}")
            return OperationResult(outcome, row.node_id)

    async def _unique_key_free(self, conn: AsyncConnection, task_id: int) -> tuple[str, str] | None:
        """Before task ``task_id`` becomes live again: its (type, unique key), or None if it has
        none; ``DuplicateTask`` when another live task holds that key now."""
        row = (await self._run(conn, "unique_holder", {"id": task_id})).first()
        if row is None or row.unique_key is None:
            return None
        if row.holder is not None:
            raise DuplicateTask(row.type, row.unique_key, row.holder, State(row.holder_state))
        return row.type, row.unique_key

    # -- execution --------------------------------------------------------------------------

    @cancel_safe
    @whole
    async def claim(self, params: ClaimParams) -> ClaimResult:
        """Claim up to ``limit`` due PENDING tasks of ``types`` (and of ``groups``, when given)
        for ``node_id`` (event CLAIM), in the ``policy``'s order, skipping paused groups and
        never exceeding group limits (docs/design.md §6).

        Exactness of the limits: the ``claim_prepare`` statement makes claimers that could
        exceed a limit run one after the other (row locks on PostgreSQL, the write lock on
        SQLite), and the claim counts every task the previous claimer took. A task whose group
        changed since the statement's snapshot is skipped under its row lock, and so is every
        task in ``busy`` (the node still runs an execution of it).

        The claim looks at a window of queues from ``after`` on, not at every queue: its cost
        is bounded whatever the number of queues (docs/design.md §6.3). ``claim_prepare``
        finds the window, and the next due time, in the same round trip as the locks. Where
        the database can claim in one statement (``claim_at_once``), it does.
        """
        if params.limit <= 0 or not params.types:
            return ClaimResult([], None)
        at_once = await self.claim_at_once(params)
        return at_once if at_once is not None else await self._claim_in_two(params)

    async def claim_at_once(self, params: ClaimParams) -> ClaimResult | None:
        """The claim ``params`` in one statement outside a transaction, where the database
        can make it so (docs/design.md §6.9); None where it cannot or does not: it is then made
        in two statements in a transaction."""
        return None

    async def _claim_in_two(self, params: ClaimParams) -> ClaimResult:
        """The claim ``params``: ``claim_prepare``, then ``claim``, in one transaction."""
        p, limit = params, params.limit
        pool = limit * self.claim_pool_factor
        size = self.window_size(limit)
        groups = self.group_params(p.groups)
        async with self.write() as conn:
            found = (
                await self._run(conn, "claim_prepare", self.prepare_params(p, size, groups))
            ).all()
            if not found[0].registered:
                return ClaimResult([], None)
            queues = [(r.group_name, r.user_name) for r in found if r.group_name is not None]
            window = ClaimWindow(queues, full=len(queues) >= size)
            rows: list[Any] = []
            if window.queues:
                bound: dict[str, Any] = {
                    "node": p.node_id,
                    "types": self.bind_list(p.types),
                    "limit": limit,
                    "pool": pool,
                    "busy": self.bind_list(p.busy),
                    "window_groups": self.bind_list(g for g, _ in window.queues),
                    "window_users": self.bind_list(u for _, u in window.queues),
                    **groups,
                    **CLAIM,
                }
                result = await self._run(conn, "claim", bound, order_by=p.policy.order_by)
                rows = list(result)
                await self._notify_claimed(conn, rows)
        return self.claim_result(p, rows, window, found[0].next_due)

    def claim_result(
        self, p: ClaimParams, rows: Sequence[Any], window: ClaimWindow, next_due: Any
    ) -> ClaimResult:
        """The result of the claim ``p`` that took ``rows`` (with the columns of ``claim``)
        from ``window``; ``next_due``, the seconds until the next delayed task is due."""
        ordered = sorted(rows, key=lambda r: (not r.handoff, -r.priority, r.id))
        claimed = [_rows.claimed(r) for r in ordered]
        return ClaimResult(
            claimed,
            next_due_in(next_due) if len(claimed) < p.limit else None,
            window.advance(p.after, claimed, p.limit),
            window.full,
        )

    def window_size(self, limit: int) -> int:
        """The most queues the window of a claim of up to ``limit`` tasks holds."""
        return max(self.claim_window, limit * self.claim_pool_factor)

    def group_params(self, groups: Sequence[str] | None) -> dict[str, Any]:
        """A node's ``groups=`` option as the claim's statements bind it."""
        return {"all_groups": groups is None, "groups": self.bind_list(groups or ())}

    def prepare_params(self, p: ClaimParams, size: int, groups: dict[str, Any]) -> dict[str, Any]:
        """The parameters of ``claim_prepare`` (PostgreSQL, SQLite) for the claim ``p``."""
        return {
            "node": p.node_id,
            "types": self.bind_list(p.types),
            **self.window_params(p.after, size, groups),
        }

    def window_params(
        self, after: ClaimCursor, size: int, groups: dict[str, Any]
    ) -> dict[str, Any]:
        """The parameters of a claim's walk of up to ``size`` queues from ``after`` on."""
        return {
            "after_group": after.group,  # "": no group is named so
            "cursor_groups": self.bind_list(after.users),
            "cursor_users": self.bind_list(after.users.values()),
            "window": size,
            **groups,
        }

    @cancel_safe
    @whole
    async def claim_cleanups(self, params: CleanupClaimParams) -> list[Claimed]:
        """Claim unowned, due DELETING tasks to run their cleanup handler (CLEANUP_CLAIM)."""
        p = params
        if p.limit <= 0 or not p.types:
            return []
        at_once = await self.claim_cleanups_at_once(p)
        if at_once is not None:
            return at_once
        async with self.write() as conn:
            # The statement is fenced: a node another node declared dead takes nothing.
            result = await self._run(conn, "claim_cleanups", self.cleanup_params(p))
            rows = sorted(result, key=lambda r: r.id)
            await self._notify_claimed(conn, rows)
        return [_rows.claimed(r) for r in rows]

    async def claim_cleanups_at_once(self, params: CleanupClaimParams) -> list[Claimed] | None:
        """The cleanup claim ``params`` in one statement outside a transaction, where the
        database can make it so; None where it cannot: it is then made in a transaction."""
        return None

    def cleanup_params(self, p: CleanupClaimParams) -> dict[str, Any]:
        """The parameters of ``claim_cleanups``."""
        return {
            "node": p.node_id,
            "types": self.bind_list(p.types),
            "limit": p.limit,
            "busy": self.bind_list(p.busy),
            **CLEANUP_CLAIM,
        }

    async def _notify_claimed(self, conn: AsyncConnection, rows: Sequence[Any]) -> None:
        watched = [row.id for row in rows if row.watched]
        if watched:
            await self.notify_task_events(conn, TASK_PROGRESS, watched)

    @cancel_safe
    @whole
    async def checkpoint(self, params: CheckpointParams) -> set[int]:
        """Store checkpoints (context, progress, message) of executions on ``node_id``; returns
        the ids whose write was accepted: rows still owned by ``node_id`` under the execution's
        claim token, running, canceling, or deleting for a cleanup handler. One statement per
        batch; outside a transaction where the database can (``checkpoint_at_once``)."""
        if not params.checkpoints:
            return set()
        at_once = await self.checkpoint_at_once(params)
        if at_once is not None:
            return at_once
        async with self.write() as conn:
            written = (await self._run(conn, "checkpoint", self._checkpoint_params(params))).all()
            watched = [row.id for row in written if row.watched]
            if watched:  # one notification per batch, and only for tasks someone watches
                await self.notify_task_events(conn, TASK_PROGRESS, watched)
        return {row.id for row in written}

    async def checkpoint_at_once(self, params: CheckpointParams) -> set[int] | None:
        """The checkpoint batch ``params`` in one statement outside a transaction, with the
        task events of the watched rows, where the database can (docs/design.md §15); the ids
        written, or None where it cannot."""
        return None

    def _checkpoint_params(self, params: CheckpointParams) -> dict[str, Any]:
        rows = [
            (task_id, c.token, c.context, c.progress, c.message)
            for task_id, c in sorted(params.checkpoints.items())  # ids ascending: batch_row
        ]
        return {
            **self.bind_rows(("ids", "tokens", "contexts", "progress", "messages"), rows),
            "node": params.node_id,
            "states": self.bind_list(s.value for s in CHECKPOINT_STATES),
        }

    @cancel_safe
    async def complete(self, params: CompleteParams) -> set[int]:
        """Apply the ends of executions on ``node_id``; returns the accepted task ids.

        A completion applies only to the row its execution claimed: still owned by ``node_id``
        under the same claim token. Any other (rescued, force-deleted, fenced, claimed again
        since) is left alone, so a completion retried after its first try committed, or sent
        by an execution that lost its task, changes nothing.

        Where the database can (``complete_at_once``), the ends whose outcome is certain for a
        task that still runs as claimed (``CERTAIN_ENDS``) are written first, in one statement
        that checks that it does; the others, and those whose task does not, go through a
        transaction that locks the rows and applies the state rules to them.
        """
        rest = list(params.completions)
        if not rest:
            return set()
        accepted: set[int] = set()
        certain = [c for c in rest if c.event in CERTAIN_ENDS]
        if certain:
            written = await self.complete_at_once(params.node_id, certain)
            if written is not None:
                accepted = written
                rest = [c for c in rest if c.task_id not in written]
        if rest:
            accepted |= await self._complete_locked(params.node_id, rest, params.cleanup_attempts)
        return accepted

    async def complete_at_once(
        self, node_id: int, completions: list[Completion]
    ) -> set[int] | None:
        """Write ``completions`` (of ``CERTAIN_ENDS``) of the tasks that still run as their
        executions claimed them, in one statement outside a transaction, where the database
        can (docs/design.md §15.1); the ids written, or None where it cannot."""
        return None

    @whole
    async def _complete_locked(
        self, node_id: int, completions: list[Completion], cleanup_attempts: int
    ) -> set[int]:
        """Apply ``completions`` in one transaction: their rows locked, the state rules
        applied to each, the outcomes written."""
        by_id = {c.task_id: c for c in completions}
        async with self.write() as conn:
            writes: list[_Write] = []
            for row in await self._lock(conn, list(by_id), owner=node_id):
                c = by_id[row.id]
                if row.token != c.token:
                    continue
                cleanup = c.event in (Event.CLEANUP_FINISHED, Event.CLEANUP_FAILED) or (
                    c.event is Event.NODE_LOST and row.state is State.DELETING
                )
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
                back = give_back(row.state, c.event, outcome, graceful=False)
                lost = c.event is Event.NODE_LOST
                writes.append(
                    _Write(
                        row,
                        outcome,
                        node_id,
                        context=c.context,
                        error=_lost_error(row, outcome) if lost else c.error,
                        delay=c.delay,
                        progress=c.progress,
                        message=c.message,
                        handoff=back.handoff,
                        refund=back.refund,
                    )
                )
            await self._write(conn, writes)
            if any(w.outcome.state in (State.PENDING, State.DELETING) for w in writes):
                await self.notify(conn, "wake")
            return {w.row.id for w in writes}

    @cancel_safe
    @whole
    async def release_claims(self, params: ReleaseClaimsParams) -> int:
        """Hand back tasks ``node_id`` claimed but never ran (``claims``: task id → token):
        a claim that came back after the node's lease ran out, or a row the node found it owns
        without an execution. Each goes back as a hand-off, with its attempt refunded."""
        claims = params.claims
        if not claims:
            return 0
        async with self.write() as conn:
            rows = await self._lock(conn, list(claims), owner=params.node_id)
            mine = [row for row in rows if row.token == claims[row.id]]
            return await self._write_and_wake(conn, self._released(mine, graceful=True))

    def _released(
        self,
        rows: Iterable[_rows.Locked],
        *,
        graceful: bool,
        cleanup_attempts: int | None = None,
    ) -> list[_Write]:
        """The writes that give back ``rows`` their node lets go of: gracefully (a stop, a
        claim never run; nothing used up), or lost with the node (``cleanup_attempts`` then
        bounds the cleanups)."""
        writes: list[_Write] = []
        for row in rows:
            event = release_event(row.state, graceful=graceful)
            if graceful or cleanup_attempts is None:
                can_retry = True
            else:
                limit = cleanup_attempts if row.state is State.DELETING else row.max_attempts
                can_retry = row.attempts < limit
            outcome = apply_event(
                row.state, row.requested, event, has_cleanup=row.has_cleanup, can_retry=can_retry
            )
            if outcome is None:
                continue
            back = give_back(row.state, event, outcome, graceful=graceful)
            error = _lost_error(row, outcome)
            writes.append(
                _Write(row, outcome, None, error=error, handoff=back.handoff, refund=back.refund)
            )
        return writes

    # -- nodes ------------------------------------------------------------------------------

    @cancel_safe
    @whole
    async def register_node(self, params: RegisterParams) -> int:
        bound = {
            "name": params.name,
            "concurrency": params.concurrency,
            "types": _rows.node_types(params.types),
            "heartbeat_interval": params.heartbeat_interval,
            "node_timeout": params.node_timeout,
        }
        async with self.write() as conn:
            return self.inserted_id(await self._run(conn, "register_node", bound))

    @cancel_safe
    @whole
    async def heartbeat(self, node_id: int) -> list[Owned] | None:
        """Renew the node's row and read the tasks it owns; None when the row is gone
        (the node was declared dead: it must fence itself)."""
        async with self.write() as conn:
            if not self.found(await self._run(conn, "heartbeat", {"node": node_id})):
                return None
            return await self._owned(conn, node_id)

    @cancel_safe
    async def owned(self, node_id: int) -> list[Owned]:
        """The tasks a node owns, with pending stop requests (for the stop poll)."""
        async with self.read() as conn:
            return await self._owned(conn, node_id)

    async def _owned(self, conn: AsyncConnection, node_id: int) -> list[Owned]:
        return [_rows.owned(r) for r in await self._run(conn, "owned_tasks", {"node": node_id})]

    async def _release_nodes(
        self,
        conn: AsyncConnection,
        node_ids: Sequence[int],
        *,
        graceful: bool,
        cleanup_attempts: int,
        orphans: bool = False,
    ) -> int:
        """Give back the tasks of ``node_ids`` (and with ``orphans`` every owned task whose node
        row is gone), then remove the nodes' rows."""
        nodes = self.bind_list(node_ids)
        result = await self._run(conn, "lock_tasks_of_nodes", {"nodes": nodes, "orphans": orphans})
        rows = [_rows.Locked.from_row(r) for r in result]
        released = self._released(rows, graceful=graceful, cleanup_attempts=cleanup_attempts)
        count = await self._write_and_wake(conn, released)
        if node_ids:
            await self._run(conn, "delete_nodes", {"nodes": nodes})
        return count

    @cancel_safe
    @whole
    async def deregister(self, params: DeregisterParams) -> None:
        """Remove the node's row at the end of a graceful stop. Whatever it still owns (a task
        claimed while it began to stop, or cancelled by ``stop(timeout=…)``) is handed back
        like any task the shutdown stopped, without using up an attempt."""
        async with self.write() as conn:
            await self._release_nodes(
                conn, [params.node_id], graceful=True, cleanup_attempts=params.cleanup_attempts
            )

    @cancel_safe
    @whole
    async def rescue(self, params: RescueParams) -> int:
        """Declare dead every other node whose heartbeat is older than its own ``node_timeout``
        (database clock): release its tasks (NODE_LOST) and remove its row. Tasks owned by a
        node whose row is gone are released too. ``node_id`` — the rescuer — never rescues
        itself. Returns the number of tasks released."""
        async with self.write() as conn:
            result = await self._run(conn, "dead_nodes", {"node": params.node_id})
            dead = [r.id for r in result]
            return await self._release_nodes(
                conn, dead, graceful=False, cleanup_attempts=params.cleanup_attempts, orphans=True
            )

    @cancel_safe
    async def get_nodes(self) -> list[NodeInfo]:
        async with self.read() as conn:
            return [_rows.node(r) for r in await self._run(conn, "get_nodes")]

    # -- groups -----------------------------------------------------------------------------

    @cancel_safe
    @whole
    async def set_group(self, params: SetGroupParams) -> Group:
        """Create a group's row, or update its settings (what ``params`` leaves None stays)."""
        async with self.write() as conn:
            group = await self._set_group(conn, params)
            if not group.paused:  # resumed, or limits changed: there may be room now
                await self.notify(conn, "wake")
        return group

    async def _set_group(self, conn: AsyncConnection, params: SetGroupParams) -> Group:
        name = params.name
        for _ in range(GROUP_TRIES):
            await self._run(conn, "create_group", {"name": name})
            row = (await self._run(conn, "lock_group_settings", {"name": name})).first()
            if row is not None:
                break
            # Between the two, another node set the group back to the defaults, which removes
            # its row (docs/design.md §4.5): create it again.
        else:
            raise DatabaseError(
                f"group {name!r} kept being removed while it was set", transient=True
            )
        paused = bool(row.paused) if params.paused is None else params.paused
        limits = params.limits or Limits(row.max_running, row.max_running_per_user)
        group = Group(name, paused, limits.max_running, limits.max_running_per_user)
        if not paused and limits.max_running is None and limits.max_running_per_user is None:
            # A group row exists only for settings (docs/design.md §4.5).
            await self._run(conn, "delete_group", {"name": name})
        else:
            await self._run(
                conn,
                "update_group",
                {
                    "name": name,
                    "paused": group.paused,
                    "max_running": group.max_running,
                    "max_running_per_user": group.max_running_per_user,
                },
            )
        return group

    @cancel_safe
    async def get_groups(self) -> list[Group]:
        """Every group that has tasks or settings, with its settings (defaults when unset)."""
        async with self.read() as conn:
            return [_rows.group(r) for r in await self._run(conn, "get_groups")]

    @cancel_safe
    @whole
    async def pause_group(self, params: PauseGroupParams) -> list[tuple[int, int]]:
        """Pause the group; with ``stop_running`` also pause every task of it that runs now, in
        the same transaction (all or nothing). Returns the stopped tasks with their owners."""
        async with self.write() as conn:
            await self._set_group(conn, SetGroupParams(params.group, paused=True))
            if not params.stop_running:
                return []
            result = await self._run(
                conn,
                "lock_running_in_group",
                {"group": params.group, "state": State.RUNNING.value},
            )
            writes = []
            for row in (_rows.Locked.from_row(r) for r in result):
                outcome = apply_operation(
                    row.state, row.requested, Operation.PAUSE, has_cleanup=row.has_cleanup
                )
                writes.append(_Write(row, outcome, row.node_id))
            await self._write(conn, writes)
            return await self._tell_owners(conn, writes)

    async def _tell_owners(
        self, conn: AsyncConnection, writes: Iterable[_Write]
    ) -> list[tuple[int, int]]:
        """Send ``stop:<node>`` to the owners of the rows whose outcome stops them; returns
        those rows as (task id, owner)."""
        stopped = [
            (w.row.id, w.row.node_id)
            for w in writes
            if w.outcome.stop and w.row.node_id is not None
        ]
        for owner in sorted({owner for _, owner in stopped}):
            await self.notify(conn, f"stop:{owner}")
        return stopped

    # -- retention and bulk deletes ---------------------------------------------------------

    async def try_prune_lock(self, conn: AsyncConnection) -> bool:
        """Whether this transaction may prune: no other node prunes now. The write lock makes
        pruners take turns where the database has one; a database without one overrides this
        (docs/design.md §4.5)."""
        return True

    async def release_prune_lock(self, conn: AsyncConnection) -> None:
        """After a round that ``try_prune_lock`` allowed: release a lock that the end of the
        transaction does not (a session's named lock on MySQL)."""

    @cancel_safe
    async def prune(self, params: PruneParams) -> PruneResult:
        """One round of retention: remove the FINISHED and FAILED tasks that ended longer ago
        than their retention (``delete, force``: removed, no cleanup handler), up to
        ``params.limit`` of each, in one transaction, unless another node prunes now."""
        ages = [
            (state, age)
            for state, age in (
                (State.FINISHED, params.finished_after),
                (State.FAILED, params.failed_after),
            )
            if age is not None
        ]
        removed, more = 0, False
        async with self.write() as conn:
            if not await self.try_prune_lock(conn):
                return PruneResult(0, more=False, busy=True)
            try:
                for state, age in ages:
                    assert PRUNED[state].state is None  # removed, by the state table
                    result = await self._run(
                        conn, "prune", {"state": state.value, "age": age, "limit": params.limit}
                    )
                    removed += result.rowcount
                    more = more or result.rowcount >= params.limit
            finally:
                await self.release_prune_lock(conn)
        return PruneResult(removed, more=more)

    @cancel_safe
    @whole
    async def delete_matching(self, params: DeleteParams) -> DeleteResult:
        """The delete operation (``force`` as given) applied to one batch of the tasks that
        match, in id order after ``params.after``: each row locked, decided by the state
        table and written like ``operate`` writes it (docs/design.md §4.5, §5)."""
        c = self._tasks.c
        where = self._where(params.filter)
        where.append(c.id > params.after)
        async with self.write() as conn:
            now = time_from_db((await self._run(conn, "db_now")).scalar_one())
            if params.older_than is not None:
                where.append(c.updated_at < now - timedelta(seconds=params.older_than))
            watched = sa.func.coalesce(c.watched_until > now, False).label("watched")
            query = (
                sa.select(*(c[name] for name in _rows.LOCKED_FIELDS), watched)
                .where(*where)
                .order_by(c.id)
                .limit(params.limit)
                .with_for_update()
            )
            rows = [_rows.Locked.from_row(r) for r in await self._execute(conn, query)]
            writes = []
            for row in rows:
                outcome = apply_operation(
                    row.state,
                    row.requested,
                    Operation.DELETE,
                    has_cleanup=row.has_cleanup,
                    force=params.force,
                    task_id=row.id,
                )
                if outcome.changed:
                    writes.append(_Write(row, outcome, row.node_id))
            await self._write(conn, writes)
            if any(w.outcome.state is State.DELETING for w in writes):
                await self.notify(conn, "wake")
            stopped = await self._tell_owners(conn, writes)
        last = rows[-1].id if len(rows) >= params.limit else None
        return DeleteResult(len(writes), stopped, last)

    # -- task types -------------------------------------------------------------------------

    @cancel_safe
    @whole
    async def register_task_types(self, params: RegisterTypesParams) -> None:
        """Store the options of the task types a worker runs (docs/design.md §4.6)."""
        if not params.types:
            return
        rows = [
            (t.name, t.max_attempts, t.has_cleanup)
            for t in sorted(params.types, key=lambda t: t.name)
        ]
        async with self.write() as conn:
            await self._run(
                conn,
                "register_task_types",
                self.bind_rows(("names", "max_attempts", "has_cleanup"), rows),
            )

    @cancel_safe
    async def get_task_types(self, params: TaskTypesQuery) -> list[StoredTaskType]:
        names = params.names
        query = {"all": names is None, "names": self.bind_list(names or ())}
        async with self.read() as conn:
            return [_rows.task_type(r) for r in await self._run(conn, "get_task_types", query)]

    # -- periodic tasks (docs/design.md §17) ------------------------------------------------

    @cancel_safe
    @whole
    async def put_schedule(self, params: PutScheduleParams) -> Schedule:
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
            return _rows.schedule((await self._run(conn, "put_schedule", values)).one())

    @cancel_safe
    @whole
    async def delete_schedule(self, params: UnscheduleParams) -> bool:
        async with self.write() as conn:
            return self.found(await self._run(conn, "delete_schedule", {"name": params.name}))

    @cancel_safe
    async def get_schedules(self) -> list[Schedule]:
        async with self.read() as conn:
            return [_rows.schedule(r) for r in await self._run(conn, "get_schedules")]

    @cancel_safe
    @whole
    async def tick(self, params: TickParams) -> TickResult:
        """Enqueue the due ticks of the schedules of ``params.types``: for each, in one
        transaction, the task of its latest due tick (due at the tick), and its next tick
        advanced by compare-and-set on the one it was read with. A schedule another node is
        enqueueing is skipped (PostgreSQL) or found advanced (SQLite, after the write lock)."""
        kinds = {t.name: t for t in params.types}
        if not kinds:
            return TickResult([], [], None)
        names = self.bind_list(kinds)
        fired: list[Fired] = []
        broken: list[tuple[str, str]] = []
        async with self.write() as conn:
            result = await self._run(
                conn, "lock_due_schedules", {"types": names, "limit": params.limit}
            )
            for row in result.all():
                now = time_from_db(row.now)
                due = time_from_db(row.next_tick)
                advance = {"name": row.name, "expected": row.next_tick}
                try:
                    planned = plan(Period(row.cron, row.every, row.timezone), due, now)
                except Exception as exc:  # a stored period this node cannot read: report it
                    broken.append((row.name, f"{type(exc).__name__}: {exc}"))
                    advance |= {
                        "next_tick": self._db_time(now + BROKEN_SCHEDULE_DELAY),
                        "tick": row.last_tick,
                        "task_id": row.last_task_id,
                    }
                    await self._run(conn, "advance_schedule", advance)
                    continue
                kind = kinds[row.type]
                new = NewTask(
                    type=row.type,
                    context=row.context,
                    user=row.user_name,
                    group=row.group_name,
                    priority=row.priority,
                    max_attempts=kind.max_attempts
                    if row.max_attempts is None
                    else row.max_attempts,
                    has_cleanup=kind.has_cleanup,
                    state=State.PENDING,
                    run_at=planned.tick,
                )
                [task_id] = await self._insert(conn, [new], wake=True)
                advance |= {
                    "next_tick": self._db_time(planned.following),
                    "tick": self._db_time(planned.tick),
                    "task_id": task_id,
                }
                if not self.found(await self._run(conn, "advance_schedule", advance)):
                    # Advanced meanwhile by another node: its task stands, ours goes.
                    await self._run(conn, "delete_tasks", {"ids": self.bind_list([task_id])})
                    continue
                fired.append(Fired(row.name, planned.tick, task_id, planned.skipped))
            due_in = (await self._run(conn, "next_schedule_due", {"types": names})).scalar()
        next_due = None if due_in is None else max(float(due_in), 0.0)
        return TickResult(fired, broken, next_due)

    # -- waiting and watching (docs/design.md §18) ------------------------------------------

    @cancel_safe
    @whole
    async def watch_tasks(self, params: WatchParams) -> None:
        if not self.supports_notify or not params.ids:
            return  # watchers poll: nothing to mark, and no write lock to take
        values = {"ids": self.bind_list(params.ids), "seconds": params.seconds}
        async with self.write() as conn:
            await self._run(conn, "watch_tasks", values)

    # -- statistics -------------------------------------------------------------------------

    @cancel_safe
    async def queue_stats(self, params: StatsParams) -> QueueStats:
        async with self.read() as conn:
            now = time_from_db((await self._run(conn, "db_now")).scalar_one())
            counts = {
                (r.group_name, State(r.state)): int(r.tasks)
                for r in await self._run(conn, "stats_by_group_and_state")
            }
            running = {int(r.node_id): int(r.tasks) for r in await self._run(conn, "stats_running")}
            ended: list[EndedCount] = []
            for window in params.windows:
                since = self._db_time(now - timedelta(seconds=window))
                by_state = {
                    State(r.state): int(r.tasks)
                    for r in await self._run(conn, "stats_ended", {"since": since})
                }
                ended.append(
                    EndedCount(
                        window, by_state.get(State.FINISHED, 0), by_state.get(State.FAILED, 0)
                    )
                )
        return QueueStats(now, counts, running, ended)
