"""Waiting for a task and watching it (``Node.wait_task``, ``Node.watch``; docs/design.md §18),
on both backends, from a worker node and from a client-only node: the final snapshot, a task
removed meanwhile, the timeout, progress snapshots as they commit; on PostgreSQL, that a
notification (not the backstop poll) wakes a waiter, and that a lost listening connection is
made good."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import BOUND, make_node, raw_engine, wait_for

from aioasync_tasks import (
    ConfigurationError,
    Node,
    NodeNotStarted,
    Report,
    State,
    Task,
    TaskNotFound,
    TaskRegistry,
    WaitTimeout,
)

SLOW_POLLS = {"poll_interval": 30.0}
"""A client that would read again only after minutes: only a notification wakes it in time."""


class Gates:
    """Steps of the ``gated`` task type that the test opens one by one."""

    def __init__(self) -> None:
        self.open: dict[int, asyncio.Event] = {}

    def __getitem__(self, step: int) -> asyncio.Event:
        return self.open.setdefault(step, asyncio.Event())


def registry_with(gates: Gates) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("quick")
    async def _quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        if context == "fail":
            yield Report.failed("it had to", context="failed")
        elif context == "vanish":
            yield Report.finished(delete=True)
        else:
            yield Report.finished(context="done")

    @registry.task("gated")
    async def _gated(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        state = json.loads(context)
        while state["i"] < state["n"]:
            await gates[state["i"]].wait()
            state["i"] += 1
            yield Report(context=json.dumps(state))
        yield Report.finished(context=json.dumps(state))

    return registry


def step_of(task: Task) -> int:
    value: int = json.loads(task.context)["i"]
    return value


@pytest.mark.parametrize("client_only", [False, True], ids=["worker", "client"])
async def test_wait_task_returns_the_final_snapshot(db: DbTarget, client_only: bool) -> None:
    registry = registry_with(Gates())
    async with make_node(db, registry, concurrency=4) as worker, AsyncExitStack() as stack:
        waiter = await _client(stack, db, registry) if client_only else worker
        done = await waiter.create_task("quick")
        failed = await waiter.create_task("quick", "fail")
        task = await waiter.wait_task(done, timeout=BOUND)
        assert (task.id, task.state, task.context) == (done, State.FINISHED, "done")
        task = await waiter.wait_task(failed, timeout=BOUND)
        assert (task.state, task.context, task.error) == (State.FAILED, "failed", "it had to")
        assert await waiter.wait_task(done) == await waiter.get_task(done)  # already final


async def _client(stack: AsyncExitStack, db: DbTarget, registry: TaskRegistry) -> Node:
    """A started client-only node, stopped when ``stack`` closes."""
    return await stack.enter_async_context(make_node(db, registry, concurrency=0))


async def test_wait_task_times_out_with_a_timeout_error(db: DbTarget) -> None:
    async with make_node(db, registry_with(Gates()), concurrency=0) as client:
        task_id = await client.create_task("quick", auto_run=False)  # INIT: never runs
        with pytest.raises(WaitTimeout) as caught:
            await client.wait_task(task_id, timeout=0.2)
        assert isinstance(caught.value, TimeoutError)
        assert (caught.value.task_id, caught.value.timeout) == (task_id, 0.2)
        assert str(caught.value) == f"task {task_id} did not end within 0.2 s"


async def test_a_task_removed_while_waited_for_raises_task_not_found(db: DbTarget) -> None:
    registry = registry_with(Gates())
    async with make_node(db, registry, concurrency=0) as client:
        with pytest.raises(TaskNotFound):
            await client.wait_task(424242)
        task_id = await client.create_task("quick", auto_run=False)
        waiting = asyncio.create_task(client.wait_task(task_id, timeout=BOUND))
        await asyncio.sleep(0)
        await client.delete_task(task_id)
        with pytest.raises(TaskNotFound):
            await waiting
        # A task that removes itself at its end (delete=True) is gone too.
        async with make_node(db, registry, concurrency=2):
            vanishing = await client.create_task("quick", "vanish")
            with pytest.raises(TaskNotFound):
                await client.wait_task(vanishing, timeout=BOUND)


@pytest.mark.parametrize("client_only", [False, True], ids=["worker", "client"])
async def test_watch_yields_each_checkpoint_as_it_commits(db: DbTarget, client_only: bool) -> None:
    """Each step waits for its gate, which the test opens only once it has seen the previous
    checkpoint: the watcher sees every checkpoint, in order, then the final snapshot."""
    gates = Gates()
    registry = registry_with(gates)
    async with make_node(db, registry, concurrency=2) as worker, AsyncExitStack() as stack:
        watcher = await _client(stack, db, registry) if client_only else worker
        task_id = await watcher.create_task("gated", json.dumps({"i": 0, "n": 3}))
        seen: list[tuple[State, int]] = []
        async for task in watcher.watch(task_id):
            seen.append((task.state, step_of(task)))
            if task.state is State.RUNNING:
                gates[step_of(task)].set()
    assert seen[-1] == (State.FINISHED, 3)
    # The claim, then each checkpoint but the last (a gate opens only once its step was
    # seen); the last may come with the end, a slow watcher getting the latest snapshot.
    running = [step for state, step in seen if state is State.RUNNING]
    assert [step for step in running if step < 3] == [0, 1, 2], seen


async def test_watch_of_a_missing_or_removed_task_raises_task_not_found(db: DbTarget) -> None:
    async with make_node(db, registry_with(Gates()), concurrency=0) as client:
        with pytest.raises(TaskNotFound):
            await _to_the_end(client.watch(424242))
        task_id = await client.create_task("quick", auto_run=False)
        watch = client.watch(task_id)
        first = await anext(watch)
        assert first.state is State.INIT
        await client.run_task(task_id)  # PENDING: no worker takes it
        await client.delete_task(task_id)
        with pytest.raises(TaskNotFound):
            await _to_the_end(watch)


async def _to_the_end(watch: AsyncIterator[Task]) -> None:
    async for _ in watch:
        pass


async def test_bad_arguments_and_an_unstarted_node(db: DbTarget) -> None:
    node = make_node(db, registry_with(Gates()), concurrency=0)
    with pytest.raises(NodeNotStarted):
        await node.wait_task(1)
    with pytest.raises(NodeNotStarted):
        node.watch(1)
    async with node:
        with pytest.raises(ConfigurationError, match="timeout"):
            await node.wait_task(1, timeout=0)
        with pytest.raises(ConfigurationError):
            await node.wait_task(0)
        with pytest.raises(ConfigurationError):
            node.watch("1")  # type: ignore[arg-type]


@asynccontextmanager
async def gated_on_a_worker(db: DbTarget, steps: int) -> AsyncIterator[tuple[Node, Gates, int]]:
    """A client that would read a task again only after minutes, and a ``gated`` task of
    ``steps`` steps that it created, running on a worker node, waiting for its first gate."""
    gates = Gates()
    registry = registry_with(gates)
    async with (
        make_node(db, registry, concurrency=0, **SLOW_POLLS) as client,
        make_node(db, registry, concurrency=2) as worker,
    ):
        task_id = await client.create_task("gated", json.dumps({"i": 0, "n": steps}))

        async def running() -> bool:
            return task_id in worker.services.state.executions

        await wait_for(running, timeout=BOUND, what="the task running")
        yield client, gates, task_id


@pytest.mark.postgres_only
async def test_a_notification_wakes_the_waiter_of_a_client(db: DbTarget) -> None:
    """The client reads again only every 300 s: the end, and each checkpoint, reach it by
    notification."""
    async with gated_on_a_worker(db, 2) as (client, gates, task_id):
        watch = client.watch(task_id)
        first = await anext(watch)
        gates[0].set()
        async with asyncio.timeout(BOUND):  # a bound, far below the client's 300 s backstop
            checkpoint = await anext(watch)
            while step_of(checkpoint) < 1:
                checkpoint = await anext(watch)
            assert checkpoint.state is State.RUNNING
            assert (first.state, step_of(first)) == (State.RUNNING, 0)
            gates[1].set()
            final = await client.wait_task(task_id)
        assert (final.state, step_of(final)) == (State.FINISHED, 2)


@pytest.mark.postgres_only
async def test_a_lost_listening_connection_is_made_good(db: DbTarget) -> None:
    """The watcher's listening connection is killed while a wait goes on: the watcher listens
    again, reads the task again, and the end still reaches it without the backstop poll."""
    async with gated_on_a_worker(db, 1) as (client, gates, task_id):
        watch = client.watch(task_id)
        await anext(watch)  # the client listens now
        waiting = asyncio.create_task(client.wait_task(task_id, timeout=BOUND))
        engine = raw_engine(db)
        try:
            async with engine.begin() as conn:
                killed = await conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE query LIKE :listen"
                    ),
                    {"listen": f'LISTEN "aioasync_watch_{db.schema}"%'},
                )
                assert killed.all(), "no listening connection found"
        finally:
            await engine.dispose()
        gates[0].set()  # most likely ends before the watcher listens again, a second later
        final = await waiting
        assert (final.state, step_of(final)) == (State.FINISHED, 1)
        async with asyncio.timeout(BOUND):
            assert [step_of(t) async for t in watch][-1] == 1  # the watch ends too
