"""Small helpers shared by the tests: nodes with fast test timings, waiting on conditions and
task states, a second engine to look at the database behind the library's back, and the
``aioasync-tasks`` command line as a subprocess.

Fixtures live in ``conftest.py`` (``db``, ``raw``, ``cluster`` …); this module holds plain
functions and constants, imported as ``from _helpers import …``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, overload

from _db import DbTarget
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioasync_tasks import Node, Report, State, Task, TaskNotFound, TaskRegistry
from aioasync_tasks._backends.postgresql import PostgresDriver
from aioasync_tasks._urls import engine_from_url

BOUND = 30.0
"""Generous bound on waiting for a condition in the test's own process (never a timing
assertion: a test that needs it has failed)."""
LONG_BOUND = 60.0
"""The same for what other processes do, or for work that is slow on a busy 2-core machine."""

FAST: dict[str, Any] = {
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


def client_registry(types: Mapping[str, Mapping[str, Any]]) -> TaskRegistry:
    """Task types (name → ``register_task`` options) for a client-only node that creates tasks
    another process runs: their handlers never run here."""
    registry = TaskRegistry()

    async def never(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        raise AssertionError("the client runs nothing")
        yield Report()

    for name, options in types.items():
        registry.register_task(name, never, **options)
    return registry


def counter_context(n: int, delay: float = 0.0, *, gap: float = 0.0, i: int = 0) -> str:
    """The context of the tests' ``counter`` task types: count from ``i`` to ``n``, a step
    taking ``delay`` seconds (``gap``: see ``nodeproc``)."""
    return json.dumps({"i": i, "n": n, "delay": delay, "gap": gap})


# -- waiting ----------------------------------------------------------------------------------


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


async def wait_event(
    event: asyncio.Event,
    what: str,
    timeout: float = BOUND,  # noqa: ASYNC109 - a bound on waiting, reported as a failure
) -> None:
    """Wait for ``event``; fail the test after ``timeout`` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def state_of(node: Node, task_id: int) -> State | None:
    """The task's state, or None when it is gone."""
    try:
        return (await node.get_task(task_id)).state
    except TaskNotFound:
        return None


@overload
async def wait_state(
    node: Node,
    task_id: int,
    *states: State,
    what: str = "",
    timeout: float = BOUND,  # noqa: ASYNC109
) -> Task: ...
@overload
async def wait_state(
    node: Node,
    task_id: int,
    *states: State | None,
    what: str = "",
    timeout: float = BOUND,  # noqa: ASYNC109
) -> Task | None: ...
async def wait_state(
    node: Node,
    task_id: int,
    *states: State | None,
    what: str = "",
    timeout: float = BOUND,  # noqa: ASYNC109 - a bound on waiting, reported as a failure
) -> Task | None:
    """Wait until the task is in one of ``states`` (None: gone); returns it (None if gone)."""

    async def reached() -> bool:
        return await state_of(node, task_id) in states

    shown = " or ".join(str(s) for s in states)
    await wait_for(reached, timeout=timeout, what=what or f"task {task_id} to be {shown}")
    if None not in states:
        return await node.get_task(task_id)
    try:
        return await node.get_task(task_id)
    except TaskNotFound:
        return None


async def task_states(node: Node, ids: list[int]) -> dict[int, State]:
    return {t: (await node.get_task(t)).state for t in ids}


def all_in(node: Node, ids: list[int], *states: State) -> Callable[[], Awaitable[bool]]:
    """A condition for ``wait_for``: every task of ``ids`` is in one of ``states``."""

    async def check() -> bool:
        return all(s in states for s in (await task_states(node, ids)).values())

    return check


# -- the database behind the library's back ---------------------------------------------------


def raw_engine(db: DbTarget) -> AsyncEngine:
    """An engine of the test's own, with the test schema on the search path (the ``raw``
    fixture of ``conftest.py`` is one, disposed of after the test). Behind PgBouncer
    (``pgbouncer=transaction`` in the URL) it is made as an application makes its own, with
    ``engine_from_url``, and has no search path (PgBouncer refuses the startup parameter)."""
    if db.pooled:
        return engine_from_url(db.url)
    return create_async_engine(db.url, connect_args=db.connect_args())


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def node_rows(engine: AsyncEngine) -> int:
    """How many node rows there are."""
    return int(await scalar(engine, "SELECT count(*) FROM aioasync_nodes"))


