"""Driver conformance: creating and reading tasks (``insert_many``, ``get_task``,
``get_tasks``, ``count_tasks``).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from _db import DbTarget
from _helpers import raw_engine

from aioasync_tasks import Operation, State, Task, TaskNotFound
from aioasync_tasks._backends._driver import (
    Driver,
    InsertParams,
    NewTask,
    OperateParams,
    TaskFilter,
)
from driver._driverkit import new_task

CLOSE = timedelta(milliseconds=1)
"""Timestamps round-trip through the database to within this."""


async def test_insert_many_returns_the_ids_in_input_order(driver: Driver) -> None:
    tasks = [new_task(user=f"user{i}", priority=i, context=f'{{"i": {i}}}') for i in range(5)]
    ids = await driver.insert_many(InsertParams(tasks))
    assert len(set(ids)) == 5
    assert ids == sorted(ids)
    for task_id, new in zip(ids, tasks, strict=True):
        stored = await driver.get_task(task_id)
        assert (stored.id, stored.type, stored.user, stored.priority, stored.context) == (
            task_id,
            new.type,
            new.user,
            new.priority,
            new.context,
        )


async def test_insert_many_of_nothing_inserts_nothing(driver: Driver) -> None:
    assert await driver.insert_many(InsertParams([])) == []
    assert await driver.count_tasks(TaskFilter()) == 0


async def test_a_new_task_is_stored_as_given(driver: Driver) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    given = new_task(
        user="bob",
        group="reports",
        context='{"step": 0}',
        priority=7,
        max_attempts=3,
        has_cleanup=True,
        state=State.INIT,
        run_at=later,
    )
    # One task, and several (a driver may insert them with other statements).
    ids = await driver.insert_many(InsertParams([given])) + await driver.insert_many(
        InsertParams([given, given])
    )
    for task_id in ids:
        task = await driver.get_task(task_id)
        assert (task.type, task.user, task.group, task.context) == (
            given.type,
            "bob",
            "reports",
            '{"step": 0}',
        )
        assert (task.state, task.requested, task.priority) == (State.INIT, None, 7)
        assert (task.attempts, task.max_attempts, task.error, task.node) == (0, 3, None, None)
        assert (task.started_at, task.done_at) == (None, None)
        assert abs(task.run_at - later) < CLOSE
        assert task.created_at == task.updated_at

    # Without run_at: due when created (the database's clock).
    before = datetime.now(UTC)
    for due in await driver.insert_many(InsertParams([new_task()])) + await driver.insert_many(
        InsertParams([new_task(), new_task()])
    ):
        task = await driver.get_task(due)
        assert task.state is State.PENDING
        assert task.run_at == task.created_at
        assert abs(task.created_at - before) < timedelta(minutes=1)


async def test_insert_many_in_a_callers_transaction_commits_with_it(
    driver: Driver, db: DbTarget
) -> None:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            rolled_back = await driver.insert_many(
                InsertParams([new_task(), new_task()], connection=conn)
            )
            await transaction.rollback()
        assert len(rolled_back) == 2
        assert await driver.count_tasks(TaskFilter()) == 0
        for task_id in rolled_back:
            with pytest.raises(TaskNotFound) as caught:
                await driver.get_task(task_id)
            assert caught.value.task_id == task_id

        async with engine.begin() as conn:
            committed = await driver.insert_many(InsertParams([new_task()], connection=conn))
        assert [t.id for t in await driver.get_tasks(TaskFilter())] == committed
    finally:
        await engine.dispose()


async def _dataset(driver: Driver) -> list[Task]:
    """Tasks of several users, groups, types and states (one paused), newest first."""
    rows: list[NewTask] = [
        new_task("a", user="alice", group="g1"),
        new_task("b", user="bob", group="g1", state=State.INIT),
        new_task("a", user="bob", group="g2"),
        new_task("c", user="alice", group="g2", state=State.INIT),
        new_task("b", user="carol", group="g1"),
        new_task("c", user="bob", group="g1"),
    ]
    ids = await driver.insert_many(InsertParams(rows))
    await driver.operate(OperateParams(ids[-1], Operation.PAUSE))
    return [await driver.get_task(task_id) for task_id in reversed(ids)]


FILTERS: list[tuple[str, TaskFilter, Callable[[Task], bool]]] = [
    ("none", TaskFilter(), lambda t: True),
    ("user", TaskFilter(user="bob"), lambda t: t.user == "bob"),
    ("group", TaskFilter(group="g2"), lambda t: t.group == "g2"),
    ("one type", TaskFilter(types=("a",)), lambda t: t.type == "a"),
    ("two types", TaskFilter(types=("a", "c")), lambda t: t.type in ("a", "c")),
    ("no type", TaskFilter(types=()), lambda t: False),
    ("one state", TaskFilter(states=(State.INIT,)), lambda t: t.state is State.INIT),
    (
        "two states",
        TaskFilter(states=(State.PENDING, State.PAUSED)),
        lambda t: t.state in (State.PENDING, State.PAUSED),
    ),
    ("no state", TaskFilter(states=()), lambda t: False),
    (
        "all at once",
        TaskFilter(user="bob", group="g1", types=("b", "c"), states=(State.INIT, State.PAUSED)),
        lambda t: t.user == "bob" and t.group == "g1" and t.type in ("b", "c"),
    ),
    ("unknown user", TaskFilter(user="nobody"), lambda t: False),
]


async def test_get_tasks_and_count_tasks_apply_each_filter_newest_first(driver: Driver) -> None:
    tasks = await _dataset(driver)
    problems = []
    for name, f, wanted in FILTERS:
        expected = [t for t in tasks if wanted(t)]
        got = await driver.get_tasks(f)
        count = await driver.count_tasks(f)
        if got != expected or count != len(expected):
            problems.append(
                f"{name}: get_tasks {[t.id for t in got]}, count_tasks {count};"
                f" expected {[t.id for t in expected]}"
            )
    assert not problems, "\n".join(problems)

    # Pages, newest first; a count ignores the page.
    ids = [t.id for t in tasks]
    pages = [
        [t.id for t in await driver.get_tasks(TaskFilter(offset=offset, limit=4))]
        for offset in (0, 4, 8)
    ]
    assert pages == [ids[:4], ids[4:], []]
    page = await driver.get_tasks(TaskFilter(group="g1", offset=1, limit=2))
    assert [t.id for t in page] == [t.id for t in tasks if t.group == "g1"][1:3]
    assert await driver.count_tasks(TaskFilter(offset=4, limit=1)) == len(tasks)
