"""Sample task types, ready to run: ``dot``, a dot product that checkpoints after every
element, and ``matmul``, a matrix multiply made of one ``dot`` task per cell.

They are what ``aioasync-tasks demo`` runs, and small complete examples of the task protocol:
JSON contexts, a checkpoint per step, random failures retried from the last checkpoint, a task
that creates and watches other tasks through ``current_node()``, and a cleanup handler. Run them
in worker processes with ``aioasync-tasks worker aioasync_tasks.samples:registry``, or give
``registry`` to a ``Node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

from ._errors import InvalidTransition, TaskNotFound
from ._models import State, TaskInfo
from ._node import MAX_PAGE_SIZE, Node
from ._registry import TaskRegistry
from ._report import Report
from ._task import current_node, current_task

__all__ = [
    "CELL_GROUP_PREFIX",
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_POLL",
    "cell_group",
    "dot",
    "matmul",
    "registry",
]

registry = TaskRegistry()
"""The sample task types: ``dot`` and ``matmul``."""

DEFAULT_POLL = 0.2
"""Seconds between a ``matmul``'s looks at its cells, unless its context says ``poll``."""
DEFAULT_MAX_RESTARTS = 3
"""How often a ``matmul`` runs a FAILED cell again, unless its context says ``max_restarts``."""


async def _sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()


def _fails(rate: float, task: TaskInfo | None, failures: int, element: int) -> bool:
    """Whether this element fails at random; the same task, attempt and history always give
    the same answer, so a run can be reproduced (and tested)."""
    if rate <= 0:
        return False
    task_id, attempt = (task.id, task.attempt) if task is not None else (0, 0)
    return random.Random(f"{task_id}:{attempt}:{failures}:{element}").random() < rate


# -- dot ------------------------------------------------------------------------------------


@registry.task("dot", max_attempts=3)
async def dot(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    """The dot product of two vectors, one element per checkpoint.

    Context (JSON): ``a`` and ``b``, equal-length lists of numbers; ``i``, the next element
    (0 at first) and ``sum``, the sum so far. Optional: ``fail_rate`` (0 to 1), the chance
    that an element fails the attempt; ``delay``, seconds of "work" per element.
    Stored as it goes: ``failures`` (random failures so far), and ``runs``, a ``[node, i]``
    pair for every start — on which node the task (re)started and from which element.
    """
    state = json.loads(context)
    a: list[float] = state["a"]
    b: list[float] = state["b"]
    if len(a) != len(b):
        yield Report.failed(f"vectors of different lengths: {len(a)} and {len(b)}")
        return
    state.setdefault("i", 0)
    state.setdefault("sum", 0)
    state.setdefault("failures", 0)
    fail_rate = float(state.get("fail_rate", 0))
    delay = float(state.get("delay", 0))
    task = current_task()
    state.setdefault("runs", []).append([task.node if task else None, state["i"]])
    yield Report(context=json.dumps(state))
    while state["i"] < len(a):
        if stop.is_set():
            return  # paused, deleted or handed off: the last checkpoint is stored already
        i = state["i"]
        if _fails(fail_rate, task, state["failures"], i):
            state["failures"] += 1
            yield Report.failed(f"random failure at element {i}", context=json.dumps(state))
            return
        await _sleep_unless_stopped(stop, delay)
        if stop.is_set():
            return
        state["sum"] += a[i] * b[i]
        state["i"] = i + 1
        yield Report(context=json.dumps(state))  # durable once the yield returns
    yield Report.finished(context=json.dumps(state))


# -- matmul ---------------------------------------------------------------------------------


CELL_GROUP_PREFIX = "matmul-"
"""The start of the name of every group of cells."""


def cell_group(task_id: int) -> str:
    """The group of the dot tasks ("cells") of matrix multiply ``task_id``."""
    return f"{CELL_GROUP_PREFIX}{task_id}"


def _shape(name: str, matrix: object) -> tuple[int, int]:
    if (
        not isinstance(matrix, list)
        or not matrix
        or not all(isinstance(row, list) and row for row in matrix)
        or len({len(row) for row in matrix}) != 1
    ):
        raise ValueError(f"{name} must be a non-empty list of equal-length rows")
    return len(matrix), len(matrix[0])


async def _find_or_create_cells(node: Node, task: TaskInfo, state: dict[str, Any]) -> list[int]:
    """The ids of the cells' dot tasks, row-major. Cells an earlier attempt created but could
    not checkpoint (it died in between) are found in the group and not created again."""
    a, b = state["a"], state["b"]
    rows, cols = len(a), len(b[0])
    group = cell_group(task.id)
    found: dict[tuple[int, int], int] = {}
    for existing in await node.get_tasks(group=group, types=["dot"], limit=MAX_PAGE_SIZE):
        cell = json.loads(existing.context).get("cell")
        if isinstance(cell, list) and len(cell) == 2:
            found.setdefault((cell[0], cell[1]), existing.id)
    missing = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in found]
    options = {key: state[key] for key in ("fail_rate", "delay") if key in state}
    new = [
        {
            "type": "dot",
            "context": json.dumps(
                {"a": a[r], "b": [row[c] for row in b], "i": 0, "sum": 0, "cell": [r, c], **options}
            ),
            "user": task.user,
            "group": group,
        }
        for r, c in missing
    ]
    if new:
        found.update(zip(missing, await node.create_tasks(new), strict=True))
    return [found[(r, c)] for r in range(rows) for c in range(cols)]


