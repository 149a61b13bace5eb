"""Driver conformance: groups (``set_group``, ``get_groups``, ``pause_group``) and
notifications (``listen``, where the driver ``supports_notify``).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import pytest
from _helpers import wait_for

from aioasync_tasks import Group, Operation, State, StopRequest
from aioasync_tasks._backends._driver import (
    ClaimParams,
    Driver,
    Limits,
    OperateParams,
    PauseGroupParams,
    SetGroupParams,
)
from aioasync_tasks._states import apply_operation
from driver._driverkit import FIFO, Start, Want, insert, make_many, register, snapshot, view


async def test_set_group_creates_a_group_and_changes_only_the_fields_given(
    driver: Driver,
) -> None:
    assert await driver.get_groups() == []
    assert await driver.set_group(SetGroupParams("g", limits=Limits(3, None))) == Group(
        "g", False, 3, None
    )
    assert await driver.get_groups() == [Group("g", False, 3, None)]
    assert await driver.set_group(SetGroupParams("g", paused=True)) == Group("g", True, 3, None)
    changed = await driver.set_group(SetGroupParams("g", limits=Limits(None, 2)))
    assert changed == Group("g", True, None, 2)
    assert await driver.get_groups() == [changed]

    # pause_group creates the group's row too.
    assert await driver.pause_group(PauseGroupParams("new", stop_running=True)) == []
    assert await driver.get_groups() == [changed, Group("new", True, None, None)]


async def test_get_groups_lists_groups_with_tasks_or_settings_by_name(driver: Driver) -> None:
    await insert(driver, group="b")
    await insert(driver, group="a")
    await insert(driver, group="a")
    await driver.set_group(SetGroupParams("c", paused=True))
    await driver.set_group(SetGroupParams("b", limits=Limits(None, 1)))
    assert await driver.get_groups() == [
        Group("a", False, None, None),
        Group("b", False, None, 1),
        Group("c", True, None, None),
    ]


async def test_pause_group_without_stop_running_leaves_running_tasks(driver: Driver) -> None:
    node = await register(driver)
    made = await make_many(driver, node, [Want(Start.RUNNING, group="g")])
    pending = await insert(driver, type="a", group="g")
    before = await snapshot(driver)
    assert await driver.pause_group(PauseGroupParams("g", stop_running=False)) == []
    assert await driver.get_groups() == [Group("g", True, None, None)]
    assert await snapshot(driver) == before
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed == []
    assert (await driver.get_task(made[0].id)).state is State.RUNNING
    assert (await driver.get_task(pending)).state is State.PENDING


async def test_pause_group_with_stop_running_pauses_its_running_tasks(driver: Driver) -> None:
    node = await register(driver)
    other = await register(driver, "other")
    in_group = await make_many(
        driver,
        node,
        [
            Want(start, group="g", has_cleanup=True)
            for start in Start
            if start is not Start.CANCELING_PAUSE
        ],
    )
    on_other_node = await make_many(driver, other, [Want(Start.RUNNING, group="g")])
    elsewhere = await make_many(driver, node, [Want(Start.RUNNING, group="elsewhere")])
    before = await snapshot(driver)

    stopped = await driver.pause_group(PauseGroupParams("g", stop_running=True))

    running = [m for m in in_group + on_other_node if m.start is Start.RUNNING]
    assert sorted(stopped) == sorted((m.id, before[m.id].node) for m in running)
    assert Group("g", True, None, None) in await driver.get_groups()
    after = await snapshot(driver)
    for m in in_group + on_other_node:
        if m.start is Start.RUNNING:
            outcome = apply_operation(State.RUNNING, None, Operation.PAUSE, has_cleanup=True)
            assert (after[m.id].state, after[m.id].requested) == (
                outcome.state,
                outcome.requested,
            )
            assert view(after[m.id]) == {
                **(view(before[m.id]) or {}),
                "state": outcome.state,
                "requested": outcome.requested,
            }
        else:
            assert after[m.id] == before[m.id], m.start
    assert after[elsewhere[0].id] == before[elsewhere[0].id]
    owned = await driver.heartbeat(other)
    assert owned is not None
    assert [(o.state, o.requested) for o in owned] == [(State.CANCELING, StopRequest.PAUSE)]


async def test_listen_delivers_wake_ups_and_stop_requests(driver: Driver) -> None:
    if not driver.supports_notify:
        pytest.skip("this driver has no notifications (supports_notify is False): nodes poll")
    node = await register(driver)
    [running] = await make_many(driver, node, [Want(Start.RUNNING)])
    messages: list[str] = []
    async with driver.listen(messages.append) as lost:
        await insert(driver)
        await wait_for(lambda: "wake" in messages, timeout=10, what="a wake-up")
        await driver.operate(OperateParams(running.id, Operation.PAUSE))
        await wait_for(lambda: f"stop:{node}" in messages, timeout=10, what="a stop request")
        assert not lost.is_set()
