"""The task state machine (docs/explanation.md, "States and transitions"), as data and
pure functions.

This module imports no database and no concurrency library. The backends ask it what a user
operation or a system event does to a task in a given ``(state, requested)`` and then apply the
answer as one compare-and-set statement, so the table below is the only place the rules live.

User operations (= idempotent no-op, ✗ ``InvalidTransition``)::

    from \\ op   run          pause                  delete                   change group
    INIT         PENDING      PAUSED                 DELETING¹                ✓
    PENDING      =            PAUSED                 DELETING¹                ✓
    RUNNING      =            CANCELING(pause)       CANCELING(delete)        ✓
    CANCELING    ✗            = (pause) / ✗ (delete) CANCELING(delete) / =    ✓
    PAUSED       PENDING      =                      DELETING¹                ✓
    FINISHED     ✗            ✗                      DELETING¹                ✓
    FAILED       PENDING²     ✗                      DELETING¹                ✓
    DELETING     ✗            ✗                      =                        ✗

¹ removed at once when the type has no cleanup handler, or with ``force=True``.
² attempts are reset; the task resumes from its last stored context.

``delete(force=True)`` removes the row from *every* state; a running owner is told to stop and its
late writes are rejected because the row is gone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._errors import InvalidTransition
from ._models import Operation, State, StopRequest


class Event(enum.StrEnum):
    """A system event on one task, reported by a node."""

    CLAIM = "claim"
    """A node takes a due PENDING task."""
    FINISHED = "finished"
    """The generator finished (terminal report, or returned with no stop requested)."""
    DISCARD = "discard"
    """The generator finished or failed with ``delete=True``: the row goes, no cleanup."""
    FAILED = "failed"
    """The generator failed (failed report, exception, or timeout)."""
    STOPPED = "stopped"
    """The generator stopped after a stop signal (user request or the node's shutdown)."""
    NODE_LOST = "node lost"
    """The owner's heartbeat expired; another node rescues the task."""
    CLEANUP_CLAIM = "cleanup claim"
    """A node takes an unowned DELETING task to run its cleanup handler."""
    CLEANUP_FINISHED = "cleanup finished"
    CLEANUP_FAILED = "cleanup failed"
    REJECTED = "rejected"
    """The task's stored context does not decode into its type's context type: FAILED at once,
    whatever attempts are left — every retry would fail the same way (a cleanup too)."""


ACTIVE_STATES = frozenset({State.RUNNING, State.CANCELING})
"""States in which a node owns and executes the task's generator."""
LIVE_STATES = frozenset({State.INIT, State.PENDING, State.RUNNING, State.CANCELING, State.PAUSED})
"""States in which a task holds its unique key (docs/design.md §4.4): all but FINISHED, FAILED
and DELETING. The unique index's predicate lists the same (``_schema.LIVE_STATES_SQL``)."""
REPLACEABLE_STATES = LIVE_STATES - ACTIVE_STATES
"""The live states in which ``on_conflict="replace"`` may rewrite a task: no node runs it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a transition does to a row.

    ``state`` None means the row is removed. ``owned`` tells whether the row keeps (or, for a
    claim, takes) an owner node; otherwise the owner is cleared. ``stop`` means the task's owner
    must be told to stop. ``retry`` means the row is delayed by the back-off. ``reset_attempts``
    starts a fresh series of attempts. ``changed`` False marks an idempotent no-op.
    """

    state: State | None
    requested: StopRequest | None = None
    owned: bool = False
    stop: bool = False
    retry: bool = False
    reset_attempts: bool = False
    changed: bool = True


REMOVED = Outcome(state=None)


def _deleted(has_cleanup: bool) -> Outcome:
    """The ¹ rule: a task with a cleanup handler goes to DELETING, any other is removed."""
    if has_cleanup:
        return Outcome(State.DELETING, reset_attempts=True)
    return REMOVED


def _same(state: State, requested: StopRequest | None) -> Outcome:
    return Outcome(state, requested, owned=state in ACTIVE_STATES, changed=False)


def apply_operation(
    state: State,
    requested: StopRequest | None,
    operation: Operation,
    *,
    has_cleanup: bool,
    force: bool = False,
    task_id: int | None = None,
) -> Outcome:
    """The outcome of a user ``operation`` on a task in ``(state, requested)``.

    Raises ``InvalidTransition`` for the ✗ cells of the table.
    """
    active = state in ACTIVE_STATES
    if operation is Operation.DELETE:
        if force:
            return Outcome(None, stop=active)
        if active:
            if requested is StopRequest.DELETE:
                return _same(state, requested)
            return Outcome(State.CANCELING, StopRequest.DELETE, owned=True, stop=True)
        if state is State.DELETING:
            return _same(state, requested)
        return _deleted(has_cleanup)

    if operation is Operation.CHANGE_GROUP:
        if state is State.DELETING:
            raise InvalidTransition(task_id, state, operation)
        return Outcome(state, requested, owned=active)

    if operation is Operation.RUN:
        if state in (State.INIT, State.PAUSED):
            return Outcome(State.PENDING)
        if state is State.FAILED:
            return Outcome(State.PENDING, reset_attempts=True)
        if state in (State.PENDING, State.RUNNING):
            return _same(state, requested)
        raise InvalidTransition(task_id, state, operation)

    # Operation.PAUSE
    if state in (State.INIT, State.PENDING):
        return Outcome(State.PAUSED)
    if state is State.RUNNING:
        return Outcome(State.CANCELING, StopRequest.PAUSE, owned=True, stop=True)
    if state is State.PAUSED or (state is State.CANCELING and requested is StopRequest.PAUSE):
        return _same(state, requested)
    raise InvalidTransition(task_id, state, operation)


def apply_event(
    state: State,
    requested: StopRequest | None,
    event: Event,
    *,
    has_cleanup: bool,
    can_retry: bool = False,
) -> Outcome | None:
    """The outcome of a system ``event`` on a task in ``(state, requested)``.

    ``can_retry`` says whether the task has attempts left (for FAILED, NODE_LOST and
    CLEANUP_FAILED; for a DELETING task, attempts of its cleanup). None means the event does
    not apply to that state: the write is stale (for instance the user deleted the task
    meanwhile) and must change nothing.
    """
    if event is Event.CLAIM:
        return Outcome(State.RUNNING, owned=True) if state is State.PENDING else None
    if event is Event.CLEANUP_CLAIM:
        return Outcome(State.DELETING, owned=True) if state is State.DELETING else None
    if event is Event.CLEANUP_FINISHED:
        return REMOVED if state is State.DELETING else None
    if event is Event.CLEANUP_FAILED:
        if state is not State.DELETING:
            return None
        return Outcome(State.DELETING, retry=True) if can_retry else Outcome(State.FAILED)

    if state is State.DELETING and event is Event.REJECTED:
        return Outcome(State.FAILED)  # its cleanup handler cannot take the context either
    if state is State.DELETING and event is Event.NODE_LOST:
        # The cleanup's node was lost (or gave the cleanup back): any node may take it again,
        # unless its attempts are used up — a cleanup that crashes its process ends FAILED.
        return Outcome(State.DELETING) if can_retry else Outcome(State.FAILED)
    if state not in ACTIVE_STATES:
        return None
    if state is State.CANCELING and requested is StopRequest.DELETE:
        return _deleted(has_cleanup)  # the user's delete wins: its cleanup handler still runs
    if event is Event.DISCARD:
        return REMOVED
    if state is State.CANCELING:
        # CANCELING(pause): the task ended its own way before it could pause, or stopped.
        if event is Event.FINISHED:
            return Outcome(State.FINISHED)
        if event in (Event.FAILED, Event.REJECTED):
            return Outcome(State.FAILED)
        return Outcome(State.PAUSED)

    # RUNNING
    if event is Event.FINISHED:
        return Outcome(State.FINISHED)
    if event is Event.STOPPED:
        return Outcome(State.PENDING)  # hand-off: claimable at once by any node
    if event is Event.REJECTED:
        return Outcome(State.FAILED)  # no retry: the context would not decode the next time
    # FAILED and NODE_LOST
    if can_retry:
        return Outcome(State.PENDING, retry=event is Event.FAILED)
    return Outcome(State.FAILED)


def release_event(state: State, *, graceful: bool) -> Event:
    """The event for a task whose node lets it go without an execution reporting its end: a
    graceful stop (or a claim never run) stopped the generator of a running task (STOPPED);
    otherwise the node is lost to it (NODE_LOST, which also gives back a cleanup)."""
    return Event.STOPPED if graceful and state in ACTIVE_STATES else Event.NODE_LOST


@dataclass(frozen=True, slots=True)
class GiveBack:
    """How a task its node gave back returns to the queue."""

    handoff: bool
    """Claimed before every other due task: it was handed back by a graceful stop."""
    refund: bool
    """The attempt it was claimed for is given back, so that pauses, graceful restarts and
    claims never run do not use up a task's retries."""


def give_back(state: State, event: Event, outcome: Outcome, *, graceful: bool) -> GiveBack:
    """The hand-off and refund rule for a task in ``state`` that ``event`` moved to ``outcome``.

    A stopped generator whose task goes back to PENDING is a hand-off, and its attempt is
    refunded, as is that of a task stopped to be PAUSED. A cleanup given back gracefully (not
    lost with its node) is refunded too. A reset count (``reset_attempts``) has nothing to give
    back, whatever this says."""
    stopped = event is Event.STOPPED
    return GiveBack(
        handoff=stopped and outcome.state is State.PENDING,
        refund=(stopped and outcome.state in (State.PENDING, State.PAUSED))
        or (graceful and state is State.DELETING),
    )
