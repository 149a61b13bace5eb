"""Helpers for the tests of applications that use aioasync_tasks (docs/testing.md).

- ``temporary_node(registry)``: a started node on a fresh SQLite file in a temporary directory
  (or on the database you give), with quick test timings, stopped and removed afterwards.
- ``drain(node)``: run the node until nothing is left to do; returns the tasks that ran. Raises
  ``DrainTimeout``, naming what is still due, instead of hanging.
- ``created(node, type=…)``: the tasks there are, oldest first, to assert what your code
  created; ``context_of(node, task)`` decodes a task's context as its type's handlers see it.

Import it explicitly: ``from aioasync_tasks.testing import drain, temporary_node``.
"""

from __future__ import annotations

import asyncio
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import AsyncTasksError, ConfigurationError
from ._models import State, Task
from ._node import MAX_PAGE_SIZE, Node
from ._registry import TaskRegistry

__all__ = ["TEST_TIMINGS", "DrainTimeout", "context_of", "created", "drain", "temporary_node"]

TEST_TIMINGS: dict[str, float] = {
    "heartbeat_interval": 0.5,
    "poll_interval": 0.05,
    "retry_base": 0.01,
    "retry_cap": 0.05,
}
"""The node options ``temporary_node`` sets unless you give them: quick polls, heartbeats and
retries (a task type's own ``retry_base``/``retry_cap`` still win)."""

DRAIN_TIMEOUT = 30.0
"""Seconds ``drain`` waits by default before it raises ``DrainTimeout``."""
_BUSY = (State.RUNNING, State.CANCELING, State.DELETING)
_drained: weakref.WeakKeyDictionary[Node, int] = weakref.WeakKeyDictionary()
"""The newest task id each node's previous ``drain`` saw: the next one returns what is newer."""


class DrainTimeout(AsyncTasksError, TimeoutError):
    """``drain`` ran out of time with tasks still to run; ``tasks`` are those tasks."""

    def __init__(self, message: str, tasks: list[Task]) -> None:
        super().__init__(message)
        self.tasks = tasks


@asynccontextmanager
async def temporary_node(
    registry: TaskRegistry, url: str | None = None, **options: Any
) -> AsyncIterator[Node]:
    """A started node with ``registry``, on a fresh SQLite file in a temporary directory that is
    removed afterwards — or on ``url`` (your test database; nothing is removed there). Options
    are ``Node``'s; ``TEST_TIMINGS`` apply unless given."""
    with tempfile.TemporaryDirectory(prefix="aioasync_tasks-") as directory:
        target = url or f"sqlite+aiosqlite:///{Path(directory) / 'tasks.db'}"
        async with Node(target, registry=registry, **{**TEST_TIMINGS, **options}) as node:
            yield node


async def _all_tasks(node: Node, **filters: Any) -> list[Task]:
    """Every task matching ``filters``, newest first."""
    found: list[Task] = []
    while True:
        page = await node.get_tasks(**filters, offset=len(found), limit=MAX_PAGE_SIZE)
        found.extend(page)
        if len(page) < MAX_PAGE_SIZE:
            return found


def _to_do(task: Task, node: Node, paused: set[str], now: datetime) -> bool:
    """Whether the node still has ``task`` to run: it is running or being cleaned up, or it is
    pending and due — or a retry or hand-off, due after its back-off — in a group the node
    claims from, of a type it knows."""
    groups = node.services.state.config.groups
    if task.type not in node.registry or (groups is not None and task.group not in groups):
        return False
    if task.state in _BUSY:
        return True
    if task.state is not State.PENDING or task.group in paused:
        return False
    return task.run_at is None or task.run_at <= now or task.attempts > 0


async def drain(
    node: Node,
    *,
    timeout: float = DRAIN_TIMEOUT,  # noqa: ASYNC109 - a bound, reported as DrainTimeout
) -> list[Task]:
    """Run ``node`` until it has nothing left to do, and return the tasks that ran — every task
    created since the previous ``drain`` of this node returned (since the node started, for the
    first; the node may have run some before ``drain`` was called), those created meanwhile (by
    the tasks themselves, say), and any older one it still found to do — if they started, as
    they are at the end, oldest first; a task removed meanwhile (``delete=True``, a cleanup) is
    not among them.

    Nothing to do means: no task running, canceling or being cleaned up, and none pending and
    due (a retry waiting for its back-off counts as due). Tasks delayed by ``run_at``, in a
    paused group, or of a type (or a group) the node does not run are left alone. After
    ``timeout`` seconds it raises ``DrainTimeout`` naming the tasks still to do."""
    if node.concurrency == 0:
        raise ConfigurationError("drain needs a node that runs tasks, not a client-only one")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    newest = _drained.get(node, 0)
    ran: set[int] = set()
    while True:
        paused = {g.name for g in await node.get_groups() if g.paused}
        now = datetime.now(UTC)
        to_do = [t for t in await _all_tasks(node) if _to_do(t, node, paused, now)]
        ran.update(t.id for t in to_do)
        if not to_do:
            break
        if loop.time() > deadline:
            shown = ", ".join(f"#{t.id} {t.type} ({t.state.value})" for t in to_do[:10])
            raise DrainTimeout(
                f"drain: after {timeout}s, {len(to_do)} task(s) still to run: {shown}", to_do
            )
        node.services.state.wake()
        await asyncio.sleep(TEST_TIMINGS["poll_interval"])
    ended = await _all_tasks(node)
    _drained[node] = max((t.id for t in ended), default=newest)
    started = (t for t in ended if t.id in ran or (t.id > newest and t.started_at is not None))
    return sorted(started, key=lambda t: t.id)


async def created(
    node: Node,
    type: str | None = None,
    *,
    user: str | None = None,
    group: str | None = None,
    states: Iterable[State | str] | None = None,
) -> list[Task]:
    """The tasks of ``type`` (all types if None) there are, matching the other filters, oldest
    first: what your code created."""
    types = None if type is None else [type]
    found = await _all_tasks(node, user=user, group=group, types=types, states=states)
    return found[::-1]


def context_of(node: Node, task: Task) -> object:
    """``task``'s context as its type's handlers receive it: a typed value for a type with a
    ``context_type``, else the text."""
    return node.registry.get(task.type).decode_context(task.context)
