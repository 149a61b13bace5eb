"""Driver conformance: ``queue_stats`` — counts by group and state, the tasks each node runs and
the tasks that ended within each window, measured on the database clock.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from aioasync_tasks import State
from aioasync_tasks._backends._driver import Driver, EndedCount, QueueStats, StatsParams
from driver._driverkit import Peek, Want, every_start, make_many, register, snapshot

MINUTE, HOURS = 60.0, 3 * 3600.0


async def test_queue_stats_of_an_empty_queue(driver: Driver) -> None:
    stats = await driver.queue_stats(StatsParams(windows=(MINUTE, HOURS)))
    assert stats.now.utcoffset() == timedelta(0)
    assert stats == QueueStats(
        stats.now, {}, {}, [EndedCount(MINUTE, 0, 0), EndedCount(HOURS, 0, 0)]
    )


async def test_queue_stats_counts_groups_states_nodes_and_recent_ends(
    driver: Driver, peek: Peek
) -> None:
    first, second = await register(driver, "first"), await register(driver, "second")
    made = await make_many(driver, first, every_start(group="a"))
    made += await make_many(driver, second, [Want(s.start, group="b") for s in made[:6]])
    tasks = await snapshot(driver)
    ended = [t.id for t in tasks.values() if t.state in (State.FINISHED, State.FAILED)]
    # One finished and one failed task ended two hours ago; the others just now.
    aged = [next(i for i in ended if tasks[i].state is s) for s in (State.FINISHED, State.FAILED)]
    await peek.age(aged, "done_at", 2)

    stats = await driver.queue_stats(StatsParams(windows=(MINUTE, HOURS)))

    assert stats.now.utcoffset() == timedelta(0)
    assert stats.counts == Counter((t.group, t.state) for t in tasks.values())
    running = Counter(
        t.node
        for t in tasks.values()
        if t.node is not None and t.state in (State.RUNNING, State.CANCELING)
    )
    assert stats.running == running
    assert set(running) == {first, second}

    def ends(ids: list[int], state: State) -> int:
        return sum(1 for i in ids if tasks[i].state is state)

    recent = [i for i in ended if i not in aged]
    assert stats.ended == [
        EndedCount(MINUTE, ends(recent, State.FINISHED), ends(recent, State.FAILED)),
        EndedCount(HOURS, ends(ended, State.FINISHED), ends(ended, State.FAILED)),
    ]
    assert stats.ended[0].finished
    assert stats.ended[0].failed
    assert stats.ended[1].finished == stats.ended[0].finished + 1
    assert stats.ended[1].failed == stats.ended[0].failed + 1
