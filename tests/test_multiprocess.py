"""Multi-process behaviour with real node processes (``docs/explanation.md``, "Delivery
guarantees"), on both backends.

Each test starts node processes (``tests/nodeproc.py``) against one database — several
processes on one SQLite file, or one PostgreSQL schema — and drives them from a client-only
node in the test process. The task types of ``nodeproc`` write a ledger into the same database
(``_ledger``), and the tests read it back to check that every step of every task was done, that
a step was repeated only when its checkpoint was not yet durable (after a kill -9), and that no
task ever ran on two nodes at once.

Node processes use fast timings (heartbeat 0.3 s, node timeout 3 s) except the pause test,
which keeps the library's default heartbeat to measure stop delivery on each backend.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import time

import pytest
from _cluster import Cluster
from _helpers import LONG_BOUND, counter_context, wait_for
from _ledger import Step, duplicates

from aioasync_tasks import State, Task

pytestmark = pytest.mark.slow

PAUSE_SAMPLES = int(os.environ.get("AIOASYNC_TASKS_TEST_PAUSE_SAMPLES", "1"))
"""How many pause latencies the pause test measures (raise it to collect figures)."""
PHASE_STEPS = 250
"""Up to this many 20 ms steps before a pause: about one default heartbeat interval."""


def checkpoint(task: Task) -> int:
    """The step a counter task resumes at: ``i`` of its stored context."""
    value: int = json.loads(task.context)["i"]
    return value


def by_node(steps: list[Step], node_id: int) -> list[int]:
    return sorted(s.step for s in steps if s.node_id == node_id)


async def test_kill9_tasks_are_rescued_and_resume_from_checkpoint(cluster: Cluster) -> None:
    """SIGKILL a node mid-task: after ``node_timeout`` another node rescues its tasks and
    resumes them from their last checkpoint; a step is repeated only if it was done but not
    checkpointed; a task without attempts left ends FAILED "node lost"."""
    n = 40
    victim = await cluster.start(concurrency=8)
    # Half of each step lies between its ledger row and its checkpoint, so the kill often
    # leaves a logged step without its checkpoint: that step, and only that one, is repeated.
    context = counter_context(n, delay=0.03, gap=0.03)
    ids = await cluster.client.create_tasks(
        [{"type": "counter", "context": context} for _ in range(3)]
        + [{"type": "counter", "context": context, "max_attempts": 1}]
    )
    resumable, once = ids[:3], ids[3]
    await wait_for(cluster.steps_at_least(ids, 2), timeout=LONG_BOUND, what="every task under way")

    victim.kill()
    assert await victim.wait() == -signal.SIGKILL
    # No node runs now: the rows hold the victim's last durable checkpoints.
    at_kill = {t: await cluster.task(t) for t in ids}
    for t, task in at_kill.items():
        assert task.state is State.RUNNING, task
        assert task.node == victim.node_id, task
        assert checkpoint(task) < n, f"task {t} finished before the kill; make it longer"

    rescuer = await cluster.start(concurrency=8)
    await wait_for(
        cluster.all_in(resumable, State.FINISHED), timeout=LONG_BOUND, what="rescued tasks finished"
    )
    await wait_for(
        cluster.all_in([once], State.FAILED), timeout=LONG_BOUND, what="FAILED node lost"
    )

    repeated = 0
    for t in resumable:
        task = await cluster.task(t)
        assert task.attempts == 2, task
        assert checkpoint(task) == n
        steps = await cluster.ledger.steps(t)
        c = checkpoint(at_kill[t])
        assert by_node(steps, rescuer.node_id) == list(range(c, n)), steps
        victim_steps = by_node(steps, victim.node_id)
        # The step in flight at the kill may have been logged without its checkpoint.
        assert victim_steps in (list(range(c)), list(range(c + 1))), (c, steps)
        assert set(duplicates(steps)) <= {c}, steps
        repeated += len(victim_steps) - c

    failed = await cluster.task(once)
    assert failed.error == "node lost", failed
    assert failed.attempts == 1
    assert failed.node is None
    assert failed.context == at_kill[once].context
    steps = await cluster.ledger.steps(once)
    c = checkpoint(at_kill[once])
    assert by_node(steps, victim.node_id) in (list(range(c)), list(range(c + 1))), steps
    assert by_node(steps, rescuer.node_id) == []

    assert victim.node_id not in {node.id for node in await cluster.client.get_nodes()}
    await cluster.ledger.assert_no_overlap()
    await rescuer.stop()
    print(f"[{cluster.db.backend}] steps repeated after kill -9: {repeated} of {len(resumable)}")


async def test_graceful_stop_hands_tasks_off_without_repeating_a_step(cluster: Cluster) -> None:
    """SIGTERM a node: its RUNNING tasks go back to PENDING with their checkpoints (the step in
    flight finishes and is checkpointed) and another node resumes them; no step is done twice
    and none is lost."""
    n = 40
    first = await cluster.start(concurrency=8)
    # The stop often arrives between a step's ledger row and its checkpoint: the checkpoint
    # must still be stored before the task returns, or the step would be done again.
    context = counter_context(n, delay=0.03, gap=0.03)
    ids = await cluster.client.create_tasks(
        [{"type": "counter", "context": context} for _ in range(3)]
    )
    await wait_for(cluster.steps_at_least(ids, 2), timeout=LONG_BOUND, what="every task under way")

    await first.stop()
    handed_off: dict[int, int] = {}
    for t in ids:
        task = await cluster.task(t)
        assert task.state is State.PENDING, task
        assert task.node is None
        assert task.attempts == 0  # a hand-off does not use up an attempt
        assert task.error is None
        c = handed_off[t] = checkpoint(task)
        assert c < n, f"task {t} finished before the stop; make it longer"
        steps = await cluster.ledger.steps(t)
        assert by_node(steps, first.node_id) == list(range(c)), (c, steps)
    assert first.node_id not in {node.id for node in await cluster.client.get_nodes()}

    second = await cluster.start(concurrency=8)
    await wait_for(cluster.all_in(ids, State.FINISHED), timeout=LONG_BOUND, what="tasks finished")
    for t in ids:
        steps = await cluster.ledger.steps(t)
        assert sorted(s.step for s in steps) == list(range(n)), steps
        c = handed_off[t]
        assert by_node(steps, first.node_id) == list(range(c))
        assert by_node(steps, second.node_id) == list(range(c, n))
    await cluster.ledger.assert_no_overlap()
    await second.stop()


async def test_pause_and_resume_a_task_running_in_another_process(cluster: Cluster) -> None:
    """Pause a task another process runs, then run it again: it resumes at the checkpoint it
    paused at, with no step repeated or lost. The node keeps the default heartbeat interval
    (5 s), so on SQLite the stop arrives with a heartbeat and on PostgreSQL with NOTIFY; the
    time from ``pause_task()`` to PAUSED is printed, never asserted."""
    runner = await cluster.start(heartbeat=5.0, node_timeout=30.0)
    t = await cluster.client.create_task("counter", counter_context(10**9, delay=0.01, gap=0.01))
    samples: list[float] = []
    paused_at = 0
    for _ in range(PAUSE_SAMPLES):
        # Running (again) and past the checkpoint it last paused at. Without NOTIFY the stop
        # waits for the owner's next heartbeat: a random number of extra steps puts the pause at
        # a random point of the heartbeat cycle, as in real use, not always just after a claim.
        extra = 0 if cluster.db.is_postgres else random.randrange(PHASE_STEPS)
        await wait_for(
            cluster.steps_at_least([t], paused_at + 3 + extra), timeout=LONG_BOUND, what="steps"
        )
        await cluster.client.pause_task(t)
        started = time.perf_counter()
        await wait_for(
            cluster.all_in([t], State.PAUSED), timeout=LONG_BOUND, interval=0.002, what="PAUSED"
        )
        samples.append(time.perf_counter() - started)

        task = await cluster.task(t)
        assert task.node is None
        assert task.requested is None
        paused_at = checkpoint(task)
        steps = await cluster.ledger.steps(t)
        assert sorted(s.step for s in steps) == list(range(paused_at)), (paused_at, steps)
        await cluster.client.run_task(t)

    await wait_for(cluster.steps_at_least([t], paused_at + 3), timeout=LONG_BOUND, what="resumed")
    await runner.stop()
    task = await cluster.task(t)
    assert task.state is State.PENDING  # handed off at the stop
    steps = await cluster.ledger.steps(t)
    assert sorted(s.step for s in steps) == list(range(checkpoint(task))), steps
    await cluster.ledger.assert_no_overlap()
    figures = ", ".join(f"{s * 1000:.0f}" for s in samples)
    print(
        f"[{cluster.db.backend}] pause_task() -> PAUSED with heartbeat_interval=5.0: "
        f"median {statistics.median(samples) * 1000:.0f} ms; samples (ms): {figures}"
    )


async def test_delete_running_task_runs_its_cleanup_exactly_once(cluster: Cluster) -> None:
    """Delete a task running in another process: it stops, its cleanup handler runs exactly
    once (on either node, with the last checkpoint) and the row disappears."""
    nodes = await cluster.start_many(2)
    t = await cluster.client.create_task("cleaned", counter_context(10**9, delay=0.02))
    await wait_for(cluster.steps_at_least([t], 3), timeout=LONG_BOUND, what="task under way")
    owner = (await cluster.task(t)).node
    assert owner in {p.node_id for p in nodes}

    await cluster.client.delete_task(t)
    await wait_for(cluster.gone(t), timeout=LONG_BOUND, what="row removed after its cleanup")
    cleanups = await cluster.ledger.cleanups(t)
    assert len(cleanups) == 1, cleanups
    cleaner, context = cleanups[0]
    assert cleaner in {p.node_id for p in nodes}
    steps = await cluster.ledger.steps(t)
    assert sorted(s.step for s in steps) == list(range(json.loads(context)["i"])), steps

    for process in nodes:
        await process.stop()
    assert await cluster.ledger.cleanups(t) == cleanups
    await cluster.ledger.assert_no_overlap()


async def test_task_ignoring_stop_is_cancelled_after_its_stop_timeout(cluster: Cluster) -> None:
    """A task that ignores ``stop``: a pause cancels it after its ``stop_timeout`` and it ends
    PAUSED at its checkpoint; resumed and then caught by a graceful stop, it is cancelled again
    and handed off."""
    runner = await cluster.start(stop_timeout=0.5)
    t = await cluster.client.create_task("stubborn", json.dumps({"i": 0}))

    async def checkpoint_is(value: int) -> bool:
        return checkpoint(await cluster.task(t)) == value

    await wait_for(lambda: checkpoint_is(1), timeout=LONG_BOUND, what="first checkpoint")
    await cluster.client.pause_task(t)
    await wait_for(cluster.all_in([t], State.PAUSED), timeout=LONG_BOUND, what="PAUSED")
    assert await cluster.ledger.events(t) == ["stop seen", "cancelled"]
    task = await cluster.task(t)
    assert checkpoint(task) == 1
    assert task.node is None
    assert task.error is None

    await cluster.client.run_task(t)
    await wait_for(lambda: checkpoint_is(2), timeout=LONG_BOUND, what="resumed at the checkpoint")
    await runner.stop()  # waits out the stop timeout, cancels, hands off
    task = await cluster.task(t)
    assert task.state is State.PENDING
    assert checkpoint(task) == 2
    assert await cluster.ledger.events(t) == ["stop seen", "cancelled"] * 2
    assert [s.step for s in await cluster.ledger.steps(t)] == [0, 1]
    await cluster.ledger.assert_no_overlap()


async def test_three_nodes_drain_one_queue_each_step_once(cluster: Cluster) -> None:
    """Three node processes share one queue (one SQLite file, or one PostgreSQL schema): every
    task runs once, every step once, never on two nodes at once."""
    nodes = await cluster.start_many(3, concurrency=4)
    n = 5
    ids = await cluster.client.create_tasks(
        [{"type": "counter", "context": counter_context(n, delay=0.01)} for _ in range(24)]
    )
    await wait_for(cluster.all_in(ids, State.FINISHED), timeout=LONG_BOUND, what="queue drained")
    workers: set[int] = set()
    for t in ids:
        task = await cluster.task(t)
        assert task.attempts == 1, task
        steps = await cluster.ledger.steps(t)
        assert sorted(s.step for s in steps) == list(range(n)), steps
        assert len({s.node_id for s in steps}) == 1, steps
        workers |= {s.node_id for s in steps}
    assert workers <= {p.node_id for p in nodes}
    await cluster.ledger.assert_no_overlap()
    for process in nodes:
        await process.stop()
    print(f"[{cluster.db.backend}] tasks ran on {len(workers)} of 3 nodes")
