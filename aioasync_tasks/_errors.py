"""The exceptions of aioasync_tasks.

Every error the library raises on purpose derives from one root::

    AsyncTasksError
    ├── TaskNotFound(task_id)
    ├── InvalidTransition(task_id, state, operation)
    ├── UnknownTaskType(type)
    ├── DuplicateTaskType(type)
    ├── DuplicateTask(type, unique_key, task_id, state)
    ├── ConfigurationError          (also a ValueError: bad arguments and options)
    │   └── ContextError            (a context that does not fit its task type's context_type)
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
    """The task type is not registered in this node's registry (nor, to create a task, stored
    by a worker that runs it)."""

    def __init__(self, type: str, message: str | None = None) -> None:
        super().__init__(message or f"unknown task type {type!r}: register it first")
        self.type = type


class DuplicateTaskType(AsyncTasksError):
    """A task type name was registered twice in one registry."""

    def __init__(self, type: str) -> None:
        super().__init__(f"task type {type!r} is already registered")
        self.type = type


class DuplicateTask(AsyncTasksError):
    """A live task of the same type already holds this ``unique_key`` (docs/how-to.md,
    "Create unique tasks"): raised by ``create_task(..., on_conflict="error")``, by
    ``on_conflict="replace"`` when that task is running, and by ``run_task`` on a FAILED task
    whose key another task took meanwhile.

    ``task_id`` and ``state`` are the live task's, when known (None when it took the key in a
    race the database settled).
    """

    def __init__(
        self, type: str, unique_key: str, task_id: int | None, state: State | None = None
    ) -> None:
        holder = "another live task" if task_id is None else f"task {task_id}"
        if state is not None:
            holder += f" ({state.value})"
        super().__init__(f"a live {type!r} task has unique_key {unique_key!r} already: {holder}")
        self.type = type
        self.unique_key = unique_key
        self.task_id = task_id
        self.state = state


class ConfigurationError(AsyncTasksError, ValueError):
    """A bad argument or option; raised before any database I/O."""


class ContextError(ConfigurationError):
    """A context does not fit its task type's declared ``context_type``: a value of another
    type given to ``create_task`` or yielded in a ``Report``, a value that cannot be encoded as
    JSON, or a stored context that does not decode. Attributes ``task_type`` (the type's name)
    and ``context_type`` (the declared class)."""

    def __init__(self, message: str, *, task_type: str, context_type: type) -> None:
        super().__init__(message)
        self.task_type = task_type
        self.context_type = context_type


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
