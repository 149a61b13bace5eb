"""Unique tasks (docs/how-to.md, "Create unique tasks"; docs/design.md §4.4) through ``Node``:
``create_task(..., unique_key=…, on_conflict=…)`` and ``create_tasks`` per item, the key freed
when its task ends, and — in several processes at once — exactly one live task per key.

The driver's side, per starting situation and per ``on_conflict``, is in
``tests/driver/test_driver_unique.py``; the bad arguments in ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _cluster import Cluster
from _db import DbTarget
from _helpers import LONG_BOUND, make_node, wait_for, wait_state

from aioasync_tasks import DuplicateTask, Report, State, TaskRegistry

NODEPROC = Path(__file__).with_name("nodeproc.py")


def _registry(release: asyncio.Event) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("refresh")
    async def refresh(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        await release.wait()
        yield Report.finished(context=context + " done")

    return registry


async def test_one_live_task_per_key_until_it_ends(db: DbTarget) -> None:
    release = asyncio.Event()
    async with make_node(db, _registry(release), concurrency=2) as node:
        first = await node.create_task("refresh", "u1", unique_key="user:1")
        await wait_state(node, first, State.RUNNING)

        assert await node.create_task(
            "refresh", "again", unique_key="user:1", on_conflict="skip"
        ) == (first)
        with pytest.raises(DuplicateTask) as caught:
            await node.create_task("refresh", "again", unique_key="user:1")  # "error"
        assert (caught.value.task_id, caught.value.state) == (first, State.RUNNING)
        with pytest.raises(DuplicateTask):  # a running task is not replaced
            await node.create_task("refresh", "new", unique_key="user:1", on_conflict="replace")
        other = await node.create_task("refresh", "u2", unique_key="user:2", auto_run=False)
        assert other != first
        task = await node.get_task(first)
        assert (task.unique_key, task.context) == ("user:1", "u1")

        # A waiting task is replaced: its id and state stay, its context is the new one.
        replaced = await node.create_task(
            "refresh", "u2 newer", unique_key="user:2", on_conflict="replace", priority=3
        )
        assert replaced == other
        waiting = await node.get_task(other)
        assert (waiting.state, waiting.context, waiting.priority) == (State.INIT, "u2 newer", 3)

        # Once it has ended, the key is free: the same key makes a new task.
        release.set()
        await wait_state(node, first, State.FINISHED)
        second = await node.create_task("refresh", "later", unique_key="user:1", auto_run=False)
        assert second not in (first, other)
        assert await node.count_tasks(types=["refresh"]) == 3

        # Per item in create_tasks.
        ids = await node.create_tasks(
            [
                {"type": "refresh", "unique_key": "user:1", "on_conflict": "skip"},
                {"type": "refresh", "unique_key": "user:3", "context": "u3"},
                {"type": "refresh", "context": "no key"},
            ]
        )
        assert ids[0] == second
        assert len({*ids, first, other}) == 5


async def test_running_a_failed_task_whose_key_was_taken_raises(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("flaky")
    async def flaky(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.failed("no luck")

    async with make_node(db, registry, concurrency=1) as node:
        failed = await node.create_task("flaky", unique_key="nightly")
        await wait_state(node, failed, State.FAILED)
        taker = await node.create_task("flaky", unique_key="nightly", auto_run=False)
        with pytest.raises(DuplicateTask) as caught:
            await node.run_task(failed)
        assert caught.value.task_id == taker
        assert (await node.get_task(failed)).state is State.FAILED


# -- several processes ----------------------------------------------------------------------

KEYS = [f"key{i}" for i in range(12)]
CREATORS = 3


@pytest.mark.slow
async def test_creators_in_several_processes_make_one_live_task_per_key(
    cluster: Cluster,
) -> None:
    """Three processes create the same keys at once, each in its own order, with every
    ``on_conflict``; two worker processes run the tasks. Exactly one task per key exists, every
    creator was given its id, and the ledger (written by the tasks themselves) shows exactly
    that task running for the key."""
    db = cluster.db
    await cluster.start_many(2, concurrency=len(KEYS))
    creators: list[asyncio.subprocess.Process] = []
    try:
        for seed in range(CREATORS):
            args = [sys.executable, str(NODEPROC), "unique", "--url", db.url]
            if db.schema is not None:
                args += ["--schema", db.schema]
            args += ["--keys", ",".join(KEYS), "--seed", str(seed)]
            creators.append(
                await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
            )
        for creator in creators:
            assert creator.stdout is not None
            line = await asyncio.wait_for(creator.stdout.readline(), LONG_BOUND)
            assert line.strip() == b"READY", line
        outputs = await asyncio.gather(
            *(asyncio.wait_for(c.communicate(b"go\n"), LONG_BOUND) for c in creators)
        )
    finally:
        for creator in creators:
            if creator.returncode is None:
                creator.kill()
                await creator.wait()
    assert [c.returncode for c in creators] == [0] * CREATORS

    given: dict[str, set[int | None]] = defaultdict(set)
    for out, _ in outputs:
        for key, ids in json.loads(out.decode().strip().splitlines()[-1]).items():
            assert len(ids) == 2, (key, ids)  # one create_task, one item of create_tasks
            given[key] |= set(ids)
    tasks = await cluster.client.get_tasks(types=["keyed"], limit=1000)
    by_key: dict[str | None, list[int]] = defaultdict(list)
    for task in tasks:
        by_key[task.unique_key].append(task.id)
    assert set(by_key) == set(KEYS)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    for key in KEYS:
        assert given[key] == set(by_key[key]), (key, given[key], by_key[key])

    ids = [ids[0] for ids in by_key.values()]
    await wait_for(cluster.all_in(ids, State.RUNNING), timeout=LONG_BOUND, what="every task")

    async def all_recorded() -> bool:
        return len(await cluster.ledger.all_events()) >= len(KEYS)

    await wait_for(all_recorded, timeout=LONG_BOUND, what="every task's ledger entry")
    ran: dict[str, set[int]] = defaultdict(set)
    for task_id, kind in await cluster.ledger.all_events():
        ran[kind.removeprefix("unique ")].add(task_id)
    assert {key: ran[key] for key in KEYS} == {key: set(by_key[key]) for key in KEYS}
