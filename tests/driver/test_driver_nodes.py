"""Driver conformance: nodes (``register_node``, ``get_nodes``, ``heartbeat``, ``owned``,
``deregister``, ``rescue``): liveness by each node's own ``node_timeout`` on the database's
clock, and the tasks of a node that leaves (STOPPED: a graceful stop) or is lost (NODE_LOST)
released as the state table says.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from aioasync_tasks import Operation, State, StopRequest
from aioasync_tasks._backends._driver import (
    DeregisterParams,
    Driver,
    OperateParams,
    Owned,
    RegisterParams,
    RescueParams,
)
from aioasync_tasks._schema import NODES
from aioasync_tasks._states import Event, apply_event
from driver._driverkit import (
    CLEANUP_ATTEMPTS,
    FAR,
    Peek,
    Problems,
    Start,
    Want,
    describe,
    expected_view,
    given_back_problems,
    make,
    make_many,
    owned_cells,
    register,
    run_at_problem,
    snapshot,
    view,
)

SHORT = 0.05
"""The ``node_timeout`` of a node a test lets go stale."""
STALE = 0.15
"""How long the test waits for such a node's heartbeat to be older than ``SHORT``."""


async def test_register_node_is_listed_by_get_nodes_until_it_is_gone(driver: Driver) -> None:
    first = await driver.register_node(
        RegisterParams("first", 3, ["a", "b"], heartbeat_interval=2.5, node_timeout=20.0)
    )
    second = await driver.register_node(
        RegisterParams("second", 0, [], heartbeat_interval=1.0, node_timeout=9.0)
    )
    assert second != first
    nodes = await driver.get_nodes()
    assert [n.id for n in nodes] == sorted([first, second])
    one = next(n for n in nodes if n.id == first)
    assert (one.name, one.concurrency, one.types) == ("first", 3, ("a", "b"))
    assert (one.heartbeat_interval, one.node_timeout) == (2.5, 20.0)
    assert one.started_at == one.heartbeat_at
    two = next(n for n in nodes if n.id == second)
    assert (two.name, two.concurrency, two.types, two.node_timeout) == ("second", 0, (), 9.0)

    # Gone (here: deregistered): its heartbeat says so, it owns nothing.
    await driver.deregister(DeregisterParams(second, cleanup_attempts=CLEANUP_ATTEMPTS))
    assert [n.id for n in await driver.get_nodes()] == [first]
    assert await driver.heartbeat(second) is None
    assert await driver.owned(second) == []


async def test_heartbeat_renews_the_node_and_returns_what_it_owns(driver: Driver) -> None:
    node = await register(driver)
    other = await register(driver, "other")
    [registered] = [n for n in await driver.get_nodes() if n.id == node]
    assert await driver.heartbeat(node) == []
    made = await make_many(
        driver,
        node,
        [
            Want(Start.RUNNING),
            Want(Start.CANCELING_PAUSE),
            Want(Start.CLEANING, has_cleanup=True),
            Want(Start.PENDING),
            Want(Start.FINISHED),
        ],
    )
    await make(driver, other, Start.RUNNING)
    owned = await driver.heartbeat(node)
    assert owned is not None
    wanted = [
        Owned(m.id, m.start.state, m.start.requested, m.token) for m in made if m.token is not None
    ]
    assert len(wanted) == 3
    assert sorted(owned, key=lambda o: o.id) == wanted
    assert sorted(await driver.owned(node), key=lambda o: o.id) == wanted
    [renewed] = [n for n in await driver.get_nodes() if n.id == node]
    assert renewed.heartbeat_at >= registered.heartbeat_at
    assert renewed.started_at == registered.started_at

    # A stop request shows at the next heartbeat.
    await driver.operate(OperateParams(made[0].id, Operation.DELETE))
    owned = await driver.heartbeat(node)
    assert owned is not None
    [deleted] = [o for o in owned if o.id == made[0].id]
    assert (deleted.state, deleted.requested) == (State.CANCELING, StopRequest.DELETE)


async def _deregister(driver: Driver, peek: Peek, wants: list[Want]) -> Problems:
    node = await register(driver)
    stays = await register(driver, "stays")
    made = await make_many(driver, node, wants)
    before = await snapshot(driver)
    await driver.deregister(DeregisterParams(node, cleanup_attempts=1))
    assert [n.id for n in await driver.get_nodes()] == [stays]
    assert await driver.heartbeat(node) is None
    after = await snapshot(driver)
    return given_back_problems("deregister", made, before, after, await peek.handoffs())


