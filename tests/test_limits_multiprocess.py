"""Cluster-wide group limits under concurrent claims from several node processes
(``docs/how-to.md``, "Use groups, limits and priorities").

Three node processes with 10 slots each drain two limited groups. Two witnesses must agree
that no limit is ever exceeded: the database, sampled continuously while the nodes work, and
the ledger the tasks write (each task's first step start to last step end, on the nodes' shared
clock), swept for the largest overlap.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
import sqlalchemy as sa
from _cluster import Cluster
from _helpers import LONG_BOUND, counter_context, raw_engine, wait_for
from _ledger import Step

from aioasync_tasks import State

pytestmark = pytest.mark.slow

GROUP_LIMIT = 4
USER_LIMIT = 2


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, delta in events:  # at equal times an end (-1) sorts before a start (+1)
        running += delta
        peak = max(peak, running)
    return peak


def _intervals(steps: list[Step], task_ids: list[int]) -> list[tuple[float, float]]:
    by_task: dict[int, list[Step]] = defaultdict(list)
    for step in steps:
        by_task[step.task_id].append(step)
    return [
        (min(s.t_start for s in by_task[t]), max(s.t_end for s in by_task[t])) for t in task_ids
    ]


async def test_group_limits_hold_across_three_node_processes(cluster: Cluster) -> None:
    client = cluster.client
    await client.set_group_limits("capped", max_running=GROUP_LIMIT)
    await client.set_group_limits("per-user", max_running_per_user=USER_LIMIT)
    await client.pause_group("capped")  # let all three nodes be up before the race starts
    await client.pause_group("per-user")
    context = counter_context(3, delay=0.03)
    capped = await client.create_tasks(
        [
            {"type": "counter", "context": context, "group": "capped", "user": f"u{i % 3}"}
            for i in range(30)
        ]
    )
    users = ["ann", "bob", "cat"]
    per_user = {
        user: await client.create_tasks(
            [{"type": "counter", "context": context, "group": "per-user", "user": user}] * 8
        )
        for user in users
    }
    await cluster.start_many(3, concurrency=10)

    engine = raw_engine(cluster.db)
    peaks: dict[tuple[str, str | None], int] = defaultdict(int)
    samples = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal samples
        query = sa.text(
            "SELECT group_name, user_name, count(*) FROM aioasync_tasks"
            " WHERE state IN ('running', 'canceling') GROUP BY group_name, user_name"
        )
        while not done.is_set():
            async with engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            per_group: dict[str, int] = defaultdict(int)
            for group, user, count in rows:
                per_group[group] += count
                peaks[(group, user)] = max(peaks[(group, user)], count)
            for group, count in per_group.items():
                peaks[(group, None)] = max(peaks[(group, None)], count)
            samples += 1
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await client.resume_group("capped")
        await client.resume_group("per-user")
        everything = capped + [t for ids in per_user.values() for t in ids]
        await wait_for(
            cluster.all_in(everything, State.FINISHED),
            timeout=LONG_BOUND,
            what="both groups drained",
        )
    finally:
        done.set()
        await sampler
        await engine.dispose()

    # The database never showed more than the limits...
    assert samples > 10
    assert peaks[("capped", None)] <= GROUP_LIMIT, dict(peaks)
    for user in users:
        assert peaks[("per-user", user)] <= USER_LIMIT, dict(peaks)
    # ...and was busy enough for the check to mean something.
    assert peaks[("capped", None)] == GROUP_LIMIT, dict(peaks)

    # The tasks' own ledger agrees.
    steps = await cluster.ledger.steps()
    assert _max_overlap(_intervals(steps, capped)) <= GROUP_LIMIT
    for ids in per_user.values():
        assert _max_overlap(_intervals(steps, ids)) <= USER_LIMIT
    nodes = {s.node_id for s in steps}
    assert len(nodes) >= 2, "the work should have been shared by several node processes"
    await cluster.ledger.assert_no_overlap()
