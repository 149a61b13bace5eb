"""aioasync_tasks: durable, decentralised, stateful background tasks for asyncio.

Tasks are async generators that yield ``Report`` checkpoints; every process that starts a
``Node`` is an equal peer, and PostgreSQL (or SQLite) is the only coordinator.
"""

from ._backends._base import Group, NodeInfo
from ._errors import (
    AsyncTasksError,
    ConfigurationError,
    DatabaseError,
    DuplicateTaskType,
    InvalidTransition,
    NodeNotStarted,
    NodeStopped,
    SchemaError,
    TaskNotFound,
    UnknownTaskType,
)
from ._node import MAX_PAGE_SIZE, Node
from ._registry import TaskRegistry, TaskType
from ._report import Phase, Report
from ._scheduling import FairShare, Fifo, SchedulingPolicy
from ._schema import metadata
from ._states import Operation, State, StopRequest
from ._task import Task, TaskInfo, current_node, current_task

__all__ = [
    "MAX_PAGE_SIZE",
    "AsyncTasksError",
    "ConfigurationError",
    "DatabaseError",
    "DuplicateTaskType",
    "FairShare",
    "Fifo",
    "Group",
    "InvalidTransition",
    "Node",
    "NodeInfo",
    "NodeNotStarted",
    "NodeStopped",
    "Operation",
    "Phase",
    "Report",
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
    "current_node",
    "current_task",
    "metadata",
]