async def test_deregister_hands_back_owned_tasks_with_the_attempt_refunded(
    driver: Driver, peek: Peek
) -> None:
    # One attempt only: a lost node's task would fail, a stopped one does not use it up.
    wants = owned_cells(max_attempts=1)
    (await _deregister(driver, peek, wants)).assert_none()


@pytest.mark.parametrize("can_retry", [False, True], ids=["no-attempt-left", "attempt-left"])
async def test_rescue_releases_the_tasks_of_a_lost_node(
    driver: Driver, peek: Peek, can_retry: bool
) -> None:
    rescuer = await register(driver, "rescuer")
    lost = await register(driver, "lost", node_timeout=SHORT)
    # Each task has been claimed once (or its cleanup has): `limit` attempts leave one or none.
    limit = 2 if can_retry else 1
    made = await make_many(driver, lost, owned_cells(max_attempts=limit))
    before = await snapshot(driver)
    await asyncio.sleep(STALE)

    released = await driver.rescue(RescueParams(rescuer, cleanup_attempts=limit))

    assert released == len(made)
    assert [n.id for n in await driver.get_nodes()] == [rescuer]
    assert await driver.heartbeat(lost) is None
    after = await snapshot(driver)
    handoffs = await peek.handoffs()
    problems = Problems()
    for m in made:
        cell = f"node lost on {describe(m.want)}, {'an' if can_retry else 'no'} attempt left"
        old, new = before[m.id], after.get(m.id)
        expected = apply_event(
            m.start.state,
            m.start.requested,
            Event.NODE_LOST,
            has_cleanup=m.want.has_cleanup,
            can_retry=can_retry,
        )
        assert expected is not None
        wanted = expected_view(old, expected, owner=None)
        problems.check(view(new) == wanted, cell, f"row {view(new)}, not {wanted}")
        wrong_run_at = run_at_problem(old, new, expected)
        problems.check(wrong_run_at is None, cell, str(wrong_run_at))
        if new is None:
            continue
        if new.state is State.FAILED:
            problems.check("node lost" in (new.error or ""), cell, f"error {new.error!r}")
            problems.check(new.done_at is not None, cell, "no done_at")
        problems.check(not handoffs[m.id], cell, "a lost task is no hand-off")
    problems.assert_none()


async def test_rescue_judges_each_node_by_its_own_timeout_and_never_itself(
    driver: Driver,
) -> None:
    me = await register(driver, "me", node_timeout=SHORT)
    healthy = await register(driver, "healthy", node_timeout=FAR)
    dead = await register(driver, "dead", node_timeout=SHORT)
    mine = await make(driver, me, Start.RUNNING)
    theirs = await make(driver, healthy, Start.RUNNING)
    lost = await make(driver, dead, Start.RUNNING, max_attempts=2)
    await asyncio.sleep(STALE)

    assert await driver.rescue(RescueParams(me, cleanup_attempts=CLEANUP_ATTEMPTS)) == 1
    assert [n.id for n in await driver.get_nodes()] == [me, healthy]
    assert await driver.heartbeat(dead) is None
    assert ((await driver.get_task(lost.id)).state, (await driver.get_task(lost.id)).node) == (
        State.PENDING,
        None,
    )
    assert (await driver.get_task(mine.id)).node == me
    assert (await driver.get_task(theirs.id)).node == healthy
    assert await driver.rescue(RescueParams(me, cleanup_attempts=CLEANUP_ATTEMPTS)) == 0

    # Stale as well: any other node may declare it dead.
    assert await driver.rescue(RescueParams(healthy, cleanup_attempts=CLEANUP_ATTEMPTS)) == 1
    assert [n.id for n in await driver.get_nodes()] == [healthy]
    assert (await driver.get_task(mine.id)).state is State.FAILED


async def test_rescue_releases_tasks_whose_node_row_is_gone(driver: Driver, peek: Peek) -> None:
    rescuer = await register(driver, "rescuer")
    gone = await register(driver, "gone")
    made = await make(driver, gone, Start.RUNNING, max_attempts=2)
    # No driver operation removes a node row and leaves its tasks owned: remove it behind
    # the driver's back.
    await peek.execute(f"DELETE FROM {peek.table(NODES)} WHERE id = :id", {"id": gone})
    assert await driver.rescue(RescueParams(rescuer, cleanup_attempts=CLEANUP_ATTEMPTS)) == 1
    task = await driver.get_task(made.id)
    assert (task.state, task.node, task.attempts) == (State.PENDING, None, 1)
