"""Helpers of the driver conformance suite: new tasks, nodes, and tasks brought into each
starting situation of the state table through the driver's own operations.

Everything here goes through the ``Driver`` protocol, except ``Peek``, which reads the two
columns the protocol does not return (``token``, ``handoff``) with a raw SELECT, and runs the
one raw write of the suite (a node row removed while the node still owns tasks).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from _db import DbTarget
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Fifo, Operation, State, StopRequest, Task
from aioasync_tasks._backends import driver_for
from aioasync_tasks._backends._driver import (
    ClaimParams,
    CleanupClaimParams,
    CompleteParams,
    Completion,
    Driver,
    InsertParams,
    NewTask,
    OperateParams,
    RegisterParams,
    TaskFilter,
)
from aioasync_tasks._schema import TASKS
from aioasync_tasks._states import Event, Outcome, apply_event
from aioasync_tasks._urls import engine_from_url
from aioasync_tasks._validation import OnConflict

FAR = 3600.0
"""Node timings that never run out during a test (nothing here runs on its own anyway)."""
FIFO = Fifo()
CLEANUP_ATTEMPTS = 3
"""The ``cleanup_attempts`` the suite passes where the test does not care about it."""

_types = itertools.count(1)


def unique_type() -> str:
    """A task type no other task of the test has: a claim of it takes exactly that task."""
    return f"type{next(_types)}"


@asynccontextmanager
async def open_engine(db: DbTarget) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database as a node makes it from the URL (no search path: the
    driver must name its schema itself), disposed of afterwards."""
    engine = engine_from_url(db.url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def new_driver(engine: AsyncEngine, db: DbTarget, *, migrate: bool = True) -> Driver:
    """The driver ``driver_for`` gives for the engine, migrated unless told not to."""
    driver: Driver = driver_for(engine, db.schema)
    if migrate:
        await driver.migrate()
    return driver


def new_task(
    type: str | None = None,
    *,
    user: str = "alice",
    group: str = "default",
    context: str = "{}",
    priority: int = 0,
    max_attempts: int = 1,
    has_cleanup: bool = False,
    state: State = State.PENDING,
    run_at: datetime | None = None,
    unique_key: str | None = None,
    on_conflict: OnConflict = "error",
) -> NewTask:
    return NewTask(
        type=type if type is not None else unique_type(),
        context=context,
        user=user,
        group=group,
        priority=priority,
        max_attempts=max_attempts,
        has_cleanup=has_cleanup,
        state=state,
        run_at=run_at,
        unique_key=unique_key,
        on_conflict=on_conflict,
    )


async def insert(driver: Driver, task: NewTask | None = None, **fields: Any) -> int:
    """Insert one task (``task``, or ``new_task(**fields)``); its id."""
    [task_id] = await driver.insert_many(
        InsertParams([task if task is not None else new_task(**fields)])
    )
    return task_id


async def register(
    driver: Driver,
    name: str = "node",
    *,
    types: tuple[str, ...] = (),
    node_timeout: float = FAR,
    heartbeat_interval: float = FAR,
) -> int:
    return await driver.register_node(
        RegisterParams(
            name,
            4,
            types,
            heartbeat_interval=heartbeat_interval,
            node_timeout=node_timeout,
        )
    )


class Start(enum.Enum):
    """A starting situation of a task: a cell row of the state table, plus whether a node owns
    the task (a DELETING task waits for its cleanup, or its cleanup runs)."""

    INIT = (State.INIT, None, False)
    PENDING = (State.PENDING, None, False)
    RUNNING = (State.RUNNING, None, True)
    CANCELING_PAUSE = (State.CANCELING, StopRequest.PAUSE, True)
    CANCELING_DELETE = (State.CANCELING, StopRequest.DELETE, True)
    PAUSED = (State.PAUSED, None, False)
    FINISHED = (State.FINISHED, None, False)
    FAILED = (State.FAILED, None, False)
    DELETING = (State.DELETING, None, False)
    CLEANING = (State.DELETING, None, True)
    """DELETING, with its cleanup claimed by a node."""

    @property
    def state(self) -> State:
        state: State = self.value[0]
        return state

    @property
    def requested(self) -> StopRequest | None:
        requested: StopRequest | None = self.value[1]
        return requested

    @property
    def owned(self) -> bool:
        owned: bool = self.value[2]
        return owned

    @property
    def needs_cleanup(self) -> bool:
        """Only a task whose type has a cleanup handler can be DELETING."""
        return self.state is State.DELETING


OWNED_STARTS = [s for s in Start if s.owned]


def cleanup_variants(start: Start) -> tuple[bool, ...]:
    """The ``has_cleanup`` values a task can have in ``start``."""
    return (True,) if start.needs_cleanup else (False, True)


@dataclass(frozen=True)
class Want:
    """A task to bring into ``start``."""

    start: Start
    has_cleanup: bool = False
    max_attempts: int = 1
    group: str = "default"
    user: str = "alice"
    unique_key: str | None = None


@dataclass(frozen=True)
class Made:
    """A task brought into a starting situation."""

    id: int
    type: str
    want: Want
    token: int | None
    """The token of the execution that owns the task now (None: not owned)."""

    @property
    def start(self) -> Start:
        return self.want.start


async def claim_one(driver: Driver, node_id: int, type: str) -> tuple[int, int]:
    """Claim the one PENDING task of ``type``; its id and token."""
    result = await driver.claim(ClaimParams(node_id, [type], 1, FIFO))
    [claimed] = result.claimed
    return claimed.id, claimed.token


_CLAIMED = (
    Start.RUNNING,
    Start.CANCELING_PAUSE,
    Start.CANCELING_DELETE,
    Start.FINISHED,
    Start.FAILED,
)
"""The situations reached through a claim."""


async def make_many(driver: Driver, node_id: int, wants: Sequence[Want]) -> list[Made]:
    """Tasks, each of a type of its own, in the situations ``wants`` asks for, reached through
    driver operations only, in few round trips (the owner, where there is one, is
    ``node_id``): insert; pause, delete; claim (or claim the cleanup); pause, delete, finish or
    fail. A FAILED task with several attempts fails, and is claimed again, until it is FAILED.
    Each owned task has been claimed once."""
    types = [unique_type() for _ in wants]
    ids = await driver.insert_many(
        InsertParams(
            [
                new_task(
                    type,
                    has_cleanup=w.has_cleanup,
                    max_attempts=w.max_attempts,
                    state=State.INIT if w.start is Start.INIT else State.PENDING,
                    group=w.group,
                    user=w.user,
                    unique_key=w.unique_key,
                )
                for type, w in zip(types, wants, strict=True)
            ]
        )
    )
    by_start: dict[Start, list[int]] = {}
    for task_id, w in zip(ids, wants, strict=True):
        by_start.setdefault(w.start, []).append(task_id)
    type_of = dict(zip(ids, types, strict=True))
    tokens: dict[int, int] = {}

    def of(*starts: Start) -> list[int]:
        return [task_id for start in starts for task_id in by_start.get(start, [])]

    async def operate(operation: Operation, *starts: Start) -> None:
        for task_id in of(*starts):
            await driver.operate(OperateParams(task_id, operation))

    async def claim(task_ids: list[int]) -> None:
        if task_ids:
            result = await driver.claim(
                ClaimParams(node_id, [type_of[i] for i in task_ids], len(task_ids), FIFO)
            )
            assert sorted(c.id for c in result.claimed) == sorted(task_ids), result
            tokens.update((c.id, c.token) for c in result.claimed)

    async def end(task_ids: list[int], event: Event) -> None:
        completions = [Completion(i, tokens.pop(i), event) for i in task_ids]
        if completions:
            accepted = await driver.complete(
                CompleteParams(node_id, completions, cleanup_attempts=1)
            )
            assert accepted == set(task_ids), (event, accepted)

    await operate(Operation.PAUSE, Start.PAUSED)
    await operate(Operation.DELETE, Start.DELETING, Start.CLEANING)
    cleaning = of(Start.CLEANING)
    if cleaning:
        claimed = await driver.claim_cleanups(
            CleanupClaimParams(node_id, [type_of[i] for i in cleaning], len(cleaning))
        )
        assert sorted(c.id for c in claimed) == sorted(cleaning), claimed
        tokens.update((c.id, c.token) for c in claimed)
    await claim(of(*_CLAIMED))
    await operate(Operation.PAUSE, Start.CANCELING_PAUSE)
    await operate(Operation.DELETE, Start.CANCELING_DELETE)
    await end(of(Start.FINISHED), Event.FINISHED)
    failing = of(Start.FAILED)
    while failing:
        await end(failing, Event.FAILED)  # no back-off: a retry is due at once
        tasks = await snapshot(driver, failing)
        failing = [i for i in failing if tasks[i].state is not State.FAILED]
        await claim(failing)

    tasks = await snapshot(driver, ids)
    for task_id, w in zip(ids, wants, strict=True):
        task = tasks[task_id]
        reached = (task.state, task.requested, task.node is not None)
        assert reached == w.start.value, (w, task)
    return [
        Made(task_id, type_of[task_id], w, tokens.get(task_id))
        for task_id, w in zip(ids, wants, strict=True)
    ]


async def make(driver: Driver, node_id: int, start: Start, **fields: Any) -> Made:
    """One task in ``start`` (see ``make_many``)."""
    [made] = await make_many(driver, node_id, [Want(start, **fields)])
    return made


async def snapshot(driver: Driver, ids: Iterable[int] | None = None) -> dict[int, Task]:
    """The tasks (of ``ids``, or all), by id, in one read; a removed task is absent."""
    wanted = None if ids is None else set(ids)
    tasks = await driver.get_tasks(TaskFilter(limit=10_000))
    return {t.id: t for t in tasks if wanted is None or t.id in wanted}


def every_start(**fields: Any) -> list[Want]:
    """Every starting situation, with each ``has_cleanup`` it can have."""
    return [
        Want(start, has_cleanup=has_cleanup, **fields)
        for start in Start
        for has_cleanup in cleanup_variants(start)
    ]


def describe(want: Want) -> str:
    return want.start.name + (" with cleanup" if want.has_cleanup else "")


async def complete_one(
    driver: Driver,
    node_id: int,
    task_id: int,
    token: int,
    event: Event,
    *,
    cleanup_attempts: int = CLEANUP_ATTEMPTS,
    **fields: Any,
) -> set[int]:
    return await driver.complete(
        CompleteParams(
            node_id,
            [Completion(task_id, token, event, **fields)],
            cleanup_attempts=cleanup_attempts,
        )
    )


class Peek:
    """Reads columns the driver does not return, behind its back (a raw SELECT), on the
    driver's own engine."""

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        self.engine = engine
        self.schema = schema

    def table(self, name: str) -> str:
        """``name``, in the test's schema where there is one."""
        if self.schema is None:
            return name
        return f'"{self.schema}".{name}'

    async def execute(self, statement: str, params: Mapping[str, Any] | None = None) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(statement), dict(params or {}))

    async def columns(self, column: str) -> dict[int, Any]:
        """``column`` of every task, by id."""
        assert column.isidentifier()
        async with self.engine.connect() as conn:
            result = await conn.execute(text(f"SELECT id, {column} FROM {self.table(TASKS)}"))
            return {row[0]: row[1] for row in result}

    async def age(self, ids: list[int], column: str, hours: int) -> None:
        """Move a time column of tasks ``hours`` into the past."""
        assert column in ("done_at", "updated_at")
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            change = f"{column} - {hours * 3600}"  # epoch seconds
        elif dialect in ("mysql", "mariadb"):
            change = f"{column} - INTERVAL {hours} HOUR"
        else:
            change = f"{column} - interval '{hours} hours'"
        for task_id in ids:
            await self.execute(
                f"UPDATE {self.table(TASKS)} SET {column} = {change} WHERE id = :id",
                {"id": task_id},
            )

    async def tokens(self) -> dict[int, int]:
        return {k: int(v) for k, v in (await self.columns("token")).items()}

    async def handoffs(self) -> dict[int, bool]:
        return {k: bool(v) for k, v in (await self.columns("handoff")).items()}


