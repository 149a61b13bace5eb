"""Conformance: every cell of the user-operation table (the module docstring of
``aioasync_tasks._states``; ``docs/explanation.md``, "States and transitions"), on both backends.

Each test reaches its starting state honestly, with real nodes on a real database:

- INIT by ``auto_run=False``; PENDING on a client-only node (no node executes tasks);
  PAUSED by pausing a pending task; DELETING (unowned) by deleting a task whose type has a
  cleanup handler while no node can run cleanups;
- RUNNING with a worker node whose task writes a checkpoint and then waits on an event the test
  controls; CANCELING with the same task, which keeps running after ``stop`` is set until the test
  releases it; FINISHED and FAILED with tasks that finish or fail (the worker is then stopped, so
  nothing but the test touches the row); DELETING (owned) with a cleanup handler that waits.

The expected outcome of every cell is written out by hand below from that table, never derived from
the library. Operations go through a second, client-only node, so stop requests travel through the
database (NOTIFY on PostgreSQL, the heartbeat on SQLite), as they do between processes; a few tests
operate through the owning node itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

import pytest
from _db import DbTarget
from _helpers import LONG_BOUND, make_node, wait_event, wait_for

from aioasync_tasks import (
    InvalidTransition,
    Node,
    Operation,
    Report,
    State,
    StopRequest,
    Task,
    TaskNotFound,
    TaskRegistry,
    current_task,
)

STOP_TIMEOUT = 90.0
"""Grace period of the test task types: longer than any test, so no task is ever cancelled
for ignoring ``stop`` (the tests decide when a task ends)."""
NEW_GROUP = "moved"


# -- the task types ---------------------------------------------------------------------------


class Gate:
    """What one execution (a run or a cleanup) of one task tells the test, and waits for."""

    def __init__(self, release: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ended = asyncio.Event()
        self.stop: asyncio.Event | None = None
        self.contexts: list[str] = []
        self.finished = 0
        if release:
            self.release.set()


class Harness:
    """A client-only node for the operations, an optional worker node, and the task types.

    ``hold``: checkpoints ``"started"``, then waits for the test's release, *ignoring* ``stop``
    meanwhile (so it stays CANCELING as long as the test wants); it then returns, which is
    FINISHED without a stop request and *stopped* after one. ``finish``/``fail``: checkpoint,
    then finish or fail. The ``_c`` variants have a cleanup handler that waits for its release.
    """

    def __init__(self, db: DbTarget) -> None:
        self.db = db
        self.registry = TaskRegistry()
        self.runs: dict[int, Gate] = {}
        self.cleanups: dict[int, Gate] = {}
        self.closing = False
        self.worker: Node | None = None
        self.client = make_node(db, self.registry, concurrency=0)
        for suffix, cleanup in (("", None), ("_c", self._cleanup)):
            for name, running in (("hold", self._hold), ("finish", self._finish)):
                self.registry.register_task(
                    name + suffix, running, cleanup, stop_timeout=STOP_TIMEOUT
                )
            self.registry.register_task(
                "fail" + suffix, self._fail, cleanup, stop_timeout=STOP_TIMEOUT, max_attempts=1
            )

    def _gate(self, gates: dict[int, Gate], task_id: int) -> Gate:
        gate = gates.get(task_id)
        if gate is None:
            gate = gates[task_id] = Gate(release=self.closing)
        return gate

    def run_gate(self, task_id: int) -> Gate:
        return self._gate(self.runs, task_id)

    def cleanup_gate(self, task_id: int) -> Gate:
        return self._gate(self.cleanups, task_id)

    def _enter(self, gates: dict[int, Gate], context: str, stop: asyncio.Event) -> Gate:
        info = current_task()
        assert info is not None
        gate = self._gate(gates, info.id)
        gate.stop = stop
        gate.contexts.append(context)
        return gate

    async def _hold(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        gate = self._enter(self.runs, context, stop)
        try:
            yield Report(context="started")
            gate.started.set()
            await gate.release.wait()
        finally:
            gate.ended.set()

    async def _finish(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        gate = self._enter(self.runs, context, stop)
        yield Report(context="working")
        gate.finished += 1
        yield Report.finished(context="finished")

    async def _fail(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        gate = self._enter(self.runs, context, stop)
        yield Report(context="before failing")
        gate.finished += 1
        yield Report.failed("boom")

    async def _cleanup(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        gate = self._enter(self.cleanups, context, stop)
        gate.started.set()
        try:
            await gate.release.wait()
        finally:
            gate.ended.set()
        gate.finished += 1
        yield Report.finished()

    async def __aenter__(self) -> Harness:
        try:
            await self.client.start()
        except BaseException:
            await self.client.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closing = True  # every gate from now on opens at once: the worker can stop
        for gate in [*self.runs.values(), *self.cleanups.values()]:
            gate.release.set()
        try:
            if self.worker is not None:
                await self.worker.stop()
        finally:
            await self.client.stop()

    async def start_worker(self) -> Node:
        if self.worker is None:
            self.worker = make_node(self.db, self.registry, concurrency=4, name="worker")
            await self.worker.start()
        return self.worker

    @property
    def worker_id(self) -> int:
        assert self.worker is not None
        assert self.worker.id is not None
        return self.worker.id

    async def state(self, task_id: int) -> tuple[State, StopRequest | None] | None:
        """The task's ``(state, requested)``, or None once its row is gone."""
        try:
            task = await self.client.get_task(task_id)
        except TaskNotFound:
            return None
        return task.state, task.requested

    async def wait_state(
        self, task_id: int, state: State | None, requested: StopRequest | None = None
    ) -> None:
        expected = None if state is None else (state, requested)

        async def reached() -> bool:
            return await self.state(task_id) == expected

        await wait_for(reached, timeout=LONG_BOUND, what=f"task {task_id} to be {expected}")

    # -- reaching a starting state ----------------------------------------------------------

    async def reach(self, start: str, cleanup: bool) -> int:
        """Create a task and bring it honestly to ``start``; returns its id."""
        suffix = "_c" if cleanup else ""
        client = self.client
        if start == "init":
            return await client.create_task("hold" + suffix, "created", auto_run=False)
        if start == "pending":
            return await client.create_task("hold" + suffix, "created")
        if start == "paused":
            task_id = await client.create_task("hold" + suffix, "created")
            await client.pause_task(task_id)
            return task_id
        if start == "deleting_unowned":
            assert cleanup
            task_id = await client.create_task("hold_c", "created")
            await client.delete_task(task_id)
            return task_id
        await self.start_worker()
        if start in ("running", "canceling_pause", "canceling_delete"):
            task_id = await client.create_task("hold" + suffix, "created")
            gate = self.run_gate(task_id)
            await wait_event(gate.started, f"task {task_id} to start", LONG_BOUND)
            if start != "running":
                if start == "canceling_pause":
                    await client.pause_task(task_id)
                else:
                    await client.delete_task(task_id)
                assert gate.stop is not None
                await wait_event(gate.stop, f"the stop request of task {task_id}", LONG_BOUND)
            return task_id
        if start in ("finished", "failed"):
            task_id = await client.create_task(start.removesuffix("ed") + suffix, "created")
            await self.wait_state(task_id, State.FINISHED if start == "finished" else State.FAILED)
            assert self.worker is not None
            await self.worker.stop()  # from now on only the test changes the row
            return task_id
        assert start == "deleting_owned"
        assert cleanup
        task_id = await client.create_task("finish_c", "created")
        await self.wait_state(task_id, State.FINISHED)
        await client.delete_task(task_id)
        await wait_event(
            self.cleanup_gate(task_id).started, f"the cleanup of task {task_id}", LONG_BOUND
        )
        return task_id


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Becomes:
    """The task is now in ``state`` (with ``requested``), in the same group."""

    state: State
    requested: StopRequest | None = None


