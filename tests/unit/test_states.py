"""Unit tests of the task state machine, ``aioasync_tasks._states``.

The expected tables below are written out by hand from the module docstring and the state
diagram of ``docs/explanation.md`` ("States and transitions"); they are
never derived from the functions under test. ``Cleanup(yes, no)`` marks a cell that depends on
whether the task type has a ``deleting`` handler (footnote ¹), ``Retry(yes, no)`` one that depends
on whether attempts are left.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from functools import cache

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aioasync_tasks import Operation, State, StopRequest
from aioasync_tasks._errors import AsyncTasksError, InvalidTransition
from aioasync_tasks._states import Event, Outcome, apply_event, apply_operation

S = State
R = StopRequest
O = Operation  # noqa: E741
E = Event


class _Invalid:
    """The ✗ cells: ``InvalidTransition``."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = _Invalid()


@dataclass(frozen=True)
class Cleanup:
    """A cell that depends on ``has_cleanup``."""

    yes: Outcome
    no: Outcome


@dataclass(frozen=True)
class Retry:
    """A cell that depends on ``can_retry``."""

    yes: Outcome
    no: Outcome


Expected = Outcome | _Invalid | Cleanup | Retry | None

GONE = Outcome(state=None)
"""The row is removed."""

DELETED = Cleanup(yes=Outcome(S.DELETING, reset_attempts=True), no=GONE)
"""Footnote ¹: → DELETING (unowned, a fresh series of cleanup attempts), or removed at once when
the type has no cleanup handler."""

CONFIGS: list[tuple[State, StopRequest | None]] = [
    (S.INIT, None),
    (S.PENDING, None),
    (S.RUNNING, None),
    (S.CANCELING, R.PAUSE),
    (S.CANCELING, R.DELETE),
    (S.PAUSED, None),
    (S.FINISHED, None),
    (S.FAILED, None),
    (S.DELETING, None),
]
"""Every visible ``(state, requested)`` a row can be in."""

# --------------------------------------------------------------------------------------------
# User operations: the table of the module docstring.
# --------------------------------------------------------------------------------------------

OPERATIONS: dict[tuple[State, StopRequest | None, Operation], Expected] = {
    # INIT
    (S.INIT, None, O.RUN): Outcome(S.PENDING),
    (S.INIT, None, O.PAUSE): Outcome(S.PAUSED),
    (S.INIT, None, O.DELETE): DELETED,
    (S.INIT, None, O.CHANGE_GROUP): Outcome(S.INIT),
    # PENDING
    (S.PENDING, None, O.RUN): Outcome(S.PENDING, changed=False),
    (S.PENDING, None, O.PAUSE): Outcome(S.PAUSED),
    (S.PENDING, None, O.DELETE): DELETED,
    (S.PENDING, None, O.CHANGE_GROUP): Outcome(S.PENDING),
    # RUNNING
    (S.RUNNING, None, O.RUN): Outcome(S.RUNNING, owned=True, changed=False),
    (S.RUNNING, None, O.PAUSE): Outcome(S.CANCELING, R.PAUSE, owned=True, stop=True),
    (S.RUNNING, None, O.DELETE): Outcome(S.CANCELING, R.DELETE, owned=True, stop=True),
    (S.RUNNING, None, O.CHANGE_GROUP): Outcome(S.RUNNING, owned=True),
    # CANCELING(pause)
    (S.CANCELING, R.PAUSE, O.RUN): INVALID,
    (S.CANCELING, R.PAUSE, O.PAUSE): Outcome(S.CANCELING, R.PAUSE, owned=True, changed=False),
    # The docs are silent on ``stop`` here (the owner already got a stop for the pause); the module
    # tells the owner again, which is harmless since ``stop`` is set at most once.
    (S.CANCELING, R.PAUSE, O.DELETE): Outcome(S.CANCELING, R.DELETE, owned=True, stop=True),
    (S.CANCELING, R.PAUSE, O.CHANGE_GROUP): Outcome(S.CANCELING, R.PAUSE, owned=True),
    # CANCELING(delete)
    (S.CANCELING, R.DELETE, O.RUN): INVALID,
    (S.CANCELING, R.DELETE, O.PAUSE): INVALID,
    (S.CANCELING, R.DELETE, O.DELETE): Outcome(S.CANCELING, R.DELETE, owned=True, changed=False),
    (S.CANCELING, R.DELETE, O.CHANGE_GROUP): Outcome(S.CANCELING, R.DELETE, owned=True),
    # PAUSED
    (S.PAUSED, None, O.RUN): Outcome(S.PENDING),
    (S.PAUSED, None, O.PAUSE): Outcome(S.PAUSED, changed=False),
    (S.PAUSED, None, O.DELETE): DELETED,
    (S.PAUSED, None, O.CHANGE_GROUP): Outcome(S.PAUSED),
    # FINISHED
    (S.FINISHED, None, O.RUN): INVALID,
    (S.FINISHED, None, O.PAUSE): INVALID,
    (S.FINISHED, None, O.DELETE): DELETED,
    (S.FINISHED, None, O.CHANGE_GROUP): Outcome(S.FINISHED),
    # FAILED
    (S.FAILED, None, O.RUN): Outcome(S.PENDING, reset_attempts=True),
    (S.FAILED, None, O.PAUSE): INVALID,
    (S.FAILED, None, O.DELETE): DELETED,
    (S.FAILED, None, O.CHANGE_GROUP): Outcome(S.FAILED),
    # DELETING
    (S.DELETING, None, O.RUN): INVALID,
    (S.DELETING, None, O.PAUSE): INVALID,
    (S.DELETING, None, O.DELETE): Outcome(S.DELETING, changed=False),
    (S.DELETING, None, O.CHANGE_GROUP): INVALID,
}

