"""Concurrency safety of the user operations (``docs/explanation.md``, "Every transition is a
compare-and-set"): many callers, one task table.

Twenty tasks in mixed states (INIT, PENDING, RUNNING on a worker node of the test, PAUSED,
FINISHED, FAILED; some with a cleanup handler) are hit by 200 random ``run``/``pause``/
``delete``/``change_task_group`` calls from several client-only nodes, each with its own engine
and connection pool (on PostgreSQL also from two more OS processes, ``opsproc.py``). Each call
must succeed or raise ``InvalidTransition``/``TaskNotFound``. Once the system has settled, every
row must be in a consistent visible state, no task may be lost or survive a successful delete,
and every deleted task with a cleanup handler must have had its cleanup run exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _db import DbTarget
from _helpers import make_node, raw_engine, wait_for
from opsproc import CALLS as PROCESS_CALLS
from opsproc import GROUPS, Tally, random_ops, run_stream
from sqlalchemy import text

from aioasync_tasks import Node, Report, State, TaskRegistry, current_task

SEED = 20240611
CLIENT_NODES = 4
STREAMS_PER_NODE = 5
OPS_PER_STREAM = 10  # 4 nodes x 5 streams x 10 = 200 calls in this process
WORKER_CONCURRENCY = 6
WITH_CLEANUP = frozenset({"work_c", "quick_c"})
OPS_SCRIPT = Path(__file__).with_name("opsproc.py")
PROCESS_TIMEOUT = 90.0
WORKER_TIMINGS = {"heartbeat_interval": 0.5, "node_timeout": 30.0}
"""Liveness timings no load on two shared cores can break: the test is about user calls, and
with the FAST ones (lease 0.75 s) a slow heartbeat under this storm stops every task."""


@dataclass
class Witness:
    """What the task generators saw, for checks against the table."""

    live: Counter[int] = field(default_factory=Counter)
    """Task ids whose running generator is executing now (count must stay 0 or 1)."""
    overlaps: list[int] = field(default_factory=list)
    """Task ids seen running twice at once."""
    cleanups: Counter[int] = field(default_factory=Counter)
    """How many times each task's cleanup handler started."""


def build_registry(witness: Witness) -> TaskRegistry:
    registry = TaskRegistry()

    async def work(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        info = current_task()
        assert info is not None
        if witness.live[info.id]:
            witness.overlaps.append(info.id)
        witness.live[info.id] += 1
        try:
            step = int(context or "0")
            for _ in range(3):
                step += 1
                yield Report(context=str(step))  # durable before the generator resumes
            await stop.wait()  # run until paused, deleted or handed off
        finally:
            witness.live[info.id] -= 1

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        info = current_task()
        assert info is not None
        witness.cleanups[info.id] += 1
        yield Report(context=context + ":cleaning")  # a checkpoint inside a cleanup handler
        yield Report.finished()

    async def quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="done")

    async def failing(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.failed(error="always fails", context="failed")

    registry.register_task("work", work)
    registry.register_task("work_c", work, cleanup)
    registry.register_task("quick_c", quick, cleanup)
    registry.register_task("failing", failing)
    return registry


async def create_mixed_tasks(worker: Node, witness: Witness) -> dict[int, str]:
    """Twenty tasks: 4 INIT, 6 RUNNING + 4 PENDING, 2 FINISHED, 2 FAILED, 2 PAUSED.

    Returns their types by id.
    """

    def spec(i: int, type_: str, *, auto_run: bool = True) -> dict[str, Any]:
        return {
            "type": type_,
            "context": "0",
            "user": f"u{i % 3}",
            "group": GROUPS[i % len(GROUPS)],
            "auto_run": auto_run,
        }

    # Claims go oldest first: the short tasks first, then the ones that run until stopped.
    specs = [spec(i, "quick_c") for i in range(2)]
    specs += [spec(i, "failing") for i in range(2)]
    specs += [spec(i, "work" if i % 2 else "work_c") for i in range(10)]
    specs += [spec(i, "work_c" if i % 2 else "work", auto_run=False) for i in range(6)]
    ids = await worker.create_tasks(specs)
    for task_id in ids[-2:]:
        await worker.pause_task(task_id)

    expected = {
        State.RUNNING: WORKER_CONCURRENCY,
        State.PENDING: 10 - WORKER_CONCURRENCY,
        State.FINISHED: 2,
        State.FAILED: 2,
        State.INIT: 4,
        State.PAUSED: 2,
    }

    seen: list[object] = []

    async def in_place() -> bool:
        counts = {s: await worker.count_tasks(states=[s]) for s in expected}
        running = {t.id for t in await worker.get_tasks(states=[State.RUNNING])}
        live = {i for i, n in witness.live.items() if n}
        seen[:] = [counts, running, live]
        return counts == expected and running == live

    try:
        await wait_for(in_place, timeout=60, what="the initial mix of states")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen (counts, running, live): {seen}") from None
    return {task_id: s["type"] for task_id, s in zip(ids, specs, strict=True)}


async def read_rows(db: DbTarget) -> dict[int, dict[str, Any]]:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                text(
                    "SELECT id, type, state, requested, node_id, has_cleanup, group_name"
                    " FROM aioasync_tasks"
                )
            )
            return {row.id: dict(row._mapping) for row in result}
    finally:
        await engine.dispose()