@dataclass(frozen=True)
class ByCleanup:
    """Footnote ¹: the outcome depends on whether the type has a cleanup handler."""

    with_handler: object
    without: object


SAME = "same (idempotent, nothing written)"
INVALID = "InvalidTransition"
REMOVED = "row removed"
MOVED = "same state, new group"

RUN, PAUSE, DELETE, CHANGE = (
    Operation.RUN,
    Operation.PAUSE,
    Operation.DELETE,
    Operation.CHANGE_GROUP,
)
PENDING = Becomes(State.PENDING)
PAUSED = Becomes(State.PAUSED)
DELETING = Becomes(State.DELETING)
CANCELING_PAUSE = Becomes(State.CANCELING, StopRequest.PAUSE)
CANCELING_DELETE = Becomes(State.CANCELING, StopRequest.DELETE)
DELETED = ByCleanup(DELETING, REMOVED)

TABLE: dict[str, dict[Operation, object]] = {
    "init": {RUN: PENDING, PAUSE: PAUSED, DELETE: DELETED, CHANGE: MOVED},
    "pending": {RUN: SAME, PAUSE: PAUSED, DELETE: DELETED, CHANGE: MOVED},
    "running": {RUN: SAME, PAUSE: CANCELING_PAUSE, DELETE: CANCELING_DELETE, CHANGE: MOVED},
    "canceling_pause": {RUN: INVALID, PAUSE: SAME, DELETE: CANCELING_DELETE, CHANGE: MOVED},
    "canceling_delete": {RUN: INVALID, PAUSE: INVALID, DELETE: SAME, CHANGE: MOVED},
    "paused": {RUN: PENDING, PAUSE: SAME, DELETE: DELETED, CHANGE: MOVED},
    "finished": {RUN: INVALID, PAUSE: INVALID, DELETE: DELETED, CHANGE: MOVED},
    "failed": {RUN: PENDING, PAUSE: INVALID, DELETE: DELETED, CHANGE: MOVED},
    "deleting_unowned": {RUN: INVALID, PAUSE: INVALID, DELETE: SAME, CHANGE: INVALID},
    "deleting_owned": {RUN: INVALID, PAUSE: INVALID, DELETE: SAME, CHANGE: INVALID},
}
"""The user-operation table, by starting state."""

