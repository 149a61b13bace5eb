"""Conformance: creating and querying tasks (``docs/reference.md``, "Creating tasks" and
"Querying"), on both backends.

``get_tasks``/``count_tasks`` filters alone and combined, newest first, paging; ``create_tasks``
in one call; transactional creation in the caller's connection or session (the task exists iff
the caller's transaction commits); the fields of the ``Task`` snapshot.

The expected results are computed here from what the test created, never read back from the
library's own queries.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from _db import DbTarget
from _helpers import LONG_BOUND, RawCapture, make_node, raw_engine, statements, wait_for
from sqlalchemy.ext.asyncio import AsyncSession

from aioasync_tasks import (
    MAX_PAGE_SIZE,
    ConfigurationError,
    Node,
    Report,
    State,
    Task,
    TaskNotFound,
    TaskRegistry,
)


def _registry() -> TaskRegistry:
    registry = TaskRegistry()

    async def quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context=context + "+step")
        yield Report.finished()

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    registry.register_task("alpha", quick)
    registry.register_task("beta", quick, max_attempts=3)
    registry.register_task("gamma", quick, cleanup)
    return registry


REGISTRY = _registry()


# -- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Made:
    id: int
    type: str
    user: str
    group: str
    state: State


USERS = ("alice", "bob", "")
GROUPS = ("default", "math", "io")
TYPES = ("alpha", "beta", "gamma")
STATES = (State.INIT, State.PENDING, State.PAUSED, State.DELETING)


async def _populate(node: Node) -> list[Made]:
    """Tasks in every combination of user, group and type, in various states, on a node that runs
    none of them, so the states stay as made."""
    made: list[Made] = []
    combos = list(itertools.product(USERS, GROUPS, TYPES))
    for index, (user, group, type_) in enumerate(combos):
        state = STATES[index % len(STATES)]
        if state is State.DELETING and type_ != "gamma":
            state = State.PAUSED  # only a type with a cleanup handler stays DELETING
        task_id = await node.create_task(
            type_, f"ctx-{index}", user=user, group=group, auto_run=state is not State.INIT
        )
        if state is State.PAUSED:
            await node.pause_task(task_id)
        elif state is State.DELETING:
            await node.delete_task(task_id)
        made.append(Made(task_id, type_, user, group, state))
    return made


FILTERS: list[dict[str, Any]] = [
    {},
    {"user": "alice"},
    {"user": ""},
    {"user": "nobody"},
    {"group": "math"},
    {"group": "nowhere"},
    {"types": ["beta"]},
    {"types": ["alpha", "gamma"]},
    {"types": ["unregistered"]},
    {"types": []},
    {"states": [State.PENDING]},
    {"states": ["paused", State.DELETING]},
    {"states": [State.RUNNING]},
    {"states": []},
    {"user": "bob", "group": "io"},
    {"user": "alice", "types": ["gamma"], "states": [State.DELETING, State.INIT]},
    {"group": "default", "states": [State.PAUSED]},
    {"user": "", "group": "math", "types": ["alpha", "beta"], "states": ["init", "pending"]},
]


def _matches(task: Made, filters: dict[str, Any]) -> bool:
    if "user" in filters and task.user != filters["user"]:
        return False
    if "group" in filters and task.group != filters["group"]:
        return False
    if "types" in filters and task.type not in filters["types"]:
        return False
    return "states" not in filters or task.state in {State(s) for s in filters["states"]}


@pytest.fixture
async def client(db: DbTarget) -> AsyncIterator[Node]:
    async with make_node(db, REGISTRY, concurrency=0) as node:
        yield node


async def test_get_tasks_and_count_tasks_filters(client: Node) -> None:
    made = await _populate(client)
    everything = await client.get_tasks(limit=MAX_PAGE_SIZE)
    assert [t.id for t in everything] == sorted((m.id for m in made), reverse=True)
    for filters in FILTERS:
        expected = sorted((m.id for m in made if _matches(m, filters)), reverse=True)
        page = await client.get_tasks(**filters, limit=MAX_PAGE_SIZE)
        assert [t.id for t in page] == expected, filters  # newest first
        for task in page:
            assert _matches(Made(task.id, task.type, task.user, task.group, task.state), filters)
        assert await client.count_tasks(**filters) == len(expected), filters
    # Every filter really filters: no combination above returned everything but {}.
    assert await client.count_tasks() == len(made)


async def test_states_filter_takes_enum_members_or_their_values(client: Node) -> None:
    made = await _populate(client)
    paused = sorted((m.id for m in made if m.state is State.PAUSED), reverse=True)
    assert paused
    by_member = await client.get_tasks(states=[State.PAUSED])
    by_value = await client.get_tasks(states=["paused"])
    by_iterable = await client.get_tasks(states=(s for s in [State.PAUSED]))
    assert [t.id for t in by_member] == [t.id for t in by_value] == [t.id for t in by_iterable]
    assert [t.id for t in by_member] == paused


async def test_paging_with_offset_and_limit(client: Node) -> None:
    ids = await client.create_tasks([{"type": "alpha", "context": str(i)} for i in range(23)])
    newest_first = sorted(ids, reverse=True)
    assert [t.id for t in await client.get_tasks()] == newest_first  # default limit 100

    pages: list[int] = []
    for offset in range(0, 30, 7):
        page = await client.get_tasks(offset=offset, limit=7)
        assert len(page) == max(0, min(7, len(ids) - offset))
        pages.extend(t.id for t in page)
    assert pages == newest_first
    assert await client.get_tasks(offset=len(ids)) == []
    assert await client.get_tasks(offset=10_000) == []
    assert [t.id for t in await client.get_tasks(limit=1)] == newest_first[:1]
    assert [t.id for t in await client.get_tasks(limit=MAX_PAGE_SIZE)] == newest_first


async def test_limit_rule_is_one_to_max_page_size(client: Node) -> None:
    """``limit=0`` is an error, never an empty page; the maximum is 1000 (``MAX_PAGE_SIZE``)."""
    await client.create_task("alpha")
    assert MAX_PAGE_SIZE == 1000
    for bad in (0, -1, MAX_PAGE_SIZE + 1, 10**9):
        with pytest.raises(ConfigurationError, match="limit"):
            await client.get_tasks(limit=bad)
    assert len(await client.get_tasks(limit=MAX_PAGE_SIZE)) == 1
    with pytest.raises(ConfigurationError, match="offset"):
        await client.get_tasks(offset=-1)


# -- creating ---------------------------------------------------------------------------------


async def test_create_tasks_returns_ids_in_input_order_in_one_call(
    db: DbTarget, client: Node
) -> None:
    items: list[dict[str, Any]] = [
        {"type": "beta", "context": "first", "user": "u1", "group": "g1", "priority": 3},
        {"type": "alpha", "context": "second", "user": "u2", "auto_run": False},
        {"type": "gamma", "context": "third", "group": "g3", "max_attempts": 5},
        {"type": "alpha"},
        {"type": "beta", "context": "fifth", "priority": -2},
    ]
    with statements(client, begins=True) as seen, RawCapture() as raw:
        ids = await client.create_tasks(items)
    assert len(ids) == len(set(ids)) == len(items)
    assert ids == sorted(ids)  # created in this order, so numbered in this order
    inserts = [s for s in seen if s.upper().startswith("INSERT")]
    if db.is_postgres:
        # One statement, atomic by itself (all of them or none), outside any transaction:
        # one round trip, with the wake-up in it.
        assert seen == []
        assert [sql.split()[0] for sql, _ in raw.statements] == ["WITH"]
        assert raw.names == {"insert_tasks_and_wake"}
    else:
        assert seen.count("BEGIN") == 1  # one transaction: all of them or none
        assert inserts  # SQLite has no round trips: one transaction is the unit

    for task_id, item in zip(ids, items, strict=True):
        task = await client.get_task(task_id)
        assert task.type == item["type"]
        assert task.context == item.get("context", "")
        assert task.user == item.get("user", "")
        assert task.group == item.get("group", "default")
        assert task.priority == item.get("priority", 0)
        assert task.state is (State.PENDING if item.get("auto_run", True) else State.INIT)
        expected_attempts = item.get("max_attempts", 3 if item["type"] == "beta" else 1)
        assert task.max_attempts == expected_attempts
    assert await client.create_tasks([]) == []
    assert await client.count_tasks() == len(items)


async def test_create_task_in_callers_connection(db: DbTarget, client: Node) -> None:
    """``connection=``: the task is part of the caller's transaction (transactional outbox)."""
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            trans = await conn.begin()
            rolled_back = await client.create_task("alpha", "rolled back", connection=conn)
            rolled_back_too = await client.create_tasks(
                [{"type": "alpha"}, {"type": "beta", "auto_run": False}], connection=conn
            )
            await trans.rollback()
        assert await client.count_tasks() == 0
        for task_id in (rolled_back, *rolled_back_too):
            with pytest.raises(TaskNotFound):
                await client.get_task(task_id)

        async with engine.connect() as conn:
            trans = await conn.begin()
            committed = await client.create_task("alpha", "committed", connection=conn)
            # Not visible to anyone else before the caller commits.
            assert await client.count_tasks() == 0
            await trans.commit()
        task = await client.get_task(committed)
        assert (task.context, task.state) == ("committed", State.PENDING)
        assert await client.count_tasks() == 1

        async with engine.begin() as conn:
            many = await client.create_tasks(
                [{"type": "alpha", "context": "a"}, {"type": "beta", "context": "b"}],
                connection=conn,
            )
        assert [(await client.get_task(i)).context for i in many] == ["a", "b"]
    finally:
        await engine.dispose()