def check_row(row: dict[str, Any], worker_id: int | None) -> None:
    """Columns consistent with the state; ``worker_id`` None once no node may own anything."""
    state = State(row["state"])  # a state the table allows
    assert (row["requested"] is not None) == (state is State.CANCELING), row
    if state is State.CANCELING:
        assert row["requested"] in ("pause", "delete"), row
    if state in (State.RUNNING, State.CANCELING):
        assert worker_id is not None, row
        assert row["node_id"] == worker_id, row
    elif state is State.DELETING:
        assert row["node_id"] in (None, worker_id), row
    else:
        assert row["node_id"] is None, row
    assert bool(row["has_cleanup"]) == (row["type"] in WITH_CLEANUP), row
    if state is State.DELETING:
        assert row["has_cleanup"], row  # a task without cleanup is removed at once
    assert row["group_name"] in GROUPS, row


def check_outcome(
    types: dict[int, str], rows: dict[int, dict[str, Any]], tally: Tally, witness: Witness
) -> None:
    """Nothing lost, nothing resurrected, every cleanup run exactly once."""
    present = set(rows)
    assert present <= set(types)
    lost = set(types) - present - tally.deleted
    assert not lost, f"tasks gone without a successful delete: {sorted(lost)}"
    survived = present & tally.deleted
    assert not survived, f"tasks still here after a successful delete: {sorted(survived)}"
    for task_id, type_ in types.items():
        runs = witness.cleanups[task_id]
        if task_id in present or type_ not in WITH_CLEANUP:
            assert runs == 0, (task_id, type_, runs)
        elif task_id in tally.forced:
            assert runs <= 1, (task_id, runs)  # force may remove the row before its cleanup
        else:
            assert runs == 1, (task_id, runs)


async def start_processes(
    db: DbTarget, ids: Iterable[int], procs: list[asyncio.subprocess.Process]
) -> None:
    """Start two ``opsproc.py`` processes (into ``procs``) and wait until their client nodes
    are ready to fire."""
    assert db.schema is not None
    for index in range(2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(OPS_SCRIPT),
            "--url",
            db.url,
            "--schema",
            db.schema,
            "--ids",
            ",".join(map(str, ids)),
            "--seed",
            str(SEED + 1 + index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), PROCESS_TIMEOUT)
        if line.strip() != b"ready":
            _, err = await proc.communicate()
            raise AssertionError(f"opsproc.py did not start: {line!r} {err.decode()[-2000:]}")


