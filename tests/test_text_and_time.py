"""Conformance: text and time as stored on every backend — 4-byte UTF-8 in contexts, users and
groups from create through checkpoint to completion (MySQL's tables and connections are
utf8mb4), a context of exactly ``max_context_bytes``, and timestamps to the microsecond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from _db import DbTarget
from _helpers import make_node, wait_state

from aioasync_tasks import Report, State, TaskRegistry

MAX_CONTEXT_BYTES = 64 * 1024 + 4
"""Past MySQL's 64 KiB TEXT: contexts are LONGTEXT there."""
EMOJI = "\U0001f600"  # 4 bytes in UTF-8
PARTY = "\U0001f389"


def _registry(checkpointed: asyncio.Event) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("echo")
    async def _echo(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context=PARTY + context[1:])  # a checkpoint of the same size
        checkpointed.set()
        yield Report.finished(context=context[:-1] + PARTY)

    return registry


async def test_four_byte_text_and_a_full_context_round_trip(db: DbTarget) -> None:
    context = EMOJI * (MAX_CONTEXT_BYTES // 4)
    assert len(context.encode()) == MAX_CONTEXT_BYTES
    name = f"{EMOJI}é{PARTY}"
    checkpointed = asyncio.Event()
    registry = _registry(checkpointed)
    async with make_node(db, registry, concurrency=0, max_context_bytes=MAX_CONTEXT_BYTES) as node:
        task_id = await node.create_task("echo", context, user=name, group=name)
        [other] = await node.create_tasks([{"type": "echo", "context": context, "user": name}])
        for created in (task_id, other):
            task = await node.get_task(created)
            assert task.context == context
        task = await node.get_task(task_id)
        assert (task.user, task.group) == (name, name)
        assert [g.name for g in await node.get_groups()] == sorted(["default", name])
        assert await node.count_tasks(user=name, group=name) == 1
        async with make_node(
            db, registry, concurrency=2, max_context_bytes=MAX_CONTEXT_BYTES
        ) as worker:
            assert worker.running
            done = await wait_state(node, task_id, State.FINISHED)
            await wait_state(node, other, State.FINISHED)
        assert checkpointed.is_set()
        assert done.context == context[:-1] + PARTY


async def test_timestamps_keep_their_microseconds(db: DbTarget) -> None:
    run_at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with make_node(db, _registry(asyncio.Event()), concurrency=0) as node:
        task_id = await node.create_task("echo", run_at=run_at)
        task = await node.get_task(task_id)
        assert task.run_at == run_at
        assert task.run_at.tzinfo is not None
        assert abs(task.created_at - datetime.now(UTC)) < timedelta(minutes=5)
        later = await node.create_task("echo", run_at=run_at + timedelta(microseconds=1))
        assert (await node.get_task(later)).run_at - task.run_at == timedelta(microseconds=1)