@dataclass
class Problems:
    """Disagreements with the state table, collected over the cells of one test and reported
    together (one line per cell)."""

    found: list[str] = field(default_factory=list)

    def check(self, ok: bool, cell: str, what: str) -> None:
        if not ok:
            self.found.append(f"{cell}: {what}")

    def assert_none(self) -> None:
        assert not self.found, "the driver disagrees with the state table:\n" + "\n".join(
            self.found
        )


def view(task: Task | None) -> dict[str, Any] | None:
    """What a transition decides of a row (None: the row is gone)."""
    if task is None:
        return None
    return {
        "state": task.state,
        "requested": task.requested,
        "node": task.node,
        "attempts": task.attempts,
        "group": task.group,
        "context": task.context,
    }


def expected_view(
    before: Task,
    outcome: Outcome,
    *,
    owner: int | None,
    refund: bool = False,
    group: str | None = None,
    context: str | None = None,
) -> dict[str, Any] | None:
    """``view`` of the row after ``outcome`` (``_states.Outcome``): ``owner`` keeps it if the
    outcome is owned; ``refund`` gives back the attempt of an execution stopped on request."""
    if outcome.state is None:
        return None
    attempts = 0 if outcome.reset_attempts else before.attempts - (1 if refund else 0)
    return {
        "state": outcome.state,
        "requested": outcome.requested,
        "node": owner if outcome.owned else None,
        "attempts": attempts,
        "group": group if group is not None else before.group,
        "context": context if context is not None else before.context,
    }