async def reap(procs: list[asyncio.subprocess.Process]) -> None:
    """Kill what is left of our own processes when the test fails halfway."""
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish_process(proc: asyncio.subprocess.Process, tally: Tally) -> None:
    out, err = await asyncio.wait_for(proc.communicate(b"go\n"), PROCESS_TIMEOUT)
    assert proc.returncode == 0, err.decode()[-4000:]
    tally.merge(json.loads(out.decode().strip().splitlines()[-1]))


def check_logs(records: list[logging.LogRecord], tally: Tally) -> None:
    """The only warnings allowed are writes rejected for a task that was force-deleted while
    it ran, and the failure record of each ``failing`` task: with one worker and no lost node,
    nothing else may take a task from its owner."""
    unexplained = [
        f"{r.levelname} {r.getMessage()}"
        for r in records
        if r.name.startswith("aioasync_tasks")
        and r.levelno >= logging.WARNING
        and getattr(r, "task_id", None) not in tally.forced
        and not (
            getattr(r, "type", None) == "failing" and "task failed on attempt" in r.getMessage()
        )
    ]
    assert not unexplained, unexplained


@pytest.mark.slow
async def test_concurrent_user_operations(db: DbTarget, caplog: pytest.LogCaptureFixture) -> None:
    witness = Witness()
    registry = build_registry(witness)
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            make_node(db, registry, concurrency=WORKER_CONCURRENCY, **WORKER_TIMINGS)
        )
        clients = [
            await stack.enter_async_context(make_node(db, concurrency=0))
            for _ in range(CLIENT_NODES)
        ]
        assert len({id(c.engine) for c in clients} | {id(worker.engine)}) == CLIENT_NODES + 1

        types = await create_mixed_tasks(worker, witness)
        ids = list(types)
        rng = random.Random(SEED)
        streams = [
            (clients[s % CLIENT_NODES], random_ops(rng, ids, OPS_PER_STREAM))
            for s in range(CLIENT_NODES * STREAMS_PER_NODE)
        ]
        tally = Tally()
        procs: list[asyncio.subprocess.Process] = []
        stack.push_async_callback(reap, procs)
        if db.is_postgres:
            await start_processes(db, ids, procs)
        await asyncio.gather(
            *(run_stream(node, ops, tally) for node, ops in streams),
            *(finish_process(proc, tally) for proc in procs),
        )
        assert not tally.unexpected, tally.unexpected
        assert tally.calls == 200 + PROCESS_CALLS * len(procs)
        # Not vacuous: the storm deleted tasks, and some calls were refused.
        assert tally.ok["delete"] > 0, tally
        assert sum(tally.rejected.values()) > 0, tally

        worker_id = worker.id
        assert worker_id is not None

        async def settled() -> bool:
            rows = await read_rows(db)
            states = Counter(State(r["state"]) for r in rows.values())
            if states[State.CANCELING] or states[State.DELETING]:
                return False
            running = {i for i, r in rows.items() if r["state"] == State.RUNNING}
            live = {i for i, n in witness.live.items() if n}
            idle_slots = len(running) < WORKER_CONCURRENCY
            return running == live and not (idle_slots and states[State.PENDING])

        await wait_for(settled, timeout=60, what="the worker to settle after the calls")
        rows = await read_rows(db)
        for row in rows.values():
            check_row(row, worker_id)
        check_outcome(types, rows, tally, witness)
        assert not witness.overlaps, f"tasks run twice at once: {witness.overlaps}"

        await worker.stop()  # graceful: RUNNING tasks are handed back as PENDING
        rows = await read_rows(db)
        for row in rows.values():
            check_row(row, None)
            assert row["state"] not in (State.RUNNING, State.CANCELING, State.DELETING), row
        assert not any(witness.live.values())
        check_outcome(types, rows, tally, witness)
    check_logs(caplog.records, tally)
