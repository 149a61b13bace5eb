"""Rows read back from the database, mapped to the library's values by column name (the
statements of each ``queries.sql`` select the columns these read), one function per kind of
row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._models import Group, NodeInfo, Schedule, State, StopRequest, Task
from .._schema import time_from_db
from ._driver import Claimed, Owned, StoredTaskType

TASK_FIELDS = (
    "id",
    "type",
    "user_name",
    "group_name",
    "state",
    "requested",
    "context",
    "priority",
    "attempts",
    "max_attempts",
    "error",
    "node_id",
    "created_at",
    "updated_at",
    "started_at",
    "done_at",
    "run_at",
    "unique_key",
    "progress",
    "message",
)
"""The columns ``task`` reads."""


def task(row: Any) -> Task:
    return Task(
        id=row.id,
        type=row.type,
        user=row.user_name,
        group=row.group_name,
        state=State(row.state),
        requested=StopRequest(row.requested) if row.requested else None,
        context=row.context,
        priority=row.priority,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        error=row.error,
        node=row.node_id,
        created_at=time_from_db(row.created_at),
        updated_at=time_from_db(row.updated_at),
        started_at=None if row.started_at is None else time_from_db(row.started_at),
        done_at=None if row.done_at is None else time_from_db(row.done_at),
        run_at=time_from_db(row.run_at),
        unique_key=row.unique_key,
        progress=None if row.progress is None else float(row.progress),
        message=row.message,
    )


def claimed(row: Any) -> Claimed:
    return Claimed(
        id=row.id,
        type=row.type,
        user=row.user_name,
        group=row.group_name,
        context=row.context,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        token=row.token,
        waited=max(float(row.waited or 0.0), 0.0),
        trace_parent=row.trace_parent,
    )


def owned(row: Any) -> Owned:
    requested = StopRequest(row.requested) if row.requested else None
    return Owned(row.id, State(row.state), requested, row.token)


def node_types(types: Sequence[str]) -> str:
    """A node's task types as its row stores them (read back by ``node``)."""
    return json.dumps(list(types))


def node(row: Any) -> NodeInfo:
    return NodeInfo(
        row.id,
        row.name,
        row.concurrency,
        tuple(json.loads(row.types)),
        time_from_db(row.started_at),
        time_from_db(row.heartbeat_at),
        float(row.heartbeat_interval),
        float(row.node_timeout),
    )


def group(row: Any) -> Group:
    return Group(row.name, bool(row.paused), row.max_running, row.max_running_per_user)


def schedule(row: Any) -> Schedule:
    return Schedule(
        name=row.name,
        type=row.type,
        cron=row.cron,
        every=None if row.every is None else float(row.every),
        timezone=row.timezone,
        context=row.context,
        user=row.user_name,
        group=row.group_name,
        priority=row.priority,
        max_attempts=row.max_attempts,
        declared=bool(row.declared),
        next_tick=time_from_db(row.next_tick),
        last_tick=None if row.last_tick is None else time_from_db(row.last_tick),
        last_task=row.last_task_id,
        created_at=time_from_db(row.created_at),
        updated_at=time_from_db(row.updated_at),
    )


def task_type(row: Any) -> StoredTaskType:
    return StoredTaskType(
        row.name, row.max_attempts, bool(row.has_cleanup), time_from_db(row.updated_at)
    )


LOCKED_FIELDS = (
    "id",
    "state",
    "requested",
    "has_cleanup",
    "attempts",
    "max_attempts",
    "node_id",
    "group_name",
    "token",
)
"""The columns ``Locked.from_row`` reads."""


@dataclass(frozen=True, slots=True)
class Locked:
    """A task row read under the write lock, before the state rules change it."""

    id: int
    state: State
    requested: StopRequest | None
    has_cleanup: bool
    attempts: int
    max_attempts: int
    node_id: int | None
    group: str
    token: int
    watched: bool = False
    """Someone waits for or watches the task: its change is notified (docs/design.md §18)."""

    @classmethod
    def from_row(cls, row: Any) -> Locked:
        return cls(
            id=row.id,
            state=State(row.state),
            requested=StopRequest(row.requested) if row.requested else None,
            has_cleanup=bool(row.has_cleanup),
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            node_id=row.node_id,
            group=row.group_name,
            token=row.token,
            watched=bool(row.watched),
        )