def run_at_problem(
    before: Task, after: Task | None, outcome: Outcome, *, delay: float = 0.0
) -> str | None:
    """What is wrong with ``after.run_at``, or None: a retry is due ``delay`` seconds after the
    write; a task that has just become DELETING is due at once (its cleanup may run now); any
    other keeps its ``run_at``."""
    if after is None:
        return None
    if outcome.retry:
        wanted = after.updated_at + timedelta(seconds=delay)
        if abs(after.run_at - wanted) > timedelta(seconds=1):
            return f"a retry should be due {delay} s after the write, run_at {after.run_at}"
        return None
    if after.state is State.DELETING and before.state is not State.DELETING:
        if after.run_at > after.updated_at:
            return f"a new DELETING task should be due at once, run_at {after.run_at}"
        return None
    if after.run_at != before.run_at:
        return f"run_at should be kept: {before.run_at} -> {after.run_at}"
    return None


def owned_cells(*, excluding: Iterable[tuple[Start, bool]] = (), **fields: Any) -> list[Want]:
    """Every owned situation, with each ``has_cleanup`` it can have, but those ``excluding``."""
    left_out = set(excluding)
    return [
        Want(start, has_cleanup=has_cleanup, **fields)
        for start in OWNED_STARTS
        for has_cleanup in cleanup_variants(start)
        if (start, has_cleanup) not in left_out
    ]


