"""Nodes behind a real PgBouncer in transaction pooling mode (``pgbouncer=transaction``;
docs/how-to.md, "Run behind PgBouncer"): a worker and a client run a mix of tasks through a pool
of two server connections — checkpoints, retries, pause and resume, unique keys — and a ledger
written from inside the tasks, straight to PostgreSQL, shows that no step ran twice and none was
lost. Waits, watches and stop requests work by polling, and with ``listen_host`` by
notifications on a direct connection; migrations run through the pooler; no setting of ours
stays in a server session that other clients get next.

Skipped with the reason when there is no ``pgbouncer`` binary (``apt-get install pgbouncer``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import BOUND, FAST, statements, wait_for, wait_state
from _pgbouncer import PgBouncer
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioasync_tasks import Node, Report, State, TaskRegistry, current_task
from aioasync_tasks._urls import engine_from_url

pytestmark = pytest.mark.postgres_only

STEPS = 4
"""Steps of each ``steps`` task, one checkpoint each."""
LISTENING_WORKER = {**FAST, "heartbeat_interval": 60.0, "node_timeout": 120.0}
"""A worker that listens: a stop request reaches it in time only by a notification, never by
its heartbeat. (It still polls for work: a claim skips a row that a waiter's mark has locked
for an instant, and only the next poll takes it.)"""
LISTENING_CLIENT = {**FAST, "poll_interval": 60.0}
"""A client that listens: a waiter learns in time only by a task event, never by a poll."""


def idle_bound_ms(timings: dict[str, float]) -> int:
    """The idle bound of a node's write transactions (a quarter of its ``node_timeout``)."""
    return int(timings["node_timeout"] * 0.25 * 1000)


class Ledger:
    """What the tasks did, written straight to PostgreSQL (not through the pooler) in the test's
    schema: one row per step done, with the attempt that did it."""

    def __init__(self, db: DbTarget) -> None:
        self.engine: AsyncEngine = create_async_engine(db.url)
        self.table = f'"{db.schema}".ledger'
        self.holding: dict[int, asyncio.Event] = {}
        """Set when a ``held`` task waits for its stop request."""

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(f"CREATE TABLE {self.table} (task_id BIGINT, step INT, attempt INT)")
            )

    async def write(self, task_id: int, step: int, attempt: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text(f"INSERT INTO {self.table} VALUES (:t, :s, :a)"),
                {"t": task_id, "s": step, "a": attempt},
            )

    async def steps(self) -> dict[int, list[int]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.text(f"SELECT task_id, step FROM {self.table} ORDER BY task_id, step")
            )
            done: dict[int, list[int]] = {}
            for task_id, step in rows:
                done.setdefault(task_id, []).append(step)
            return done