FINISHED = Becomes(State.FINISHED)
SETTLED: dict[str, dict[Operation, object]] = {
    "running": {RUN: FINISHED, PAUSE: PAUSED, DELETE: REMOVED, CHANGE: FINISHED},
    "canceling_pause": {RUN: PAUSED, PAUSE: PAUSED, DELETE: REMOVED, CHANGE: PAUSED},
    "canceling_delete": {RUN: REMOVED, PAUSE: REMOVED, DELETE: REMOVED, CHANGE: REMOVED},
    "deleting_owned": {RUN: REMOVED, PAUSE: REMOVED, DELETE: REMOVED, CHANGE: REMOVED},
}
"""Where a task that a node is executing ends once the test releases it (the state diagram of
``docs/explanation.md``): the task returns, which is *finished* without a stop request, else
*stopped*; a cleanup that finishes removes the row."""

ACTIVE_STARTS = frozenset(SETTLED)
STARTS = list(TABLE)


def _cells() -> list[tuple[str, Operation, bool]]:
    cells: list[tuple[str, Operation, bool]] = []
    for start in STARTS:
        for op in (RUN, PAUSE, DELETE, CHANGE):
            needs_cleanup = start.startswith("deleting")
            # The handler only matters for delete; the other operations use a type with one.
            variants = [True] if needs_cleanup or op is not DELETE else [True, False]
            cells.extend((start, op, cleanup) for cleanup in variants)
    return cells


CELLS = _cells()


def _cell_id(cell: tuple[str, Operation, bool]) -> str:
    start, op, cleanup = cell
    return f"{start}-{op.name.lower()}-{'cleanup' if cleanup else 'plain'}"


async def apply(node: Node, op: Operation, task_id: int, *, force: bool = False) -> None:
    if op is RUN:
        await node.run_task(task_id)
    elif op is PAUSE:
        await node.pause_task(task_id)
    elif op is DELETE:
        await node.delete_task(task_id, force=force)
    else:
        await node.change_task_group(task_id, NEW_GROUP)


def _check_ownership(task: Task, worker_id: int | None) -> None:
    """Only RUNNING, CANCELING and a DELETING being cleaned up have an owner."""
    if task.state in (State.RUNNING, State.CANCELING):
        assert task.node == worker_id
    elif task.state is not State.DELETING:
        assert task.node is None
    assert (task.state is State.CANCELING) == (task.requested is not None)