async def test_create_task_in_callers_session(db: DbTarget, client: Node) -> None:
    """``session=``: the same, through an ORM ``AsyncSession``."""
    engine = raw_engine(db)
    try:
        async with AsyncSession(engine) as session:
            await session.begin()
            rolled_back = await client.create_task("alpha", "rolled back", session=session)
            await session.rollback()
        with pytest.raises(TaskNotFound):
            await client.get_task(rolled_back)
        assert await client.count_tasks() == 0

        async with AsyncSession(engine) as session, session.begin():
            committed = await client.create_task("gamma", "committed", session=session)
        assert (await client.get_task(committed)).context == "committed"
        assert await client.count_tasks() == 1
    finally:
        await engine.dispose()


async def test_task_created_in_a_committed_transaction_runs(db: DbTarget) -> None:
    """After the caller commits, a worker picks the task up (woken or by polling)."""
    async with make_node(db, REGISTRY, concurrency=2) as worker:
        engine = raw_engine(db)
        try:
            async with engine.begin() as conn:
                task_id = await worker.create_task("alpha", "outbox", connection=conn)

            async def finished() -> bool:
                return (await worker.get_task(task_id)).state is State.FINISHED

            await wait_for(finished, timeout=LONG_BOUND, what="the committed task to finish")
        finally:
            await engine.dispose()
        assert (await worker.get_task(task_id)).context == "outbox+step"