def registry_of(ledger: Ledger) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("steps", max_attempts=3)
    async def _steps(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        """``STEPS`` steps; with ``fail_at``, the first attempt that reaches that step fails
        after its checkpoint (the retry goes on from it)."""
        task = current_task()
        assert task is not None
        state = json.loads(context)
        while state["i"] < STEPS:
            if state["i"] == state.get("fail_at") and not state.get("failed"):
                yield Report(context=json.dumps({**state, "failed": True}))
                raise RuntimeError("a failure the retry cures")
            await ledger.write(task.id, state["i"], task.attempt)
            state["i"] += 1
            yield Report(context=json.dumps(state), progress=state["i"] / STEPS)

    @registry.task("held")
    async def _held(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        """Step 0, then wait for a stop request (once), then step 1."""
        task = current_task()
        assert task is not None
        state = json.loads(context)
        if state["i"] == 0:
            await ledger.write(task.id, 0, task.attempt)
            state["i"] = 1
            yield Report(context=json.dumps(state))
            ledger.holding.setdefault(task.id, asyncio.Event()).set()
            await stop.wait()
            return
        await ledger.write(task.id, 1, task.attempt)
        yield Report.finished(context=json.dumps({"i": 2}))

    return registry


LISTENING = sa.text("SELECT query FROM pg_stat_activity WHERE query LIKE :pattern")
"""The server sessions whose last statement was a ``LISTEN`` on a channel like ``:pattern``."""


async def listening_channels(engine: AsyncEngine, schema: str) -> set[str]:
    """The channels of the test's schema that a server session listens on."""
    async with engine.connect() as conn:
        found = (await conn.execute(LISTENING, {"pattern": f'LISTEN "%{schema}"'})).scalars()
        return {query.split(None, 1)[1].strip('"') for query in found}


@pytest.mark.parametrize("listen", [False, True], ids=["poll", "listen"])
async def test_a_worker_and_a_client_through_pgbouncer(
    pg_db: DbTarget, pgbouncer: PgBouncer, listen: bool
) -> None:
    assert pg_db.schema is not None
    ledger = Ledger(pg_db)
    await ledger.create()
    registry = registry_of(ledger)
    url = pgbouncer.pooled_url(listen=listen)
    worker_timings = LISTENING_WORKER if listen else FAST
    async with AsyncExitStack() as stack:
        stack.push_async_callback(ledger.engine.dispose)
        worker = Node(url, registry=registry, schema=pg_db.schema, concurrency=8, **worker_timings)
        client = Node(
            url,
            registry=registry,
            schema=pg_db.schema,
            concurrency=0,
            **(LISTENING_CLIENT if listen else FAST),
        )
        await stack.enter_async_context(worker)
        await stack.enter_async_context(client)
        assert (worker.services.listener is not None) is listen

        with statements(worker) as seen:
            plain = [await client.create_task("steps", json.dumps({"i": 0})) for _ in range(12)]
            failing = [
                await client.create_task("steps", json.dumps({"i": 0, "fail_at": at}))
                for at in (0, 2, 3)
            ]
            unique = await asyncio.gather(
                *(
                    client.create_task(
                        "steps", json.dumps({"i": 0}), unique_key="once", on_conflict="skip"
                    )
                    for _ in range(5)
                )
            )
            held = await client.create_task("held", json.dumps({"i": 0}))
            progress = [t.progress async for t in client.watch(plain[0])]
            for task_id in [*plain, *failing, unique[0]]:
                assert (await client.wait_task(task_id, timeout=BOUND)).state is State.FINISHED

            await asyncio.wait_for(ledger.holding.setdefault(held, asyncio.Event()).wait(), BOUND)
            await client.pause_task(held)
            await wait_state(client, held, State.PAUSED)
            await client.run_task(held)
            assert (await client.wait_task(held, timeout=BOUND)).state is State.FINISHED

        assert len(set(unique)) == 1
        assert progress[-1] == 1.0
        for task_id in failing:
            assert (await client.get_task(task_id)).attempts == 2
        done = await ledger.steps()
        assert done == {
            **{task_id: list(range(STEPS)) for task_id in [*plain, *failing, unique[0]]},
            held: [0, 1],
        }, "a step ran twice or never"

        # The idle bound is set in each write transaction, never for a server session.
        bound = idle_bound_ms(worker_timings)
        assert f"SET LOCAL idle_in_transaction_session_timeout = {bound}" in seen
        assert not any(s.startswith("SET idle_in_transaction") for s in seen)

        channels = await listening_channels(ledger.engine, pg_db.schema)
        expected = {f"aioasync_tasks_{pg_db.schema}", f"aioasync_watch_{pg_db.schema}"}
        assert channels == (expected if listen else set())


async def test_no_setting_stays_in_the_pooled_sessions(
    pg_db: DbTarget, pgbouncer: PgBouncer
) -> None:
    """After a node's writes, the server sessions of the pool, which other clients get next,
    have the server's idle bound: ours ended with each of our transactions."""
    url = pgbouncer.pooled_url(listen=False)
    async with Node(url, schema=pg_db.schema, **FAST) as node:
        for _ in range(10):
            await node.get_nodes()
            await node.services.heartbeat.run_once()
    engine = engine_from_url(url)
    try:
        async with engine.connect() as first, engine.connect() as second:
            # Both sessions of the pool at once: each transaction holds one till its end.
            settings = set()
            pids = set()
            for conn in (first, second):
                row = (
                    await conn.execute(
                        sa.text(
                            "SELECT current_setting('idle_in_transaction_session_timeout'), "
                            "pg_backend_pid()"
                        )
                    )
                ).one()
                settings.add(row[0])
                pids.add(row[1])
            assert len(pids) == 2
            assert settings == {"0"}
    finally:
        await engine.dispose()


async def test_migrations_through_pgbouncer(pg_db: DbTarget, pgbouncer: PgBouncer) -> None:
    """Two nodes migrate the same empty schema at once through the pooler: the advisory lock of
    the transaction makes one apply every version and the other none."""
    url = pgbouncer.pooled_url(listen=False)
    first = Node(url, schema=pg_db.schema, concurrency=0)
    second = Node(url, schema=pg_db.schema, concurrency=0)
    try:
        applied = await asyncio.gather(first.migrate(), second.migrate())
        assert sorted(applied, key=len) == [[], [1, 2, 3, 4, 5]]
        assert await first.migrate() == []
    finally:
        await first.stop()
        await second.stop()


async def test_a_listener_that_cannot_connect_leaves_the_node_polling(
    pg_db: DbTarget, pgbouncer: PgBouncer
) -> None:
    """A ``listen_host`` where nothing listens: the node starts, says so, and still runs tasks
    by polling."""
    url = f"{pgbouncer.url}?pgbouncer=transaction&listen_host=127.0.0.1&listen_port=1"
    registry = TaskRegistry()

    @registry.task("quick")
    async def _quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    async with Node(url, registry=registry, schema=pg_db.schema, **FAST) as node:
        task_id = await node.create_task("quick")

        async def finished() -> bool:
            return (await node.get_task(task_id)).state is State.FINISHED

        await wait_for(finished, timeout=BOUND, what="the task to finish")