FORCE_DELETE_STOPS = frozenset({S.RUNNING, S.CANCELING})
"""``delete(force=True)`` must tell a running owner to stop; no other state has one."""

# --------------------------------------------------------------------------------------------
# System events: the diagram of docs/explanation.md (None = the event does not apply: a stale
# write).
# --------------------------------------------------------------------------------------------

_NO_EVENTS: dict[Event, Expected] = dict.fromkeys(Event)

EVENTS: dict[tuple[State, StopRequest | None, Event], Expected] = {
    # INIT: only the user moves it.
    **{(S.INIT, None, e): v for e, v in _NO_EVENTS.items()},
    # PENDING: a node claims it.
    (S.PENDING, None, E.CLAIM): Outcome(S.RUNNING, owned=True),
    (S.PENDING, None, E.FINISHED): None,
    (S.PENDING, None, E.DISCARD): None,
    (S.PENDING, None, E.FAILED): None,
    (S.PENDING, None, E.STOPPED): None,
    (S.PENDING, None, E.NODE_LOST): None,
    (S.PENDING, None, E.CLEANUP_CLAIM): None,
    (S.PENDING, None, E.CLEANUP_FINISHED): None,
    (S.PENDING, None, E.CLEANUP_FAILED): None,
    (S.PENDING, None, E.REJECTED): None,
    # RUNNING
    (S.RUNNING, None, E.CLAIM): None,
    (S.RUNNING, None, E.FINISHED): Outcome(S.FINISHED),
    (S.RUNNING, None, E.DISCARD): GONE,
    (S.RUNNING, None, E.FAILED): Retry(yes=Outcome(S.PENDING, retry=True), no=Outcome(S.FAILED)),
    (S.RUNNING, None, E.STOPPED): Outcome(S.PENDING),  # hand-off: claimable at once
    (S.RUNNING, None, E.NODE_LOST): Retry(yes=Outcome(S.PENDING), no=Outcome(S.FAILED)),
    (S.RUNNING, None, E.CLEANUP_CLAIM): None,
    (S.RUNNING, None, E.CLEANUP_FINISHED): None,
    (S.RUNNING, None, E.CLEANUP_FAILED): None,
    (S.RUNNING, None, E.REJECTED): Outcome(S.FAILED),  # whatever attempts are left
    # CANCELING(pause): whatever ends the generator, no retry.
    (S.CANCELING, R.PAUSE, E.CLAIM): None,
    (S.CANCELING, R.PAUSE, E.FINISHED): Outcome(S.FINISHED),
    (S.CANCELING, R.PAUSE, E.DISCARD): GONE,
    (S.CANCELING, R.PAUSE, E.FAILED): Outcome(S.FAILED),
    (S.CANCELING, R.PAUSE, E.STOPPED): Outcome(S.PAUSED),
    (S.CANCELING, R.PAUSE, E.NODE_LOST): Outcome(S.PAUSED),
    (S.CANCELING, R.PAUSE, E.CLEANUP_CLAIM): None,
    (S.CANCELING, R.PAUSE, E.CLEANUP_FINISHED): None,
    (S.CANCELING, R.PAUSE, E.CLEANUP_FAILED): None,
    (S.CANCELING, R.PAUSE, E.REJECTED): Outcome(S.FAILED),
    # CANCELING(delete): every end goes to DELETING¹; the user's delete wins over the task's
    # own delete=True, so a cleanup handler still runs.
    (S.CANCELING, R.DELETE, E.CLAIM): None,
    (S.CANCELING, R.DELETE, E.FINISHED): DELETED,
    (S.CANCELING, R.DELETE, E.DISCARD): DELETED,
    (S.CANCELING, R.DELETE, E.FAILED): DELETED,
    (S.CANCELING, R.DELETE, E.STOPPED): DELETED,
    # The diagram: node lost → DELETING (unowned); with no handler ¹ applies and the row is
    # removed.
    (S.CANCELING, R.DELETE, E.NODE_LOST): DELETED,
    (S.CANCELING, R.DELETE, E.CLEANUP_CLAIM): None,
    (S.CANCELING, R.DELETE, E.CLEANUP_FINISHED): None,
    (S.CANCELING, R.DELETE, E.CLEANUP_FAILED): None,
    (S.CANCELING, R.DELETE, E.REJECTED): DELETED,
    # PAUSED, FINISHED, FAILED: only the user moves them.
    **{(S.PAUSED, None, e): v for e, v in _NO_EVENTS.items()},
    **{(S.FINISHED, None, e): v for e, v in _NO_EVENTS.items()},
    **{(S.FAILED, None, e): v for e, v in _NO_EVENTS.items()},
    # DELETING: the cleanup handler's life.
    (S.DELETING, None, E.CLAIM): None,
    (S.DELETING, None, E.FINISHED): None,
    (S.DELETING, None, E.DISCARD): None,
    (S.DELETING, None, E.FAILED): None,
    (S.DELETING, None, E.STOPPED): None,
    (S.DELETING, None, E.NODE_LOST): Retry(
        yes=Outcome(S.DELETING), no=Outcome(S.FAILED)
    ),  # owned → unowned, or FAILED when its cleanup attempts are used up
    (S.DELETING, None, E.CLEANUP_CLAIM): Outcome(S.DELETING, owned=True),
    (S.DELETING, None, E.CLEANUP_FINISHED): GONE,
    (S.DELETING, None, E.CLEANUP_FAILED): Retry(
        yes=Outcome(S.DELETING, retry=True), no=Outcome(S.FAILED)
    ),
    (S.DELETING, None, E.REJECTED): Outcome(S.FAILED),  # the cleanup cannot take it either
}


