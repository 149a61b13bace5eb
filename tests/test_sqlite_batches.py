"""SQLite: a checkpoint batch costs what its rows do.

The batch is one ``UPDATE`` whose rows come from a JSON array (``json_each``). Unmaterialized,
the array was read again for every task the owner index found — n² for a batch of n, 440 ms
for 1,000 checkpoints, where it now takes 3 ms (docs/design.md §15). The cost is counted in
SQLite's own virtual-machine instructions (a progress handler), not timed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from _helpers import FAST

from aioasync_tasks import Node, Report, TaskRegistry
from aioasync_tasks._backends._queries import Queries

SMALL, BIG = 100, 400
STEP = 100
"""The progress handler runs every ``STEP`` instructions."""


async def _created(path: Path, count: int) -> list[int]:
    registry = TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    registry.register_task("job", job)
    async with Node(
        f"sqlite+aiosqlite:///{path}", registry=registry, concurrency=0, **FAST
    ) as node:
        return await node.create_tasks([{"type": "job", "auto_run": False}] * count)


def _instructions(conn: sqlite3.Connection, ids: list[int], node: int) -> int:
    """The instructions of one checkpoint batch of ``ids``, each running on ``node`` (and no
    other task), rolled back."""
    sql = Queries("sqlite").sql["checkpoint"]
    params = {
        "rows": json.dumps([[task_id, 1, "checkpointed", None, None] for task_id in ids]),
        "node": node,
        "states": json.dumps(["running"]),
    }
    used = [0]

    def count() -> int:
        used[0] += STEP
        return 0  # go on

    conn.execute("BEGIN")
    try:
        marks = ",".join("?" * len(ids))
        conn.execute(
            "UPDATE aioasync_tasks SET state = 'running', node_id = ?, token = 1"
            f" WHERE id IN ({marks})",
            [node, *ids],
        )
        conn.set_progress_handler(count, STEP)
        written = conn.execute(sql, params).fetchall()
        conn.set_progress_handler(None, STEP)
    finally:
        conn.execute("ROLLBACK")
    assert len(written) == len(ids)
    return used[0]


async def test_a_checkpoint_batch_costs_what_its_rows_do(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    ids = await _created(path, BIG)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO aioasync_nodes (name, concurrency, types, started_at, heartbeat_at,"
            " heartbeat_interval, node_timeout) VALUES ('batches', 1, '', 0, 0, 1, 60)"
        )
        (node,) = conn.execute("SELECT max(id) FROM aioasync_nodes").fetchone()
        small = _instructions(conn, ids[:SMALL], node)
        big = _instructions(conn, ids, node)
    finally:
        conn.close()
    # Four times the rows: about four times the instructions; n² would be sixteen.
    assert big < 8 * small, f"{big} instructions for {BIG} rows, {small} for {SMALL}"
