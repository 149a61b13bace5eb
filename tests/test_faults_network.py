"""Real network faults between a node and PostgreSQL, and what the engine makes of them.

Each test puts a node behind a fault-injecting proxy (``_faultcases.FaultProxy``), injects one
fault — a COMMIT whose reply is lost, a stall longer than the lease, a claim that returns after
the lease ran out, every connection reset mid-drain — and then checks the outcome from two
sides: the database's own ledger (``History``: every committed change of every task row, by a
trigger) and a witness written inside the tasks (``Witness``: every execution and every step,
with the moment its checkpoint's ``yield`` returned). Every test checks that no two executions
of a task overlapped in time, that no checkpoint a ``yield`` returned from was lost, and that no
row is left RUNNING/CANCELING/DELETING without a live owner.

The docstring of each scenario says why it fails on the engine before claim tokens (2086912);
``test_a_node_cut_off_inside_a_transaction_is_still_rescued`` is an engine bug of today's code
(xfail, strict).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from _db import DbTarget, PgServer, free_port
from _faultcases import (
    CHECKPOINT_SQL,
    CLAIM_PREPARE_SQL,
    CLAIM_SQL,
    CLEANUP_CLAIM_SQL,
    HEARTBEAT_SQL,
    WRITE_SQL,
    CommitFault,
    FaultProxy,
    History,
    Witness,
    counter_registry,
    orphans,
    task_rows,
)
from _helpers import BOUND, LONG_BOUND, counter_context, make_node, node_ids, wait_for
from _observers import Recorder
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioasync_tasks import AttemptOutcome, Node, Report, State, TaskRegistry, current_task
from aioasync_tasks._backends import SqlDriver
from aioasync_tasks._errors import DatabaseError

pytestmark = pytest.mark.postgres_only

QUIET = {"heartbeat_interval": 30.0, "node_timeout": 60.0, "poll_interval": 30.0}
"""A node that claims only when woken and heartbeats (and rescues) only at start: in a short
test its only transactions are the ones the test causes."""


@pytest.fixture
def fault_proxy(pg_server: PgServer) -> Iterator[FaultProxy]:
    with FaultProxy.for_url(pg_server.url) as proxy:
        assert isinstance(proxy, FaultProxy)
        yield proxy


@pytest.fixture
def proxied(db: DbTarget, fault_proxy: FaultProxy) -> DbTarget:
    """``db`` through ``fault_proxy``."""
    return fault_proxy.target(db)


@asynccontextmanager
async def running(proxy: FaultProxy, *nodes: Node) -> AsyncIterator[None]:
    """Start ``nodes`` in order; at the end release the proxy and stop them (bounded), so that
    a failing test fails instead of hanging in ``stop()``."""
    async with AsyncExitStack() as stack:

        async def stop(node: Node) -> None:
            proxy.release()
            await node.stop(timeout=BOUND)

        for node in nodes:
            await node.start()
            stack.push_async_callback(stop, node)
        yield


async def setup(db: DbTarget, raw: AsyncEngine, registry: TaskRegistry) -> tuple[Node, History]:
    """A client-only node straight to the server (creates and controls tasks, never through
    the proxy) and the history trigger, installed once the client migrated the schema."""
    client = make_node(db, registry, concurrency=0)
    await client.start()
    assert db.schema is not None
    history = History(raw, db.schema)
    await history.install()
    return client, history


async def all_in(raw: AsyncEngine, ids: list[int], state: str) -> bool:
    rows = await task_rows(raw, ids)
    return len(rows) == len(ids) and all(row.state == state for row in rows.values())


class DriverProbe:
    """Wraps one driver method of a node (``Node.driver``) and counts its calls, begun and
    ended, and what they returned: to wait until the node's claimer is idle before arming a
    fault meant for the next claim, or to see a heartbeat in flight."""

    def __init__(self, node: Node, method: str) -> None:
        self.begun = 0
        self.ended = 0
        self.results: list[Any] = []
        real = getattr(node.driver, method)

        async def probe(*args: Any, **kwargs: Any) -> Any:
            self.begun += 1
            try:
                result = await real(*args, **kwargs)
            finally:
                self.ended += 1
            self.results.append(result)
            return result

        setattr(node.driver, method, probe)

    async def quiet(self, for_seconds: float = 0.3) -> None:
        """Wait until no call ran for ``for_seconds``."""
        seen = -1
        since = time.monotonic()
        deadline = since + BOUND
        while True:
            if self.begun != seen or self.begun != self.ended:
                seen, since = self.begun, time.monotonic()
            elif time.monotonic() - since >= for_seconds:
                return
            assert time.monotonic() < deadline, "the driver method never went quiet"
            await asyncio.sleep(0.01)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _end_with_its_reply_lost(
    fault_proxy: FaultProxy, client: Node, witness: Witness, gate: asyncio.Event, type: str
) -> tuple[int, CommitFault]:
    """Create a task of ``type`` (context ``{"i": 0}``), wait until it runs, then let it end
    (``gate``) with the reply to the write of its end dropped; the task and the fault."""
    task_id = await client.create_task(type, '{"i": 0}')
    await wait_for(lambda: witness.started([task_id]), timeout=BOUND, what="the task to start")
    fault = fault_proxy.drop_commit_after(WRITE_SQL)
    gate.set()
    await fault.wait(BOUND)
    return task_id, fault


# -- 1. a lost COMMIT reply of a completion --------------------------------------------------


async def test_lost_commit_reply_of_a_completion_never_lands_on_the_next_attempt(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The transaction applying a FAILED completion (attempts left) commits, but its reply is
    lost: the row is PENDING (attempt 1 used, retry due at once), the committer sees a reset
    connection and retries the completion.

    The retry must change nothing: the node does not claim the task again while it still has
    the execution waiting for that answer, and the retried write is guarded by the claim
    token. The row then moves as the state table says — running 1 → pending 1 → running 2 →
    finished 2 — and the two executions never overlap.

    On 2086912 the node's claim did not skip tasks it still ran and writes were guarded by the
    owner only: the NOTIFY of the committed completion woke the claimer, which claimed attempt 2
    on the same node; the retried FAILED then applied to attempt 2's row (same owner, RUNNING),
    sending it back to PENDING while attempt 2 ran, and attempt 3 started beside it.
    """
    witness = Witness()
    registry = TaskRegistry()
    gate = asyncio.Event()

    async def flaky(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        run = witness.begin(0)
        outcome = "failed"
        try:
            if run.attempt == 1:
                await gate.wait()
                yield Report.failed("attempt 1 fails")
                return
            for i in range(1, 6):
                await asyncio.sleep(0.05)
                yield Report(context=f'{{"i": {i}}}')
            outcome = "finished"
            yield Report.finished()
        finally:
            witness.end(run, outcome)

    registry.register_task("flaky", flaky, max_attempts=3)
    client, history = await setup(db, raw, registry)
    # Two slots, so that the claimer really claims (with one free slot) while attempt 1 waits
    # for its completion; it claims only when woken, and nothing else commits meanwhile.
    node = make_node(
        proxied, registry, name="a", concurrency=2, retry_base=0.01, retry_cap=0.01, **QUIET
    )
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    async with running(fault_proxy, client, node):
        task_id, fault = await _end_with_its_reply_lost(fault_proxy, client, witness, gate, "flaky")
        await wait_for(
            lambda: all_in(raw, [task_id], "finished"), timeout=BOUND, what="the task to finish"
        )
        assert await orphans(raw, [node]) == []
        node_id = node.id

    assert fault.fired == 1
    await history.assert_path(
        task_id,
        [
            ("pending", 0, 0),
            ("running", 1, 1),
            ("pending", 1, 1),  # attempt 1 failed (committed, reply lost); retry due
            ("running", 2, 2),
            ("finished", 2, 2),
        ],
    )
    row = (await task_rows(raw, [task_id]))[task_id]
    assert (row.state, row.attempts, row.error) == ("finished", 2, "attempt 1 fails")
    # The committer did retry the completion, and the retry was rejected.
    assert any("final write (failed) rejected" in r.getMessage() for r in caplog.records)
    runs = [(r.node_id, r.attempt, r.token, r.outcome) for r in witness.runs]
    assert runs == [(node_id, 1, 1, "failed"), (node_id, 2, 2, "finished")]
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())


