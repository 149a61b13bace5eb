"""The ledger of the multi-process tests: what the task types of ``nodeproc`` did, written by
the node processes into the test's own database and read back by the tests.

Tables (created by the test before any node process starts):

``ledger(task_id, step, node_id, pid, t_start, t_end)``
    One row per step a ``counter``-like task *completed*, written (and committed) just before
    the task yields the checkpoint of that step. A step whose row exists but whose checkpoint
    never became durable (the node was killed in between) is done again after a rescue: such a
    repeat is the only duplicate allowed, and only after a kill -9.
``events(task_id, kind, node_id, pid, at)``
    Things a task noticed: ``stop seen`` (it saw ``stop`` set and ignored it), ``cancelled``
    (``CancelledError`` was thrown into it after its grace period).
``cleanups(task_id, node_id, pid, context, at)``
    One row per run of a cleanup handler, with the context it was given.

Timestamps are ``time.time()`` of the node processes: they all run on this machine, so they
share one clock, which is what the "never on two nodes at once" check needs.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT = 60.0
"""Seconds a ledger write waits for the SQLite write lock (the nodes hold it briefly)."""

TABLES = (
    "CREATE TABLE ledger (task_id BIGINT NOT NULL, step INTEGER NOT NULL,"
    " node_id BIGINT NOT NULL, pid INTEGER NOT NULL, t_start DOUBLE PRECISION NOT NULL,"
    " t_end DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE events (task_id BIGINT NOT NULL, kind TEXT NOT NULL, node_id BIGINT NOT NULL,"
    " pid INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE cleanups (task_id BIGINT NOT NULL, node_id BIGINT NOT NULL,"
    " pid INTEGER NOT NULL, context TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
)


def ledger_engine(url: str, schema: str | None) -> AsyncEngine:
    """An engine for the ledger tables: the test schema on PostgreSQL, a busy timeout on
    SQLite (several processes write to the one file)."""
    connect_args: dict[str, Any]
    if schema is not None:
        connect_args = {"server_settings": {"search_path": schema}}
    elif url.startswith("sqlite"):
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT}
    else:
        connect_args = {}
    return create_async_engine(url, connect_args=connect_args)


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for statement in TABLES:
            await conn.execute(text(statement))


class LedgerWriter:
    """Used inside the node processes by the test task types."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.pid = os.getpid()

    async def step(self, task_id: int, step: int, node_id: int, t_start: float) -> None:
        t_end = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO ledger (task_id, step, node_id, pid, t_start, t_end)"
                    " VALUES (:task, :step, :node, :pid, :t_start, :t_end)"
                ),
                {
                    "task": task_id,
                    "step": step,
                    "node": node_id,
                    "pid": self.pid,
                    "t_start": t_start,
                    "t_end": t_end,
                },
            )

    async def events(self, task_id: int, node_id: int, events: list[tuple[str, float]]) -> None:
        """Record ``(kind, time.time())`` events of a task in one transaction."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (task_id, kind, node_id, pid, at)"
                    " VALUES (:task, :kind, :node, :pid, :at)"
                ),
                [
                    {"task": task_id, "kind": kind, "node": node_id, "pid": self.pid, "at": at}
                    for kind, at in events
                ],
            )

    async def cleanup(self, task_id: int, node_id: int, context: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO cleanups (task_id, node_id, pid, context, at)"
                    " VALUES (:task, :node, :pid, :context, :at)"
                ),
                {
                    "task": task_id,
                    "node": node_id,
                    "pid": self.pid,
                    "context": context,
                    "at": time.time(),
                },
            )


@dataclass(frozen=True)
class Step:
    task_id: int
    step: int
    node_id: int
    pid: int
    t_start: float
    t_end: float


class LedgerReader:
    """Used by the tests to read what the node processes did."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def steps(self, task_id: int | None = None) -> list[Step]:
        sql = "SELECT task_id, step, node_id, pid, t_start, t_end FROM ledger"
        params: dict[str, Any] = {}
        if task_id is not None:
            sql += " WHERE task_id = :task"
            params["task"] = task_id
        async with self.engine.connect() as conn:
            result = await conn.execute(text(sql + " ORDER BY t_start, step"), params)
            return [Step(*row) for row in result]

    async def step_counts(self) -> dict[int, int]:
        """How many ledger rows each task has."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                text("SELECT task_id, count(*) FROM ledger GROUP BY task_id")
            )
            return {row[0]: row[1] for row in result}

    async def events(self, task_id: int) -> list[str]:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                text("SELECT kind FROM events WHERE task_id = :task ORDER BY at"),
                {"task": task_id},
            )
            return [row[0] for row in result]

    async def all_events(self) -> list[tuple[int, str]]:
        """(task id, kind) of every event of every task."""
        async with self.engine.connect() as conn:
            result = await conn.execute(text("SELECT task_id, kind FROM events ORDER BY at"))
            return [(row[0], row[1]) for row in result]

    async def cleanups(self, task_id: int) -> list[tuple[int, str]]:
        """(node id, context) of every cleanup run of a task."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                text("SELECT node_id, context FROM cleanups WHERE task_id = :task ORDER BY at"),
                {"task": task_id},
            )
            return [(row[0], row[1]) for row in result]

    async def assert_no_overlap(self) -> None:
        """No task ran two steps on different nodes at overlapping times."""
        by_task: dict[int, list[Step]] = defaultdict(list)
        for step in await self.steps():
            by_task[step.task_id].append(step)
        for task_id, steps in by_task.items():
            for index, a in enumerate(steps):
                for b in steps[index + 1 :]:
                    if a.node_id == b.node_id:
                        continue
                    overlap = a.t_start < b.t_end and b.t_start < a.t_end
                    assert not overlap, f"task {task_id} ran on two nodes at once: {a} and {b}"


def duplicates(steps: list[Step]) -> dict[int, int]:
    """Steps done more than once, with their counts."""
    counts = Counter(s.step for s in steps)
    return {step: n for step, n in counts.items() if n > 1}
