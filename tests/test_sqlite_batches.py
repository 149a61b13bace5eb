"""SQLite: statements cost what they are about, not what the table holds besides.

- A checkpoint batch is one ``UPDATE`` whose rows come from a JSON array (``json_each``).
  Unmaterialized, the array was read again for every task the owner index found — n² for a
  batch of n, 440 ms for 1,000 checkpoints, where it now takes 3 ms (docs/design.md §15).
- A claim counts what runs in the queues of its window, and in those of their groups that
  have a limit, not every running task (docs/design.md §6.3): with 5,000 tasks running in
  other queues, a claim of 10 at 100,000 queues took 12 ms instead of 4.

The cost is counted in SQLite's own virtual-machine instructions (a progress handler), not
timed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from _helpers import FAST, Capture, wait_for

from aioasync_tasks import Node, Report, State, TaskRegistry
from aioasync_tasks._backends._queries import Queries

SMALL, BIG = 100, 400
"""The checkpoint batches compared."""
RUNNING = 2_000
"""Tasks running in another group while the claim is run again."""
STEP = 100
"""The progress handler runs every ``STEP`` instructions."""


def _node(path: Path, concurrency: int) -> Node:
    registry = TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    registry.register_task("job", job)
    return Node(f"sqlite+aiosqlite:///{path}", registry=registry, concurrency=concurrency, **FAST)


def _instructions(
    conn: sqlite3.Connection, statements: Sequence[tuple[str, Any]], before: str
) -> int:
    """The instructions of ``statements`` (each SQL and its parameters) run after the
    statement ``before``, all rolled back."""
    used = [0]

    def count() -> int:
        used[0] += STEP
        return 0  # go on

    conn.execute("BEGIN")
    try:
        conn.execute(before)
        conn.set_progress_handler(count, STEP)
        for sql, parameters in statements:
            conn.execute(sql, parameters).fetchall()
        conn.set_progress_handler(None, STEP)
    finally:
        conn.execute("ROLLBACK")
    return used[0]


def _checkpoint(ids: list[int], node: int) -> tuple[str, dict[str, Any]]:
    """The checkpoint batch of ``ids``, each under token 1 on ``node``."""
    return Queries("sqlite").sql["checkpoint"], {
        "rows": json.dumps([[task_id, 1, "checkpointed", None, None] for task_id in ids]),
        "node": node,
        "states": json.dumps(["running"]),
    }


def _running(ids: list[int], node: int) -> str:
    """The statement that makes ``ids`` run on ``node`` under token 1 (and no other task)."""
    listed = ", ".join(str(task_id) for task_id in ids)
    return (
        f"UPDATE aioasync_tasks SET state = 'running', node_id = {node}, token = 1"
        f" WHERE id IN ({listed})"
    )


async def test_a_checkpoint_batch_costs_what_its_rows_do(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with _node(path, 0) as client:
        ids = await client.create_tasks([{"type": "job", "auto_run": False}] * BIG)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO aioasync_nodes (name, concurrency, types, started_at, heartbeat_at,"
            " heartbeat_interval, node_timeout) VALUES ('batches', 1, '', 0, 0, 1, 60)"
        )
        (node,) = conn.execute("SELECT max(id) FROM aioasync_nodes").fetchone()
        few = ids[:SMALL]
        small = _instructions(conn, [_checkpoint(few, node)], _running(few, node))
        big = _instructions(conn, [_checkpoint(ids, node)], _running(ids, node))
    finally:
        conn.close()
    # Four times the rows: about four times the instructions; n² would be sixteen.
    assert big < 8 * small, f"{big} instructions for {BIG} rows, {small} for {SMALL}"


async def test_a_claim_does_not_count_what_runs_in_other_queues(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    async with _node(path, 0) as client:
        await client.pause_group("busy")
        await client.create_tasks([{"type": "job", "group": "busy"}] * RUNNING)
        await client.set_group_limits("limited", max_running=5)  # a group count in the claim
        await client.create_tasks([{"type": "job", "group": "limited", "user": "u"}] * 10)
        worker = _node(path, 1)
        with Capture(worker.engine) as capture:
            async with worker:

                async def finished() -> bool:
                    return await client.count_tasks(states=[State.FINISHED]) > 0

                await wait_for(finished, what="a claim")
    window = next(c for c in capture.statements if "walk(" in c[0])
    claim = next(c for c in capture.statements if "chosen AS" in c[0])
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        idle = _instructions(conn, [window, claim], "SELECT 1")
        busy = _instructions(
            conn,
            [window, claim],
            "UPDATE aioasync_tasks SET state = 'running' WHERE group_name = 'busy'",
        )
    finally:
        conn.close()
    assert busy < 2 * idle, f"{busy} instructions with {RUNNING} running elsewhere, {idle} idle"
