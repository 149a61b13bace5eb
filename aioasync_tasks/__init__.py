"""aioasync_tasks: durable, decentralised, stateful background tasks for asyncio.

Tasks are async generators that yield ``Report`` checkpoints; every process that starts a
``Node`` is an equal peer, and the database (PostgreSQL, SQLite, MySQL or MariaDB) is the only
coordinator.
"""

from ._errors import (
    AsyncTasksError,
    ConfigurationError,
    ContextError,
    DatabaseError,
    DuplicateTask,
    DuplicateTaskType,
    InvalidTransition,
    NodeNotStarted,
    NodeStopped,
    SchemaError,
    TaskNotFound,
    UnknownTaskType,
    WaitTimeout,
)
from ._models import Group, NodeInfo, Operation, Schedule, State, StopRequest, Task, TaskInfo
from ._node import MAX_PAGE_SIZE, Node
from ._registry import TaskRegistry, TaskType
from ._report import Phase, Report
from ._scheduling import FairShare, Fifo, SchedulingPolicy
from ._schema import metadata
from ._task import current_node, current_task
from ._telemetry import Attempt, AttemptOutcome, Observer

__all__ = [
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

for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type):
        # Reported as ``aioasync_tasks.Task`` in reprs, tracebacks and docs, not by the private
        # module that defines it.
        _value.__module__ = __name__
del _name, _value
