"""The public API is exactly the documented one (STYLE 1: a facade with an explicit ``__all__``).

Adding or removing a public name is a decision: it changes this list, the reference docs and the
changelog together.
"""

from __future__ import annotations

import inspect
import types
import typing

import pytest

import aioasync_tasks
from aioasync_tasks import (
    AsyncTasksError,
    ConfigurationError,
    ContextError,
    DatabaseError,
    DuplicateTask,
    DuplicateTaskType,
    InvalidTransition,
    NodeNotStarted,
    NodeStopped,
    Operation,
    SchemaError,
    State,
    TaskNotFound,
    UnknownTaskType,
    WaitTimeout,
)

PUBLIC_API = [
    "MAX_PAGE_SIZE",
    "AsyncTasksError",
    "Attempt",
    "AttemptOutcome",
    "ConfigurationError",
    "ContextError",
    "DatabaseError",
    "DuplicateTask",
    "DuplicateTaskType",
    "FairShare",
    "Fifo",
    "Group",
    "InvalidTransition",
    "Node",
    "NodeInfo",
    "NodeNotStarted",
    "NodeStopped",
    "Observer",
    "Operation",
    "Phase",
    "Report",
    "Schedule",
    "SchedulingPolicy",
    "SchemaError",
    "State",
    "StopRequest",
    "Task",
    "TaskInfo",
    "TaskNotFound",
    "TaskRegistry",
    "TaskType",
    "UnknownTaskType",
    "WaitTimeout",
    "current_node",
    "current_task",
    "metadata",
]

EXCEPTIONS = {
    # name: the documented parents besides AsyncTasksError
    "AsyncTasksError": (Exception,),
    "TaskNotFound": (LookupError,),
    "InvalidTransition": (),
    "UnknownTaskType": (LookupError,),
    "DuplicateTaskType": (),
    "DuplicateTask": (),
    "ConfigurationError": (ValueError,),
    "ContextError": (ConfigurationError, ValueError),
    "NodeNotStarted": (),
    "NodeStopped": (),
    "SchemaError": (),
    "DatabaseError": (),
    "WaitTimeout": (TimeoutError,),
}


def test_all_is_exactly_the_documented_api() -> None:
    assert aioasync_tasks.__all__ == PUBLIC_API
    assert len(set(PUBLIC_API)) == len(PUBLIC_API)


def test_every_public_name_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec("from aioasync_tasks import *", namespace)  # the star import itself
    del namespace["__builtins__"]
    assert sorted(namespace) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(aioasync_tasks, name) is namespace[name]


def test_no_public_name_is_left_out_of_all() -> None:
    """Everything the package exposes without an underscore is in ``__all__`` (submodules are
    private: they all start with an underscore)."""
    exposed = {
        name
        for name, value in vars(aioasync_tasks).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exposed == set(PUBLIC_API)


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_every_exception_derives_from_the_root(name: str) -> None:
    error = getattr(aioasync_tasks, name)
    assert name in PUBLIC_API
    assert inspect.isclass(error)
    assert issubclass(error, AsyncTasksError)
    for parent in EXCEPTIONS[name]:
        assert issubclass(error, parent)
    assert error.__module__.startswith("aioasync_tasks")


def test_every_public_exception_is_listed() -> None:
    errors = {
        name
        for name in PUBLIC_API
        if inspect.isclass(getattr(aioasync_tasks, name))
        and issubclass(getattr(aioasync_tasks, name), BaseException)
    }
    assert errors == set(EXCEPTIONS)


def test_exceptions_carry_their_fields() -> None:
    not_found = TaskNotFound(7)
    assert not_found.task_id == 7
    assert "7" in str(not_found)

    invalid = InvalidTransition(8, State.FINISHED, Operation.PAUSE)
    assert (invalid.task_id, invalid.state, invalid.operation) == (
        8,
        State.FINISHED,
        Operation.PAUSE,
    )
    assert "finished" in str(invalid)
    assert "pause" in str(invalid)

    timeout = WaitTimeout(9, 2.5)
    assert (timeout.task_id, timeout.timeout) == (9, 2.5)
    assert isinstance(timeout, TimeoutError)
    assert "9" in str(timeout)

    assert UnknownTaskType("x").type == "x"
    assert DuplicateTaskType("y").type == "y"
    duplicate = DuplicateTask("report", "user:42", 9, State.RUNNING)
    assert (duplicate.type, duplicate.unique_key, duplicate.task_id, duplicate.state) == (
        "report",
        "user:42",
        9,
        State.RUNNING,
    )
    assert str(duplicate) == (
        "a live 'report' task has unique_key 'user:42' already: task 9 (running)"
    )
    assert DuplicateTask("report", "k", None).task_id is None
    for error in (ConfigurationError, NodeNotStarted, NodeStopped, SchemaError, DatabaseError):
        assert isinstance(error("message"), AsyncTasksError)
    context = ContextError("message", task_type="ship", context_type=dict)
    assert (context.task_type, context.context_type) == ("ship", dict)


def test_public_classes_report_the_public_module() -> None:
    """``aioasync_tasks.Group``, not ``aioasync_tasks._models.Group``, in reprs and docs; and
    every public class is documented."""
    classes = [getattr(aioasync_tasks, n) for n in PUBLIC_API]
    for cls in [c for c in classes if inspect.isclass(c)]:
        assert cls.__module__ == "aioasync_tasks", cls
        doc = cls.__doc__ or ""
        # (a dataclass without a docstring gets its signature as one)
        assert doc, f"{cls.__name__} has no docstring"
        assert not doc.startswith(f"{cls.__name__}("), f"{cls.__name__} has no docstring"


@pytest.mark.parametrize(
    "model",
    [aioasync_tasks.Task, aioasync_tasks.TaskInfo, aioasync_tasks.Group, aioasync_tasks.NodeInfo],
)
def test_the_public_models_type_hints_resolve(model: type) -> None:
    """Frameworks read the public models' annotations (FastAPI returns a ``Task`` as it is):
    they must resolve in the module the models report, ``aioasync_tasks``."""
    hints = typing.get_type_hints(model)
    assert hints