@pytest.mark.parametrize(("start", "op", "cleanup"), CELLS, ids=[_cell_id(c) for c in CELLS])
async def test_operation_cell(db: DbTarget, start: str, op: Operation, cleanup: bool) -> None:
    async with Harness(db) as h:
        task_id = await h.reach(start, cleanup)
        before = await h.client.get_task(task_id)
        worker_id = h.worker_id if start in ACTIVE_STARTS else None
        _check_ownership(before, worker_id)

        expected = TABLE[start][op]
        if isinstance(expected, ByCleanup):
            expected = expected.with_handler if cleanup else expected.without

        if expected == INVALID:
            with pytest.raises(InvalidTransition) as raised:
                await apply(h.client, op, task_id)
            assert raised.value.task_id == task_id
            assert raised.value.state is before.state
            assert raised.value.operation is op
            assert await h.client.get_task(task_id) == before
        elif expected == SAME:
            await apply(h.client, op, task_id)
            assert await h.client.get_task(task_id) == before  # updated_at included
        elif expected == REMOVED:
            await apply(h.client, op, task_id)
            with pytest.raises(TaskNotFound) as missing:
                await h.client.get_task(task_id)
            assert missing.value.task_id == task_id
        else:
            await apply(h.client, op, task_id)
            after = await h.client.get_task(task_id)
            if expected == MOVED:
                assert (after.state, after.requested) == (before.state, before.requested)
                assert after.group == NEW_GROUP
            else:
                assert isinstance(expected, Becomes)
                assert (after.state, after.requested) == (expected.state, expected.requested)
                assert after.group == before.group
            assert after.context == before.context  # a user operation never loses a checkpoint
            assert (after.id, after.type, after.user, after.created_at) == (
                before.id,
                before.type,
                before.user,
                before.created_at,
            )
            _check_ownership(after, worker_id)
            if start == "failed" and op is RUN:
                assert before.attempts == 1
                assert after.attempts == 0  # footnote ²: a fresh series of attempts
                assert after.context == "before failing"
            if expected in (CANCELING_PAUSE, CANCELING_DELETE) and start == "running":
                gate = h.run_gate(task_id)
                assert gate.stop is not None
                await wait_event(gate.stop, "the stop request to reach the task", LONG_BOUND)

        if start not in ACTIVE_STARTS:
            return
        # Release the task (and any cleanup) and see where it ends.
        h.run_gate(task_id).release.set()
        h.cleanup_gate(task_id).release.set()
        settled = SETTLED[start][op]
        if settled == REMOVED:
            await h.wait_state(task_id, None)
        else:
            assert isinstance(settled, Becomes)
            await h.wait_state(task_id, settled.state, settled.requested)
            final = await h.client.get_task(task_id)
            assert final.context == "started"
            assert final.group == (NEW_GROUP if op is CHANGE else "default")
            _check_ownership(final, None)
        cleaned = settled == REMOVED and cleanup
        assert h.cleanup_gate(task_id).finished == (1 if cleaned else 0)
        assert len(h.run_gate(task_id).contexts) == 1  # it ran once, never again


@pytest.mark.parametrize("start", STARTS)
async def test_force_delete_removes_at_once_without_cleanup(db: DbTarget, start: str) -> None:
    """``delete(force=True)`` removes the row from every state; a running task (or cleanup) is
    told to stop and ends, and the cleanup handler never runs for it."""
    async with Harness(db) as h:
        task_id = await h.reach(start, cleanup=True)
        await h.client.delete_task(task_id, force=True)
        with pytest.raises(TaskNotFound):
            await h.client.get_task(task_id)
        if start in ACTIVE_STARTS:
            gate = h.cleanup_gate(task_id) if start == "deleting_owned" else h.run_gate(task_id)
            assert gate.stop is not None
            # Never released: the execution ends only because its row is gone.
            await wait_event(
                gate.ended, "the execution of the force-deleted task to end", LONG_BOUND
            )
            assert gate.stop.is_set()
            assert not gate.release.is_set()
        if start != "deleting_owned":
            assert not h.cleanup_gate(task_id).started.is_set()
        assert h.cleanup_gate(task_id).finished == 0
        assert await h.client.count_tasks() == 0


