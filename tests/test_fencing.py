"""Rescue of a dead node's tasks and fencing of a node declared dead (``docs/explanation.md``,
"A node crashes (kill -9)" and "A node is cut off (network partition)"), in one process on
every backend.

The nodes here have hour-long heartbeat intervals and node timeouts, so nothing happens on its
own: the test makes a node's heartbeat stale (or removes its row) with SQL of its own and then
drives ``rescue_once()`` and ``heartbeat_once()`` itself. A witness counts the generators of
each task that are executing, to check that a task never runs twice at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from _db import DbTarget
from _helpers import BOUND, make_node, node_ids, read_row, wait_for, wait_state
from _observers import Recorder
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import AttemptOutcome, Node, Report, State, TaskRegistry, current_task
from aioasync_tasks._backends._driver import Completion
from aioasync_tasks._states import Event

SLOW = {"heartbeat_interval": 1800.0, "node_timeout": 3600.0}
"""No heartbeat or rescue happens by itself during a test."""


@dataclass
class Witness:
    runs: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Task id -> (node id, attempt) of each execution of its generator."""
    cleanups: Counter[int] = field(default_factory=Counter)
    """Task id -> how many times its cleanup handler started."""
    held: set[int] = field(default_factory=set)
    """Tasks (and cleanups) whose first execution has checkpointed and now waits forever."""
    cancelled: list[int] = field(default_factory=list)
    """Tasks whose waiting generator was cancelled."""
    live: Counter[int] = field(default_factory=Counter)
    overlaps: list[int] = field(default_factory=list)

    def enter(self, task_id: int) -> None:
        self.live[task_id] += 1
        if self.live[task_id] > 1:
            self.overlaps.append(task_id)

    def leave(self, task_id: int) -> None:
        self.live[task_id] -= 1


def blocking_registry(witness: Witness) -> TaskRegistry:
    """Task types whose first execution checkpoints and then waits (ignoring ``stop``) until
    it is cancelled; any later execution finishes at once. The first cleanup of a "tidy" task
    waits in the same way."""
    registry = TaskRegistry()

    async def blocker(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        witness.enter(task.id)
        try:
            runs = witness.runs.setdefault(task.id, [])
            runs.append((task.node, task.attempt))
            if len(runs) == 1:
                yield Report(context="held")
                witness.held.add(task.id)
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    witness.cancelled.append(task.id)
                    yield Report(context="late")  # a write after the fence: never applied
                    raise
            yield Report.finished(context=f"{context}+again")
        finally:
            witness.leave(task.id)

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        witness.enter(-task.id)
        try:
            witness.cleanups[task.id] += 1
            if task.type == "tidy" and witness.cleanups[task.id] == 1:
                yield Report(context="cleaning")
                witness.held.add(-task.id)
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    witness.cancelled.append(-task.id)
                    raise
            yield Report.finished()
        finally:
            witness.leave(-task.id)

    async def quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="done")

    registry.register_task("retry", blocker, max_attempts=2)
    registry.register_task("once", blocker, max_attempts=1)
    registry.register_task("stubborn", blocker, max_attempts=2, stop_timeout=3600)
    registry.register_task("stubborn_c", blocker, cleanup, stop_timeout=3600)
    registry.register_task("tidy", quick, cleanup)
    return registry


async def make_stale(db: DbTarget, engine: AsyncEngine, node_id: int) -> None:
    """Move a node's last heartbeat a day into the past (epoch seconds on SQLite)."""
    if db.is_postgres:
        sql = "UPDATE aioasync_nodes SET heartbeat_at = heartbeat_at - interval '1 day'"
    elif db.backend == "mysql":
        sql = "UPDATE aioasync_nodes SET heartbeat_at = heartbeat_at - INTERVAL 1 DAY"
    else:
        sql = "UPDATE aioasync_nodes SET heartbeat_at = heartbeat_at - 86400.0"
    async with engine.begin() as conn:
        result = await conn.execute(text(sql + " WHERE id = :id"), {"id": node_id})
        assert result.rowcount == 1


async def summary(engine: AsyncEngine, task_id: int) -> tuple[Any, ...] | None:
    """(state, requested, context, node_id, attempts, error) of a task, or None."""
    row = await read_row(engine, task_id)
    if row is None:
        return None
    return tuple(row[k] for k in ("state", "requested", "context", "node_id", "attempts", "error"))


@asynccontextmanager
async def bounded(node: Node) -> AsyncIterator[Node]:
    """Start ``node``; stop it with a bound, so that a test failing with a task stuck on the
    node fails at once instead of hanging in ``stop()``."""
    await node.start()
    try:
        yield node
    finally:
        await node.stop(timeout=BOUND)


async def heartbeat_finds_row_gone(node: Node, old_id: int) -> int:
    """Run the node's heartbeat once, its row gone: it fences itself and registers again under
    a new id, which it returns."""
    services = node.services
    async with asyncio.timeout(BOUND):  # a bound on the test, not a timing check
        await services.heartbeat.run_once()
    assert services.state.fenced.is_set()
    new_id = node.id
    assert new_id is not None
    assert new_id != old_id
    return new_id


