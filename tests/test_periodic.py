"""Periodic tasks through a node (docs/how-to.md, "Run tasks periodically"; design §17), on
both backends: schedules declared with a task type or made at runtime, enqueued by the worker
nodes' tickers, each tick once; missed ticks; removing a schedule; bad arguments.

The multi-process test (several node processes, kill -9, a ledger of ticks) is in
``test_periodic_processes.py``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from _db import DbTarget
from _helpers import BOUND, make_node, raw_engine, wait_for
from sqlalchemy import text

from aioasync_tasks import (
    ConfigurationError,
    Node,
    Report,
    Schedule,
    State,
    TaskRegistry,
    UnknownTaskType,
)
from aioasync_tasks._periodic import Period, check_period

EVERY = 0.2
"""The interval of the tests' fast schedules, in seconds."""


def registry_with(**declared: object) -> TaskRegistry:
    """``tick`` (finishes at once; ``declared`` are its schedule options) and ``other``."""
    registry = TaskRegistry()

    @registry.task("tick", **declared)  # type: ignore[arg-type]
    async def _tick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context=context)

    @registry.task("other")
    async def _other(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    return registry


async def ticks_of(node: Node, type: str = "tick") -> list[datetime]:
    """The ticks enqueued so far (a tick's task is due at its tick), in order."""
    tasks = await node.get_tasks(types=[type], limit=1000)
    return sorted(t.run_at for t in tasks)


def on_grid(tick: datetime, period: Period) -> bool:
    return period.latest(tick) == tick


async def test_a_schedule_declared_with_a_type_enqueues_each_tick_once(db: DbTarget) -> None:
    registry = registry_with(every=EVERY)
    async with make_node(db, registry, concurrency=4) as first, make_node(db, registry) as second:
        await wait_for(lambda: _count_at_least(first, 5), timeout=BOUND, what="five ticks enqueued")
        [schedule] = await second.get_schedules()
        assert (schedule.name, schedule.type, schedule.every, schedule.cron) == (
            "tick",
            "tick",
            EVERY,
            None,
        )
        assert (schedule.declared, schedule.context, schedule.user, schedule.group) == (
            True,
            "",
            "",
            "default",
        )
    ticks = await _all_ticks(db, registry)
    assert len(ticks) == len(set(ticks)), "a tick was enqueued twice"
    period = check_period(None, EVERY)
    assert all(on_grid(t, period) for t in ticks)
    assert schedule.last_tick in ticks


async def _count_at_least(node: Node, count: int) -> bool:
    return await node.count_tasks(types=["tick"], states=[State.FINISHED]) >= count


async def _all_ticks(db: DbTarget, registry: TaskRegistry) -> list[datetime]:
    async with make_node(db, registry, concurrency=0) as client:
        return await ticks_of(client)


async def test_a_runtime_schedule_from_a_client_runs_on_the_workers(db: DbTarget) -> None:
    registry = registry_with()
    async with make_node(db, registry, concurrency=0) as client:
        made = await client.schedule(
            "every-200ms",
            "tick",
            every=timedelta(seconds=EVERY),
            context='{"report": 1}',
            user="alice",
            group="reports",
            priority=5,
            max_attempts=2,
        )
        assert isinstance(made, Schedule)
        assert (made.name, made.type, made.every, made.declared, made.last_task) == (
            "every-200ms",
            "tick",
            EVERY,
            False,
            None,
        )
        assert made.next_tick > made.created_at - timedelta(seconds=1)
        async with make_node(db, registry, concurrency=2):
            await wait_for(lambda: _count_at_least(client, 3), timeout=BOUND, what="3 ticks")
        [schedule] = await client.get_schedules()
        assert schedule.last_task is not None
        task = await client.get_task(schedule.last_task)
        assert (task.type, task.context, task.user, task.group, task.priority) == (
            "tick",
            '{"report": 1}',
            "alice",
            "reports",
            5,
        )
        assert task.max_attempts == 2
        assert task.run_at == schedule.last_tick
        assert task.state is State.FINISHED


async def test_unschedule_stops_the_ticks(db: DbTarget) -> None:
    registry = registry_with()
    async with make_node(db, registry, concurrency=2) as node:
        await node.schedule("fast", "tick", "* * * * * *")  # six fields: every second
        await wait_for(lambda: _enqueued_at_least(node, 1), timeout=BOUND, what="a tick")
        assert await node.unschedule("fast") is True
        assert await node.unschedule("fast") is False
        # A tick in flight committed before the schedule's row was deleted (the delete waits
        # for its lock): what is enqueued now is all there will be.
        enqueued = await ticks_of(node)
        result = await node.services.ticker.run_once()
        assert result.fired == []
        assert await node.get_schedules() == []
        assert await ticks_of(node) == enqueued


async def _enqueued_at_least(node: Node, count: int) -> bool:
    return len(await ticks_of(node)) >= count


async def test_schedule_again_replaces_it_and_keeps_its_next_tick(db: DbTarget) -> None:
    async with make_node(db, registry_with(), concurrency=0) as client:
        first = await client.schedule("nightly", "tick", "0 3 * * *", timezone="Europe/Paris")
        again = await client.schedule(
            "nightly", "other", "0 3 * * *", timezone="Europe/Paris", user="bob"
        )
        assert (again.type, again.user, again.next_tick) == ("other", "bob", first.next_tick)
        assert again.next_tick.astimezone(ZoneInfo("Europe/Paris")).hour == 3
        moved = await client.schedule("nightly", "other", "0 4 * * *", timezone="Europe/Paris")
        assert moved.next_tick != first.next_tick
        assert [s.name for s in await client.get_schedules()] == ["nightly"]


async def test_only_the_latest_missed_tick_is_enqueued(
    db: DbTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """Five hourly ticks passed while no node ran: one task, for the latest, and a warning."""
    registry = registry_with()
    with caplog.at_level(logging.WARNING, logger="aioasync_tasks"):
        async with make_node(db, registry, concurrency=1) as node:
            await node.schedule("hourly", "tick", every=3600)
            latest = check_period(None, 3600).latest(datetime.now(UTC))
            await _set_next_tick(db, "hourly", latest - timedelta(hours=5))
            await node.services.ticker.run_once()  # or the node's own ticker, at once
            await wait_for(lambda: _enqueued_at_least(node, 1), timeout=BOUND, what="a tick")
            assert await ticks_of(node) == [latest]
            [schedule] = await node.get_schedules()
            assert schedule.next_tick == latest + timedelta(hours=1)
    assert "schedule hourly missed ticks" in caplog.text


async def _set_next_tick(db: DbTarget, name: str, when: datetime) -> None:
    engine = raw_engine(db)
    value: object = when.timestamp() if db.url.startswith("sqlite") else when
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE aioasync_schedules SET next_tick = :t WHERE name = :n"),
                {"t": value, "n": name},
            )
    finally:
        await engine.dispose()


async def test_bad_schedules_are_refused_before_any_io(db: DbTarget) -> None:
    async with make_node(db, registry_with(), concurrency=0) as client:
        with pytest.raises(UnknownTaskType):
            await client.schedule("s", "nope", "* * * * *")
        with pytest.raises(ConfigurationError, match="not valid"):
            await client.schedule("s", "tick", "every day")
        with pytest.raises(ConfigurationError, match="either cron= or every="):
            await client.schedule("s", "tick")
        with pytest.raises(ConfigurationError, match="name"):
            await client.schedule("", "tick", every=1)
        with pytest.raises(ConfigurationError, match="max_attempts"):
            await client.schedule("s", "tick", every=1, max_attempts=0)
        with pytest.raises(ConfigurationError, match="unknown timezone"):
            await client.schedule("s", "tick", "* * * * *", timezone="Nowhere/Land")
        assert await client.get_schedules() == []


def test_a_type_declares_its_schedule_and_bad_ones_are_refused() -> None:
    registry = registry_with(cron="0 * * * *", timezone="Asia/Tokyo")
    tick = registry.get("tick")
    assert (tick.cron, tick.every, tick.timezone) == ("0 * * * *", None, "Asia/Tokyo")
    assert tick.period == Period(cron="0 * * * *", timezone="Asia/Tokyo")
    assert registry.get("other").period is None
    with pytest.raises(ConfigurationError, match="not valid"):
        registry_with(cron="0 0 31 2 *")
    with pytest.raises(ConfigurationError, match="either cron= or every="):
        registry_with(cron="* * * * *", every=5)
    with pytest.raises(ConfigurationError, match="applies to cron= only"):
        registry_with(every=5, timezone="Asia/Tokyo")
