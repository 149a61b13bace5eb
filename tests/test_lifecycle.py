"""A node's life (``docs/reference.md``, "Lifecycle"): start and stop from any asyncio task,
client-only nodes, graceful hand-off of running tasks to another node, bounded stops, the node
registry, and which task types a node claims."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from _db import DbTarget
from _helpers import BOUND, make_node, node_rows, read_row, wait_for, wait_state
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import (
    ConfigurationError,
    Node,
    NodeNotStarted,
    NodeStopped,
    Report,
    State,
    TaskNotFound,
    TaskRegistry,
    current_task,
)


def echo_registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("echo")
    async def echo(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context=context + "!")
        yield Report.finished(context=context + "!!")

    return registry


# -- start and stop -----------------------------------------------------------------------


async def test_start_and_stop_in_different_tasks(db: DbTarget, raw: AsyncEngine) -> None:
    node = make_node(db, echo_registry())
    starter = asyncio.create_task(node.start(), name="starter")
    await starter  # the task that started the node is finished; the node keeps running
    assert node.running
    task_id = await node.create_task("echo", "hi")
    await wait_state(node, task_id, State.FINISHED)
    assert (await node.get_task(task_id)).context == "hi!!"
    assert await node_rows(raw) == 1

    stopper = asyncio.create_task(node.stop(), name="stopper")
    await stopper
    assert not node.running
    assert await node_rows(raw) == 0
    with pytest.raises(NodeStopped):
        await node.get_task(task_id)


@pytest.fixture
async def started_node(db: DbTarget) -> AsyncIterator[tuple[Node, asyncio.Task[Any] | None]]:
    """A started node, as an application's test suite would write it: pytest-asyncio runs the
    setup and the teardown of this fixture in different asyncio tasks."""
    node = make_node(db, echo_registry())
    await node.start()
    setup_task = asyncio.current_task()
    yield node, setup_task
    assert asyncio.current_task() is not setup_task
    await node.stop()
    assert not node.running


async def test_node_from_an_async_fixture(
    started_node: tuple[Node, asyncio.Task[Any] | None],
) -> None:
    node, setup_task = started_node
    assert asyncio.current_task() is not setup_task
    task_id = await node.create_task("echo", "fixture")
    await wait_state(node, task_id, State.FINISHED)
    assert [n.id for n in await node.get_nodes()] == [node.id]


async def test_stop_is_idempotent(db: DbTarget, raw: AsyncEngine) -> None:
    node = make_node(db, echo_registry())
    with pytest.raises(NodeNotStarted):
        await node.get_tasks()
    await node.start()
    await node.start()  # a second start is a no-op
    assert await node_rows(raw) == 1
    await asyncio.gather(node.stop(), node.stop())  # concurrently, from two tasks
    await node.stop()
    assert await node_rows(raw) == 0
    with pytest.raises(NodeStopped):
        await node.start()
    with pytest.raises(NodeStopped):
        await node.create_task("echo")


async def test_async_with(db: DbTarget, raw: AsyncEngine) -> None:
    async with make_node(db, echo_registry()) as node:
        assert node.running
        assert node.id is not None
        task_id = await node.create_task("echo", "ctx")
        await wait_state(node, task_id, State.FINISHED)
        assert await node_rows(raw) == 1
    assert not node.running
    assert await node_rows(raw) == 0


async def test_services_are_shown_once_started(db: DbTarget) -> None:
    """``Node.services``, the test surface of docs/reference.md: refused before ``start()`` and
    on a client-only node; once started, one round of each service runs on demand, and they are
    still there after ``stop()``."""
    node = make_node(db, echo_registry())
    with pytest.raises(NodeNotStarted):
        _ = node.services
    async with node:
        services = node.services
        assert services.state.node_id == node.id
        assert (services.listener is None) == (not db.is_postgres)
        await services.heartbeat.run_once()
        await services.heartbeat.poll_stops_once()
        services.heartbeat.check_lease()
        assert services.state.lease_valid()
        assert await services.rescuer.run_once() == 0
        assert await services.claimer.run_once() == 0
        assert not services.state.fenced.is_set()
    assert node.services is services
    assert services.state.stopping.is_set()
    async with make_node(db, echo_registry(), concurrency=0) as client:
        with pytest.raises(ConfigurationError, match="client-only"):
            _ = client.services


# -- client-only nodes --------------------------------------------------------------------


async def test_client_only_node_runs_nothing_but_manages_tasks(
    db: DbTarget, raw: AsyncEngine
) -> None:
    async with make_node(db, echo_registry(), concurrency=0) as client:
        assert client.running
        assert client.id is None
        assert await client.get_nodes() == []
        assert await node_rows(raw) == 0

        first = await client.create_task("echo", "one", user="u")
        second = await client.create_task("echo", "two", auto_run=False)
        assert (await client.get_task(first)).state is State.PENDING
        assert (await client.get_task(second)).state is State.INIT
        await client.pause_task(first)
        assert (await client.get_task(first)).state is State.PAUSED
        await client.run_task(first)
        await client.change_task_group(second, "elsewhere")
        assert await client.count_tasks() == 2
        assert [t.id for t in await client.get_tasks(user="u")] == [first]
        await client.delete_task(second)
        with pytest.raises(TaskNotFound):
            await client.get_task(second)
        # Nothing can have run it: no node exists.
        task = await client.get_task(first)
        assert (task.state, task.attempts, task.node) == (State.PENDING, 0, None)

        async with make_node(db, echo_registry()) as worker:
            await wait_state(worker, first, State.FINISHED)
        assert (await client.get_task(first)).context == "one!!"


# -- graceful hand-off --------------------------------------------------------------------


async def test_graceful_stop_hands_off_to_another_node(db: DbTarget, raw: AsyncEngine) -> None:
    registry = TaskRegistry()
    steps: list[tuple[int, int]] = []
    """(node id, step) for each step a generator took."""
    executions: list[int] = []

    @registry.task("counter")
    async def counter(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        executions.append(task.node)
        state = json.loads(context)
        # The first execution counts until it is stopped; the next one does three more steps.
        last = None if len(executions) == 1 else state["step"] + 3
        while last is None or state["step"] < last:
            if stop.is_set():
                return  # the last checkpoint is already stored
            state["step"] += 1
            steps.append((task.node, state["step"]))
            yield Report(context=json.dumps(state))
        yield Report.finished(context=json.dumps(state))

    node_a = make_node(db, registry, name="alpha")
    async with node_a:
        a_id = node_a.id
        task_id = await node_a.create_task("counter", json.dumps({"step": 0}))
        await wait_for(lambda: len(steps) >= 3, timeout=BOUND, what="a few steps on node A")
    assert not node_a.running

    row = await read_row(raw, task_id)
    assert row is not None
    assert await node_rows(raw) == 0
    assert row["state"] == "pending"
    assert row["node_id"] is None
    assert bool(row["handoff"]) is True
    stored = json.loads(row["context"])["step"]
    assert steps == [(a_id, n) for n in range(1, stored + 1)]  # nothing after the checkpoint

    async with make_node(db, registry, name="beta") as node_b:
        await wait_state(node_b, task_id, State.FINISHED)
        task = await node_b.get_task(task_id)
        b_id = node_b.id
    assert b_id != a_id
    assert executions == [a_id, b_id]
    assert json.loads(task.context)["step"] == stored + 3
    # Every step exactly once: node B went on from the stored checkpoint.
    assert steps == [(a_id, n) for n in range(1, stored + 1)] + [
        (b_id, n) for n in range(stored + 1, stored + 4)
    ]


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_stop_timeout_bounds_a_task_that_ignores_stop(
    db: DbTarget, raw: AsyncEngine, max_attempts: int
) -> None:
    registry = TaskRegistry()
    checkpointed = asyncio.Event()
    cancelled: list[bool] = []

    @registry.task("stubborn", stop_timeout=3600, max_attempts=max_attempts)
    async def stubborn(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="c1")
        checkpointed.set()
        try:
            await asyncio.Event().wait()  # ignores stop, and its grace period is an hour
        except asyncio.CancelledError:
            cancelled.append(stop.is_set())
            raise

    node = make_node(db, registry)
    await node.start()
    try:
        task_id = await node.create_task("stubborn")
        await asyncio.wait_for(checkpointed.wait(), BOUND)
    finally:
        async with asyncio.timeout(BOUND):  # a bound on the test, not a timing assertion
            await node.stop(timeout=0.3)

    assert cancelled == [True]
    assert await node_rows(raw) == 0
    async with raw.connect() as conn:
        result = await conn.execute(
            text("SELECT id, state, context, node_id, attempts, handoff, error FROM aioasync_tasks")
        )
        rows = result.mappings().all()
    assert len(rows) == 1
    row = rows[0]
    # Handed back like any task the shutdown stopped, at its last checkpoint, without
    # using up an attempt (even its only one): no row is left owned by the gone node.
    assert row["id"] == task_id
    assert row["state"] == "pending"
    assert row["node_id"] is None
    assert row["context"] == "c1"
    assert row["attempts"] == 0
    assert bool(row["handoff"]) is True
    assert row["error"] is None


async def test_task_claimed_while_stopping_is_handed_back(db: DbTarget, raw: AsyncEngine) -> None:
    """A claim transaction in flight when ``stop()`` begins is not cancelled halfway; what it
    claimed starts with ``stop`` already set and goes straight back to PENDING."""
    registry = TaskRegistry()
    stop_at_start: list[bool] = []

    @registry.task("loop")
    async def loop(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        stop_at_start.append(stop.is_set())
        n = 0
        while not stop.is_set():  # runs until stopped: without a stop, stop() never returns
            n += 1
            yield Report(context=str(n))

    node = make_node(db, registry)
    await node.start()
    claim = node.driver.claim
    entered = asyncio.Event()
    proceed = asyncio.Event()

    async def claim_held_in_flight(*args: Any, **kwargs: Any) -> Any:
        # Stands for a claim transaction that is slow to get its turn: like every library
        # transaction it finishes even when the claimer is cancelled meanwhile.
        with anyio.CancelScope(shield=True):
            entered.set()
            await proceed.wait()
            return await claim(*args, **kwargs)

    node.driver.claim = claim_held_in_flight  # type: ignore[method-assign]
    stopping: asyncio.Task[None] | None = None
    try:
        # Once the claimer is held in the wrapper, no claim of the real method is in flight.
        await asyncio.wait_for(entered.wait(), BOUND)
        task_id = await node.create_task("loop", "0")
        stopping = asyncio.create_task(node.stop())
        begun = node.services.state.stopping
        await wait_for(begun.is_set, timeout=BOUND, what="the shutdown to begin")
        proceed.set()
        async with asyncio.timeout(BOUND):  # a bound on the test, not a timing assertion
            await stopping
    finally:
        proceed.set()
        if stopping is None:
            await node.stop()
        else:
            await asyncio.gather(stopping, return_exceptions=True)

    assert stop_at_start == [True]
    row = await read_row(raw, task_id)
    assert row is not None
    assert row["state"] == "pending"
    assert row["node_id"] is None
    assert bool(row["handoff"]) is True
    assert row["context"] == "0"
    assert await node_rows(raw) == 0


# -- the node registry --------------------------------------------------------------------


async def test_get_nodes_lists_live_nodes(db: DbTarget) -> None:
    registry = echo_registry()
    async with make_node(db, registry, name="alpha", concurrency=2) as alpha:
        beta = make_node(db, registry, name="beta", concurrency=3)
        async with beta:
            nodes = await alpha.get_nodes()
            assert [(n.id, n.name, n.concurrency, n.types) for n in nodes] == [
                (alpha.id, "alpha", 2, ("echo",)),
                (beta.id, "beta", 3, ("echo",)),
            ]
            assert all(n.heartbeat_at >= n.started_at for n in nodes)
        assert [n.id for n in await alpha.get_nodes()] == [alpha.id]


async def test_unregistered_type_is_never_claimed(db: DbTarget) -> None:
    registry_a = echo_registry()
    full = echo_registry()

    @full.task("other")
    async def other(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="ran")

    async with make_node(db, full, concurrency=0) as client:
        other_id = await client.create_task("other")  # older, so it would be claimed first
        async with make_node(db, registry_a) as node_a:
            echo_id = await client.create_task("echo", "x")
            await wait_state(node_a, echo_id, State.FINISHED)  # A's claimer went past "other"
            assert await node_a.services.claimer.run_once() == 0
            task = await client.get_task(other_id)
            assert (task.state, task.attempts, task.node) == (State.PENDING, 0, None)
        async with make_node(db, full) as node_b:
            await wait_state(node_b, other_id, State.FINISHED)
            assert (await node_b.get_task(other_id)).context == "ran"