async def test_rescue_releases_a_dead_nodes_tasks(db: DbTarget, raw: AsyncEngine) -> None:
    witness = Witness()
    registry = blocking_registry(witness)
    async with bounded(make_node(db, registry, name="a", **SLOW)) as node_a:
        a_old = node_a.id
        assert a_old is not None
        retry = await node_a.create_task("retry", "r")
        once = await node_a.create_task("once", "o")
        pausing = await node_a.create_task("stubborn", "p")
        deleting = await node_a.create_task("stubborn_c", "d")
        cleaning = await node_a.create_task("tidy", "c")
        await wait_state(node_a, cleaning, State.FINISHED)
        await node_a.delete_task(cleaning)  # its cleanup starts and waits
        await wait_for(
            lambda: witness.held == {retry, once, pausing, deleting, -cleaning},
            timeout=BOUND,
            what="every task (and the cleanup) to checkpoint and wait",
        )
        await node_a.pause_task(pausing)  # CANCELING(pause): the task ignores stop
        await node_a.delete_task(deleting)  # CANCELING(delete)
        assert await summary(raw, pausing) == ("canceling", "pause", "held", a_old, 1, None)
        assert await summary(raw, deleting) == ("canceling", "delete", "held", a_old, 1, None)
        assert await summary(raw, cleaning) == ("deleting", None, "cleaning", a_old, 1, None)

        async with make_node(db, TaskRegistry(), name="b", **SLOW) as node_b:
            await make_stale(db, raw, a_old)
            # A rescuer skips a node row that is locked by that node's claim in flight
            # (PostgreSQL): it is rescued on one of the next rounds.
            released: list[int] = []

            async def rescued() -> bool:
                released.append(await node_b.services.rescuer.run_once())
                return sum(released) > 0

            await wait_for(rescued, timeout=BOUND, what="node B to rescue node A's tasks")
            assert sum(released) == 5  # all of them at once
            assert await node_ids(raw) == [node_b.id]
            assert {
                task_id: await summary(raw, task_id)
                for task_id in (retry, once, pausing, deleting, cleaning)
            } == {
                retry: ("pending", None, "held", None, 1, None),
                once: ("failed", None, "held", None, 1, "node lost"),
                pausing: ("paused", None, "held", None, 1, None),
                deleting: ("deleting", None, "held", None, 0, None),
                cleaning: ("deleting", None, "cleaning", None, 1, None),
            }
            # Node A does not know yet: its generators are still waiting.
            assert witness.cancelled == []

            # A's next heartbeat finds its row gone: it fences itself and re-registers.
            a_new = await heartbeat_finds_row_gone(node_a, a_old)
            assert sorted(witness.cancelled) == sorted([retry, once, pausing, deleting, -cleaning])
            assert node_b.id is not None
            assert sorted(await node_ids(raw)) == sorted([a_new, node_b.id])

            # The released work runs again on A, under its new id.
            await wait_state(node_a, retry, State.FINISHED)
            await wait_state(node_a, deleting, None)
            await wait_state(node_a, cleaning, None)
            assert witness.runs[retry] == [(a_old, 1), (a_new, 2)]
            assert witness.cleanups[deleting] == 1
            assert witness.cleanups[cleaning] == 2
            assert (await node_a.get_task(once)).state is State.FAILED
            assert (await node_a.get_task(pausing)).state is State.PAUSED
            assert witness.runs[pausing] == [(a_old, 1)]
            assert witness.runs[once] == [(a_old, 1)]
    assert witness.overlaps == []


async def test_fenced_node_stops_its_tasks_and_its_late_writes_are_rejected(
    db: DbTarget, raw: AsyncEngine
) -> None:
    witness = Witness()
    registry = blocking_registry(witness)
    seen = Recorder()
    async with bounded(make_node(db, registry, name="a", observers=[seen], **SLOW)) as node_a:
        services_a = node_a.services
        a_old = node_a.id
        assert a_old is not None
        task_id = await node_a.create_task("retry", "r", group="fenced")
        await wait_for(
            lambda: task_id in witness.held, timeout=BOUND, what="the task to checkpoint"
        )
        # Keep the released task from being claimed again until the test has looked.
        await node_a.pause_group("fenced")
        assert await summary(raw, task_id) == ("running", None, "held", a_old, 1, None)

        # Another node declared A dead and removed its row (A's tasks are still its own).
        async with raw.begin() as conn:
            await conn.execute(text("DELETE FROM aioasync_nodes WHERE id = :id"), {"id": a_old})
        assert witness.cancelled == []

        a_new = await heartbeat_finds_row_gone(node_a, a_old)
        # The heartbeat found the row gone: A stopped its task at once and registered again
        # under a new id, waiting for nothing; the generator was cancelled.
        assert await node_ids(raw) == [a_new]
        await wait_for(lambda: not services_a.state.executions, timeout=BOUND, what="the execution")
        assert witness.cancelled == [task_id]
        # The row still named the old id and the execution's claim token: the execution's
        # last word released it (NODE_LOST); a rescue finds nothing left to do.
        assert await services_a.rescuer.run_once() == 0
        fenced_row = await read_row(raw, task_id)
        assert fenced_row is not None
        # The generator's write after its cancellation ("late") never landed.
        assert await summary(raw, task_id) == ("pending", None, "held", None, 1, None)

        # Writes still bound to the old id are rejected and change nothing.
        committer = services_a.committer
        assert await committer.checkpoint(a_old, task_id, 1, "later") is False
        assert (
            await committer.complete(
                a_old, Completion(task_id, 1, Event.FINISHED, context="finished late")
            )
            is False
        )
        assert await read_row(raw, task_id) == fenced_row

        # The released task runs again, on A under its new id, from its checkpoint.
        await node_a.resume_group("fenced")
        await wait_state(node_a, task_id, State.FINISHED)
        task = await node_a.get_task(task_id)
    assert task.context == "held+again"
    assert task.attempts == 2
    assert witness.runs[task_id] == [(a_old, 1), (a_new, 2)]
    assert witness.overlaps == []
    assert (seen.fencings, seen.lease_losses) == (1, 0)
    assert seen.outcomes() == [AttemptOutcome.LOST, AttemptOutcome.FINISHED]
