"""``current_task()`` and ``current_node()``: what code running inside a task can ask."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from ._models import TaskInfo

if TYPE_CHECKING:
    from ._node import Node


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