async def test_lost_reply_of_a_finished_tasks_one_statement_end_is_not_written_twice(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On PostgreSQL a FINISHED end of a task that still runs as claimed is one statement
    outside a transaction (docs/design.md §15.1). It commits, but its reply is lost: the
    committer sees a reset connection and tries the batch again. The retry finds the row no
    longer running as claimed, goes through the locked path, and is rejected there: the task
    ran once, ended once, and its last checkpoint and message are the final report's."""
    witness = Witness()
    registry = TaskRegistry()
    gate = asyncio.Event()

    async def once(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        run = witness.begin(0)
        try:
            yield Report(context='{"i": 1}')
            await gate.wait()
            yield Report.finished(context='{"i": 2}', message="done")
        finally:
            witness.end(run, "finished")

    registry.register_task("once", once)
    client, history = await setup(db, raw, registry)
    node = make_node(proxied, registry, name="a", concurrency=2, **QUIET)
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    async with running(fault_proxy, client, node):
        task_id, fault = await _end_with_its_reply_lost(fault_proxy, client, witness, gate, "once")

        def rejected() -> bool:
            return any("final write (finished) rejected" in r.getMessage() for r in caplog.records)

        await wait_for(rejected, timeout=BOUND, what="the retried end to be rejected")
        assert await orphans(raw, [node]) == []
        node_id = node.id
        task = await client.get_task(task_id)

    assert fault.fired == 1
    assert [s[:15] for s in fault.statements] == [b"WITH written AS"]  # not a COMMIT
    await history.assert_path(task_id, [("pending", 0, 0), ("running", 1, 1), ("finished", 1, 1)])
    assert (task.state, task.attempts, task.context, task.message) == (
        State.FINISHED,
        1,
        '{"i": 2}',
        "done",
    )
    assert [(r.node_id, r.attempt, r.token) for r in witness.runs] == [(node_id, 1, 1)]


# -- 2. a lost COMMIT reply of a claim ----------------------------------------------------


async def test_lost_commit_reply_of_a_claim_is_handed_back_by_the_heartbeat(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The claim's transaction commits but its reply is lost: the rows are RUNNING, owned by the
    node under the new token, and no execution runs them. The node's next heartbeats compare the
    rows it owns with its executions and hand these back (attempt refunded); then each task runs
    exactly once.

    On 2086912 nothing reconciled: the node's own heartbeat kept its row alive, so no rescue
    came either, and the tasks stayed RUNNING without a live owner for ever.
    """
    witness = Witness()
    registry = counter_registry(witness)
    client, history = await setup(db, raw, registry)
    node = make_node(
        proxied, registry, name="a", heartbeat_interval=0.2, node_timeout=60.0, poll_interval=30
    )
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    await client.pause_group("g")
    ids = await client.create_tasks(
        [{"type": "counter", "context": counter_context(3), "group": "g"} for _ in range(5)]
    )
    async with running(fault_proxy, client, node):
        # A's first claim found the group paused; no other claim comes until a wake-up.
        await fault_proxy.settled(CLAIM_PREPARE_SQL)
        await DriverProbe(node, "claim").quiet()
        fault = fault_proxy.drop_commit_after(CLAIM_SQL)
        await client.resume_group("g")  # its NOTIFY wakes the claimer
        await fault.wait(BOUND)
        # The rows are RUNNING under token 1 with no execution only until the next heartbeat
        # (0.2 s), too short to look at them reliably: the history below shows that state,
        # and the witness that no execution ran under token 1.
        await wait_for(
            lambda: all_in(raw, ids, "finished"), timeout=BOUND, what="the tasks to finish"
        )
        assert await orphans(raw, [node]) == []
        node_id = node.id

    assert fault.fired == 1
    for task_id in ids:
        await history.assert_path(
            task_id,
            [
                ("pending", 0, 0),
                ("running", 1, 1),  # the claim whose reply was lost
                ("pending", 0, 1),  # handed back by a heartbeat, attempt refunded
                ("running", 1, 2),
                ("finished", 1, 2),
            ],
        )
    assert any("without running them" in r.getMessage() for r in caplog.records)
    assert sorted((r.task_id, r.node_id, r.token) for r in witness.runs) == [
        (task_id, node_id, 2) for task_id in ids
    ]
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())
    assert {row.step for row in (await task_rows(raw, ids)).values()} == {3}


async def test_lost_reply_of_a_one_statement_cleanup_claim_is_handed_back(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cleanup claim — one statement outside a transaction (docs/design.md §6.7, §6.9) —
    commits, but its reply is lost: the DELETING row is owned by the node under a new token, and
    no cleanup runs. The node's heartbeats hand it back, as they do a lost claim; then the
    cleanup handler runs exactly once, and the task is gone."""
    cleanups: list[int] = []
    registry = TaskRegistry()

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        info = current_task()
        assert info is not None
        cleanups.append(info.id)
        yield Report.finished()

    registry.register_task("job", _never_run, cleanup)
    client, history = await setup(db, raw, registry)
    node = make_node(
        proxied, registry, name="a", heartbeat_interval=0.2, node_timeout=60.0, poll_interval=30
    )
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    task_id = await client.create_task("job", auto_run=False)
    async with running(fault_proxy, client, node):
        await DriverProbe(node, "claim_cleanups").quiet()
        fault = fault_proxy.drop_commit_after(CLEANUP_CLAIM_SQL)
        await client.delete_task(task_id)  # its NOTIFY wakes the claimer
        await fault.wait(BOUND)
        await wait_for(
            lambda: _gone(raw, task_id), timeout=BOUND, what="the cleanup to run and the task to go"
        )
        assert await orphans(raw, [node]) == []
    assert fault.fired == 1
    assert cleanups == [task_id]
    await history.assert_path(
        task_id,
        [
            ("init", 0, 0),
            ("deleting", 0, 0),
            ("deleting", 1, 1),  # the cleanup claim whose reply was lost
            ("deleting", 0, 1),  # handed back by a heartbeat, attempt refunded
            ("deleting", 1, 2),  # claimed again: the cleanup runs, the row goes
        ],
    )
    assert any("without running them" in r.getMessage() for r in caplog.records)


async def _gone(raw: AsyncEngine, task_id: int) -> bool:
    return not await task_rows(raw, [task_id])


# -- 3. a stall longer than the lease -------------------------------------------------------


@pytest.mark.slow
async def test_stall_past_the_lease_stops_the_tasks_before_another_node_rescues_them(
    fault_proxy: FaultProxy, proxied: DbTarget, db: DbTarget, raw: AsyncEngine
) -> None:
    """Node A (through the proxy, node_timeout 2 s) runs four tasks; the proxy holds all of A's
    traffic at a moment when A has no transaction open. A's lease (¾ of its node_timeout, from
    the send time of its last heartbeat) runs out first: A cancels its executions on its own,
    while still cut off. Only then may node B (straight to the server, whose own node_timeout is
    1 s) find A's heartbeat older than *A's* node_timeout, rescue the tasks and resume them from
    their last checkpoints. When the stall ends A finds its row gone, fences itself, registers
    again and claims new work; its late writes (checkpoints, NODE_LOST) change nothing.

    On 2086912 the rescuer judged A by its own node_timeout: B rescued A's tasks after 1 s and
    ran them while A — whose lease still had half a second to go — ran them too.
    """
    witness = Witness()
    registry = counter_registry(witness, max_attempts=3)
    client, history = await setup(db, raw, registry)
    tasks = 4
    # As many slots as tasks: once they run, A's claimer has nothing to claim and sends nothing.
    seen_by_a = Recorder()
    node_a = make_node(
        proxied,
        registry,
        name="a",
        concurrency=tasks,
        heartbeat_interval=0.2,
        node_timeout=2.0,
        observers=[seen_by_a],
    )
    # B's own node_timeout is shorter than A's lease: B must judge A by A's node_timeout.
    node_b = make_node(
        db,
        registry,
        name="b",
        concurrency=tasks,
        groups=["main"],
        heartbeat_interval=0.2,
        node_timeout=1.0,
    )
    async with running(fault_proxy, client, node_a):
        state_a = node_a.services.state
        a_old = node_a.id
        assert a_old is not None
        ids = await client.create_tasks(
            [
                {"type": "counter", "context": counter_context(16, 0.05), "group": "main"}
                for _ in range(tasks)
            ]
        )
        await wait_for(
            lambda: witness.started(ids, a_old) and len(witness.steps) >= 2 * tasks,
            timeout=BOUND,
            what="A to run every task",
        )
        async with running(fault_proxy, node_b):
            b_id = node_b.id
            assert b_id is not None
            hold = fault_proxy.hold_when_idle()
            await hold.wait(BOUND)

            def a_stopped() -> bool:
                return all(r.end is not None for r in witness.on_node(a_old))

            await wait_for(a_stopped, timeout=BOUND, what="A to stop its tasks (lease)")
            # A stopped its tasks by itself, while still cut off, before anyone rescued them.
            assert fault_proxy.held
            assert not state_a.lease_valid()
            assert not state_a.fenced.is_set()
            assert witness.on_node(b_id) == []
            assert {r.outcome for r in witness.on_node(a_old)} <= {"cancelled", "closed"}

            await wait_for(
                lambda: witness.started(ids, b_id), timeout=BOUND, what="B to rescue the tasks"
            )
            fault_proxy.release()
            await wait_for(state_a.fenced.is_set, timeout=BOUND, what="A to fence itself")
            a_new = node_a.id
            assert a_new is not None
            assert a_new != a_old
            # A's observers heard of it: one lost lease, one fencing, every attempt lost.
            assert (seen_by_a.lease_losses, seen_by_a.fencings) == (1, 1)
            await wait_for(
                lambda: len(seen_by_a.outcomes(a_old)) == tasks,
                timeout=BOUND,
                what="A's attempts to end",
            )
            assert set(seen_by_a.outcomes(a_old)) == {AttemptOutcome.LOST}
            # A claims again: tasks of a group only A runs.
            after = await client.create_tasks(
                [
                    {"type": "counter", "context": counter_context(2), "group": "after"}
                    for _ in range(2)
                ]
            )
            await wait_for(
                lambda: all_in(raw, ids + after, "finished"),
                timeout=BOUND,
                what="every task to finish",
            )
            assert await orphans(raw, [node_a, node_b]) == []
            assert sorted(await node_ids(raw)) == sorted([a_new, b_id])

    assert {r.node_id for t in after for r in witness.runs_of(t)} == {a_new}
    for task_id in ids:
        assert [r.node_id for r in witness.runs_of(task_id)] == [a_old, b_id]
        await history.assert_path(
            task_id,
            [
                ("pending", 0, 0),
                ("running", 1, 1),
                ("pending", 1, 1),  # rescued by B: node lost, an attempt used
                ("running", 2, 2),
                ("finished", 2, 2),
            ],
        )
    assert {row.step for row in (await task_rows(raw, ids)).values()} == {16}
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())


# -- 4. nodes with different node_timeouts ---------------------------------------------------


@pytest.mark.slow
async def test_a_node_is_judged_by_its_own_node_timeout(
    fault_proxy: FaultProxy, proxied: DbTarget, db: DbTarget, raw: AsyncEngine
) -> None:
    """Node A (node_timeout 30 s) is cut off for 3 s; node B (node_timeout 1.5 s, heartbeat
    0.3 s) looks for dead nodes many times meanwhile and sees A's heartbeat older than its own
    timeout, but A is judged by the 30 s it registered with: B rescues nothing, A keeps its
    row and its tasks, which finish on A once the stall ends.

    On 2086912 the rescuer judged every node by its own node_timeout: B declared A dead after
    1.5 s and ran A's tasks while A — whose lease is ¾ of 30 s — still ran them.
    """
    witness = Witness()
    registry = counter_registry(witness, max_attempts=3)
    client, history = await setup(db, raw, registry)
    tasks = 3
    node_a = make_node(
        proxied, registry, name="a", concurrency=tasks, heartbeat_interval=0.3, node_timeout=30
    )
    node_b = make_node(
        db, registry, name="b", concurrency=tasks, heartbeat_interval=0.3, node_timeout=1.5
    )
    async with running(fault_proxy, client, node_a):
        a_id = node_a.id
        assert a_id is not None
        ids = await client.create_tasks(
            [{"type": "counter", "context": counter_context(16, 0.05)} for _ in range(tasks)]
        )
        await wait_for(
            lambda: witness.started(ids, a_id) and len(witness.steps) >= 2 * tasks,
            timeout=BOUND,
            what="A to run every task",
        )
        async with running(fault_proxy, node_b):
            rescues = DriverProbe(node_b, "rescue")
            hold = fault_proxy.hold_when_idle()
            await hold.wait(BOUND)
            await asyncio.sleep(3.0)
            async with raw.connect() as conn:
                silent = await conn.scalar(
                    text(
                        "SELECT EXTRACT(EPOCH FROM now() - heartbeat_at) FROM aioasync_nodes"
                        " WHERE id = :id"
                    ),
                    {"id": a_id},
                )
            # B looked for dead nodes many times and took nothing; A still runs its tasks.
            assert witness.on_node(node_b.id or 0) == []
            assert sum(rescues.results) == 0
            assert len(rescues.results) >= 3
            assert all(r.end is None for r in witness.on_node(a_id))
            # A's row is still there, silent for longer than B's own node_timeout.
            assert silent is not None
            assert float(silent) > 1.5
            fault_proxy.release()
            await wait_for(
                lambda: all_in(raw, ids, "finished"), timeout=BOUND, what="the tasks to finish"
            )
            assert await orphans(raw, [node_a, node_b]) == []
            assert a_id in await node_ids(raw)
            assert node_a.id == a_id
            assert not node_a.services.state.fenced.is_set()

    assert sum(rescues.results) == 0
    assert [(r.task_id, r.node_id) for r in witness.runs] == [(t, a_id) for t in ids]
    for task_id in ids:
        await history.assert_path(
            task_id,
            [
                ("pending", 0, 0),
                ("running", 1, 1),
                ("finished", 1, 1),
            ],
        )
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())


# -- 5. a claim in flight when the lease runs out ---------------------------------------------


@pytest.mark.slow
async def test_a_claim_that_returns_after_the_lease_ran_out_is_handed_back(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node A's claim reaches the server and takes three tasks; its reply is held while A's
    (injected) clock moves past the lease. When the claim returns — committed — A must not
    start the tasks: it hands them back (attempt refunded) and they run later, on A after a
    heartbeat renewed its lease, each exactly once, under the next claim's token.

    On 2086912 there was no way to inject the clock (``Node(clock=…)``), and the claimer started
    whatever a claim returned without looking at the lease again.
    """
    witness = Witness()
    registry = counter_registry(witness)
    client, history = await setup(db, raw, registry)
    clock = FakeClock()
    node = make_node(
        proxied,
        registry,
        name="a",
        heartbeat_interval=0.2,
        node_timeout=2.0,
        poll_interval=30.0,
        clock=clock,
    )
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    await client.pause_group("g")
    ids = await client.create_tasks(
        [{"type": "counter", "context": counter_context(3), "group": "g"} for _ in range(3)]
    )
    async with running(fault_proxy, client, node):
        state = node.services.state
        # A's first claim found the group paused; no other claim comes until a wake-up.
        await fault_proxy.settled(CLAIM_PREPARE_SQL)
        claims = DriverProbe(node, "claim")
        await claims.quiet()
        heartbeats = DriverProbe(node, "heartbeat")
        moved: list[int] = []  # the claims ended when the clock moved
        counted_heartbeat = node.driver.heartbeat

        async def heartbeat_after_the_claim(node_id: int) -> Any:
            if moved:
                # A heartbeat sent after the move would renew the lease: the held claim comes
                # back first, however long its reply takes to be read on a busy machine.
                await wait_for(
                    lambda: claims.ended > moved[0],
                    timeout=BOUND,
                    what="the held claim to come back",
                )
            return await counted_heartbeat(node_id)

        node.driver.heartbeat = heartbeat_after_the_claim  # type: ignore[method-assign]
        hold = fault_proxy.hold_after(CLAIM_SQL)
        await client.resume_group("g")
        await hold.wait(BOUND)
        # Let a heartbeat start (and wait on the hold) before the clock moves: the heartbeat
        # loop is then stuck in it until the hold ends, and the later ones wait for the claim
        # to come back: no heartbeat sent after the move renews the lease before it.
        await wait_for(
            lambda: heartbeats.begun > heartbeats.ended,
            timeout=BOUND,
            what="a heartbeat waiting on the hold",
        )
        moved.append(claims.ended)
        clock.advance(10.0)  # far past the lease (1.5 s) on A's clock
        assert not state.lease_valid()
        await asyncio.sleep(0.3)  # the lease watchdog acts
        assert witness.runs == []
        fault_proxy.release()
        await wait_for(
            lambda: all_in(raw, ids, "finished"), timeout=BOUND, what="the tasks to finish"
        )
        assert await orphans(raw, [node]) == []
        node_id = node.id
        assert not state.fenced.is_set()

    assert any("after the lease ran out" in r.getMessage() for r in caplog.records)
    for task_id in ids:
        await history.assert_path(
            task_id,
            [
                ("pending", 0, 0),
                ("running", 1, 1),  # the held claim: committed after the lease ran out
                ("pending", 0, 1),  # handed back untouched, attempt refunded
                ("running", 1, 2),
                ("finished", 1, 2),
            ],
        )
    # No execution under the late claim's token: the tasks ran once each, claimed again.
    assert sorted((r.task_id, r.node_id, r.attempt, r.token) for r in witness.runs) == [
        (task_id, node_id, 1, 2) for task_id in ids
    ]
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())


# -- 6. every connection reset in the middle of a drain -----------------------------------


@pytest.mark.slow
async def test_reset_all_during_a_drain_loses_nothing_and_runs_nothing_twice(
    fault_proxy: FaultProxy, proxied: DbTarget, db: DbTarget, raw: AsyncEngine
) -> None:
    """200 short tasks of three checkpointed steps drain on node A (through the proxy, 20
    slots) and node B (straight to the server, 10 slots); every connection of A is reset three
    times on the way: at a quarter done with ``reset_all()`` whenever it lands, at a half and
    three quarters done at the moment one of A's claims commits (its reply is lost with
    everything else A had in flight — other claims, checkpoints, completions, heartbeats, its
    listener). Every task still finishes with each step's checkpoint committed in order, none
    runs twice at once, and no row is left owned without an execution: the rows of the lost
    claims are handed back by A's heartbeat.

    On 2086912 the rows of a claim whose COMMIT reply was lost stayed RUNNING under A with no
    execution; A's heartbeat kept them from being rescued, and the drain never ended.
    """
    witness = Witness()
    registry = counter_registry(witness)
    client, history = await setup(db, raw, registry)
    timings = {"heartbeat_interval": 0.2, "node_timeout": 60.0, "poll_interval": 0.05}
    node_a = make_node(proxied, registry, name="a", concurrency=20, **timings)
    node_b = make_node(db, registry, name="b", concurrency=10, **timings)
    total, steps = 200, 3
    async with running(fault_proxy, client, node_a, node_b):
        ids = await client.create_tasks(
            [{"type": "counter", "context": counter_context(steps, 0.03)} for _ in range(total)]
        )
        resets = []
        for fraction in (0.25, 0.5, 0.75):

            def done(fraction: float = fraction) -> bool:
                return sum(r.outcome == "finished" for r in witness.runs) >= fraction * total

            await wait_for(done, timeout=BOUND, what=f"{fraction:.0%} of the drain")
            if fraction == 0.25:
                resets.append(fault_proxy.reset_all())
            else:
                fault = fault_proxy.reset_all_at_commit_after(CLAIM_SQL)
                await fault.wait(BOUND)
                resets.extend(fault.resets)
        await wait_for(
            lambda: all_in(raw, ids, "finished"), timeout=LONG_BOUND, what="the drain to finish"
        )
        assert await orphans(raw, [node_a, node_b]) == []
        a_id, b_id = node_a.id, node_b.id
        assert a_id is not None
        assert b_id is not None
        assert sorted(await node_ids(raw)) == sorted([a_id, b_id])

    assert all(count > 0 for count in resets), resets
    rows = await task_rows(raw, ids)
    assert {row.step for row in rows.values()} == {steps}
    by_task = await history.by_task()
    for task_id in ids:
        # Every step's checkpoint was committed, in order, never rewound.
        written = [c.step for c in by_task[task_id] if c.state == "running" and c.step]
        assert sorted(set(written)) == list(range(1, steps + 1)), (task_id, written)
        assert written == sorted(written), (task_id, written)
    assert {r.node_id for r in witness.runs} <= {a_id, b_id}
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(by_task)
    # The lost claims' rows were handed back (attempt refunded) and claimed again.
    handed_back = [
        t
        for t in ids
        if any(
            a.state == "running" and b.state == "pending" and b.attempts == a.attempts - 1
            for a, b in itertools.pairwise(by_task[t])
        )
    ]
    assert handed_back, "no claim's rows were handed back"


# -- a partition in the middle of a transaction ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "statement", [CHECKPOINT_SQL, HEARTBEAT_SQL], ids=["in-checkpoint", "in-heartbeat"]
)
async def test_a_node_cut_off_inside_a_transaction_is_still_rescued(
    fault_proxy: FaultProxy,
    proxied: DbTarget,
    db: DbTarget,
    raw: AsyncEngine,
    statement: bytes,
) -> None:
    """Node A (through the proxy, node_timeout 2 s) is cut off just after one of its writes
    reached the server — a checkpoint or its heartbeat (row lock on its node row, in a
    transaction that stays open on the server, as it does in a real partition until TCP
    keepalives notice: hours, by default). A stops its tasks when its lease runs out; node B
    (straight to the server) must then rescue them once A's heartbeat is older than A's
    node_timeout, and run them. (Since 2026-11-30 a checkpoint on PostgreSQL is one statement
    outside a transaction, docs/design.md §15: it commits before the cut and leaves no row lock
    of a task behind; it was a transaction holding one.)

    This needs the server to end A's open transaction (``idle_in_transaction_session_timeout``,
    set by every write transaction of a node since 304a7e7). Before that, and on 2086912, B's
    rescue either waited on the task row A's open checkpoint held (its ``SELECT … FOR UPDATE``
    in ``SqlDriver._release_nodes`` — and B's rescuer, holding A's node row, was stuck for every
    other dead node too) or skipped A's node row, locked by A's open heartbeat (``rescue``:
    ``FOR UPDATE SKIP LOCKED``): the tasks ran nowhere until the partition healed.
    """
    witness = Witness()
    registry = counter_registry(witness, max_attempts=3)
    client, history = await setup(db, raw, registry)
    tasks = 2
    timings = {"heartbeat_interval": 0.2, "node_timeout": 2.0}
    node_a = make_node(proxied, registry, name="a", concurrency=tasks, **timings)
    node_b = make_node(db, registry, name="b", concurrency=tasks, groups=["main"], **timings)
    async with running(fault_proxy, client, node_a):
        a_id = node_a.id
        assert a_id is not None
        ids = await client.create_tasks(
            [
                {"type": "counter", "context": counter_context(30, 0.05), "group": "main"}
                for _ in range(tasks)
            ]
        )
        await wait_for(
            lambda: witness.started(ids, a_id) and len(witness.steps) >= 2 * tasks,
            timeout=BOUND,
            what="A to run every task",
        )
        async with running(fault_proxy, node_b):
            b_id = node_b.id
            assert b_id is not None
            hold = fault_proxy.hold_after(statement)
            await hold.wait(BOUND)
            await wait_for(
                lambda: all(r.end is not None for r in witness.on_node(a_id)),
                timeout=BOUND,
                what="A to stop its tasks (lease)",
            )
            assert fault_proxy.held
            assert witness.on_node(b_id) == []
            # A's node_timeout is 2 s: B rescues within a few of its heartbeats after that,
            # while A is still cut off.
            await wait_for(
                lambda: witness.started(ids, b_id), timeout=6.0, what="B to rescue A's tasks"
            )
            assert fault_proxy.held
            fault_proxy.release()
            await wait_for(
                lambda: all_in(raw, ids, "finished"), timeout=BOUND, what="the tasks to finish"
            )
            fenced = node_a.services.state.fenced
            await wait_for(fenced.is_set, timeout=BOUND, what="A to fence itself")
            assert await orphans(raw, [node_a, node_b]) == []

    assert {row.step for row in (await task_rows(raw, ids)).values()} == {30}
    for task_id in ids:
        assert [r.node_id for r in witness.runs_of(task_id)] == [a_id, b_id]
    witness.assert_no_overlap()
    witness.assert_checkpoints_kept(await history.by_task())


# -- errors name their cause -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_connection_refused_raises_a_database_error_that_names_it(host: str) -> None:
    """Starting a node against a port nobody listens on raises ``DatabaseError`` with a message
    that says what failed (not an empty string), marked transient (a retry may cure it).

    On 2086912 ``DatabaseError`` had no ``transient`` flag to tell it from a refused value."""
    port = free_port()
    node = Node(f"postgresql+asyncpg://postgres@{host}:{port}/test", concurrency=0)
    with pytest.raises(DatabaseError) as info:
        await node.start()
    message = str(info.value)
    assert message.strip(), repr(info.value)
    assert str(port) in message or "refused" in message.lower(), message
    assert info.value.transient is True
    await node.stop()


async def test_a_reset_connection_raises_a_database_error_that_names_it(
    fault_proxy: FaultProxy, proxied: DbTarget, db: DbTarget, raw: AsyncEngine
) -> None:
    """A statement whose connection is reset before it runs raises ``DatabaseError`` with a
    non-empty message, transient; the next call goes through on a fresh connection.

    On 2086912 ``DatabaseError`` had no ``transient`` flag."""
    registry = counter_registry(Witness())
    client, _ = await setup(db, raw, registry)
    node = make_node(proxied, registry, concurrency=0)
    async with running(fault_proxy, client, node):
        task_id = await client.create_task("counter", counter_context(1))
        fault = fault_proxy.reset_on(rb"^SELECT id, type, user_name")
        with pytest.raises(DatabaseError) as info:
            await node.get_task(task_id)
        assert fault.fired == 1
        assert str(info.value).strip(), repr(info.value)
        assert info.value.transient is True
        assert (await node.get_task(task_id)).id == task_id


async def test_a_create_whose_connection_is_reset_raises_a_database_error_that_names_it(
    fault_proxy: FaultProxy, proxied: DbTarget, db: DbTarget, raw: AsyncEngine
) -> None:
    """A create runs its one statement on asyncpg's connection itself, past SQLAlchemy: reset
    there, it raises the same transient ``DatabaseError``, the broken connection leaves the
    pool, and the next create goes through."""
    registry = counter_registry(Witness())
    client, _ = await setup(db, raw, registry)
    node = make_node(proxied, registry, concurrency=0)
    async with running(fault_proxy, client, node):
        fault = fault_proxy.reset_on(rb"^WITH ins AS \(INSERT INTO")
        with pytest.raises(DatabaseError) as info:
            await node.create_task("counter", counter_context(1))
        assert fault.fired == 1
        assert "PostgreSQL at" in str(info.value), info.value
        assert info.value.transient is True
        task_id = await node.create_task("counter", counter_context(1))
        assert [t.id for t in await client.get_tasks()] == [task_id]


async def test_the_idle_timeout_binds_the_node_writes_never_the_application(
    pg_db: DbTarget,
) -> None:
    """On an engine the application shares with its node (one connection, so both use the same
    session): the node's write transactions run with ``idle_in_transaction_session_timeout``
    at ¼ of the node timeout and with its planner settings (generic plans, no sequential scans:
    ``PLAN_SETTINGS``), and the application's own transactions on that engine — before, between
    and after the node's — run with the server's defaults, never the node's settings. The
    node's statements outside a transaction (a one-by-one create) run with its planner
    settings too (docs/design.md §15)."""
    engine = create_async_engine(pg_db.url, pool_size=1, max_overflow=0)
    registry = TaskRegistry()
    registry.register_task("job", _never_run)
    node = Node(
        engine,
        registry=registry,
        schema=pg_db.schema,
        concurrency=0,
        heartbeat_interval=1,
        node_timeout=8,
    )
    show = text(
        "SELECT current_setting('idle_in_transaction_session_timeout'),"
        " current_setting('plan_cache_mode'), current_setting('enable_seqscan')"
    )
    ours = ("2s", "force_generic_plan", "off")
    try:
        async with engine.begin() as conn:
            default = tuple((await conn.execute(show)).one())
        assert default[1:] == ("auto", "on")
        await node.start()
        backend = node.driver
        assert isinstance(backend, SqlDriver)
        for _ in range(3):
            async with backend.write() as conn:  # the node's own write transaction
                assert tuple((await conn.execute(show)).one()) == ours
            await node.pause_group("g")
            async with engine.begin() as conn:
                assert tuple((await conn.execute(show)).one()) == default
            async with engine.connect() as conn:
                assert tuple((await conn.execute(show)).one()) == default
                await conn.rollback()
            await node.create_task("job")  # one statement on asyncpg's connection
            async with engine.connect() as conn:
                # No transaction begun: the session as the node's statement left it.
                raw: Any = (await conn.get_raw_connection()).driver_connection
                plans = await raw.fetchrow(show.text)
                assert tuple(plans)[1:] == ours[1:]
            async with engine.begin() as conn:
                assert tuple((await conn.execute(show)).one()) == default
    finally:
        await node.stop()
        await engine.dispose()


async def _never_run(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    """A task type for nodes that only create tasks."""
    yield Report.finished()
