"""The seed's example tasks (examples/seed_tasks.py): dot product and matrix multiply, run by a
real node on each backend."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _db import DbTarget
from _helpers import LONG_BOUND, make_node, wait_for, wait_state

from aioasync_tasks import State

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "seed_tasks.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_tasks", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed = _load_example()


def _product(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [
        [sum(x * y for x, y in zip(row, col, strict=True)) for col in zip(*b, strict=True)]
        for row in a
    ]


def _context(task: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(task.context)
    return result


def test_example_exports_the_seed_registry() -> None:
    assert seed.registry.names == ["dot", "matmul"]
    assert seed.registry.get("dot").max_attempts == 3
    assert seed.registry.get("matmul").has_cleanup


async def test_matmul_computes_the_product(db: DbTarget) -> None:
    a = [[1, -2], [3, 4], [0, 5]]
    b = [[2, 0, 1, -1], [7, 3, -4, 6]]
    node = make_node(db, seed.registry, concurrency=8)
    await node.start()
    try:
        task_id = await node.create_task(
            "matmul", json.dumps({"a": a, "b": b, "poll": 0.05}), user="alice", group="matrix"
        )
        task = await wait_state(node, task_id, State.FINISHED, State.FAILED, timeout=LONG_BOUND)
        assert task.state is State.FINISHED, task.error
        context = _context(task)
        assert context["result"] == _product(a, b)
        assert context["done"] == 12
        cells = await node.get_tasks(group=f"matmul-{task_id}")
        assert sorted(c.id for c in cells) == sorted(context["cells"])
        assert len(cells) == 12
        assert all(c.state is State.FINISHED and c.user == "alice" for c in cells)
    finally:
        await node.stop()


@pytest.mark.slow
async def test_dot_resumes_from_its_checkpoint_after_pause(db: DbTarget) -> None:
    a = list(range(1, 31))
    b = [(-1) ** i * i for i in range(30)]
    node = make_node(db, seed.registry, concurrency=2)
    await node.start()
    try:
        context = {"a": a, "b": b, "i": 0, "sum": 0, "delay": 0.2}
        task_id = await node.create_task("dot", json.dumps(context), user="bob")

        async def started() -> bool:
            return bool(_context(await node.get_task(task_id))["i"] >= 2)

        await wait_for(started, what="two elements done")
        await node.pause_task(task_id)
        paused = await wait_state(node, task_id, State.PAUSED, timeout=LONG_BOUND)
        stopped_at = _context(paused)["i"]
        assert 2 <= stopped_at < len(a)

        await node.run_task(task_id)
        task = await wait_state(node, task_id, State.FINISHED, State.FAILED, timeout=LONG_BOUND)
        assert task.state is State.FINISHED, task.error
        final = _context(task)
        assert final["sum"] == sum(x * y for x, y in zip(a, b, strict=True))
        assert final["i"] == len(a)
        # The second run started from the checkpoint stored at the pause, not from 0.
        assert [start for _node, start in final["runs"]] == [0, stopped_at]
    finally:
        await node.stop()


async def test_dot_fails_for_good_after_three_attempts(db: DbTarget) -> None:
    node = make_node(db, seed.registry, concurrency=1)
    await node.start()
    try:
        context = {"a": [1, 2], "b": [3, 4], "i": 0, "sum": 0, "fail_rate": 1.0}
        task_id = await node.create_task("dot", json.dumps(context))
        task = await wait_state(node, task_id, State.FAILED, timeout=LONG_BOUND)
        assert task.attempts == 3
        assert "random failure at element 0" in (task.error or "")
        assert _context(task)["failures"] == 3
    finally:
        await node.stop()


@pytest.mark.slow
async def test_dot_retries_resume_from_the_checkpoint(db: DbTarget) -> None:
    a = list(range(30))
    b = [3] * 30
    node = make_node(db, seed.registry, concurrency=1)
    await node.start()
    try:
        context = {"a": a, "b": b, "i": 0, "sum": 0, "fail_rate": 0.3}
        # Random failures are decided by a hash of (task id, attempt, failures, element): the
        # same run every time. Plenty of attempts, so that it always ends.
        task_id = await node.create_task("dot", json.dumps(context), max_attempts=100)
        task = await wait_state(node, task_id, State.FINISHED, State.FAILED, timeout=LONG_BOUND)
        assert task.state is State.FINISHED, task.error
        final = _context(task)
        assert final["sum"] == 3 * sum(a)
        assert final["failures"] >= 1
        assert task.attempts == final["failures"] + 1
        # Every retry started where the failed attempt stopped, never from the start.
        starts = [start for _node, start in final["runs"]]
        assert starts == sorted(starts)
        assert len(starts) == task.attempts
    finally:
        await node.stop()


async def test_matmul_restarts_failed_cells_then_fails(db: DbTarget) -> None:
    node = make_node(db, seed.registry, concurrency=4)
    await node.start()
    try:
        context = {"a": [[2]], "b": [[3]], "fail_rate": 1.0, "max_restarts": 1, "poll": 0.05}
        task_id = await node.create_task("matmul", json.dumps(context))
        task = await wait_state(node, task_id, State.FAILED, timeout=LONG_BOUND)
        assert "failed after 1 restart(s)" in (task.error or "")
        (cell_id,) = _context(task)["cells"]
        assert _context(task)["restarts"] == {str(cell_id): 1}
        cell = await node.get_task(cell_id)
        assert cell.state is State.FAILED
        assert _context(cell)["failures"] == 6  # two series of three attempts
    finally:
        await node.stop()


async def test_matmul_reuses_cells_an_earlier_attempt_created(db: DbTarget) -> None:
    a, b = [[1, 2], [3, 4]], [[5, 6], [7, 8]]
    node = make_node(db, seed.registry, concurrency=6)
    await node.start()
    try:
        task_id = await node.create_task(
            "matmul", json.dumps({"a": a, "b": b, "poll": 0.05}), auto_run=False
        )
        # As if an attempt had created cell (0, 0) and died before its checkpoint.
        orphan = await node.create_task(
            "dot",
            json.dumps({"a": [1, 2], "b": [5, 7], "i": 0, "sum": 0, "cell": [0, 0]}),
            group=f"matmul-{task_id}",
        )
        await node.run_task(task_id)
        task = await wait_state(node, task_id, State.FINISHED, State.FAILED, timeout=LONG_BOUND)
        assert task.state is State.FINISHED, task.error
        assert _context(task)["result"] == _product(a, b)
        assert _context(task)["cells"][0] == orphan
        assert await node.count_tasks(group=f"matmul-{task_id}") == 4
    finally:
        await node.stop()


@pytest.mark.slow
async def test_matmul_handed_off_does_not_create_its_cells_twice(db: DbTarget) -> None:
    a = [[1, 2, 3], [4, 5, 6]]
    b = [[1, 0], [0, 1], [2, 2]]
    context = {"a": a, "b": b, "delay": 0.2, "poll": 0.05}
    first = make_node(db, seed.registry, concurrency=8, name="first")
    await first.start()
    try:
        task_id = await first.create_task("matmul", json.dumps(context))

        async def has_cells() -> bool:
            return "cells" in _context(await first.get_task(task_id))

        await wait_for(has_cells, what="the matmul to store its cells")
    finally:
        await first.stop()  # graceful: the matmul and its cells are handed back
    handed_off = await _peek(db, task_id)
    assert handed_off.state in (State.PENDING, State.FINISHED)

    second = make_node(db, seed.registry, concurrency=8, name="second")
    await second.start()
    try:
        task = await wait_state(second, task_id, State.FINISHED, State.FAILED, timeout=LONG_BOUND)
        assert task.state is State.FINISHED, task.error
        final = _context(task)
        assert final["result"] == _product(a, b)
        assert await second.count_tasks(group=f"matmul-{task_id}") == 4
        assert sorted(t.id for t in await second.get_tasks(group=f"matmul-{task_id}")) == sorted(
            final["cells"]
        )
    finally:
        await second.stop()


async def _peek(db: DbTarget, task_id: int) -> Any:
    client = make_node(db, seed.registry, concurrency=0)
    await client.start()
    try:
        return await client.get_task(task_id)
    finally:
        await client.stop()


async def test_deleting_a_matmul_deletes_its_cells(db: DbTarget) -> None:
    node = make_node(db, seed.registry, concurrency=4)
    await node.start()
    try:
        context = {"a": [[1, 2]], "b": [[3], [4]], "poll": 0.05}
        task_id = await node.create_task("matmul", json.dumps(context))
        await wait_state(node, task_id, State.FINISHED, timeout=LONG_BOUND)
        group = f"matmul-{task_id}"
        assert await node.count_tasks(group=group) == 1
        await node.delete_task(task_id)

        await wait_state(node, task_id, None, what="the matmul's cleanup")
        assert await node.count_tasks(group=group) == 0
    finally:
        await node.stop()


@pytest.mark.slow
async def test_example_script_runs(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--db",
        f"sqlite+aiosqlite:///{tmp_path / 'seed.db'}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "a·b = [[58, 64], [139, 154]]" in lines
    assert "dot = 70" in lines


@pytest.mark.parametrize("bad", [{"a": [[1, 2]], "b": [[1, 2]]}, {"a": [], "b": [[1]]}])
async def test_matmul_rejects_bad_shapes(sqlite_db: DbTarget, bad: dict[str, Any]) -> None:
    node = make_node(sqlite_db, seed.registry, concurrency=2)
    await node.start()
    try:
        task_id = await node.create_task("matmul", json.dumps(bad))
        task = await wait_state(node, task_id, State.FAILED, timeout=LONG_BOUND)
        assert task.attempts == 3  # a failed report is retried like any failure
        assert "cannot multiply" in (task.error or "") or "non-empty" in (task.error or "")
    finally:
        await node.stop()