# -- the Task snapshot ------------------------------------------------------------------------


def _aware_utc(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    # Sanity of the unit (seconds, not milliseconds; this century), not a timing claim.
    assert abs(value - datetime.now(UTC)) < timedelta(days=1)


async def test_task_snapshot_fields(db: DbTarget) -> None:
    async with make_node(db, REGISTRY, concurrency=0) as client:
        task_id = await client.create_task(
            "beta", "hello", user="alice", group="math", priority=7, auto_run=False
        )
        task = await client.get_task(task_id)
        assert isinstance(task, Task)
        assert (task.id, task.type, task.user, task.group) == (task_id, "beta", "alice", "math")
        assert (task.state, task.requested, task.context) == (State.INIT, None, "hello")
        assert (task.priority, task.attempts, task.max_attempts) == (7, 0, 3)
        assert (task.error, task.node, task.started_at, task.done_at) == (None, None, None, None)
        for stamp in (task.created_at, task.updated_at, task.run_at):
            _aware_utc(stamp)
        assert task.run_at == task.created_at  # due at once: set in the same statement
        assert task.updated_at == task.created_at
        with pytest.raises(AttributeError):
            task.state = State.PENDING  # type: ignore[misc]  # a frozen snapshot

        # A scheduled task keeps its instant whatever the zone it was given in.
        later = datetime(2100, 1, 2, 3, 4, 5, 123000, tzinfo=timezone(timedelta(hours=5)))
        scheduled = await client.get_task(await client.create_task("alpha", run_at=later))
        assert abs(scheduled.run_at - later) < timedelta(milliseconds=1)
        assert scheduled.run_at.utcoffset() == timedelta(0)

    async with make_node(db, REGISTRY, concurrency=2) as worker:
        await worker.run_task(task_id)

        async def finished() -> bool:
            return (await worker.get_task(task_id)).state is State.FINISHED

        await wait_for(finished, timeout=LONG_BOUND, what="the task to finish")
        done = await worker.get_task(task_id)
        assert done.context == "hello+step"
        assert (done.attempts, done.node, done.error, done.requested) == (1, None, None, None)
        assert done.started_at is not None
        assert done.done_at is not None
        for stamp in (done.started_at, done.done_at, done.updated_at):
            _aware_utc(stamp)
        assert done.created_at == task.created_at
