"""Retention and bulk deletes (docs/how-to.md, "Prune old tasks and delete in bulk";
docs/design.md §4.5) through ``Node``: ``retention=`` and ``failed_retention=`` on a worker,
``Node.delete_tasks`` by filter, and groups that disappear once they have neither tasks nor
settings.

The driver's side is in ``tests/driver/test_driver_retention.py``; the bad arguments in
``tests/test_bad_input.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import all_in, make_node, state_of, wait_for, wait_state
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Report, State, StopRequest, TaskRegistry
from aioasync_tasks._services.pruner import MIN_PRUNE_INTERVAL, PRUNE_INTERVAL, Retention


def _registry(started: asyncio.Event | None = None) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("ok")
    async def ok(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    @registry.task("bad")
    async def bad(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.failed("no")

    async def long(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        if started is not None:
            started.set()
        await stop.wait()
        yield Report()

    async def undo(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    registry.register_task("long", long, undo)
    return registry


async def _age(raw: AsyncEngine, ids: list[int], hours: int, column: str = "done_at") -> None:
    """Move a time of the tasks (their end, ``done_at``, or their last change, ``updated_at``)
    ``hours`` into the past, behind the library's back."""
    assert column in ("done_at", "updated_at")
    if raw.dialect.name == "sqlite":
        change = f"{column} - {hours * 3600}"
    elif raw.dialect.name in ("mysql", "mariadb"):
        change = f"{column} - INTERVAL {hours} HOUR"
    else:
        change = f"{column} - interval '{hours} hours'"
    async with raw.begin() as conn:
        for task_id in ids:
            await conn.execute(
                sa.text(f"UPDATE aioasync_tasks SET {column} = {change} WHERE id = :id"),
                {"id": task_id},
            )


async def test_a_worker_prunes_tasks_past_their_retention(db: DbTarget, raw: AsyncEngine) -> None:
    async with make_node(
        db, _registry(), retention=timedelta(hours=1), failed_retention=timedelta(days=1)
    ) as node:
        finished = [await node.create_task("ok") for _ in range(3)]
        failed = [await node.create_task("bad") for _ in range(2)]
        waiting = await node.create_task("ok", auto_run=False)
        await wait_for(all_in(node, finished, State.FINISHED), what="the tasks to finish")
        await wait_for(all_in(node, failed, State.FAILED), what="the tasks to fail")
        pruner = node.services.pruner
        assert pruner is not None

        assert await pruner.run_once() == 0  # all too young
        await _age(raw, finished[:2] + failed, 2)  # 2 hours ago
        assert await pruner.run_once() == 2  # the FINISHED ones; FAILED ones kept a day
        await _age(raw, failed, 24)
        assert await pruner.run_once() == 2
        left = {t.id for t in await node.get_tasks()}
    assert left == {finished[2], waiting}


async def test_pruning_runs_by_itself(db: DbTarget) -> None:
    async with make_node(db, _registry(), retention=1.0) as node:
        task_id = await node.create_task("ok")

        async def gone() -> bool:
            return await state_of(node, task_id) is None

        await wait_for(gone, timeout=60, what="the finished task to be pruned")


async def test_a_node_without_retention_runs_no_pruner(db: DbTarget) -> None:
    async with make_node(db, _registry()) as node:
        assert node.services.pruner is None


async def test_delete_tasks_by_filter(db: DbTarget, raw: AsyncEngine) -> None:
    started = asyncio.Event()
    async with make_node(db, _registry(started), concurrency=4) as node:
        done = [await node.create_task("ok", user="alice") for _ in range(3)]
        failed = await node.create_task("bad", user="bob", group="reports")
        await wait_for(all_in(node, [*done, failed], State.FINISHED, State.FAILED), what="ends")
        await _age(raw, done[:2], 48, "updated_at")  # older_than reads the last change
        waiting = await node.create_task("ok", auto_run=False, group="reports")
        running = await node.create_task("long")
        await asyncio.wait_for(started.wait(), 30)

        assert await node.delete_tasks(user="nobody") == 0
        assert await node.delete_tasks(states=[State.FINISHED], older_than=72 * 3600) == 0
        assert await node.delete_tasks(states=[State.FINISHED], older_than=timedelta(days=1)) == 2
        assert await state_of(node, done[2]) is State.FINISHED
        assert await node.delete_tasks(group="reports", states=["failed"]) == 1
        assert await state_of(node, failed) is None
        assert await node.delete_tasks(states=[State.FINISHED], types=["ok"]) == 1
        assert {t.id for t in await node.get_tasks()} == {waiting, running}

        # A running task with a cleanup handler: told to stop, then cleaned up and removed.
        assert await node.delete_tasks(types=["long"]) == 1
        task = await node.get_task(running)
        assert task.state in (State.CANCELING, State.DELETING)
        if task.state is State.CANCELING:
            assert task.requested is StopRequest.DELETE
        await wait_state(node, running, None, what="the deleted task's cleanup to end")
        assert await node.delete_tasks(states=list(State)) == 1
        assert await node.count_tasks() == 0


async def test_delete_tasks_force_removes_running_tasks_at_once(db: DbTarget) -> None:
    started = asyncio.Event()
    async with make_node(db, _registry(started), concurrency=2) as node:
        running = await node.create_task("long")
        await asyncio.wait_for(started.wait(), 30)
        assert await node.delete_tasks(states=[State.RUNNING], force=True) == 1
        assert await state_of(node, running) is None
        assert await node.delete_tasks(states=[State.RUNNING], force=True) == 0


async def test_groups_with_neither_tasks_nor_settings_are_not_listed(db: DbTarget) -> None:
    async with make_node(db, _registry(), concurrency=0) as node:
        await node.pause_group("empty")
        await node.set_group_limits("limited", max_running=3)
        task_id = await node.create_task("ok", group="busy", auto_run=False)
        assert [g.name for g in await node.get_groups()] == ["busy", "empty", "limited"]

        await node.resume_group("empty")
        await node.set_group_limits("limited", max_running=None)
        assert [g.name for g in await node.get_groups()] == ["busy"]
        await node.delete_task(task_id)
        assert await node.get_groups() == []


@pytest.mark.parametrize("seconds", [0.5, 7200.0, 10 * 86400.0])
def test_the_pruning_interval_follows_the_shortest_retention(seconds: float) -> None:
    interval = Retention(seconds, None).interval
    assert MIN_PRUNE_INTERVAL <= interval <= PRUNE_INTERVAL
    assert interval == min(PRUNE_INTERVAL, max(MIN_PRUNE_INTERVAL, seconds / 2))
    assert Retention(None, seconds).interval == interval
