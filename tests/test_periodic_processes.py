"""Periodic tasks with real node processes (docs/design.md §17), on both backends: several
processes enqueue the ticks of one fast schedule while processes are killed with SIGKILL and
started again; every tick is enqueued exactly once, and every tick's task runs.

The ledger: the tick of a task is its ``run_at`` (tasks table); each run of a ``ticker`` task
(``nodeproc``) writes a ledger row with its node. A task may run twice only when the node that
ran it first was killed before its completion was stored.
"""

from __future__ import annotations

import signal
from collections import Counter
from datetime import datetime

import pytest
from _cluster import Cluster, NodeProcess
from _helpers import LONG_BOUND, wait_for

from aioasync_tasks import State
from aioasync_tasks._periodic import check_period

pytestmark = pytest.mark.slow

EVERY = 0.25
"""The schedule's interval: about four ticks a second."""
MORE = 8
"""Ticks to wait for between two steps of the test."""


async def ticks(cluster: Cluster) -> dict[int, datetime]:
    """Every tick enqueued so far: task id -> tick (the task's run_at)."""
    tasks = await cluster.client.get_tasks(types=["ticker"], limit=1000)
    return {t.id: t.run_at for t in tasks}


async def wait_ticks(cluster: Cluster, count: int, what: str) -> int:
    """Wait until ``count`` ticks are enqueued; how many there are then."""

    async def enough() -> bool:
        return len(await ticks(cluster)) >= count

    await wait_for(enough, timeout=LONG_BOUND, what=what)
    return len(await ticks(cluster))


async def kill(process: NodeProcess) -> None:
    process.kill()
    assert await process.wait() == -signal.SIGKILL


async def test_each_tick_is_enqueued_once_while_nodes_are_killed(cluster: Cluster) -> None:
    first = await cluster.start_many(3, concurrency=4)
    await cluster.client.schedule("ticks", "ticker", every=EVERY)
    seen = await wait_ticks(cluster, MORE, "the first ticks")

    await kill(first[0])
    seen = await wait_ticks(cluster, seen + MORE, "ticks after a kill -9")
    replacement = await cluster.start(concurrency=4)
    await kill(first[1])
    seen = await wait_ticks(cluster, seen + MORE, "ticks after a second kill -9")
    await kill(first[2])  # the replacement alone now
    seen = await wait_ticks(cluster, seen + MORE, "ticks enqueued by the last node")

    assert await cluster.client.unschedule("ticks") is True
    enqueued = await ticks(cluster)
    ids = sorted(enqueued)
    await wait_for(
        cluster.all_in(ids, State.FINISHED),
        timeout=LONG_BOUND,
        what="every tick's task finished (those of killed nodes rescued)",
    )
    await replacement.stop()

    # Exactly once: no tick has two tasks, and every tick lies on the schedule's grid.
    doubled = {tick: n for tick, n in Counter(enqueued.values()).items() if n > 1}
    assert not doubled, f"ticks enqueued more than once: {doubled}"
    period = check_period(None, EVERY)
    assert all(period.latest(tick) == tick for tick in enqueued.values())
    # Only the latest missed tick is ever enqueued, so a slow moment leaves gaps, never a
    # burst: the ticks are spread over the run, one per grid point at most.
    ordered = sorted(enqueued.values())
    assert len(ordered) == len(set(ordered)) >= 4 * MORE

    # Every tick's task ran; twice only when a killed node had run it first.
    killed = {p.node_id for p in first}
    runs = Counter(step.task_id for step in await cluster.ledger.steps())
    assert set(runs) == set(ids), "a tick's task never ran"
    for task_id, count in runs.items():
        if count > 1:
            nodes = {s.node_id for s in await cluster.ledger.steps(task_id)}
            assert nodes & killed, f"task {task_id} ran {count} times with no node killed"
