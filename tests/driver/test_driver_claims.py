"""Driver conformance: claims (``claim``, ``claim_cleanups``), the CLAIM and CLEANUP_CLAIM
events of the state table: which tasks a claim may take, in which order, within which limits,
and what it writes (owner, attempt, a new claim token).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aioasync_tasks import FairShare, Operation, State
from aioasync_tasks._backends._driver import (
    ClaimCursor,
    Claimed,
    ClaimParams,
    CleanupClaimParams,
    DeregisterParams,
    Driver,
    InsertParams,
    Limits,
    OperateParams,
    SetGroupParams,
    TaskFilter,
)
from aioasync_tasks._states import Event, apply_event
from driver._driverkit import (
    CLEANUP_ATTEMPTS,
    FIFO,
    Peek,
    Start,
    claim_one,
    complete_one,
    describe,
    every_start,
    insert,
    make,
    make_many,
    new_task,
    register,
    snapshot,
)


def _ids(claimed: list[Claimed]) -> list[int]:
    return [c.id for c in claimed]


async def test_claim_takes_only_due_pending_tasks_of_its_types(driver: Driver, peek: Peek) -> None:
    node = await register(driver)
    made = await make_many(driver, node, every_start())
    later = datetime.now(UTC) + timedelta(hours=1)
    delayed = await insert(driver, type=made[0].type, run_at=later)
    other_type = await insert(driver, type="not-claimed")
    before = await snapshot(driver)
    tokens = await peek.tokens()

    result = await driver.claim(ClaimParams(node, [m.type for m in made], 100, FIFO))

    after = await snapshot(driver)
    claimable = {
        m.id: m
        for m in made
        if apply_event(m.start.state, m.start.requested, Event.CLAIM, has_cleanup=True)
    }
    assert {m.start for m in claimable.values()} == {Start.PENDING}
    assert sorted(_ids(result.claimed)) == sorted(claimable)
    new_tokens = await peek.tokens()
    for c in result.claimed:
        task = after[c.id]
        assert (task.state, task.node, task.attempts) == (State.RUNNING, node, 1)
        assert task.started_at is not None
        assert c.token == new_tokens[c.id] == tokens[c.id] + 1
        assert (c.type, c.user, c.group, c.context, c.attempts, c.max_attempts) == (
            task.type,
            task.user,
            task.group,
            task.context,
            task.attempts,
            task.max_attempts,
        )
    for m in made:
        if m.id not in claimable:
            assert after[m.id] == before[m.id], describe(m.want)
    assert after[delayed].state is after[other_type].state is State.PENDING


async def test_claim_takes_at_most_limit_and_says_when_the_next_task_is_due(
    driver: Driver,
) -> None:
    node = await register(driver)
    now = datetime.now(UTC)
    await driver.insert_many(InsertParams([new_task("a") for _ in range(3)]))
    await insert(driver, type="a", run_at=now + timedelta(seconds=600))
    await insert(driver, type="b", run_at=now + timedelta(seconds=300))

    full = await driver.claim(ClaimParams(node, ["a"], 2, FIFO))
    assert (len(full.claimed), full.next_due) == (2, None)
    rest = await driver.claim(ClaimParams(node, ["a"], 2, FIFO))
    assert len(rest.claimed) == 1
    assert rest.next_due is not None
    assert 500 < rest.next_due <= 600
    empty = await driver.claim(ClaimParams(node, ["a", "b"], 2, FIFO))
    assert empty.claimed == []
    assert empty.next_due is not None
    assert 200 < empty.next_due <= 300
    nothing = await driver.claim(ClaimParams(node, ["c"], 2, FIFO))
    assert (nothing.claimed, nothing.next_due) == ([], None)
    assert (await driver.claim(ClaimParams(node, [], 2, FIFO))).claimed == []
    assert (await driver.claim(ClaimParams(node, ["a", "b"], 0, FIFO))).claimed == []


async def test_claim_skips_paused_groups_until_resumed(driver: Driver) -> None:
    node = await register(driver)
    paused = await insert(driver, type="a", group="paused")
    running = await insert(driver, type="a", group="open")
    await driver.set_group(SetGroupParams("paused", paused=True))
    assert _ids((await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed) == [running]
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed == []
    await driver.set_group(SetGroupParams("paused", paused=False))
    assert _ids((await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed) == [paused]


async def test_claim_respects_max_running_of_a_group(driver: Driver) -> None:
    node = await register(driver)
    # Already running in the group, on any node: a RUNNING and a CANCELING task.
    running = await make(driver, node, Start.RUNNING, group="limited")
    await make(driver, node, Start.CANCELING_PAUSE, group="limited")
    await driver.set_group(SetGroupParams("limited", limits=Limits(3, None)))
    await driver.insert_many(InsertParams([new_task("a", group="limited") for _ in range(3)]))
    free = await insert(driver, type="a", group="free")

    first = await driver.claim(ClaimParams(node, ["a"], 10, FIFO))
    assert len(first.claimed) == 2
    assert free in _ids(first.claimed)
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed == []
    assert running.token is not None
    await complete_one(driver, node, running.id, running.token, Event.FINISHED)
    assert len((await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed) == 1
    assert await driver.count_tasks(TaskFilter(group="limited", states=(State.PENDING,))) == 1


async def test_claim_respects_max_running_per_user(driver: Driver) -> None:
    node = await register(driver)
    await driver.set_group(SetGroupParams("shared", limits=Limits(None, 2)))
    await make(driver, node, Start.RUNNING, group="shared", user="alice")
    await driver.insert_many(
        InsertParams(
            [new_task("a", group="shared", user=user) for user in ("alice", "alice", "bob", "bob")]
            + [new_task("a", group="other", user="alice")]
        )
    )
    claimed = (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed
    assert sorted((c.group, c.user) for c in claimed) == [
        ("other", "alice"),
        ("shared", "alice"),
        ("shared", "bob"),
        ("shared", "bob"),
    ]
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed == []


async def test_claim_takes_only_the_groups_asked_for_and_skips_busy_tasks(
    driver: Driver,
) -> None:
    node = await register(driver)
    ids = await driver.insert_many(
        InsertParams([new_task("a", group=g) for g in ("g1", "g2", "g3", "g3")])
    )
    # groups=: only those; busy: the node still runs an execution of that task.
    result = await driver.claim(
        ClaimParams(node, ["a"], 10, FIFO, groups=["g1", "g3"], busy=[ids[2]])
    )
    assert sorted(_ids(result.claimed)) == [ids[0], ids[3]]
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO, busy=[ids[2]]))).claimed[
        0
    ].id == ids[1]
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO, busy=[ids[2]]))).claimed == []
    assert (await driver.get_task(ids[2])).state is State.PENDING


async def test_claim_takes_hand_offs_first_then_priority_then_age(driver: Driver) -> None:
    node = await register(driver)
    old, urgent, young = await driver.insert_many(
        InsertParams(
            [new_task("a", priority=0), new_task("a", priority=5), new_task("a", priority=0)]
        )
    )
    handed_off = await make(driver, node, Start.RUNNING, max_attempts=1)
    assert handed_off.token is not None
    await complete_one(driver, node, handed_off.id, handed_off.token, Event.STOPPED)
    types = ["a", handed_off.type]
    order = [
        _ids((await driver.claim(ClaimParams(node, types, 1, FIFO))).claimed) for _ in range(4)
    ]
    assert order == [[handed_off.id], [urgent], [old], [young]]


async def test_fair_share_claims_for_the_user_with_fewest_running_tasks(driver: Driver) -> None:
    node = await register(driver)
    await make(driver, node, Start.RUNNING, user="alice")
    alices, bobs = await driver.insert_many(
        InsertParams([new_task("a", user="alice"), new_task("a", user="bob")])
    )
    order = [
        _ids((await driver.claim(ClaimParams(node, ["a"], 1, FairShare()))).claimed)
        for _ in range(2)
    ]
    assert order == [[bobs], [alices]]


def _small_window(driver: Driver, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Make ``driver`` look at ``size`` queues a claim (a driver that claims from a window of
    queues has its size as ``claim_window``: docs/design.md §6.3)."""
    assert hasattr(driver, "claim_window")
    monkeypatch.setattr(driver, "claim_window", size)


