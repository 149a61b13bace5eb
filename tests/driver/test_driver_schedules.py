"""Driver conformance: periodic tasks (``put_schedule``, ``get_schedules``,
``delete_schedule``, ``tick``; docs/design.md §17).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

from _db import DbTarget

from aioasync_tasks import State
from aioasync_tasks._backends._driver import (
    Driver,
    PutScheduleParams,
    ScheduledType,
    TickParams,
    UnscheduleParams,
)
from aioasync_tasks._periodic import Period
from driver._driverkit import new_driver, open_engine, snapshot, unique_type

HOUR = Period(every=3600.0)
CLOSE = timedelta(milliseconds=1)


def params(
    name: str,
    type: str,
    *,
    period: Period = HOUR,
    next_tick: datetime | None = None,
    **fields: object,
) -> PutScheduleParams:
    values: dict[str, object] = {
        "context": '{"report": "daily"}',
        "user": "alice",
        "group": "reports",
        "priority": 3,
        "max_attempts": None,
        "declared": False,
        **fields,
    }
    return PutScheduleParams(
        name=name,
        type=type,
        period=period,
        next_tick=next_tick if next_tick is not None else period.after(datetime.now(UTC)),
        **values,  # type: ignore[arg-type]
    )


def kind(type: str, *, max_attempts: int = 2, has_cleanup: bool = False) -> TickParams:
    return TickParams((ScheduledType(type, max_attempts, has_cleanup),))


async def test_put_schedule_stores_a_schedule_and_get_schedules_lists_them(
    driver: Driver,
) -> None:
    assert await driver.get_schedules() == []
    first_tick = datetime(2030, 1, 1, 9, tzinfo=UTC)
    cron = Period(cron="0 9 * * 1-5", timezone="Europe/Berlin")
    stored = await driver.put_schedule(
        params("b-weekday", "report", period=cron, next_tick=first_tick, max_attempts=4)
    )
    other = await driver.put_schedule(params("a-hourly", "cleanup", declared=True))
    assert (stored.name, stored.type, stored.cron, stored.every, stored.timezone) == (
        "b-weekday",
        "report",
        "0 9 * * 1-5",
        None,
        "Europe/Berlin",
    )
    assert (stored.context, stored.user, stored.group, stored.priority) == (
        '{"report": "daily"}',
        "alice",
        "reports",
        3,
    )
    assert (stored.max_attempts, stored.declared, stored.next_tick) == (4, False, first_tick)
    assert (stored.last_tick, stored.last_task) == (None, None)
    assert stored.created_at == stored.updated_at
    assert (other.cron, other.every, other.timezone, other.declared) == (None, 3600.0, "UTC", True)
    assert other.max_attempts is None
    assert await driver.get_schedules() == [other, stored]  # by name


async def test_put_schedule_again_keeps_the_next_tick_unless_the_period_changed(
    driver: Driver,
) -> None:
    first = datetime(2030, 1, 1, tzinfo=UTC)
    await driver.put_schedule(params("s", "report", next_tick=first))
    later = first + timedelta(days=1)
    same = await driver.put_schedule(
        params("s", "other", next_tick=later, context="new", user="bob", priority=9)
    )
    assert same.next_tick == first  # the same period: declared again, nothing moves
    assert (same.type, same.context, same.user, same.priority) == ("other", "new", "bob", 9)
    changed = await driver.put_schedule(
        params("s", "other", period=Period(every=60.0), next_tick=later)
    )
    assert (changed.every, changed.next_tick) == (60.0, later)
    zone = Period(cron="0 * * * *", timezone="Asia/Tokyo")
    await driver.put_schedule(params("s", "other", period=zone, next_tick=first))
    moved = await driver.put_schedule(
        params("s", "other", period=dataclasses.replace(zone, timezone="UTC"), next_tick=later)
    )
    assert (moved.cron, moved.timezone, moved.next_tick) == ("0 * * * *", "UTC", later)
    assert len(await driver.get_schedules()) == 1


async def test_delete_schedule_says_whether_there_was_one(driver: Driver) -> None:
    await driver.put_schedule(params("s", "report"))
    assert await driver.delete_schedule(UnscheduleParams("s")) is True
    assert await driver.delete_schedule(UnscheduleParams("s")) is False
    assert await driver.get_schedules() == []


async def test_tick_enqueues_a_due_schedule_once_and_advances_it(driver: Driver) -> None:
    type = unique_type()
    due = HOUR.latest(datetime.now(UTC))
    await driver.put_schedule(params("hourly", type, next_tick=due))
    result = await driver.tick(kind(type, max_attempts=2, has_cleanup=True))
    [fired] = result.fired
    assert (fired.schedule, fired.tick, fired.skipped) == ("hourly", due, False)
    assert result.broken == []
    assert result.next_due is not None
    assert 0 < result.next_due <= 3600

    task = await driver.get_task(fired.task_id)
    assert (task.type, task.state, task.context) == (type, State.PENDING, '{"report": "daily"}')
    assert (task.user, task.group, task.priority, task.max_attempts) == ("alice", "reports", 3, 2)
    assert abs(task.run_at - due) < CLOSE  # due at its tick
    [schedule] = await driver.get_schedules()
    assert (schedule.next_tick, schedule.last_tick, schedule.last_task) == (
        due + timedelta(hours=1),
        due,
        fired.task_id,
    )

    again = await driver.tick(kind(type))
    assert again.fired == []
    assert len(await snapshot(driver)) == 1


async def test_tick_enqueues_only_the_latest_of_the_missed_ticks(driver: Driver) -> None:
    type = unique_type()
    latest = HOUR.latest(datetime.now(UTC))
    await driver.put_schedule(params("hourly", type, next_tick=latest - timedelta(hours=5)))
    [fired] = (await driver.tick(kind(type))).fired
    assert (fired.tick, fired.skipped) == (latest, True)
    assert len(await snapshot(driver)) == 1
    [schedule] = await driver.get_schedules()
    assert schedule.next_tick == latest + timedelta(hours=1)


async def test_tick_takes_the_schedule_max_attempts_over_the_type(driver: Driver) -> None:
    type = unique_type()
    due = HOUR.latest(datetime.now(UTC))
    await driver.put_schedule(params("s", type, next_tick=due, max_attempts=7))
    [fired] = (await driver.tick(kind(type, max_attempts=2))).fired
    assert (await driver.get_task(fired.task_id)).max_attempts == 7


async def test_tick_enqueues_only_the_types_asked_for(driver: Driver) -> None:
    mine, theirs = unique_type(), unique_type()
    due = HOUR.latest(datetime.now(UTC))
    await driver.put_schedule(params("theirs", theirs, next_tick=due))
    result = await driver.tick(kind(mine))
    assert (result.fired, result.next_due) == ([], None)  # no schedule of mine at all
    await driver.put_schedule(params("mine", mine))  # not due yet
    result = await driver.tick(kind(mine))
    assert result.fired == []
    assert result.next_due is not None
    assert result.next_due > 0
    nothing = await driver.tick(TickParams(()))  # no types: nothing to look at
    assert (nothing.fired, nothing.broken, nothing.next_due) == ([], [], None)
    assert len(await snapshot(driver)) == 0


async def test_a_schedule_whose_period_cannot_be_computed_is_put_off_and_reported(
    driver: Driver,
) -> None:
    type = unique_type()
    due = HOUR.latest(datetime.now(UTC))
    nowhere = Period(cron="* * * * *", timezone="Nowhere/Land")  # not checked by the driver
    await driver.put_schedule(params("broken", type, period=nowhere, next_tick=due))
    await driver.put_schedule(params("fine", type, next_tick=due))
    result = await driver.tick(kind(type))
    assert [f.schedule for f in result.fired] == ["fine"]
    [(name, why)] = result.broken
    assert name == "broken"
    assert "Nowhere/Land" in why
    broken = next(s for s in await driver.get_schedules() if s.name == "broken")
    assert broken.next_tick > datetime.now(UTC) + timedelta(minutes=50)
    assert broken.last_task is None
    assert len(await snapshot(driver)) == 1


async def test_concurrent_ticks_enqueue_each_tick_once(db: DbTarget) -> None:
    """Ten drivers (ten engines, as ten nodes would have) tick at once, many times over,
    while the schedules are due: every tick of every schedule has exactly one task."""
    type = unique_type()
    async with open_engine(db) as first:
        setup = await new_driver(first, db)
        due = HOUR.latest(datetime.now(UTC))
        for n in range(5):
            await setup.put_schedule(params(f"s{n}", type, next_tick=due - timedelta(hours=n)))
        async with AsyncExitStack() as stack:
            engines = [await stack.enter_async_context(open_engine(db)) for _ in range(10)]
            drivers = [await new_driver(engine, db, migrate=False) for engine in engines]
            results = await asyncio.gather(*(d.tick(kind(type)) for d in drivers for _ in range(3)))
        fired = [f for r in results for f in r.fired]
        assert sorted(f.schedule for f in fired) == [f"s{n}" for n in range(5)]
        assert {f.tick for f in fired} == {due}
        tasks = await snapshot(setup)
        assert sorted(tasks) == sorted(f.task_id for f in fired)