def given_back_problems(
    what: str,
    made: Sequence[Made],
    before: Mapping[int, Task],
    after: Mapping[int, Task],
    handoffs: Mapping[int, bool],
) -> Problems:
    """Check tasks given back unrun or stopped by their node (``release_claims``, or
    ``deregister`` at a graceful stop): as a stopped execution (STOPPED; a cleanup: NODE_LOST,
    which puts it back for any node) with an attempt left whatever the count, the attempt
    refunded; a task back in PENDING is a hand-off."""
    problems = Problems()
    for m in made:
        cell = f"{what} of {describe(m.want)}"
        event = Event.NODE_LOST if m.start.state is State.DELETING else Event.STOPPED
        expected = apply_event(
            m.start.state,
            m.start.requested,
            event,
            has_cleanup=m.want.has_cleanup,
            can_retry=True,
        )
        assert expected is not None
        old, new = before[m.id], after.get(m.id)
        wanted = expected_view(old, expected, owner=None, refund=True)
        problems.check(view(new) == wanted, cell, f"row {view(new)}, not {wanted}")
        wrong_run_at = run_at_problem(old, new, expected)
        problems.check(wrong_run_at is None, cell, str(wrong_run_at))
        if new is not None:
            handoff = new.state is State.PENDING
            problems.check(handoffs[m.id] == handoff, cell, f"handoff {handoffs[m.id]}")
    return problems