@pytest.mark.parametrize("op", ["pause", "delete", "force"])
async def test_operating_through_the_owner_stops_its_task(db: DbTarget, op: str) -> None:
    """An operation issued on the node that runs the task stops it without a round trip."""
    async with Harness(db) as h:
        worker = await h.start_worker()
        task_id = await worker.create_task("hold_c", "created")
        gate = h.run_gate(task_id)
        await wait_event(gate.started, "the task to start", LONG_BOUND)
        assert gate.stop is not None
        if op == "pause":
            await worker.pause_task(task_id)
            assert await h.state(task_id) == (State.CANCELING, StopRequest.PAUSE)
            await wait_event(gate.stop, "the stop request", LONG_BOUND)
            gate.release.set()
            await h.wait_state(task_id, State.PAUSED)
        elif op == "delete":
            await worker.delete_task(task_id)
            assert await h.state(task_id) == (State.CANCELING, StopRequest.DELETE)
            await wait_event(gate.stop, "the stop request", LONG_BOUND)
            gate.release.set()
            cleanup = h.cleanup_gate(task_id)
            await wait_event(cleanup.started, "the cleanup to start", LONG_BOUND)
            assert cleanup.contexts == ["started"]  # the cleanup gets the last checkpoint
            assert await h.state(task_id) == (State.DELETING, None)
            assert (await h.client.get_task(task_id)).node == h.worker_id
            cleanup.release.set()
            await h.wait_state(task_id, None)
            assert cleanup.finished == 1
        else:
            await worker.delete_task(task_id, force=True)
            assert await h.state(task_id) is None
            await wait_event(gate.ended, "the task to be cancelled", LONG_BOUND)
            assert not h.cleanup_gate(task_id).started.is_set()


async def test_paused_task_resumes_from_its_checkpoint(db: DbTarget) -> None:
    """RUNNING → pause → PAUSED keeps the last checkpoint; run → PENDING → it runs again from
    that checkpoint."""
    async with Harness(db) as h:
        task_id = await h.reach("running", cleanup=False)
        await h.client.pause_task(task_id)
        gate = h.run_gate(task_id)
        assert gate.stop is not None
        await wait_event(gate.stop, "the stop request", LONG_BOUND)
        gate.release.set()
        await h.wait_state(task_id, State.PAUSED)
        paused = await h.client.get_task(task_id)
        # A stop on request gives the attempt back: pausing never uses up retries.
        assert (paused.context, paused.attempts, paused.node) == ("started", 0, None)

        h.runs[task_id] = Gate()  # a fresh gate for the second run
        await h.client.run_task(task_id)
        second = h.run_gate(task_id)
        await wait_event(second.started, "the task to run again", LONG_BOUND)
        assert second.contexts == ["started"]
        running = await h.client.get_task(task_id)
        assert (running.state, running.attempts, running.node) == (State.RUNNING, 1, h.worker_id)
        second.release.set()
        await h.wait_state(task_id, State.FINISHED)


async def test_pending_task_of_unknown_type_waits_for_a_node_that_knows_it(db: DbTarget) -> None:
    """A node claims only the types it has registered: another type's task stays PENDING."""
    other = TaskRegistry()

    @other.task("other")
    async def _other(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    async with Harness(db) as h:
        client_of_other = make_node(db, other, concurrency=0)
        async with client_of_other:
            foreign = await client_of_other.create_task("other")
            # Created after the foreign task: a claim that could take both takes both at once.
            own = await h.client.create_task("finish")
            await h.start_worker()
            await h.wait_state(own, State.FINISHED)
            assert await h.state(foreign) == (State.PENDING, None)
            assert (await h.client.get_task(foreign)).attempts == 0


async def test_deleting_a_scheduled_task_runs_its_cleanup_now(db: DbTarget) -> None:
    """Deleting a task scheduled for tomorrow queues its cleanup at once (the cleanup runs when
    the task is deleted), not when the task would have run."""
    async with Harness(db) as h:
        tomorrow = datetime.now(UTC) + timedelta(days=1)
        task_id = await h.client.create_task("hold_c", "scheduled", run_at=tomorrow)
        await h.start_worker()
        h.cleanup_gate(task_id).release.set()
        await h.client.delete_task(task_id)
        await h.wait_state(task_id, None)
        assert h.cleanup_gate(task_id).contexts == ["scheduled"]
        assert task_id not in h.runs  # it never ran
