"""Driver conformance: retention and bulk deletes (docs/design.md §4.5) — ``prune`` over every
starting situation, its ages, batches and one pruner at a time; ``delete_matching`` (the delete
operation over every cell, filters, age, batches); and a group row back to the default
settings is removed.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Group, Operation, State
from aioasync_tasks._backends._driver import (
    DeleteParams,
    Driver,
    Limits,
    OperateParams,
    PruneParams,
    SetGroupParams,
    TaskFilter,
)
from aioasync_tasks._states import apply_operation
from driver._driverkit import (
    FAR,
    Peek,
    Problems,
    Start,
    Want,
    describe,
    every_start,
    expected_view,
    insert,
    make_many,
    register,
    run_at_problem,
    snapshot,
    view,
)

# -- prune ----------------------------------------------------------------------------------


async def test_prune_removes_only_finished_and_failed_tasks_past_their_age(
    driver: Driver, peek: Peek
) -> None:
    node = await register(driver)
    made = await make_many(driver, node, every_start())
    before = await snapshot(driver)
    ended = [m.id for m in made if m.start.state in (State.FINISHED, State.FAILED)]
    assert ended
    await peek.age(ended, "done_at", 2)

    # Younger than their ages, or kept: nothing goes.
    for params in (
        PruneParams(finished_after=3 * 3600, failed_after=3 * 3600),
        PruneParams(finished_after=None, failed_after=None),
    ):
        result = await driver.prune(params)
        assert (result.removed, result.more, result.busy) == (0, False, False)
    assert set(await snapshot(driver)) == set(before)

    # Each state by its own age: the FINISHED ones first, then the FAILED ones.
    finished = {m.id for m in made if m.start.state is State.FINISHED}
    result = await driver.prune(PruneParams(finished_after=3600, failed_after=None))
    assert (result.removed, result.more) == (len(finished), False)
    assert set(await snapshot(driver)) == set(before) - finished
    result = await driver.prune(PruneParams(finished_after=None, failed_after=3600))
    assert result.removed == len(ended) - len(finished)

    # Removed, as "delete, force" says, with or without a cleanup handler; nothing else changed.
    after = await snapshot(driver)
    problems = Problems()
    for m in made:
        cell = describe(m.want)
        if m.id in ended:
            problems.check(m.id not in after, cell, "kept")
        else:
            problems.check(after.get(m.id) == before[m.id], cell, "changed")
    problems.assert_none()


async def test_prune_works_in_batches(driver: Driver, peek: Peek) -> None:
    node = await register(driver)
    made = await make_many(driver, node, [Want(Start.FINISHED) for _ in range(5)])
    await peek.age([m.id for m in made], "done_at", 1)
    params = PruneParams(finished_after=60, failed_after=60, limit=2)
    removed = []
    while True:
        result = await driver.prune(params)
        removed.append(result.removed)
        if not result.more:
            break
    assert removed == [2, 2, 1]
    assert await driver.count_tasks(TaskFilter()) == 0


async def test_concurrent_prunes_remove_each_task_once(driver: Driver, peek: Peek) -> None:
    node = await register(driver)
    made = await make_many(driver, node, [Want(Start.FINISHED) for _ in range(6)])
    await peek.age([m.id for m in made], "done_at", 1)
    results = await asyncio.gather(
        *(driver.prune(PruneParams(finished_after=60, failed_after=None)) for _ in range(4))
    )
    assert sum(r.removed for r in results) == 6
    assert all(r.removed == 0 for r in results if r.busy)
    assert await driver.count_tasks(TaskFilter()) == 0


@pytest.mark.postgres_only
async def test_prune_skips_its_round_while_another_node_prunes(
    driver: Driver, peek: Peek, engine: AsyncEngine
) -> None:
    """PostgreSQL: one pruner at a time, by an advisory lock tried, not waited for."""
    node = await register(driver)
    made = await make_many(driver, node, [Want(Start.FINISHED)])
    await peek.age([m.id for m in made], "done_at", 1)
    channel = getattr(driver, "channel", None)
    assert isinstance(channel, str)
    async with engine.connect() as other:
        transaction = await other.begin()
        await other.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{channel}:prune"}
        )
        busy = await driver.prune(PruneParams(finished_after=60, failed_after=60))
        assert (busy.removed, busy.busy) == (0, True)
        await transaction.rollback()
    done = await driver.prune(PruneParams(finished_after=60, failed_after=60))
    assert (done.removed, done.busy) == (1, False)


# -- delete_matching --------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["delete", "delete-force"])
async def test_delete_matching_follows_the_state_table(driver: Driver, force: bool) -> None:
    node = await register(driver)
    made = await make_many(driver, node, every_start())
    before = await snapshot(driver)
    types = tuple(m.type for m in made)
    deleted, stopped, after_id = 0, [], 0
    batches = 0
    while True:
        params = DeleteParams(TaskFilter(types=types), force=force, after=after_id, limit=4)
        result = await driver.delete_matching(params)
        deleted += result.deleted
        stopped += result.stopped
        batches += 1
        if result.after is None:
            break
        after_id = result.after
    assert batches == len(made) // 4 + 1
    after = await snapshot(driver)

    problems = Problems()
    changed = 0
    for m in made:
        cell = f"delete{' (force)' if force else ''} of {describe(m.want)} in bulk"
        expected = apply_operation(
            m.start.state,
            m.start.requested,
            Operation.DELETE,
            has_cleanup=m.want.has_cleanup,
            force=force,
        )
        changed += expected.changed
        was_stopped = (m.id, node) in stopped
        problems.check(was_stopped == expected.stop, cell, f"stopped: {was_stopped}")
        if not expected.changed:
            problems.check(after.get(m.id) == before[m.id], cell, "a no-op changed the row")
            continue
        wanted = expected_view(before[m.id], expected, owner=before[m.id].node)
        got = view(after.get(m.id))
        problems.check(got == wanted, cell, f"row {got}, not {wanted}")
        wrong_run_at = run_at_problem(before[m.id], after.get(m.id), expected)
        problems.check(wrong_run_at is None, cell, str(wrong_run_at))
    problems.assert_none()
    assert deleted == changed


async def test_delete_matching_applies_the_filters_and_the_age(driver: Driver, peek: Peek) -> None:
    ids = {
        name: await insert(driver, type=type, user=user, group=group)
        for name, type, user, group in [
            ("a", "t1", "alice", "g1"),
            ("b", "t1", "bob", "g1"),
            ("c", "t2", "alice", "g2"),
            ("d", "t2", "bob", "g2"),
            ("e", "t1", "alice", "g2"),
        ]
    }
    await driver.operate(OperateParams(ids["e"], Operation.PAUSE))
    await peek.age([ids["a"], ids["c"]], "updated_at", 48)

    async def delete(f: TaskFilter, older_than: float | None = None) -> set[int]:
        present = set(await snapshot(driver))
        result = await driver.delete_matching(DeleteParams(f, older_than=older_than))
        gone = present - set(await snapshot(driver))
        assert result.deleted == len(gone)
        assert result.after is None
        return gone

    assert await delete(TaskFilter(user="nobody")) == set()
    assert await delete(TaskFilter(), older_than=FAR * 100) == set()
    assert await delete(TaskFilter(types=("t2",)), older_than=24 * 3600) == {ids["c"]}
    assert await delete(TaskFilter(states=(State.PAUSED,))) == {ids["e"]}
    assert await delete(TaskFilter(group="g1", user="bob")) == {ids["b"]}
    assert await delete(TaskFilter(), older_than=3600) == {ids["a"]}
    assert await delete(TaskFilter()) == {ids["d"]}


# -- groups -----------------------------------------------------------------------------------


async def test_a_group_back_to_the_default_settings_has_no_row(driver: Driver) -> None:
    await driver.set_group(SetGroupParams("empty", paused=True))
    await driver.set_group(SetGroupParams("limited", limits=Limits(2, None)))
    await driver.set_group(SetGroupParams("busy", paused=True))
    await insert(driver, group="busy")
    assert [g.name for g in await driver.get_groups()] == ["busy", "empty", "limited"]

    assert await driver.set_group(SetGroupParams("empty", paused=False)) == Group(
        "empty", False, None, None
    )
    assert await driver.set_group(SetGroupParams("limited", limits=Limits(None, None))) == Group(
        "limited", False, None, None
    )
    assert await driver.set_group(SetGroupParams("busy", paused=False)) == Group(
        "busy", False, None, None
    )
    # A group with neither settings nor tasks is gone; one with tasks stays, with defaults.
    assert await driver.get_groups() == [Group("busy", False, None, None)]
    assert await driver.set_group(SetGroupParams("fresh")) == Group("fresh", False, None, None)
    assert await driver.get_groups() == [Group("busy", False, None, None)]
