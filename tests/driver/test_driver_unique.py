"""Driver conformance: unique keys (docs/design.md §4.4) — ``insert_many`` with a
``unique_key`` and each ``on_conflict``, in every starting situation of the holder, within one
batch, in the caller's transaction and from concurrent transactions; ``operate`` (run) on a
FAILED task whose key another task took.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest
from _db import DbTarget
from _helpers import raw_engine

from aioasync_tasks import DuplicateTask, Operation, State
from aioasync_tasks._backends._driver import (
    Checkpoint,
    CheckpointParams,
    ClaimParams,
    CompleteParams,
    Completion,
    Driver,
    InsertParams,
    OperateParams,
    TaskFilter,
)
from aioasync_tasks._states import LIVE_STATES, REPLACEABLE_STATES, Event
from driver._driverkit import (
    FIFO,
    Problems,
    Start,
    Want,
    describe,
    every_start,
    insert,
    make,
    make_many,
    new_task,
    register,
    snapshot,
    unique_type,
)


async def test_a_live_task_holds_its_key_in_every_live_state_and_no_other(
    driver: Driver,
) -> None:
    """For each starting situation of the holder: a new task with its type and key is refused
    (``error``) exactly while the holder is live; otherwise it is inserted."""
    node = await register(driver)
    wants = [
        Want(w.start, has_cleanup=w.has_cleanup, unique_key=f"k{i}")
        for i, w in enumerate(every_start())
    ]
    made = await make_many(driver, node, wants)
    before = await snapshot(driver)
    problems = Problems()
    for m in made:
        cell = describe(m.want)
        key = m.want.unique_key
        assert key is not None
        try:
            [task_id] = await driver.insert_many(InsertParams([new_task(m.type, unique_key=key)]))
        except DuplicateTask as exc:
            live = True
            held = (exc.type, exc.unique_key, exc.task_id, exc.state)
            wanted = (m.type, key, m.id, m.start.state)
            problems.check(held == wanted, cell, f"DuplicateTask {held}, not {wanted}")
        else:
            live = False
            problems.check(task_id != m.id, cell, "the holder's id for a new task")
        problems.check(
            live == (m.start.state in LIVE_STATES),
            cell,
            "refused" if live else "inserted beside the holder",
        )
    problems.assert_none()
    after = await snapshot(driver)
    assert {i: after[i] for i in before} == before  # no holder changed


async def test_skip_returns_the_holder_and_inserts_nothing(driver: Driver) -> None:
    node = await register(driver)
    made = await make_many(
        driver,
        node,
        [Want(start, unique_key="k") for start in (Start.PENDING, Start.RUNNING, Start.PAUSED)],
    )
    before = await snapshot(driver)
    for m in made:
        skipped = new_task(m.type, unique_key="k", on_conflict="skip", context="ignored")
        assert await driver.insert_many(InsertParams([skipped])) == [m.id]
    assert await snapshot(driver) == before


async def test_the_key_is_unique_per_type(driver: Driver) -> None:
    first = await insert(driver, type="a", unique_key="k")
    second = await insert(driver, type="b", unique_key="k")
    assert first != second
    with pytest.raises(DuplicateTask):
        await insert(driver, type="a", unique_key="k")
    # Tasks without a key never conflict.
    assert len(set(await driver.insert_many(InsertParams([new_task("a"), new_task("a")])))) == 2


async def test_replace_rewrites_a_holder_no_node_runs(driver: Driver) -> None:
    """``replace``: the holder keeps its id, state and creation time and takes the new task's
    context and options, with a fresh series of attempts and no error or progress."""
    node = await register(driver)
    wants = [
        Want(w.start, has_cleanup=w.has_cleanup, unique_key="k")
        for w in every_start()
        if w.start.state in LIVE_STATES
    ]
    made = await make_many(driver, node, wants)
    before = await snapshot(driver)
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    problems = Problems()
    for m in made:
        cell = describe(m.want)
        replacement = new_task(
            m.type,
            unique_key="k",
            on_conflict="replace",
            context="new",
            user="bob",
            group="other",
            priority=5,
            max_attempts=4,
            run_at=later,
            state=State.INIT,  # the holder's state is kept all the same
        )
        try:
            ids = await driver.insert_many(InsertParams([replacement]))
        except DuplicateTask as exc:
            problems.check(m.start.state not in REPLACEABLE_STATES, cell, f"not replaced: {exc}")
            problems.check(exc.task_id == m.id, cell, f"DuplicateTask names {exc.task_id}")
            continue
        problems.check(m.start.state in REPLACEABLE_STATES, cell, "a running task replaced")
        problems.check(ids == [m.id], cell, f"ids {ids}")
        old, new = before[m.id], await driver.get_task(m.id)
        got = (
            new.state,
            new.context,
            new.user,
            new.group,
            new.priority,
            new.max_attempts,
            new.attempts,
            new.error,
            new.progress,
            new.run_at,
            new.created_at,
        )
        wanted = (old.state, "new", "bob", "other", 5, 4, 0, None, None, later, old.created_at)
        problems.check(got == wanted, cell, f"{got}, not {wanted}")
    problems.assert_none()
    assert await driver.count_tasks(TaskFilter()) == len(made)


async def test_replace_clears_the_attempts_error_and_progress_of_a_retried_task(
    driver: Driver,
) -> None:
    node = await register(driver)
    made = await make(driver, node, Start.RUNNING, max_attempts=3, unique_key="k")
    assert made.token is not None
    checkpoint = {made.id: Checkpoint(made.token, "step 1", progress=0.5, message="half")}
    assert await driver.checkpoint(CheckpointParams(node, checkpoint)) == {made.id}
    failed = Completion(made.id, made.token, Event.FAILED, error="boom", delay=3600.0)
    assert await driver.complete(CompleteParams(node, [failed], cleanup_attempts=1)) == {made.id}
    waiting = await driver.get_task(made.id)
    assert (waiting.state, waiting.attempts, waiting.error) == (State.PENDING, 1, "boom")
    assert waiting.run_at > waiting.updated_at  # its back-off

    fresh = new_task(made.type, unique_key="k", on_conflict="replace", context="new")
    assert await driver.insert_many(InsertParams([fresh])) == [made.id]
    task = await driver.get_task(made.id)
    assert (task.state, task.context, task.attempts, task.error) == (State.PENDING, "new", 0, None)
    assert (task.progress, task.message) == (None, None)
    assert task.run_at <= task.updated_at  # due now: run_at None is now
    [claimed] = (await driver.claim(ClaimParams(node, [made.type], 1, FIFO))).claimed
    assert (claimed.id, claimed.context) == (made.id, "new")


async def test_one_batch_applies_each_rows_on_conflict_in_order(driver: Driver) -> None:
    type = unique_type()
    ids = await driver.insert_many(
        InsertParams(
            [
                new_task(type, context="plain 1"),
                new_task(type, unique_key="k", context="first"),
                new_task(type, context="plain 2"),
                new_task(type, unique_key="k", on_conflict="skip", context="skipped"),
                new_task(type, unique_key="k", on_conflict="replace", context="replaced"),
                new_task(type, unique_key="other", context="other"),
            ]
        )
    )
    assert ids[1] == ids[3] == ids[4]
    assert len(set(ids)) == 4
    created = [ids[0], ids[1], ids[2], ids[5]]
    assert created == sorted(created)  # inserted in the order given
    assert (await driver.get_task(ids[1])).context == "replaced"
    assert await driver.count_tasks(TaskFilter()) == 4

    # "error" in a batch: nothing of the batch is inserted.
    with pytest.raises(DuplicateTask) as caught:
        await driver.insert_many(
            InsertParams(
                [new_task(type, context="lost"), new_task(type, unique_key="k", context="dup")]
            )
        )
    assert caught.value.task_id == ids[1]
    assert await driver.count_tasks(TaskFilter()) == 4


async def test_a_unique_task_in_a_callers_transaction_holds_its_key_once_committed(
    driver: Driver, db: DbTarget
) -> None:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await driver.insert_many(InsertParams([new_task("a", unique_key="k")], connection=conn))
            await transaction.rollback()
        [kept] = await driver.insert_many(InsertParams([new_task("a", unique_key="k")]))
        async with engine.begin() as conn:
            skipped = await driver.insert_many(
                InsertParams([new_task("a", unique_key="k", on_conflict="skip")], connection=conn)
            )
        assert skipped == [kept]
    finally:
        await engine.dispose()
    assert await driver.count_tasks(TaskFilter()) == 1


async def test_concurrent_creators_of_the_same_keys_get_one_task_per_key(
    driver: Driver,
) -> None:
    """Transactions that insert the same keys in different orders all commit (no deadlock)
    and agree on one task per key."""
    type = unique_type()
    keys = [f"k{i}" for i in range(8)]
    rng = random.Random(7)

    async def create() -> list[int]:
        order = rng.sample(keys, len(keys))
        ids = await driver.insert_many(
            InsertParams(
                [new_task(type, unique_key=k, on_conflict="skip", context=k) for k in order]
            )
        )
        return [ids[order.index(k)] for k in keys]

    results = await asyncio.gather(*(create() for _ in range(6)))
    assert all(r == results[0] for r in results)
    tasks = await driver.get_tasks(TaskFilter(limit=100))
    assert sorted((t.context, t.id) for t in tasks) == sorted(zip(keys, results[0], strict=True))


async def test_run_of_a_failed_task_whose_key_was_taken_is_refused(driver: Driver) -> None:
    node = await register(driver)
    made = await make(driver, node, Start.FAILED, unique_key="k")
    before = await driver.get_task(made.id)
    [taker] = await driver.insert_many(InsertParams([new_task(made.type, unique_key="k")]))
    with pytest.raises(DuplicateTask) as caught:
        await driver.operate(OperateParams(made.id, Operation.RUN))
    assert (caught.value.task_id, caught.value.state) == (taker, State.PENDING)
    assert await driver.get_task(made.id) == before

    # Once the key is free again, the run goes through.
    await driver.operate(OperateParams(taker, Operation.DELETE))
    await driver.operate(OperateParams(made.id, Operation.RUN))
    assert (await driver.get_task(made.id)).state is State.PENDING