async def node_ids(engine: AsyncEngine) -> list[int]:
    """The ids of the node rows, in order."""
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT id FROM aioasync_nodes ORDER BY id"))
        return [r[0] for r in result]


async def read_row(engine: AsyncEngine, task_id: int) -> dict[str, Any] | None:
    """The task's row as stored (what another node would see), or None when there is none."""
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT state, requested, context, node_id, attempts, error, handoff, updated_at"
                " FROM aioasync_tasks WHERE id = :id"
            ),
            {"id": task_id},
        )
        row = result.mappings().first()
    return None if row is None else dict(row)


@contextmanager
def statements(node: Node, *, begins: bool = False) -> Iterator[list[str]]:
    """The SQL statements the node's engine runs inside the ``with`` block (stripped); with
    ``begins``, the start of each transaction too, as ``"BEGIN"``."""
    seen: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.strip())

    def on_begin(conn: Any) -> None:
        seen.append("BEGIN")

    sync_engine = node.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", on_execute)
    if begins:
        event.listen(sync_engine, "begin", on_begin)
    try:
        yield seen
    finally:
        event.remove(sync_engine, "before_cursor_execute", on_execute)
        if begins:
            event.remove(sync_engine, "begin", on_begin)


Captured = tuple[str, Any]
"""A statement as the driver received it, and its parameters."""


class Capture:
    """Records every statement an engine sends to the driver."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements: list[Captured] = []
        self._engine = engine.sync_engine

    def _record(self, *args: Any) -> None:
        _conn, _cursor, statement, parameters, _context, _executemany = args
        self.statements.append((statement, parameters))

    def __enter__(self) -> Capture:
        event.listen(self._engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self._engine, "before_cursor_execute", self._record)

    def find(self, predicate: Callable[[str], bool]) -> list[Captured]:
        return [(s, p) for s, p in self.statements if predicate(s)]


class RawCapture:
    """Records every statement PostgreSQL drivers run on asyncpg's own connection
    (``PostgresDriver.fetch``: the one-statement creates, claims, checkpoints and completions),
    as ``Capture`` does, with the names of the statements run."""

    def __init__(self) -> None:
        self.statements: list[Captured] = []
        self.names: set[str] = set()
        self._fetch = PostgresDriver.fetch

    def __enter__(self) -> RawCapture:
        fetch = self._fetch

        async def recording(
            driver: PostgresDriver, name: str, params: Mapping[str, Any], order_by: str = ""
        ) -> list[Any]:
            sql, names = driver._positional(name, order_by)
            self.statements.append((sql, tuple(params[n] for n in names)))
            self.names.add(name)
            return await fetch(driver, name, params, order_by)

        PostgresDriver.fetch = recording  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        PostgresDriver.fetch = self._fetch  # type: ignore[method-assign]

    def find(self, predicate: Callable[[str], bool]) -> list[Captured]:
        return [(s, p) for s, p in self.statements if predicate(s)]


# -- the command line -------------------------------------------------------------------------

HERMETIC_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AIOASYNC_TASKS_")}
"""The environment of CLI subprocesses: none of the ``AIOASYNC_TASKS_*`` settings of the
developer's shell."""
WORKER_TIMINGS = ("--heartbeat-interval", "0.2", "--node-timeout", "2", "--poll-interval", "0.1")
"""Options of ``aioasync-tasks worker`` for quick tests."""


def db_args(db: DbTarget) -> list[str]:
    """The CLI options naming the test database."""
    return ["--db", db.url, *(["--schema", db.schema] if db.schema else [])]


async def spawn_cli(
    *args: str, cwd: Path, log: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``python -m aioasync_tasks ARGS`` in ``cwd`` with its stdout and stderr in
    ``log``; the caller waits for it (and kills it if it still runs at the end)."""
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioasync_tasks",
            *args,
            cwd=cwd,
            env=env if env is not None else HERMETIC_ENV,
            stdout=sink,
            stderr=sink,
        )
