"""Small helpers shared by the tests: nodes with fast test timings, waiting on conditions,
a second engine to look at the database behind the library's back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _db import DbTarget
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioasync_tasks import Node, TaskRegistry

FAST = {
    "heartbeat_interval": 0.2,
    "node_timeout": 60.0,
    "poll_interval": 0.05,
    "retry_base": 0.01,
    "retry_cap": 0.05,
}
"""Node timings for tests: quick heartbeats, polls and retries. ``node_timeout`` stays long:
on a loaded machine a short lease can run out for real; tests of rescue set their own."""


def make_node(db: DbTarget, registry: TaskRegistry | None = None, **options: Any) -> Node:
    """A node on the test database (its own schema on PostgreSQL) with ``FAST`` timings."""
    settings = {**FAST, **options}
    return Node(db.url, registry=registry, schema=db.schema, **settings)


def raw_engine(db: DbTarget) -> AsyncEngine:
    """An engine of the test's own, with the test schema on the search path."""
    return create_async_engine(db.url, connect_args=db.connect_args())


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 20.0,  # noqa: ASYNC109 - a bound on polling, reported as a failure
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds.

    A bound on waiting, not a timing assertion: the timeout is generous on purpose.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
