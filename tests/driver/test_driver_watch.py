"""Driver conformance: task events for watchers (``watch_tasks``, ``listen_tasks``; docs/design.md
§18).

Where the driver notifies, a write of a watched task sends one event in its own transaction —
``progress:<ids>`` for a checkpoint batch, a claim or another change, ``done:<ids>`` when the
task ended or was removed — and a write of a task nobody watches sends none. Events are
delivered in commit order, so "nothing before the next watched write" shows that an unwatched
write sent nothing. A driver without notifications takes ``watch_tasks`` as a no-op.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from _helpers import wait_for

from aioasync_tasks import Operation, State
from aioasync_tasks._backends._driver import (
    MAX_PAYLOAD,
    Checkpoint,
    CheckpointParams,
    ClaimParams,
    Driver,
    InsertParams,
    ListenParams,
    OperateParams,
    WatchParams,
    parse_task_event,
    task_events,
)
from aioasync_tasks._states import Event
from driver._driverkit import (
    FIFO,
    Start,
    Want,
    claim_one,
    complete_one,
    insert,
    make,
    make_many,
    new_task,
    register,
    unique_type,
)


def notifying(driver: Driver) -> None:
    if not driver.supports_notify:
        pytest.skip("this driver has no notifications (supports_notify is False): nodes poll")


@asynccontextmanager
async def events(driver: Driver) -> AsyncIterator[list[tuple[str, list[int]]]]:
    """The task events heard while inside, parsed, in order."""
    heard: list[tuple[str, list[int]]] = []
    async with driver.listen_tasks(ListenParams(lambda p: heard.append(parse_task_event(p)))):
        yield heard


async def next_event(heard: list[tuple[str, list[int]]], count: int) -> tuple[str, list[int]]:
    await wait_for(lambda: len(heard) >= count, timeout=10, what=f"task event {count}")
    return heard[count - 1]


async def watch(driver: Driver, *ids: int) -> None:
    await driver.watch_tasks(WatchParams(ids, 60.0))


async def test_checkpoints_of_watched_tasks_send_one_event_per_batch(driver: Driver) -> None:
    notifying(driver)
    node = await register(driver)
    made = await make_many(driver, node, [Want(Start.RUNNING) for _ in range(4)])
    tokens = {m.id: m.token for m in made}
    watched, unwatched = [m.id for m in made[:2]], [m.id for m in made[2:]]
    async with events(driver) as heard:
        # Nobody watches yet: no event.
        await driver.checkpoint(
            CheckpointParams(node, {i: Checkpoint(tokens[i] or 0, "a") for i in tokens})
        )
        await watch(driver, *watched)
        await driver.checkpoint(
            CheckpointParams(node, {i: Checkpoint(tokens[i] or 0, "b") for i in tokens})
        )
        assert await next_event(heard, 1) == ("progress", watched)
        await driver.checkpoint(
            CheckpointParams(node, {unwatched[0]: Checkpoint(tokens[unwatched[0]] or 0, "c")})
        )
        await driver.checkpoint(
            CheckpointParams(node, {watched[1]: Checkpoint(tokens[watched[1]] or 0, "d")})
        )
        assert await next_event(heard, 2) == ("progress", [watched[1]])


async def test_the_end_of_a_watched_task_sends_done(driver: Driver) -> None:
    notifying(driver)
    node = await register(driver)
    finished = await make(driver, node, Start.RUNNING)
    failed = await make(driver, node, Start.RUNNING)
    retried = await make(driver, node, Start.RUNNING, max_attempts=2)
    async with events(driver) as heard:
        await watch(driver, finished.id, failed.id, retried.id)
        assert finished.token is not None
        assert failed.token is not None
        assert retried.token is not None
        await complete_one(driver, node, finished.id, finished.token, Event.FINISHED)
        assert await next_event(heard, 1) == ("done", [finished.id])
        # A failure with attempts left goes back to PENDING: progress, not done.
        await complete_one(driver, node, retried.id, retried.token, Event.FAILED)
        assert await next_event(heard, 2) == ("progress", [retried.id])
        await complete_one(driver, node, failed.id, failed.token, Event.FAILED)
        assert await next_event(heard, 3) == ("done", [failed.id])
        assert (await driver.get_task(failed.id)).state is State.FAILED


async def test_claims_operations_and_removal_of_watched_tasks_send_events(
    driver: Driver,
) -> None:
    notifying(driver)
    node = await register(driver)
    type = unique_type()
    pending = await insert(driver, type=type)
    paused = await make(driver, node, Start.PAUSED)
    async with events(driver) as heard:
        await watch(driver, pending, paused.id)
        task_id, _ = await claim_one(driver, node, type)
        assert task_id == pending
        assert await next_event(heard, 1) == ("progress", [pending])
        await driver.operate(OperateParams(paused.id, Operation.RUN))
        assert await next_event(heard, 2) == ("progress", [paused.id])
        await driver.operate(OperateParams(pending, Operation.DELETE, force=True))
        assert await next_event(heard, 3) == ("done", [pending])


async def test_a_claim_of_many_watched_tasks_tells_of_each_within_the_payload_bound(
    driver: Driver,
) -> None:
    """A claim of many watched tasks sends events, each under ``MAX_PAYLOAD``, that name
    every task taken once (PostgreSQL's claim in one statement sends them from SQL, 300 ids
    an event: docs/design.md §6.9)."""
    notifying(driver)
    node = await register(driver)
    type = unique_type()
    ids = await driver.insert_many(InsertParams([new_task(type) for _ in range(700)]))
    async with events(driver) as heard:
        await watch(driver, *ids)
        result = await driver.claim(ClaimParams(node, [type], len(ids), FIFO))
        assert sorted(c.id for c in result.claimed) == sorted(ids)
        await wait_for(
            lambda: sum(len(i) for _, i in heard) >= len(ids), timeout=10, what="the events"
        )
    assert {kind for kind, _ in heard} == {"progress"}
    assert sorted(i for _, event in heard for i in event) == sorted(ids)
    assert all(len(payload) <= MAX_PAYLOAD for payload in _payloads(heard))


def _payloads(heard: list[tuple[str, list[int]]]) -> list[str]:
    """The payloads the events ``heard`` were parsed from."""
    return [f"{kind}:{','.join(map(str, ids))}" for kind, ids in heard]


async def test_watch_tasks_of_a_driver_without_notifications_is_a_no_op(driver: Driver) -> None:
    if driver.supports_notify:
        pytest.skip("this driver notifies: see the other tests")
    task_id = await insert(driver)
    await watch(driver, task_id)
    await watch(driver)
    assert (await driver.get_task(task_id)).state is State.PENDING


def test_task_events_stay_under_the_payload_limit_and_parse_back() -> None:
    ids = list(range(10**15, 10**15 + 2_000))  # 16 digits each: several payloads
    payloads = task_events("done", ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD < 8000 for p in payloads)
    parsed = [parse_task_event(p) for p in payloads]
    assert {kind for kind, _ in parsed} == {"done"}
    assert [i for _, chunk in parsed for i in chunk] == ids
    assert task_events("progress", []) == []
    assert task_events("progress", [7]) == ["progress:7"]
    assert parse_task_event("wake") == ("", [])
    assert parse_task_event("done:x") == ("", [])
