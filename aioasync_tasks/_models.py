"""The public value types: task states and operations, and snapshots of tasks, groups and
nodes as the database stores them. This module imports nothing else of the package, so that
every other module can use them."""

import enum
from dataclasses import dataclass
from datetime import datetime


class State(enum.StrEnum):
    """The visible state of a task. Every task is in exactly one."""

    INIT = "init"
    """Created with ``auto_run=False``. Left by the user: run, pause, delete."""
    PENDING = "pending"
    """Waiting to be claimed. Entered by run, retry, hand-off on shutdown, node lost.
    Left by a node's claim (→ RUNNING) or the user (pause, delete)."""
    RUNNING = "running"
    """Owned and executed by one node. Left by the task's own end (finished, failed, stopped),
    by the user (pause, delete → CANCELING) or by the rescue of a dead owner."""
    CANCELING = "canceling"
    """Running, with a pending stop request (``requested`` is pause or delete). Left when the
    owner's generator ends, or when the owner is found dead."""
    PAUSED = "paused"
    """Stopped by the user, keeps its context. Left by the user: run (→ PENDING) or delete."""
    FINISHED = "finished"
    """Completed. Left only by delete."""
    FAILED = "failed"
    """Failed for good (attempts used up, or its cleanup failed). Left by run (→ PENDING, a fresh
    series of attempts) or delete."""
    DELETING = "deleting"
    """Deleted by the user; its cleanup handler is queued or running on some node. Left when the
    cleanup finishes (row removed) or fails for good (→ FAILED)."""


class StopRequest(enum.StrEnum):
    """Why a CANCELING task was asked to stop."""

    PAUSE = "pause"
    DELETE = "delete"


class Operation(enum.StrEnum):
    """A user operation on one task."""

    RUN = "run"
    PAUSE = "pause"
    DELETE = "delete"
    CHANGE_GROUP = "change group of"


@dataclass(frozen=True, slots=True)
class Task:
    """A snapshot of a task as stored, taken when it was read; it does not change afterwards."""

    id: int
    type: str
    user: str
    group: str
    state: State
    requested: StopRequest | None
    """The pending stop reason while the task is CANCELING, else None."""
    context: str
    priority: int
    attempts: int
    max_attempts: int
    error: str | None
    """The last error text (type, message and traceback for an exception)."""
    node: int | None
    """The id of the node that owns the task while it runs (or runs its cleanup)."""
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    done_at: datetime | None
    run_at: datetime
    unique_key: str | None = None
    """The key that makes the task unique among the live tasks of its type, or None
    (``create_task(unique_key=…)``)."""
    progress: float | None = None
    """What the task last reported, from 0 to 1 (``Report(progress=…)``), or None."""
    message: str | None = None
    """The message the task last reported with its progress (``Report(message=…)``), or None."""


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What ``current_task()`` tells code running inside a task, for logging."""

    id: int
    type: str
    user: str
    group: str
    attempt: int
    node: int


@dataclass(frozen=True, slots=True)
class Group:
    """A group's settings as stored (``Node.get_groups()``); a group without a row has the
    defaults: not paused, no limits."""

    name: str
    paused: bool
    max_running: int | None
    max_running_per_user: int | None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node as registered (``Node.get_nodes()``), each with its own liveness settings."""

    id: int
    name: str
    concurrency: int
    types: tuple[str, ...]
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_interval: float
    node_timeout: float


@dataclass(frozen=True, slots=True)
class Schedule:
    """A periodic task as stored (``Node.get_schedules()``): each tick of its period enqueues
    one task of ``type`` with the schedule's context and options, due at the tick."""

    name: str
    type: str
    cron: str | None
    """The cron expression (5 fields, or 6 with seconds first), or None for ``every``."""
    every: float | None
    """The interval in seconds, or None for ``cron``."""
    timezone: str
    """The time zone of the cron expression (``UTC`` for ``every``)."""
    context: str
    user: str
    group: str
    priority: int
    max_attempts: int | None
    """None: the task type's."""
    declared: bool
    """Declared with a task type (``cron=``/``every=`` of the registry), not by ``schedule()``."""
    next_tick: datetime
    """When the schedule is due next."""
    last_tick: datetime | None
    """The tick of the last task enqueued."""
    last_task: int | None
    """The id of the last task enqueued."""
    created_at: datetime
    updated_at: datetime
