"""Structured progress (docs/design.md §2.6): ``Report(progress=…, message=…)`` is stored with
the checkpoint, in the same write, durable when ``yield`` returns, and shown on ``Task``.

On every backend, in one process. The driver's side (one statement, fenced by the claim token)
is in ``tests/driver/test_driver_executions.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import BOUND, make_node, wait_state
from driver._driverkit import Start, make, new_driver, open_engine, register
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import ConfigurationError, Report, State, TaskRegistry, current_task
from aioasync_tasks._backends._driver import Checkpoint, Completion, Driver
from aioasync_tasks._committer import Committer
from aioasync_tasks._states import Event
from aioasync_tasks._telemetry import Telemetry


async def _stored(raw: AsyncEngine, task_id: int) -> tuple[Any, ...]:
    """The row's context, progress and message, as another connection sees them."""
    async with raw.connect() as conn:
        result = await conn.execute(
            sa.text("SELECT context, progress, message FROM aioasync_tasks WHERE id = :id"),
            {"id": task_id},
        )
        return tuple(result.one())


async def test_progress_is_durable_when_yield_returns(db: DbTarget, raw: AsyncEngine) -> None:
    registry = TaskRegistry()
    seen: list[tuple[Any, ...]] = []

    @registry.task("steps")
    async def steps(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        yield Report(context="one", progress=0.25, message="a quarter")
        seen.append(await _stored(raw, task.id))
        yield Report(progress=0.5)  # progress alone: context and message kept
        seen.append(await _stored(raw, task.id))
        yield Report(message="almost")
        seen.append(await _stored(raw, task.id))
        yield Report.finished(progress=1, message="done")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("steps", "start")
        task = await wait_state(node, task_id, State.FINISHED)

    assert seen == [
        ("one", 0.25, "a quarter"),
        ("one", 0.5, "a quarter"),
        ("one", 0.5, "almost"),
    ]
    assert (task.context, task.progress, task.message) == ("one", 1.0, "done")


async def test_a_new_task_has_no_progress(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("idle")
    async def idle(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    async with make_node(db, registry, concurrency=0) as node:
        task = await node.get_task(await node.create_task("idle"))
    assert (task.progress, task.message) == (None, None)


@pytest.mark.parametrize(
    ("report", "error"),
    [
        ({"progress": 1.5}, "progress must be from 0 to 1"),
        ({"progress": -0.1}, "progress must be from 0 to 1"),
        ({"progress": float("nan")}, "progress must be a number"),
        ({"progress": "50%"}, "progress must be a number"),
        ({"progress": True}, "progress must be a number"),
        ({"message": "x" * 1001}, "message must be at most 1000 characters"),
        ({"message": "nul \x00"}, "message must not contain NUL"),
        ({"message": 42}, "message must be a str"),
    ],
    ids=lambda value: str(value)[:30],
)
async def test_a_bad_progress_or_message_fails_the_task_alone(
    db: DbTarget, report: dict[str, Any], error: str
) -> None:
    registry = TaskRegistry()

    @registry.task("bad")
    async def bad(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="kept", progress=0.1)
        yield Report(**report)

    async with make_node(db, registry) as node:
        task_id = await node.create_task("bad")
        task = await wait_state(node, task_id, State.FAILED)
    assert task.error is not None
    assert "ConfigurationError" in task.error
    assert error in task.error
    assert (task.context, task.progress) == ("kept", 0.1)


def test_report_checks_progress_and_message_when_built() -> None:
    assert Report(progress=1).progress == 1.0
    assert isinstance(Report(progress=0).progress, float)
    assert Report(progress=0.42, message="").message == ""
    assert Report.finished(progress=1.0, message="ok").terminal
    assert Report.failed("boom", progress=0.3).progress == 0.3
    assert Report(message="m").stores
    assert not Report().stores
    with pytest.raises(ConfigurationError, match="progress"):
        Report(progress=2)
    with pytest.raises(ConfigurationError, match="message"):
        Report(message="\ud800")


async def test_checkpoints_waiting_in_one_batch_are_merged_per_execution(
    db: DbTarget,
) -> None:
    """A newer checkpoint replaces an older one still waiting in the same batch; what the newer
    one leaves out (None) is kept from the older, if both are of the same execution."""
    async with open_engine(db) as engine:
        driver: Driver = await new_driver(engine, db)
        node = await register(driver)
        first = await make(driver, node, Start.RUNNING)
        second = await make(driver, node, Start.RUNNING)
        assert first.token is not None
        assert second.token is not None
        log = logging.getLogger(__name__)
        committer = Committer(driver, cleanup_attempts=1, logger=log, telemetry=Telemetry((), log))
        writes = [
            asyncio.ensure_future(committer.checkpoint(node, first.id, first.token, "c1")),
            asyncio.ensure_future(
                committer.checkpoint(node, first.id, first.token, None, progress=0.7)
            ),
            # Another execution's (a stale token): it replaces, nothing of the older is kept.
            asyncio.ensure_future(
                committer.checkpoint(node, second.id, second.token, "c2", message="m")
            ),
            asyncio.ensure_future(
                committer.checkpoint(node, second.id, second.token + 1, None, progress=0.2)
            ),
        ]
        await asyncio.sleep(0)  # every write is queued before the flush
        await committer.run_once()
        assert await asyncio.gather(*writes) == [True, True, False, False]
        one = await driver.get_task(first.id)
        two = await driver.get_task(second.id)
    assert (one.context, one.progress, one.message) == ("c1", 0.7, None)
    assert (two.context, two.progress, two.message) == ("{}", None, None)
    assert Checkpoint(1, "a", 0.1, "x").then(Checkpoint(1, None, None, "y")) == Checkpoint(
        1, "a", 0.1, "y"
    )


async def test_a_cancelled_writer_leaves_the_others_of_its_batch_their_answer(
    db: DbTarget,
) -> None:
    """Each write waits on a future of its own: when the caller of a checkpoint (or of a
    completion) is cancelled before the flush — an execution cut off at the end of its grace
    period — the write is still made, and the other writes of the same task in that batch still
    get their answer, not the cancellation."""
    async with open_engine(db) as engine:
        driver: Driver = await new_driver(engine, db)
        node = await register(driver)
        task = await make(driver, node, Start.RUNNING)
        assert task.token is not None
        log = logging.getLogger(__name__)
        committer = Committer(driver, cleanup_attempts=1, logger=log, telemetry=Telemetry((), log))
        cut_off = asyncio.ensure_future(committer.checkpoint(node, task.id, task.token, "c1"))
        later = asyncio.ensure_future(
            committer.checkpoint(node, task.id, task.token, None, progress=0.5)
        )
        ended = asyncio.ensure_future(
            committer.complete(node, Completion(task.id, task.token, Event.FINISHED))
        )
        cut_ended = asyncio.ensure_future(
            committer.complete(node, Completion(task.id, task.token, Event.FINISHED))
        )
        await asyncio.sleep(0)  # every write is queued before the flush
        cut_off.cancel()
        cut_ended.cancel()
        await committer.run_once()
        async with asyncio.timeout(BOUND):  # the flush has answered every write, or never will
            assert await later is True
            assert await ended is True
        assert cut_off.cancelled()
        assert cut_ended.cancelled()
        stored = await driver.get_task(task.id)
    assert (stored.state, stored.context, stored.progress) == (State.FINISHED, "c1", 0.5)
