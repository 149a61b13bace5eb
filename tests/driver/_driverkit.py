"""Helpers of the driver conformance suite: new tasks, nodes, and tasks brought into each
starting situation of the state table through the driver's own operations.

Everything here goes through the ``Driver`` protocol, except ``Peek``, which reads the one or
two columns the protocol does not return (``token``, ``handoff``) with a raw SELECT.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from _db import DbTarget
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioasync_tasks import Fifo, Operation, State, StopRequest, Task, TaskNotFound
from aioasync_tasks._backends import backend_for
from aioasync_tasks._backends._driver import Completion, Driver, NewTask
from aioasync_tasks._schema import TASKS
from aioasync_tasks._states import Event

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
async def open_driver(db: DbTarget, *, migrate: bool = True) -> AsyncIterator[Driver]:
    """The driver ``backend_for`` gives for the test database, migrated unless told not to;
    its engine is disposed of afterwards."""
    engine = create_async_engine(db.url)
    try:
        driver: Driver = backend_for(engine, db.schema)
        if migrate:
            await driver.migrate()
        yield driver
    finally:
        await engine.dispose()


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
    )


async def insert(driver: Driver, task: NewTask | None = None, **fields: Any) -> int:
    """Insert one task (``task``, or ``new_task(**fields)``); its id."""
    [task_id] = await driver.insert_many([task if task is not None else new_task(**fields)])
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
        name,
        4,
        types,
        heartbeat_interval=heartbeat_interval,
        node_timeout=node_timeout,
    )


async def find(driver: Driver, task_id: int) -> Task | None:
    """The task, or None when its row is gone."""
    try:
        return await driver.get_task(task_id)
    except TaskNotFound:
        return None


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
class Made:
    """A task brought into a starting situation."""

    id: int
    type: str
    token: int | None
    """The token of the execution that owns the task now (None: not owned)."""


async def claim_one(driver: Driver, node_id: int, type: str) -> tuple[int, int]:
    """Claim the one PENDING task of ``type``; its id and token."""
    result = await driver.claim(node_id, [type], 1, FIFO)
    [claimed] = result.claimed
    return claimed.id, claimed.token


async def make(
    driver: Driver,
    node_id: int,
    start: Start,
    *,
    has_cleanup: bool = False,
    max_attempts: int = 1,
    group: str = "default",
    user: str = "alice",
) -> Made:
    """A task of a type of its own in ``start``, reached through driver operations only (the
    owner, where there is one, is ``node_id``); after one claim, or one cleanup claim, at most
    (two claims for FAILED with several attempts)."""
    type = unique_type()
    initial = State.INIT if start is Start.INIT else State.PENDING
    task_id = await insert(
        driver,
        type=type,
        has_cleanup=has_cleanup,
        max_attempts=max_attempts,
        state=initial,
        group=group,
        user=user,
    )
    token: int | None = None
    if start in (Start.INIT, Start.PENDING):
        pass
    elif start is Start.PAUSED:
        await driver.operate(task_id, Operation.PAUSE)
    elif start in (Start.DELETING, Start.CLEANING):
        await driver.operate(task_id, Operation.DELETE)
        if start is Start.CLEANING:
            [claimed] = await driver.claim_cleanups(node_id, [type], 1)
            token = claimed.token
    else:
        _, token = await claim_one(driver, node_id, type)
        if start is Start.CANCELING_PAUSE:
            await driver.operate(task_id, Operation.PAUSE)
        elif start is Start.CANCELING_DELETE:
            await driver.operate(task_id, Operation.DELETE)
        elif start is Start.FINISHED:
            await complete_one(driver, node_id, task_id, token, Event.FINISHED)
            token = None
        elif start is Start.FAILED:
            while True:
                await complete_one(driver, node_id, task_id, token, Event.FAILED)
                if (await driver.get_task(task_id)).state is State.FAILED:
                    break
                _, token = await claim_one(driver, node_id, type)
            token = None
    task = await driver.get_task(task_id)
    assert (task.state, task.requested, task.node is not None) == start.value, (start, task)
    return Made(task_id, type, token)


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
        node_id, [Completion(task_id, token, event, **fields)], cleanup_attempts=cleanup_attempts
    )


class Peek:
    """Reads columns the driver does not return, behind its back (a raw SELECT)."""

    def __init__(self, db: DbTarget) -> None:
        self.engine: AsyncEngine = create_async_engine(db.url, connect_args=db.connect_args())

    async def column(self, task_id: int, column: str) -> Any:
        assert column.isidentifier()
        async with self.engine.connect() as conn:
            result = await conn.execute(
                text(f"SELECT {column} FROM {TASKS} WHERE id = :id"), {"id": task_id}
            )
            return result.scalar_one()

    async def token(self, task_id: int) -> int:
        return int(await self.column(task_id, "token"))

    async def handoff(self, task_id: int) -> bool:
        return bool(await self.column(task_id, "handoff"))

    async def close(self) -> None:
        await self.engine.dispose()
