"""Driver conformance: the writes of an execution (``checkpoint``, ``complete``,
``release_claims``), each accepted only from the owner with the current claim token
(docs/explanation.md, "Claim tokens"); ``complete`` is checked per event over every cell of the
state table against ``apply_event``.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import pytest

from aioasync_tasks import State
from aioasync_tasks._backends._driver import (
    Checkpoint,
    CheckpointParams,
    ClaimParams,
    CompleteParams,
    Completion,
    Driver,
    ReleaseClaimsParams,
)
from aioasync_tasks._states import Event, apply_event
from driver._driverkit import (
    FIFO,
    OWNED_STARTS,
    Peek,
    Problems,
    Start,
    Want,
    claim_one,
    cleanup_variants,
    complete_one,
    describe,
    every_start,
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

COMPLETION_EVENTS = [e for e in Event if e not in (Event.CLAIM, Event.CLEANUP_CLAIM)]
"""The events a runner reports with ``complete`` (the claims are events too: see
``test_driver_claims.py``)."""
DELAY = 60.0
"""The back-off of the completions here: a retry is due this long after it."""


@pytest.mark.parametrize("event", COMPLETION_EVENTS, ids=lambda e: e.name.lower())
async def test_complete_follows_the_state_table(driver: Driver, peek: Peek, event: Event) -> None:
    node = await register(driver)
    failure = event in (Event.FAILED, Event.CLEANUP_FAILED)
    # Each owned task has been claimed once: with a limit of 2 attempts (of the task, or of its
    # cleanup: the cleanup_attempts of its batch) it has one left, with 1 none.
    made = {
        limit: await make_many(
            driver,
            node,
            [
                Want(start, has_cleanup=has_cleanup, max_attempts=limit)
                for start in OWNED_STARTS
                for has_cleanup in cleanup_variants(start)
            ],
        )
        for limit in (1, 2)
    }
    before = await snapshot(driver)
    accepted: set[int] = set()
    for limit, batch in made.items():
        completions = []
        for m in batch:
            assert m.token is not None
            error = "boom" if failure else None
            completions.append(
                Completion(m.id, m.token, event, context="after", error=error, delay=DELAY)
            )
        accepted |= await driver.complete(CompleteParams(node, completions, cleanup_attempts=limit))
    after = await snapshot(driver)
    handoffs = await peek.handoffs()
    tokens = await peek.tokens()

    problems = Problems()
    for limit, batch in made.items():
        can_retry = limit > 1
        for m in batch:
            cell = (
                f"{event.value} on {describe(m.want)}, {'an' if can_retry else 'no'} attempt left"
            )
            old, new = before[m.id], after.get(m.id)
            expected = apply_event(
                m.start.state,
                m.start.requested,
                event,
                has_cleanup=m.want.has_cleanup,
                can_retry=can_retry,
            )
            if expected is None:
                problems.check(m.id not in accepted, cell, "accepted an event that does not apply")
                problems.check(new == old, cell, f"an event that does not apply changed {new}")
                continue
            problems.check(m.id in accepted, cell, "not accepted")
            refund = event is Event.STOPPED and expected.state in (State.PENDING, State.PAUSED)
            wanted = expected_view(old, expected, owner=node, refund=refund, context="after")
            problems.check(view(new) == wanted, cell, f"row {view(new)}, not {wanted}")
            wrong_run_at = run_at_problem(old, new, expected, delay=DELAY)
            problems.check(wrong_run_at is None, cell, str(wrong_run_at))
            if new is None:
                continue
            done = new.state in (State.FINISHED, State.FAILED)
            problems.check((new.done_at is not None) == done, cell, f"done_at {new.done_at}")
            if failure:
                problems.check(new.error == "boom", cell, f"error {new.error!r}")
            elif event is Event.NODE_LOST and new.state is State.FAILED:
                problems.check("node lost" in (new.error or ""), cell, f"error {new.error!r}")
            else:
                problems.check(new.error == old.error, cell, f"error {new.error!r}")
            handoff = event is Event.STOPPED and new.state is State.PENDING
            problems.check(handoffs[m.id] == handoff, cell, f"handoff {handoffs[m.id]}")
            problems.check(tokens[m.id] == m.token, cell, f"token {m.token} -> {tokens[m.id]}")
    problems.assert_none()


async def test_complete_applies_only_the_current_execution_of_the_owner(driver: Driver) -> None:
    node = await register(driver)
    other = await register(driver, "other")
    made = await make(driver, node, Start.RUNNING)
    assert made.token is not None
    assert await complete_one(driver, node, made.id, made.token, Event.STOPPED) == {made.id}
    _, token = await claim_one(driver, node, made.type)
    assert token == made.token + 1
    before = await driver.get_task(made.id)

    stale = Completion(made.id, made.token, Event.FINISHED)
    foreign = Completion(made.id, token, Event.FINISHED)
    missing = Completion(made.id + 1000, token, Event.FINISHED)
    assert (
        await driver.complete(CompleteParams(node, [stale, missing], cleanup_attempts=1)) == set()
    )
    assert await driver.complete(CompleteParams(other, [foreign], cleanup_attempts=1)) == set()
    assert await driver.complete(CompleteParams(node, [], cleanup_attempts=1)) == set()
    assert await driver.get_task(made.id) == before

    current = Completion(made.id, token, Event.FINISHED)
    assert await driver.complete(CompleteParams(node, [current], cleanup_attempts=1)) == {made.id}
    assert (await driver.get_task(made.id)).state is State.FINISHED
    # The same completion again (its first COMMIT reply lost) changes nothing more.
    finished = await driver.get_task(made.id)
    assert await driver.complete(CompleteParams(node, [current], cleanup_attempts=1)) == set()
    assert await driver.get_task(made.id) == finished


async def test_complete_applies_a_batch_row_by_row(driver: Driver) -> None:
    node = await register(driver)
    finishing = await make(driver, node, Start.RUNNING)
    failing = await make(driver, node, Start.RUNNING, max_attempts=3)
    paused = await make(driver, node, Start.PAUSED)
    assert finishing.token is not None
    assert failing.token is not None
    accepted = await driver.complete(
        CompleteParams(
            node,
            [
                Completion(finishing.id, finishing.token, Event.FINISHED, context="done"),
                Completion(failing.id, failing.token, Event.FAILED, error="boom", delay=DELAY),
                Completion(paused.id, 1, Event.FINISHED),
            ],
            cleanup_attempts=1,
        )
    )
    assert accepted == {finishing.id, failing.id}
    done = await driver.get_task(finishing.id)
    assert (done.state, done.context, done.node) == (State.FINISHED, "done", None)
    retried = await driver.get_task(failing.id)
    assert (retried.state, retried.error, retried.attempts) == (State.PENDING, "boom", 1)
    assert retried.run_at > retried.updated_at
    assert (await driver.get_task(paused.id)).state is State.PAUSED
    # Not due before the back-off: a claim does not take it.
    assert (await driver.claim(ClaimParams(node, [failing.type], 1, FIFO))).claimed == []


async def test_checkpoint_is_accepted_from_the_owner_in_a_running_state(
    driver: Driver, peek: Peek
) -> None:
    node = await register(driver)
    made = await make_many(driver, node, every_start())
    before = await snapshot(driver)
    tokens = await peek.tokens()  # an unowned task's token is that of its last claim
    contexts = {m.id: Checkpoint(tokens[m.id], f"c{m.id}") for m in made}
    assert await driver.checkpoint(CheckpointParams(node, contexts)) == {
        m.id for m in made if m.start.owned
    }
    after = await snapshot(driver)
    for m in made:
        if m.start.owned:
            assert view(after[m.id]) == {**(view(before[m.id]) or {}), "context": f"c{m.id}"}
        else:
            assert after[m.id] == before[m.id], describe(m.want)
    assert await driver.checkpoint(CheckpointParams(node, {})) == set()


async def test_checkpoint_with_a_stale_token_or_from_another_node_is_rejected(
    driver: Driver,
) -> None:
    node = await register(driver)
    other = await register(driver, "other")
    made = await make(driver, node, Start.RUNNING)
    assert made.token is not None
    assert await driver.checkpoint(
        CheckpointParams(node, {made.id: Checkpoint(made.token, "first")})
    ) == {made.id}
    assert await complete_one(driver, node, made.id, made.token, Event.STOPPED) == {made.id}
    # Handed back: no execution owns it, the old one may not write.
    assert (
        await driver.checkpoint(CheckpointParams(node, {made.id: Checkpoint(made.token, "late")}))
        == set()
    )
    _, token = await claim_one(driver, node, made.type)
    assert (
        await driver.checkpoint(CheckpointParams(node, {made.id: Checkpoint(made.token, "late")}))
        == set()
    )
    assert (
        await driver.checkpoint(CheckpointParams(other, {made.id: Checkpoint(token, "foreign")}))
        == set()
    )
    assert (await driver.get_task(made.id)).context == "first"
    assert await driver.checkpoint(
        CheckpointParams(node, {made.id: Checkpoint(token, "second")})
    ) == {made.id}
    assert (await driver.get_task(made.id)).context == "second"


async def test_checkpoint_stores_progress_and_message_with_the_context(driver: Driver) -> None:
    """docs/design.md §2.6: one write; each part None keeps the stored one; fenced by the
    token like the context."""
    node = await register(driver)
    first, second = await make_many(driver, node, [Want(Start.RUNNING), Want(Start.RUNNING)])
    assert first.token is not None
    assert second.token is not None
    new = await driver.get_task(first.id)
    assert (new.progress, new.message) == (None, None)

    accepted = await driver.checkpoint(
        CheckpointParams(
            node,
            {
                first.id: Checkpoint(first.token, "c1", progress=0.25, message="a quarter"),
                second.id: Checkpoint(second.token, None, progress=0.5),  # progress alone
            },
        )
    )
    assert accepted == {first.id, second.id}
    one, two = await driver.get_task(first.id), await driver.get_task(second.id)
    assert (one.context, one.progress, one.message) == ("c1", 0.25, "a quarter")
    assert (two.context, two.progress, two.message) == ("{}", 0.5, None)

    # Only a message: the context and the progress stay; an empty message clears it.
    assert await driver.checkpoint(
        CheckpointParams(node, {first.id: Checkpoint(first.token, None, None, "")})
    ) == {first.id}
    one = await driver.get_task(first.id)
    assert (one.context, one.progress, one.message) == ("c1", 0.25, "")

    # A stale token writes no progress either.
    assert await complete_one(driver, node, first.id, first.token, Event.STOPPED) == {first.id}
    late = Checkpoint(first.token, None, progress=0.9, message="late")
    assert await driver.checkpoint(CheckpointParams(node, {first.id: late})) == set()
    assert (await driver.get_task(first.id)).progress == 0.25


async def test_complete_stores_the_final_progress_and_keeps_it_when_none(driver: Driver) -> None:
    node = await register(driver)
    finishing, failing, stopping = await make_many(
        driver, node, [Want(Start.RUNNING), Want(Start.RUNNING), Want(Start.RUNNING)]
    )
    assert finishing.token is not None
    assert failing.token is not None
    assert stopping.token is not None
    checkpoints = {
        m.id: Checkpoint(m.token, None, progress=0.5, message="half")
        for m in (finishing, failing, stopping)
        if m.token is not None
    }
    assert await driver.checkpoint(CheckpointParams(node, checkpoints)) == set(checkpoints)
    accepted = await driver.complete(
        CompleteParams(
            node,
            [
                Completion(
                    finishing.id, finishing.token, Event.FINISHED, progress=1.0, message="ok"
                ),
                Completion(failing.id, failing.token, Event.FAILED, error="boom", message="broke"),
                Completion(stopping.id, stopping.token, Event.STOPPED),
            ],
            cleanup_attempts=1,
        )
    )
    assert accepted == {finishing.id, failing.id, stopping.id}
    done, failed, stopped = [await driver.get_task(m.id) for m in (finishing, failing, stopping)]
    assert (done.state, done.progress, done.message) == (State.FINISHED, 1.0, "ok")
    assert (failed.state, failed.progress, failed.message) == (State.FAILED, 0.5, "broke")
    assert (stopped.state, stopped.progress, stopped.message) == (State.PENDING, 0.5, "half")


async def _release_all(driver: Driver, peek: Peek, wants: list[Want]) -> Problems:
    node = await register(driver)
    other = await register(driver, "other")
    made = await make_many(driver, node, wants)
    before = await snapshot(driver)
    # Nothing, a stale token, another node's claims, a missing task: nothing released.
    stale = {m.id: (m.token or 0) - 1 for m in made}
    assert await driver.release_claims(ReleaseClaimsParams(node, {})) == 0
    assert await driver.release_claims(ReleaseClaimsParams(node, stale)) == 0
    assert (
        await driver.release_claims(ReleaseClaimsParams(other, {m.id: m.token or 0 for m in made}))
        == 0
    )
    assert await driver.release_claims(ReleaseClaimsParams(node, {made[0].id + 1000: 1})) == 0
    assert await snapshot(driver) == before
    assert await driver.release_claims(
        ReleaseClaimsParams(node, {m.id: m.token or 0 for m in made})
    ) == len(made)
    after = await snapshot(driver)
    return given_back_problems("release", made, before, after, await peek.handoffs())


async def test_release_claims_hands_back_with_the_attempt_refunded(
    driver: Driver, peek: Peek
) -> None:
    (await _release_all(driver, peek, owned_cells())).assert_none()
