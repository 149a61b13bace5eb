"""``Task``: a read-only snapshot of one task row, and ``current_task()`` for code inside a task."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._states import State, StopRequest

if TYPE_CHECKING:
    from ._node import Node


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


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What ``current_task()`` tells code running inside a task, for logging."""

    id: int
    type: str
    user: str
    group: str
    attempt: int
    node: int


_current: contextvars.ContextVar[TaskInfo | None] = contextvars.ContextVar(
    "aioasync_tasks_current_task", default=None
)


def current_task() -> TaskInfo | None:
    """The task whose generator (or cleanup handler) is running in this context, else None."""
    return _current.get()


_current_node: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "aioasync_tasks_current_node", default=None
)


def current_node() -> Node | None:
    """The ``Node`` running the current task (to create or control other tasks), else None."""
    node: Node | None = _current_node.get()
    return node
