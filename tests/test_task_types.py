"""Clients without task code (docs/how-to.md, "Create tasks of types a process has not
imported"; docs/design.md §4.6): workers store their task types' options at start, and a node
whose registry lacks a type creates its tasks with them — or with options given explicitly —
or raises ``UnknownTaskType``.

The driver's side is in ``tests/driver/test_driver_task_types.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import make_node, wait_state
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Report, State, TaskRegistry, UnknownTaskType


def _worker_registry(cleaned: list[str]) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("report", max_attempts=4)
    async def report(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context=f"report of {context}")

    async def export(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        await stop.wait()
        yield Report()

    async def undo(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        cleaned.append(context)
        yield Report.finished()

    registry.register_task("export", export, undo, max_attempts=2)
    return registry


async def _stored(raw: AsyncEngine) -> list[tuple[str, int, bool]]:
    async with raw.connect() as conn:
        result = await conn.execute(
            sa.text("SELECT name, max_attempts, has_cleanup FROM aioasync_task_types ORDER BY 1")
        )
        return [(r[0], r[1], bool(r[2])) for r in result]


async def test_a_client_without_the_types_creates_tasks_a_worker_runs(
    db: DbTarget, raw: AsyncEngine
) -> None:
    cleaned: list[str] = []
    async with make_node(db, concurrency=0) as client:  # no registry at all
        with pytest.raises(UnknownTaskType, match="no worker has registered it") as caught:
            await client.create_task("report", "march")
        assert caught.value.type == "report"

        async with make_node(db, _worker_registry(cleaned), concurrency=4) as worker:
            assert await _stored(raw) == [("export", 2, True), ("report", 4, False)]
            task_id = await client.create_task("report", "march", user="alice")
            task = await wait_state(client, task_id, State.FINISHED)
            assert (task.context, task.max_attempts) == ("report of march", 4)

            # The stored has_cleanup too: deleting goes through the worker's cleanup handler.
            export = await client.create_task("export", "file.csv")
            await wait_state(client, export, State.RUNNING)
            await client.delete_task(export)
            await wait_state(client, export, None, what="the cleanup to run")
            assert cleaned == ["file.csv"]

            # Options given win over the stored ones; several types, one lookup.
            ids = await client.create_tasks(
                [
                    {"type": "report", "max_attempts": 9, "auto_run": False},
                    {"type": "export", "auto_run": False},
                ]
            )
            tasks = [await client.get_task(i) for i in ids]
            assert [(t.max_attempts, t.state) for t in tasks] == [(9, State.INIT), (2, State.INIT)]
            assert worker.running


async def test_a_type_no_worker_registered_needs_its_options(db: DbTarget) -> None:
    async with make_node(db, concurrency=0) as client:
        with pytest.raises(UnknownTaskType):
            await client.create_tasks([{"type": "later"}])
        plain = await client.create_task("later", "x", max_attempts=3)
        cleaned = await client.create_task("later", "y", max_attempts=1, has_cleanup=True)
        first, second = await client.get_task(plain), await client.get_task(cleaned)
        assert (first.type, first.max_attempts, first.state) == ("later", 3, State.PENDING)
        assert second.max_attempts == 1
        # has_cleanup is not on Task; deleting shows it: DELETING, waiting for a cleanup.
        await client.delete_task(plain)
        await client.delete_task(cleaned)
        assert [t.id for t in await client.get_tasks()] == [cleaned]
        assert (await client.get_task(cleaned)).state is State.DELETING


async def test_the_last_worker_to_start_stores_its_options(db: DbTarget, raw: AsyncEngine) -> None:
    old, new = TaskRegistry(), TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    old.register_task("job", job, max_attempts=1)
    new.register_task("job", job, max_attempts=5)
    async with make_node(db, old, concurrency=1):
        assert await _stored(raw) == [("job", 1, False)]
    async with make_node(db, new, concurrency=1):
        assert await _stored(raw) == [("job", 5, False)]
    async with make_node(db, old, concurrency=0):  # a client registers nothing
        assert await _stored(raw) == [("job", 5, False)]
