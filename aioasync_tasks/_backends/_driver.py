"""The driver protocol: the queue operations the engine asks of a database, and the values
they take and return. ``SqlDriver`` implements it for PostgreSQL, SQLite and MySQL/MariaDB; a
new database is added by implementing it (CONTRIBUTING.md, "Adding a database").

Every operation is one short transaction of its own (or of the caller's, for
``insert_many(connection=…)``), safe to cancel (``_transaction.cancel_safe``), and raises
``DatabaseError`` for a failure of the database. Writes that belong to an execution carry its
claim token and change nothing when the token is stale (docs/explanation.md, "Claim tokens").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from .._models import Group, NodeInfo, Operation, Schedule, State, StopRequest, Task
from .._periodic import Period
from .._states import Event, Outcome
from .._validation import OnConflict

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .._scheduling import SchedulingPolicy
    from ._transaction import InFlight


@dataclass(slots=True)
class NewTask:
    """A task to insert, every value checked; nothing changes one once it is made. Not
    frozen: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    which a batch create pays per task (benchmarks/README.md, "Batch creates in one
    statement")."""

    type: str
    context: str
    user: str
    group: str
    priority: int
    max_attempts: int
    has_cleanup: bool
    state: State
    run_at: datetime | None
    unique_key: str | None = None
    """At most one live task of the type holds it (docs/design.md §4.4)."""
    on_conflict: OnConflict = "error"
    """What ``insert_many`` does when a live task holds ``unique_key`` already: raise
    ``DuplicateTask`` (error), give that task's id (skip), or rewrite that task with this one's
    values and give its id (replace; ``DuplicateTask`` when it is running)."""
    trace_parent: str | None = None
    """The W3C traceparent of the span that created the task (an observer's
    ``trace_parent``), for the spans of its attempts to link to."""


@dataclass(frozen=True, slots=True)
class TaskFilter:
    user: str | None = None
    group: str | None = None
    types: tuple[str, ...] | None = None
    states: tuple[State, ...] | None = None
    offset: int = 0
    limit: int = 100


Queue = tuple[str, str]
"""A (group, user) queue of tasks."""


@dataclass(frozen=True, slots=True)
class ClaimCursor:
    """Where a node's claims are in their walk of the (group, user) queues: each claim looks
    at a window of them, the next one goes on from there (docs/design.md §6.3)."""

    group: str = ""
    """The walk starts with the first open group after this one ("": the first group)."""
    users: Mapping[str, str] = field(default_factory=dict)
    """Per group: its queues are walked from the first user after this one."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task a node has just claimed (to run it, or to run its cleanup)."""

    id: int
    type: str
    user: str
    group: str
    context: str
    attempts: int
    max_attempts: int
    token: int
    """The claim's token: every later write of this execution must carry it."""
    waited: float = 0.0
    """Seconds from when the task was due (``run_at``) to the claim, on the database clock."""
    trace_parent: str | None = None
    """The traceparent stored when the task was created (``NewTask.trace_parent``)."""


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: list[Claimed]
    next_due: float | None
    """Seconds until the next delayed task of the claimed types is due (None: none, or the
    claim was full and the claimer will look again anyway)."""
    cursor: ClaimCursor = ClaimCursor()
    """Where the next claim's walk of the queues starts (docs/design.md §6.3)."""
    more: bool = False
    """The claim's window of queues was full: there may be queues it did not look at."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of one execution, reported by its runner."""

    task_id: int
    token: int
    event: Event
    context: str | None = None
    error: str | None = None
    delay: float = 0.0
    """Back-off in seconds, used when the outcome is a retry."""
    progress: float | None = None
    message: str | None = None
    """The progress and message of the final report (None: keep the stored ones)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What to store for the execution that holds ``token``: a context, a progress, a message
    (each None: keep the stored one), in one write (docs/design.md §2.6)."""

    token: int
    context: str | None
    progress: float | None = None
    message: str | None = None

    def then(self, newer: Checkpoint) -> Checkpoint:
        """This checkpoint followed by ``newer``, as one write: what ``newer`` leaves out is
        kept from this one if both are of the same execution (the same token)."""
        if newer.token != self.token:
            return newer
        return Checkpoint(
            newer.token,
            self.context if newer.context is None else newer.context,
            self.progress if newer.progress is None else newer.progress,
            self.message if newer.message is None else newer.message,
        )


@dataclass(frozen=True, slots=True)
class OperationResult:
    outcome: Outcome
    owner: int | None
    """The node that ran the task before the operation (to be told to stop)."""


@dataclass(frozen=True, slots=True)
class Owned:
    """A task row as its owner sees it at a heartbeat."""

    id: int
    state: State
    requested: StopRequest | None
    token: int


# -- the parameters of the operations: one frozen dataclass per operation (an operation on one
# id takes the id itself)


@dataclass(frozen=True, slots=True)
class InsertParams:
    tasks: Sequence[NewTask]
    connection: AsyncConnection | None = None
    """The application's connection: the tasks are inserted in its transaction."""


@dataclass(frozen=True, slots=True)
class OperateParams:
    task_id: int
    operation: Operation
    force: bool = False
    group: str | None = None
    """The group to move the task to (``Operation.CHANGE_GROUP``)."""


@dataclass(frozen=True, slots=True)
class ClaimParams:
    node_id: int
    types: Sequence[str]
    limit: int
    policy: SchedulingPolicy
    groups: Sequence[str] | None = None
    """Only these groups (the node's ``groups=`` option); None: every group."""
    busy: Sequence[int] = ()
    """Tasks the node still runs an execution of: never claimed again meanwhile."""
    after: ClaimCursor = ClaimCursor()
    """Where the claim's walk of the queues starts: the previous claim's
    ``ClaimResult.cursor``."""


@dataclass(frozen=True, slots=True)
class CleanupClaimParams:
    node_id: int
    types: Sequence[str]
    """The types whose cleanup handler the node has."""
    limit: int
    busy: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class CheckpointParams:
    node_id: int
    checkpoints: Mapping[int, Checkpoint]
    """Task id → the context to store for the execution holding the checkpoint's token."""


@dataclass(frozen=True, slots=True)
class CompleteParams:
    node_id: int
    completions: Sequence[Completion]
    cleanup_attempts: int


@dataclass(frozen=True, slots=True)
class ReleaseClaimsParams:
    node_id: int
    claims: Mapping[int, int]
    """Task id → the token of the claim the node gives back."""


@dataclass(frozen=True, slots=True)
class RegisterParams:
    name: str
    concurrency: int
    types: Sequence[str]
    heartbeat_interval: float
    node_timeout: float
    """The node's own lease: others declare it dead by this, never by their own."""


@dataclass(frozen=True, slots=True)
class DeregisterParams:
    node_id: int
    cleanup_attempts: int


@dataclass(frozen=True, slots=True)
class RescueParams:
    node_id: int
    """The rescuer, which never rescues itself."""
    cleanup_attempts: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_running: int | None
    max_running_per_user: int | None


@dataclass(frozen=True, slots=True)
class SetGroupParams:
    name: str
    paused: bool | None = None
    """None: unchanged."""
    limits: Limits | None = None
    """None: unchanged."""


@dataclass(frozen=True, slots=True)
class PauseGroupParams:
    group: str
    stop_running: bool
    """Also pause every task of the group that runs now, in the same transaction."""


@dataclass(frozen=True, slots=True)
class PruneParams:
    """One round of retention (docs/design.md §4.5): remove FINISHED tasks that ended more
    than ``finished_after`` seconds ago and FAILED ones more than ``failed_after`` seconds ago
    (database clock; None: keep them), at most ``limit`` of each."""

    finished_after: float | None
    failed_after: float | None
    limit: int = 1000


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: int
    more: bool
    """A state had ``limit`` rows to remove: there may be more."""
    busy: bool = False
    """Another node prunes now: this round removed nothing and should not go on."""


@dataclass(frozen=True, slots=True)
class DeleteParams:
    """One batch of a bulk delete (docs/design.md §4.5): the delete operation applied to the
    tasks that match ``filter`` (its paging ignored) and have not changed for ``older_than``
    seconds (database clock), ``limit`` of them with ids above ``after``, in id order."""

    filter: TaskFilter
    older_than: float | None = None
    force: bool = False
    after: int = 0
    limit: int = 500


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    """Tasks the delete changed: removed, DELETING, or CANCELING (delete) and told to stop."""
    stopped: list[tuple[int, int]]
    """(task id, owner node) of the running tasks told to stop."""
    after: int | None
    """The ``after`` of the next batch; None when this batch was the last."""


@dataclass(frozen=True, slots=True)
class StoredTaskType:
    """A task type's options as its workers stored them (docs/design.md §4.6)."""

    name: str
    max_attempts: int
    has_cleanup: bool
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RegisterTypesParams:
    """The task types a worker runs, stored for the nodes that have not imported them."""

    types: tuple[StoredTaskType, ...]


@dataclass(frozen=True, slots=True)
class TaskTypesQuery:
    """The stored task types of these names (None: all)."""

    names: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class PutScheduleParams:
    """``put_schedule``: create the schedule ``name``, or replace it."""

    name: str
    type: str
    period: Period
    context: str
    user: str
    group: str
    priority: int
    max_attempts: int | None
    """None: the task type's, taken by the node that enqueues a tick."""
    declared: bool
    next_tick: datetime
    """The first tick, for a new schedule or a changed period; otherwise the stored next tick
    is kept (a node declaring its types' schedules at start moves nothing)."""


@dataclass(frozen=True, slots=True)
class UnscheduleParams:
    """``delete_schedule``: remove the schedule ``name``."""

    name: str


@dataclass(frozen=True, slots=True)
class ScheduledType:
    """A task type whose schedules a node enqueues, with what a new task of it needs."""

    name: str
    max_attempts: int
    has_cleanup: bool


@dataclass(frozen=True, slots=True)
class TickParams:
    """``tick``: enqueue one task for each due schedule of ``types``."""

    types: tuple[ScheduledType, ...]
    limit: int = 100
    """The most schedules enqueued in one transaction; the rest stay due for the next."""


@dataclass(frozen=True, slots=True)
class Fired:
    """A tick enqueued: its schedule, its time and its task."""

    schedule: str
    tick: datetime
    task_id: int
    skipped: bool
    """Earlier ticks were due and are skipped: only the latest missed tick is enqueued."""


@dataclass(frozen=True, slots=True)
class TickResult:
    fired: list[Fired]
    broken: list[tuple[str, str]]
    """Schedules whose period this node cannot compute (name, why), postponed by an hour."""
    next_due: float | None
    """Seconds until the next tick of the schedules of the types (None: there are none); 0
    when a schedule is still due (another node holds it, or the limit was reached)."""


@dataclass(frozen=True, slots=True)
class WatchParams:
    """``watch_tasks``: someone waits for or watches the tasks ``ids`` for ``seconds`` at
    least (marks renewed while they do)."""

    ids: tuple[int, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class ListenParams:
    """``listen_tasks``: where the task events go while listening."""

    on_message: Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StatsParams:
    """``queue_stats``: the windows, in seconds back from the database clock, of the counts of
    tasks that ended (FINISHED or FAILED)."""

    windows: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class EndedCount:
    """The tasks that ended within ``window`` seconds of the database clock."""

    window: float
    finished: int
    failed: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The queue as one read sees it (the dashboard's overview and ``/metrics``)."""

    now: datetime
    """The database clock when read."""
    counts: dict[tuple[str, State], int]
    """(group, state) → tasks; pairs without tasks are left out."""
    running: dict[int, int]
    """Node id → tasks it runs (RUNNING or CANCELING); nodes without any left out."""
    ended: list[EndedCount]
    """One per window, in the order of ``StatsParams.windows``."""


TASK_DONE = "done"
"""A task event: the tasks became FINISHED or FAILED, or were removed."""
TASK_PROGRESS = "progress"
"""A task event: a checkpoint of the tasks, or another change of state, was committed."""
MAX_PAYLOAD = 7900
"""Bytes of a notification's payload at most (PostgreSQL refuses 8000 and more)."""


def task_events(kind: str, ids: Sequence[int]) -> list[str]:
    """The payloads telling watchers that ``ids`` had an event of ``kind``:
    ``kind:id,id,…``, as many as it takes to keep each under ``MAX_PAYLOAD``."""
    payloads: list[str] = []
    current = ""
    for task_id in ids:
        item = str(task_id)
        if current and len(current) + 1 + len(item) > MAX_PAYLOAD:
            payloads.append(current)
            current = ""
        current = f"{current},{item}" if current else f"{kind}:{item}"
    if current:
        payloads.append(current)
    return payloads


def parse_task_event(payload: str) -> tuple[str, list[int]]:
    """``(kind, ids)`` of a payload made by ``task_events``; ``("", [])`` for anything else."""
    kind, _, ids = payload.partition(":")
    try:
        return kind, [int(i) for i in ids.split(",")]
    except ValueError:
        return "", []


class Driver(Protocol):
    """What the engine (``Node``, its services, committer and runners) asks of a database.

    Each operation takes one frozen parameter dataclass (an operation on one id takes the id)
    and returns typed values."""

    supports_notify: bool
    """Whether ``listen`` works: notifications wake nodes at once (PostgreSQL); without them
    nodes poll (SQLite)."""
    in_flight: InFlight
    """The operations still running; ``Node.stop`` closes it before disposing of the engine."""

    def bound_idle_transactions(self, seconds: float) -> None:
        """Have the server end a write transaction of ours left idle for ``seconds`` (its node
        was cut off in the middle of it), so that its row locks never keep a rescuer out."""

    def listen(
        self, on_message: Callable[[str], None]
    ) -> AbstractAsyncContextManager[asyncio.Event]:
        """Deliver notifications (``wake``, ``stop:<node id>``) to ``on_message`` while inside;
        the event yielded is set when the listening connection is lost."""

    # -- schema
    async def schema_version(self) -> int | None: ...
    async def migrate(self) -> list[int]: ...
    async def check_schema(self) -> None: ...

    # -- tasks, for users
    async def insert_many(self, params: InsertParams) -> list[int]: ...
    async def get_task(self, task_id: int) -> Task: ...
    async def get_tasks(self, f: TaskFilter) -> list[Task]: ...
    async def count_tasks(self, f: TaskFilter) -> int: ...
    async def operate(self, params: OperateParams) -> OperationResult: ...

    # -- tasks, for nodes
    async def claim(self, params: ClaimParams) -> ClaimResult: ...
    async def claim_cleanups(self, params: CleanupClaimParams) -> list[Claimed]: ...
    async def checkpoint(self, params: CheckpointParams) -> set[int]: ...
    async def complete(self, params: CompleteParams) -> set[int]: ...
    async def release_claims(self, params: ReleaseClaimsParams) -> int: ...

    # -- nodes
    async def register_node(self, params: RegisterParams) -> int: ...
    async def heartbeat(self, node_id: int) -> list[Owned] | None: ...
    async def owned(self, node_id: int) -> list[Owned]: ...
    async def deregister(self, params: DeregisterParams) -> None: ...
    async def rescue(self, params: RescueParams) -> int: ...
    async def get_nodes(self) -> list[NodeInfo]: ...

    # -- groups
    async def set_group(self, params: SetGroupParams) -> Group: ...
    async def get_groups(self) -> list[Group]: ...
    async def pause_group(self, params: PauseGroupParams) -> list[tuple[int, int]]: ...

    # -- retention, bulk deletes, task types (each takes one parameter object)
    async def prune(self, params: PruneParams) -> PruneResult: ...
    async def delete_matching(self, params: DeleteParams) -> DeleteResult: ...
    async def register_task_types(self, params: RegisterTypesParams) -> None: ...
    async def get_task_types(self, params: TaskTypesQuery) -> list[StoredTaskType]: ...

    # -- periodic tasks (docs/design.md §17)
    async def put_schedule(self, params: PutScheduleParams) -> Schedule: ...
    async def delete_schedule(self, params: UnscheduleParams) -> bool:
        """Whether there was such a schedule."""

    async def get_schedules(self) -> list[Schedule]: ...
    async def tick(self, params: TickParams) -> TickResult:
        """In one transaction, for each due schedule of the types: its tick's task inserted
        and its next tick advanced by compare-and-set, so each tick is enqueued once however
        many nodes tick at once."""

    # -- waiting and watching (docs/design.md §18)
    async def watch_tasks(self, params: WatchParams) -> None:
        """Where ``supports_notify``: mark the tasks watched, so that until the mark runs out
        their writes send task events (``listen_tasks``); elsewhere nothing (watchers poll)."""

    def listen_tasks(self, params: ListenParams) -> AbstractAsyncContextManager[asyncio.Event]:
        """Where ``supports_notify``: deliver task events (``task_events`` payloads) while
        inside; the event yielded is set when the listening connection is lost."""

    # -- statistics
    async def queue_stats(self, params: StatsParams) -> QueueStats:
        """Counts by group and state, running tasks by node and recent ends, in one read
        transaction, with the database clock they are measured on."""