async def test_claims_walk_a_window_of_queues_and_come_round_to_every_queue(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim looks at a window of queues after the previous claim's cursor, not at every
    queue: the oldest task, in the last queue, waits for the walk to reach it; each queue is
    reached in turn, and after the group's last user the walk starts again at its first."""
    _small_window(driver, monkeypatch, 3)
    node = await register(driver)
    users = [f"u{i}" for i in range(8)]
    oldest = await insert(driver, type="a", user=users[-1])
    ids = dict(
        zip(
            users[:-1],
            await driver.insert_many(InsertParams([new_task("a", user=u) for u in users[:-1]])),
            strict=True,
        )
    )
    ids[users[-1]] = oldest

    first = await driver.claim(ClaimParams(node, ["a"], 1, FIFO))
    assert _ids(first.claimed) == [ids["u0"]]  # not the oldest: u7 is beyond the window
    assert (first.cursor, first.more) == (ClaimCursor("default", {"default": "u0"}), True)

    taken, cursor, claims = _ids(first.claimed), first.cursor, 1
    while len(taken) < len(users):
        result = await driver.claim(ClaimParams(node, ["a"], 1, FIFO, after=cursor))
        assert len(result.claimed) == 1, f"claim {claims + 1} after {cursor}: {result}"
        taken += _ids(result.claimed)
        cursor, claims = result.cursor, claims + 1
    # Each queue once, in key order but for u7: its task, the oldest, goes first as soon as
    # it is in the window (u5, u6, u7); the walk then goes on after u7, round to u5 and u6.
    order = ["u0", "u1", "u2", "u3", "u4", "u7", "u5", "u6"]
    assert taken == [ids[u] for u in order]
    assert claims == len(users)

    # One task again in u1 and in u5; from after u5 the walk goes round past the last queue.
    again = await driver.insert_many(
        InsertParams([new_task("a", user="u1"), new_task("a", user="u5")])
    )
    after = ClaimCursor("default", {"default": "u5"})
    rest = await driver.claim(ClaimParams(node, ["a"], 5, FIFO, after=after))
    assert sorted(_ids(rest.claimed)) == sorted(again)
    assert (rest.cursor, rest.more) == (after, False)  # the window held every queue


async def test_a_short_claim_says_when_queues_beyond_its_window_remain(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queues with nothing to give (delayed tasks, tasks of other types) take places in the
    window; a claim that comes back short from a full window says so (``more``), with the
    cursor at the end of its window, and the next claim goes on from there. Paused groups take
    no place."""
    _small_window(driver, monkeypatch, 3)
    node = await register(driver)
    later = datetime.now(UTC) + timedelta(hours=1)
    for i in range(3):
        await insert(driver, type="a", user=f"a{i}", run_at=later)
    for i in range(4):
        await insert(driver, type="a", group="paused", user=f"p{i}")
    await driver.set_group(SetGroupParams("paused", paused=True))
    await insert(driver, type="other", user="b0")
    due = await insert(driver, type="a", user="c0")

    first = await driver.claim(ClaimParams(node, ["a"], 1, FIFO))  # a window of 3 queues
    assert first.claimed == []
    assert (first.cursor, first.more) == (ClaimCursor("default", {"default": "a2"}), True)
    second = await driver.claim(ClaimParams(node, ["a"], 1, FIFO, after=first.cursor))
    assert _ids(second.claimed) == [due]
    # b0, c0, then round to the group's first user: a0; the claim took all it could (one).
    assert (second.cursor, second.more) == (ClaimCursor("default", {"default": "c0"}), True)


async def test_a_claim_walks_no_more_queues_of_a_group_than_it_has_room_for(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each queue gives a task at least, so a group with room for two more running tasks
    takes two places in the window, and the walk goes on to the next group; every group keeps
    its own place in the walk of its users."""
    _small_window(driver, monkeypatch, 4)
    node = await register(driver)
    await driver.set_group(SetGroupParams("lim", limits=Limits(2, None)))
    opened = await driver.insert_many(
        InsertParams([new_task("a", group="open", user=f"o{i}") for i in range(4)])
    )
    await driver.insert_many(
        InsertParams([new_task("a", group="lim", user=f"l{i}") for i in range(4)])
    )

    first = await driver.claim(ClaimParams(node, ["a"], 1, FIFO))
    assert _ids(first.claimed) == [opened[0]]  # of l0, l1, o0, o1: the oldest
    assert first.cursor == ClaimCursor("open", {"lim": "l1", "open": "o0"})
    second = await driver.claim(ClaimParams(node, ["a"], 1, FIFO, after=first.cursor))
    assert _ids(second.claimed) == [opened[1]]  # of l2, l3, o1, o2
    assert second.cursor == ClaimCursor("open", {"lim": "l3", "open": "o1"})


async def test_a_node_without_a_row_claims_nothing(driver: Driver) -> None:
    node = await register(driver)
    pending = await insert(driver, type="a")
    deleting = await make(driver, node, Start.DELETING, has_cleanup=True)
    await driver.deregister(DeregisterParams(node, cleanup_attempts=CLEANUP_ATTEMPTS))
    assert (await driver.claim(ClaimParams(node, ["a"], 10, FIFO))).claimed == []
    assert await driver.claim_cleanups(CleanupClaimParams(node, [deleting.type], 10)) == []
    assert (await driver.get_task(pending)).state is State.PENDING
    assert (await driver.get_task(deleting.id)).node is None


async def test_claim_cleanups_takes_only_unowned_deleting_tasks(driver: Driver, peek: Peek) -> None:
    node = await register(driver)
    made = await make_many(driver, node, every_start())
    before = await snapshot(driver)
    tokens = await peek.tokens()

    claimed = await driver.claim_cleanups(CleanupClaimParams(node, [m.type for m in made], 100))

    after = await snapshot(driver)
    claimable = {
        m.id
        for m in made
        if not m.start.owned
        and apply_event(m.start.state, m.start.requested, Event.CLEANUP_CLAIM, has_cleanup=True)
    }
    assert sorted(_ids(claimed)) == sorted(claimable)
    new_tokens = await peek.tokens()
    for c in claimed:
        task = after[c.id]
        assert (task.state, task.node, task.attempts) == (State.DELETING, node, 1)
        assert c.token == new_tokens[c.id] == tokens[c.id] + 1
        assert (c.type, c.attempts, c.max_attempts) == (task.type, 1, task.max_attempts)
    for m in made:
        if m.id not in claimable:
            assert after[m.id] == before[m.id], describe(m.want)


async def test_claim_cleanups_respects_types_limit_busy_and_back_off(driver: Driver) -> None:
    node = await register(driver)
    later = datetime.now(UTC) + timedelta(hours=1)
    ids = await driver.insert_many(
        InsertParams([new_task("x", has_cleanup=True, run_at=later) for _ in range(3)])
    )
    for task_id in ids:
        await driver.operate(
            OperateParams(task_id, Operation.DELETE)
        )  # due at once, whatever its run_at
    assert await driver.claim_cleanups(CleanupClaimParams(node, ["y"], 10)) == []
    assert await driver.claim_cleanups(CleanupClaimParams(node, ["x"], 0)) == []
    assert await driver.claim_cleanups(CleanupClaimParams(node, [], 10)) == []
    [first] = await driver.claim_cleanups(CleanupClaimParams(node, ["x"], 1, busy=[ids[0]]))
    assert first.id == ids[1]
    # A failed cleanup with attempts left waits for its back-off.
    accepted = await complete_one(
        driver, node, first.id, first.token, Event.CLEANUP_FAILED, cleanup_attempts=3, delay=600
    )
    assert accepted == {first.id}
    rest = await driver.claim_cleanups(CleanupClaimParams(node, ["x"], 10))
    assert sorted(_ids(rest)) == [ids[0], ids[2]]
    assert await driver.claim_cleanups(CleanupClaimParams(node, ["x"], 10)) == []


async def test_claim_of_the_same_task_again_raises_its_token(driver: Driver) -> None:
    node = await register(driver)
    made = await make(driver, node, Start.RUNNING, max_attempts=5)
    token = made.token
    assert token is not None
    for event in (Event.STOPPED, Event.FAILED):
        await complete_one(driver, node, made.id, token, event)
        _, new_token = await claim_one(driver, node, made.type)
        assert new_token == token + 1
        token = new_token
    # One attempt for the first claim, refunded by the stop; one for each claim since.
    assert (await driver.get_task(made.id)).attempts == 2