def _resolve(expected: Expected, *, has_cleanup: bool, can_retry: bool = False) -> Expected:
    if isinstance(expected, Cleanup):
        return expected.yes if has_cleanup else expected.no
    if isinstance(expected, Retry):
        return expected.yes if can_retry else expected.no
    return expected


def _id(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if value is None:
        return "-"
    return str(getattr(value, "value", value)).replace(" ", "_")


# --------------------------------------------------------------------------------------------
# 1. The user-operation table, cell by cell.
# --------------------------------------------------------------------------------------------


def test_operation_table_has_every_cell() -> None:
    assert set(OPERATIONS) == {(s, r, o) for (s, r), o in itertools.product(CONFIGS, Operation)}


@pytest.mark.parametrize("has_cleanup", [True, False], ids=["cleanup", "no_cleanup"])
@pytest.mark.parametrize(("state", "requested", "operation"), list(OPERATIONS), ids=_id)
def test_operation(
    state: State, requested: StopRequest | None, operation: Operation, has_cleanup: bool
) -> None:
    expected = _resolve(OPERATIONS[state, requested, operation], has_cleanup=has_cleanup)
    if expected is INVALID:
        with pytest.raises(InvalidTransition) as info:
            apply_operation(state, requested, operation, has_cleanup=has_cleanup, task_id=7)
        error = info.value
        assert isinstance(error, AsyncTasksError)
        assert error.state is state
        assert error.operation is operation
        assert error.task_id == 7
        # "InvalidTransition error naming both"
        assert state.value in str(error)
        assert operation.value in str(error)
        assert "task 7" in str(error)
    else:
        outcome = apply_operation(state, requested, operation, has_cleanup=has_cleanup, task_id=7)
        assert outcome == expected


def test_invalid_transition_without_task_id() -> None:
    with pytest.raises(InvalidTransition) as info:
        apply_operation(S.FINISHED, None, O.RUN, has_cleanup=False)
    assert info.value.task_id is None
    assert info.value.state is S.FINISHED
    assert info.value.operation is O.RUN


@pytest.mark.parametrize("has_cleanup", [True, False], ids=["cleanup", "no_cleanup"])
@pytest.mark.parametrize(("state", "requested"), CONFIGS, ids=_id)
def test_force_delete_removes_from_every_state(
    state: State, requested: StopRequest | None, has_cleanup: bool
) -> None:
    outcome = apply_operation(
        state, requested, O.DELETE, has_cleanup=has_cleanup, force=True, task_id=7
    )
    assert outcome.state is None
    assert outcome.requested is None
    assert outcome.owned is False
    assert outcome.changed is True
    assert outcome.stop is (state in FORCE_DELETE_STOPS)


# --------------------------------------------------------------------------------------------
# 2. The system-event table, cell by cell.
# --------------------------------------------------------------------------------------------


def test_event_table_has_every_cell() -> None:
    assert set(EVENTS) == {(s, r, e) for (s, r), e in itertools.product(CONFIGS, Event)}


@pytest.mark.parametrize("can_retry", [True, False], ids=["retry", "no_retry"])
@pytest.mark.parametrize("has_cleanup", [True, False], ids=["cleanup", "no_cleanup"])
@pytest.mark.parametrize(("state", "requested", "event"), list(EVENTS), ids=_id)
def test_event(
    state: State,
    requested: StopRequest | None,
    event: Event,
    has_cleanup: bool,
    can_retry: bool,
) -> None:
    expected = _resolve(
        EVENTS[state, requested, event], has_cleanup=has_cleanup, can_retry=can_retry
    )
    outcome = apply_event(state, requested, event, has_cleanup=has_cleanup, can_retry=can_retry)
    assert outcome == expected


# --------------------------------------------------------------------------------------------
# 3. Invariants over whole lifecycles.
#
# A node is the part of a row the state machine cares about: (state, requested, owned); state None
# means removed. ``owned`` comes from the outcomes. Events carry the backend's owner check: a
# cleanup claim needs an unowned DELETING row, the other events on a DELETING row come from the
# node that claimed its cleanup (a stale report from anyone else changes nothing).
# --------------------------------------------------------------------------------------------

Node = tuple[State | None, StopRequest | None, bool]


def _owner_check(state: State, owned: bool, event: Event) -> bool:
    if state is S.DELETING:
        return not owned if event is E.CLEANUP_CLAIM else owned
    return True


def _check_outcome_shape(before: State, outcome: Outcome) -> None:
    """Properties every outcome must have, whatever the cell."""
    if outcome.state is None:
        # A removed row carries nothing: no stop reason, no owner, no retry.
        assert outcome.requested is None
        assert outcome.owned is False
        assert outcome.retry is False
        assert outcome.reset_attempts is False
        assert outcome.changed is True
    else:
        assert isinstance(outcome.state, State)
        assert (outcome.requested is not None) is (outcome.state is S.CANCELING)
        if outcome.state in (S.RUNNING, S.CANCELING):
            assert outcome.owned
        elif outcome.state is not S.DELETING:
            assert not outcome.owned
    if outcome.stop:
        # Only an owner can be told to stop.
        assert before in (S.RUNNING, S.CANCELING)
    if not outcome.changed:
        assert outcome.state is before
        assert not outcome.stop
        assert not outcome.retry
        assert not outcome.reset_attempts


def _successors(node: Node, has_cleanup: bool) -> list[tuple[str, Node]]:
    """Every node one user operation (without force) or system event away."""
    state, requested, owned = node
    if state is None:
        return []
    result: list[tuple[str, Node]] = []
    for operation in Operation:
        try:
            outcome = apply_operation(state, requested, operation, has_cleanup=has_cleanup)
        except InvalidTransition:
            continue
        _check_outcome_shape(state, outcome)
        if outcome.changed:
            result.append(
                (f"op:{operation.value}", (outcome.state, outcome.requested, outcome.owned))
            )
    for event, can_retry in itertools.product(Event, (True, False)):
        if not _owner_check(state, owned, event):
            continue
        maybe = apply_event(state, requested, event, has_cleanup=has_cleanup, can_retry=can_retry)
        if maybe is None:
            continue
        _check_outcome_shape(state, maybe)
        result.append((f"event:{event.value}", (maybe.state, maybe.requested, maybe.owned)))
    return result


START_NODES: list[Node] = [(S.INIT, None, False), (S.PENDING, None, False)]
"""A task is created INIT (``auto_run=False``) or PENDING."""


@cache
def _reachable(has_cleanup: bool) -> frozenset[Node]:
    seen: set[Node] = set(START_NODES)
    queue = deque(START_NODES)
    while queue:
        for _, nxt in _successors(queue.popleft(), has_cleanup):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return frozenset(seen)


@cache
def _can_reach_removal(node: Node, has_cleanup: bool) -> bool:
    """BFS from ``node`` to removal over operations and events.

    Neither ``force=True`` (removes anything, proves nothing) nor a discard (the task's own code
    choosing ``delete=True``, which a user cannot rely on) counts: the ordinary delete path must
    get every row out.
    """
    seen = {node}
    queue = deque([node])
    while queue:
        current = queue.popleft()
        if current[0] is None:
            return True
        for label, nxt in _successors(current, has_cleanup):
            if label == f"event:{E.DISCARD.value}":
                continue
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return False


@pytest.mark.parametrize("has_cleanup", [True, False], ids=["cleanup", "no_cleanup"])
def test_every_state_is_reachable_and_none_is_a_zombie(has_cleanup: bool) -> None:
    reachable = _reachable(has_cleanup)
    # Without a cleanup handler a deleted task is removed at once: DELETING never happens.
    configs = set(CONFIGS) if has_cleanup else set(CONFIGS) - {(S.DELETING, None)}
    assert {(s, r) for s, r, _ in reachable if s is not None} == configs
    assert any(s is None for s, _, _ in reachable)
    for node in reachable:
        assert _can_reach_removal(node, has_cleanup), node
    owned_deleting = (S.DELETING, None, True) in reachable
    assert owned_deleting is has_cleanup  # cleanup is only ever claimed when there is a handler


@pytest.mark.parametrize("has_cleanup", [True, False], ids=["cleanup", "no_cleanup"])
def test_terminal_states_are_left_only_by_delete_or_run(has_cleanup: bool) -> None:
    for node in _reachable(has_cleanup):
        if node[0] not in (S.FINISHED, S.FAILED):
            continue
        for label, nxt in _successors(node, has_cleanup):
            if nxt[0] is node[0]:
                continue
            allowed = {"op:delete"} | ({"op:run"} if node[0] is S.FAILED else set())
            assert label in allowed, (node, label, nxt)


def _try_operation(
    state: State,
    requested: StopRequest | None,
    operation: Operation,
    *,
    has_cleanup: bool,
    force: bool,
) -> Outcome | InvalidTransition:
    try:
        return apply_operation(
            state, requested, operation, has_cleanup=has_cleanup, force=force, task_id=7
        )
    except InvalidTransition as error:
        return error


class TaskLifecycle(RuleBasedStateMachine):
    """One model task driven by random user operations and system events."""

    def __init__(self) -> None:
        super().__init__()
        self.state: State | None = S.INIT
        self.requested: StopRequest | None = None
        self.owned = False
        self.cleanup_claimed = False
        self.has_cleanup = False
        self.max_attempts = 1
        self.attempts = 0

    @initialize(auto_run=st.booleans(), has_cleanup=st.booleans(), max_attempts=st.integers(1, 3))
    def create(self, auto_run: bool, has_cleanup: bool, max_attempts: int) -> None:
        self.state = S.PENDING if auto_run else S.INIT
        self.has_cleanup = has_cleanup
        self.max_attempts = max_attempts

    @property
    def removed(self) -> bool:
        return self.state is None

    def _apply(self, before: State, outcome: Outcome, *, cause: str) -> None:
        _check_outcome_shape(before, outcome)
        if not outcome.changed:
            assert outcome.state is self.state
            assert outcome.requested is self.requested
            return  # an idempotent no-op writes nothing
        if before in (S.FINISHED, S.FAILED) and outcome.state is not before:
            allowed = {"op:delete"} | ({"op:run"} if before is S.FAILED else set())
            assert cause in allowed, (before, cause, outcome)
        self.state = outcome.state
        self.requested = outcome.requested
        self.owned = outcome.owned
        self.cleanup_claimed = cause == f"event:{E.CLEANUP_CLAIM.value}"
        if outcome.reset_attempts:
            self.attempts = 0

    @precondition(lambda self: not self.removed)
    @rule(operation=st.sampled_from(Operation), force=st.sampled_from([False, False, False, True]))
    def user_operation(self, operation: Operation, force: bool) -> None:
        assert self.state is not None
        before = self.state
        outcome = _try_operation(
            before, self.requested, operation, has_cleanup=self.has_cleanup, force=force
        )
        if isinstance(outcome, InvalidTransition):
            assert outcome.state is before
            assert outcome.operation is operation
            assert outcome.task_id == 7
            return
        if operation is O.DELETE and force:
            assert outcome.state is None
            assert outcome.stop is (before in (S.RUNNING, S.CANCELING))
        self._apply(before, outcome, cause=f"op:{operation.value}")

    @precondition(lambda self: not self.removed)
    @rule(event=st.sampled_from(Event))
    def system_event(self, event: Event) -> None:
        assert self.state is not None
        before = self.state
        if not _owner_check(before, self.owned, event):
            return  # the backend's owner check rejects the stale write
        outcome = apply_event(
            before,
            self.requested,
            event,
            has_cleanup=self.has_cleanup,
            can_retry=self.attempts < self.max_attempts,
        )
        if outcome is None:
            # Not applicable: in particular no system event moves INIT, PAUSED, FINISHED, FAILED.
            return
        assert before not in (S.INIT, S.PAUSED, S.FINISHED, S.FAILED)
        if event in (E.CLAIM, E.CLEANUP_CLAIM):
            self.attempts += 1
        self._apply(before, outcome, cause=f"event:{event.value}")

    @precondition(lambda self: self.removed)
    @rule(operation=st.sampled_from(Operation), event=st.sampled_from(Event))
    def touch_removed(self, operation: Operation, event: Event) -> None:
        # A removed task accepts nothing more: there is no (state, requested) left to feed to
        # the state machine, so the model keeps it removed whatever comes.
        assert self.state is None
        assert self.requested is None
        assert not self.owned

    @invariant()
    def state_is_a_state(self) -> None:
        assert self.state is None or isinstance(self.state, State)

    @invariant()
    def requested_iff_canceling(self) -> None:
        assert (self.requested is not None) is (self.state is S.CANCELING)
        if self.requested is not None:
            assert isinstance(self.requested, StopRequest)

    @invariant()
    def owned_iff_active_or_cleanup_claimed(self) -> None:
        expected = self.state in (S.RUNNING, S.CANCELING) or (
            self.state is S.DELETING and self.cleanup_claimed
        )
        assert self.owned is expected

    @invariant()
    def no_zombie(self) -> None:
        node: Node = (self.state, self.requested, self.owned)
        assert _can_reach_removal(node, self.has_cleanup), node


TaskLifecycle.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_task_lifecycle = pytest.mark.slow(TaskLifecycle.TestCase)