def _check_shapes(state: dict[str, Any]) -> str | None:
    """Why the matrices of a matmul context cannot be multiplied here, or None."""
    try:
        rows, inner = _shape("a", state.get("a"))
        inner_b, cols = _shape("b", state.get("b"))
    except ValueError as exc:
        return str(exc)
    if inner != inner_b:
        return f"cannot multiply {rows}x{inner} by {inner_b}x{cols} matrices"
    if rows * cols > MAX_PAGE_SIZE:
        return f"at most {MAX_PAGE_SIZE} cells, not {rows * cols}"
    return None


async def _collect(node: Node, state: dict[str, Any], sums: dict[int, float]) -> str | None:
    """Look at each unfinished cell once: keep the sums of finished ones, run failed ones
    again (up to ``max_restarts``). Returns why the whole product failed, or None."""
    cols = len(state["b"][0])
    restarts: dict[str, int] = state["restarts"]
    max_restarts = int(state.get("max_restarts", DEFAULT_MAX_RESTARTS))
    for index, cell_id in enumerate(state["cells"]):
        if index in sums:
            continue
        where = f"cell {divmod(index, cols)} (task {cell_id})"
        try:
            cell = await node.get_task(cell_id)
        except TaskNotFound:
            return f"{where} was deleted"
        if cell.state is State.FINISHED:
            sums[index] = json.loads(cell.context)["sum"]
        elif cell.state is State.FAILED:
            used = restarts.get(str(cell_id), 0)
            if used >= max_restarts:
                last = (cell.error or "").strip().splitlines()[-1:] or ["?"]
                return f"{where} failed after {used} restart(s): {last[0]}"
            with contextlib.suppress(InvalidTransition):  # someone ran it again already
                await node.run_task(cell_id)
            restarts[str(cell_id)] = used + 1
    return None


@registry.task("matmul", max_attempts=3)
async def matmul(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    """The product of two matrices: one ``dot`` task per cell, created in the group
    ``matmul-<id>``, then collected into the result.

    Context (JSON): ``a`` (m by k) and ``b`` (k by n), lists of rows. Optional: ``fail_rate``
    and ``delay``, passed on to the cells; ``poll``, seconds between looks at the cells
    (``DEFAULT_POLL``); ``max_restarts``, how often a FAILED cell is run again
    (``DEFAULT_MAX_RESTARTS``). Stored as it goes: ``cells`` (the dot task ids, row-major; so a
    restart never creates them twice), ``restarts`` (per cell id), ``done`` (cells finished),
    ``runs`` (``[node, done]`` per start) and at the end ``result`` (m by n). The task holds a
    slot while it waits: give nodes more slots than matrix multiplies running at once. Deleting
    it deletes its cells too.
    """
    state = json.loads(context)
    node, task = current_node(), current_task()
    if node is None or task is None:
        raise RuntimeError("matmul must run in a node: it creates and watches dot tasks")
    problem = _check_shapes(state)
    if problem is not None:
        yield Report.failed(problem)
        return
    state.setdefault("restarts", {})
    state.setdefault("done", 0)
    state.setdefault("runs", []).append([task.node, state["done"]])
    if state.get("cells") is None:
        state["cells"] = await _find_or_create_cells(node, task, state)
    yield Report(context=json.dumps(state))  # the cell ids are durable from here on
    sums: dict[int, float] = {}
    while True:
        before = (len(sums), sum(state["restarts"].values()))
        problem = await _collect(node, state, sums)
        if problem is not None:
            yield Report.failed(problem, context=json.dumps(state))
            return
        if (len(sums), sum(state["restarts"].values())) != before:
            state["done"] = len(sums)
            yield Report(context=json.dumps(state))
        if len(sums) == len(state["cells"]):
            break
        await _sleep_unless_stopped(stop, float(state.get("poll", DEFAULT_POLL)))
        if stop.is_set():
            return  # the cells keep running; a later run collects them
    cols = len(state["b"][0])
    state["result"] = [[sums[r * cols + c] for c in range(cols)] for r in range(len(state["a"]))]
    yield Report.finished(context=json.dumps(state))


@matmul.deleting
async def _delete_cells(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    """The cleanup handler of ``matmul``: delete its cells."""
    node, task = current_node(), current_task()
    if node is None or task is None:
        raise RuntimeError("matmul cleanup must run in a node")
    ids = set(json.loads(context).get("cells") or [])
    ids.update(t.id for t in await node.get_tasks(group=cell_group(task.id), limit=MAX_PAGE_SIZE))
    for cell_id in sorted(ids):
        with contextlib.suppress(TaskNotFound):
            await node.delete_task(cell_id, force=True)
    yield Report.finished()
