"""The exceptions of aioasync_tasks.

Every error the library raises on purpose derives from one root::

    AsyncTasksError
    ├── TaskNotFound(task_id)
    ├── InvalidTransition(task_id, state, operation)
    ├── UnknownTaskType(type)
    ├── DuplicateTaskType(type)
    ├── ConfigurationError          (also a ValueError: bad arguments and options)
    ├── NodeNotStarted
    ├── NodeStopped
    ├── SchemaError                 (schema missing, or newer than this library)
    ├── DatabaseError               (a driver error, wrapped; the original is __cause__)
    └── WaitTimeout                 (also a TimeoutError: wait_task gave up)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import Operation, State


class AsyncTasksError(Exception):
    """Root of every error raised by aioasync_tasks."""


class TaskNotFound(AsyncTasksError, LookupError):
    """No task with this id exists (it may have been deleted)."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} not found")
        self.task_id = task_id


class InvalidTransition(AsyncTasksError):
    """The operation is not allowed from the task's current state (docs/explanation.md)."""

    def __init__(self, task_id: int | None, state: State, operation: Operation) -> None:
        target = f"task {task_id}" if task_id is not None else "task"
        super().__init__(f"cannot {operation.value} {target}: it is {state.value}")
        self.task_id = task_id
        self.state = state
        self.operation = operation


class UnknownTaskType(AsyncTasksError, LookupError):
    """The task type is not registered in this node's registry."""

    def __init__(self, type: str) -> None:
        super().__init__(f"unknown task type {type!r}: register it first")
        self.type = type


class DuplicateTaskType(AsyncTasksError):
    """A task type name was registered twice in one registry."""

    def __init__(self, type: str) -> None:
        super().__init__(f"task type {type!r} is already registered")
        self.type = type


class ConfigurationError(AsyncTasksError, ValueError):
    """A bad argument or option; raised before any database I/O."""


class NodeNotStarted(AsyncTasksError):
    """The operation needs a started node: call ``await node.start()`` first."""


class NodeStopped(AsyncTasksError):
    """The node was stopped; a stopped node cannot be used again."""


class SchemaError(AsyncTasksError):
    """The database schema is missing, or newer than this library."""


class DatabaseError(AsyncTasksError):
    """The database driver failed; the original exception is ``__cause__``.

    ``transient`` tells whether the failure was one of connectivity or load (connection lost,
    server shutting down, pool exhausted, lock timeout, deadlock) that a retry may cure, as
    opposed to one of the data (a value the database refuses), which no retry will.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class WaitTimeout(AsyncTasksError, TimeoutError):
    """``Node.wait_task`` gave up: the task did not end within ``timeout`` seconds. Also a
    ``TimeoutError`` (which ``asyncio.TimeoutError`` is)."""

    def __init__(self, task_id: int, timeout: float) -> None:
        super().__init__(f"task {task_id} did not end within {timeout:g} s")
        self.task_id = task_id
        self.timeout = timeout
