"""``aioasync_tasks.testing`` (docs/testing.md): the helpers for users' own test suites, on both
backends, and the page's pytest example run with pytest."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from _db import DbTarget
from test_docs import DOCS, code_blocks

from aioasync_tasks import ConfigurationError, Report, State, TaskRegistry, current_node
from aioasync_tasks.testing import (
    DrainTimeout,
    context_of,
    created,
    drain,
    temporary_node,
)


@dataclass
class Split:
    parts: int


def _registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("split")
    async def split(context: Split, stop: asyncio.Event) -> AsyncIterator[Report]:
        node = current_node()
        assert node is not None
        await node.create_tasks([{"type": "part", "context": str(i)} for i in range(context.parts)])
        yield Report.finished()

    @registry.task("part", max_attempts=2)
    async def part(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        if context == "1":
            yield Report.failed("once", context="1 retried")  # retried after its back-off
            return
        yield Report.finished(context=f"{context} done")

    @registry.task("gone")
    async def gone(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(delete=True)

    return registry


async def test_drain_runs_what_is_due_and_what_it_creates(db: DbTarget) -> None:
    registry = _registry()
    async with temporary_node(registry, db.url, schema=db.schema) as node:
        earlier = await node.create_task("part", "0")
        assert [t.id for t in await drain(node)] == [earlier]
        split = await node.create_task("split", Split(3), user="alice")
        gone = await node.create_task("gone")
        ran = await drain(node)
        assert gone not in [t.id for t in ran]  # removed itself
        assert [(t.type, t.state, t.context) for t in ran] == [
            ("split", State.FINISHED, '{"parts": 3}'),
            ("part", State.FINISHED, "0 done"),
            ("part", State.FINISHED, "1 retried done"),
            ("part", State.FINISHED, "2 done"),
        ]
        assert ran[0].id == split
        assert ran[2].attempts == 2
        assert await drain(node) == []  # nothing left to do


async def test_drain_leaves_what_is_not_due(db: DbTarget) -> None:
    async with temporary_node(_registry(), db.url, schema=db.schema) as node:
        later = await node.create_task("part", "0", run_at=datetime.now(UTC) + timedelta(days=1))
        await node.pause_group("parked")
        parked = await node.create_task("part", "0", group="parked")
        init = await node.create_task("part", "0", auto_run=False)
        assert await drain(node) == []
        states = [(await node.get_task(t)).state for t in (later, parked, init)]
    assert states == [State.PENDING, State.PENDING, State.INIT]


async def test_drain_gives_up_with_a_clear_error(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("forever")
    async def forever(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        await stop.wait()  # only the node's stop ends it
        yield Report()

    async with temporary_node(registry, db.url, schema=db.schema) as node:
        task_id = await node.create_task("forever")
        with pytest.raises(DrainTimeout) as raised:
            await drain(node, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    assert f"#{task_id} forever (" in str(raised.value)
    assert "after 0.2s, 1 task(s) still to run" in str(raised.value)
    assert [t.id for t in raised.value.tasks] == [task_id]


async def test_created_and_context_of(db: DbTarget) -> None:
    async with temporary_node(_registry(), db.url, schema=db.schema, concurrency=0) as node:
        first = await node.create_task("split", Split(2), user="alice")
        await node.create_task("part", "x", user="bob", group="g")
        second = await node.create_task("split", Split(5), user="bob")
        splits = await created(node, "split")
        assert [t.id for t in splits] == [first, second]  # oldest first
        assert [context_of(node, t) for t in splits] == [Split(2), Split(5)]
        assert [t.id for t in await created(node, user="bob", group="g")] == [first + 1]
        assert len(await created(node, states=[State.PENDING])) == 3
        assert context_of(node, (await created(node, "part"))[0]) == "x"
        with pytest.raises(ConfigurationError, match="client-only"):
            await drain(node)


async def test_a_temporary_node_lives_in_a_directory_removed_afterwards() -> None:
    async with temporary_node(_registry(), concurrency=1) as node:
        database = node.engine.url.database
        assert database is not None
        assert await asyncio.to_thread(Path(database).exists)
        assert node.running
        await node.create_task("part", "0")
        (task,) = await drain(node)
        assert task.state is State.FINISHED
    assert not node.running
    assert not await asyncio.to_thread(Path(database).parent.exists)


@pytest.mark.slow
def test_the_pytest_example_of_the_docs_passes(tmp_path: Path) -> None:
    (block,) = [b for b in code_blocks(DOCS / "testing.md") if b.language == "python"]
    (tmp_path / "test_example.py").write_text(block.code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
