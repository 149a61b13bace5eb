"""``Node``: the one object an application uses — it manages tasks and, unless it is a client
only, runs them (docs/reference.md, "Node").

``start()`` and ``stop()`` may be called from different asyncio tasks: the node's services run
in a supervisor task that the node creates and owns, never in the caller's task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import anyio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._backends import driver_for
from ._backends._driver import (
    DeleteParams,
    Driver,
    InsertParams,
    Limits,
    NewTask,
    OperateParams,
    PauseGroupParams,
    PutScheduleParams,
    RegisterTypesParams,
    SetGroupParams,
    StoredTaskType,
    TaskFilter,
    TaskTypesQuery,
    UnscheduleParams,
)
from ._clock import Clock
from ._errors import ConfigurationError, NodeNotStarted, NodeStopped, UnknownTaskType
from ._logging import LOGGER_NAME
from ._models import Group, NodeInfo, Operation, Schedule, State, Task
from ._periodic import check_period
from ._registry import TaskFunction, TaskRegistry, TaskType
from ._runner import Backoff
from ._scheduling import SchedulingPolicy
from ._services.pruner import Retention
from ._services.runtime import NodeRuntime, Services
from ._services.state import NodeConfig, NodeState
from ._task import _current_node
from ._telemetry import Observer, Telemetry
from ._urls import engine_from_url
from ._validation import (
    INT64_MAX,
    OnConflict,
    check_context,
    check_duration,
    check_group,
    check_groups,
    check_int,
    check_name,
    check_on_conflict,
    check_policy,
    check_schema,
    check_seconds,
    check_states,
    check_task_id,
    check_type_name,
    check_types,
    check_unique_key,
    check_user,
)
from ._watch import TaskWatcher

MAX_PAGE_SIZE = 1000
"""The largest ``limit`` of ``get_tasks``."""
DEFAULT_MAX_CONTEXT_BYTES = 1024 * 1024


class TaskOptions(TypedDict, total=False):
    """The options of a new task, for ``create_task(**options)`` and each mapping of
    ``create_tasks`` (besides ``type`` and ``context``); the defaults are ``_new_task``'s."""

    user: str
    group: str
    auto_run: bool
    priority: int
    run_at: datetime | None
    max_attempts: int | None
    unique_key: str | None
    on_conflict: OnConflict
    has_cleanup: bool | None


_OPTION_KEYS = TaskOptions.__optional_keys__


@dataclass(slots=True)
class _Draft:
    """A new task checked by ``_new_task``; ``stored``: of a type this node's registry lacks,
    whose options ``_resolve`` reads from the task types table (``attempts_given``: but for
    the ``max_attempts`` the caller gave)."""

    task: NewTask
    stored: bool = False
    attempts_given: bool = False


IDLE_TRANSACTION_FRACTION = 0.25
"""A write transaction of the node idle for this part of ``node_timeout`` is ended by the
server (PostgreSQL)."""
STOP_MARGIN = 5.0
"""Seconds ``stop(timeout=t)`` may take beyond ``t``: abandoning executions that ignore
cancellation, deregistering and closing the connection pool, each bounded."""
DISPOSE_TIMEOUT = 1.5
"""The bound of closing the connection pool at the end of a stop."""


class Node:
    """A peer of the task system: creates, controls, queries and (unless ``concurrency=0``)
    runs tasks. Use ``async with Node(...) as node`` or ``await node.start()``/``stop()``.

    Options (keyword-only; seconds unless said otherwise):

    - ``registry``: the task types this node knows (default: an empty ``TaskRegistry``).
    - ``concurrency`` (10): tasks run at once; 0 makes a *client-only* node that creates,
      controls and queries tasks but runs none (and registers no node row).
    - ``cleanup_concurrency`` (2): cleanup handlers run at once, in their own slots.
    - ``schema`` (None): PostgreSQL schema holding the tables; independent systems can share a
      database by using different schemas.
    - ``auto_migrate`` (True): create or upgrade the tables at start.
    - ``heartbeat_interval`` (5.0), ``node_timeout`` (30.0): liveness; a node whose heartbeat is
      older than ``node_timeout`` (database clock) is dead and its tasks are rescued.
    - ``poll_interval`` (1.0): how often an idle node looks for work without a wake-up.
    - ``retry_base`` (1.0), ``retry_cap`` (300.0): back-off of retries, full jitter.
    - ``cleanup_attempts`` (3): tries of a cleanup handler before the task is FAILED.
    - ``max_context_bytes`` (1 MiB): the largest context accepted (UTF-8 bytes).
    - ``name`` (host:pid): shown in ``get_nodes()``.
    - ``policy`` (``FairShare()``): the claim order; ``Fifo()`` or your own
      ``SchedulingPolicy`` subclass.
    - ``groups`` (None: all): run only tasks of these groups (a worker dedicated to some
      queues). Cleanup handlers of deleted tasks run on any node that has the type.
    - ``logger``: the application's logger (default ``logging.getLogger("aioasync_tasks")``).
    - ``clock`` (``time.monotonic``): the monotonic clock of the node's lease and heartbeats,
      a ``Clock`` (any callable returning seconds); tests inject their own to make a lease run
      out without waiting.
    - ``observers`` (none): ``Observer`` objects told what the node does, for metrics and
      tracing — ``aioasync_tasks.metrics.PrometheusMetrics``,
      ``aioasync_tasks.opentelemetry.OpenTelemetry`` or your own (docs/reference.md, "Metrics
      and tracing").

    For tests and operators, a node shows its parts: ``driver``, the database operations it
    calls (a test injects faults by replacing one of its methods), and, once started with
    ``concurrency > 0``, ``services``: its claimer, heartbeat, rescuer, committer and listener,
    each with ``run_once()`` to run one round of it.
    - ``clock`` (``time.monotonic``): the monotonic clock of the node's lease and heartbeats;
      tests inject their own to make a lease run out without waiting.
    - ``retention`` (None: for ever), ``failed_retention`` (None: for ever): how long FINISHED
      and FAILED tasks are kept after they ended (a ``timedelta`` or seconds); then a worker
      removes them, one node at a time, in batches (docs/design.md §4.5). Worker nodes only.
    """

    def __init__(
        self,
        url_or_engine: str | AsyncEngine,
        *,
        registry: TaskRegistry | None = None,
        concurrency: int = 10,
        cleanup_concurrency: int = 2,
        schema: str | None = None,
        auto_migrate: bool = True,
        heartbeat_interval: float = 5.0,
        node_timeout: float = 30.0,
        poll_interval: float = 1.0,
        retry_base: float = 1.0,
        retry_cap: float = 300.0,
        cleanup_attempts: int = 3,
        max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
        name: str | None = None,
        policy: SchedulingPolicy | None = None,
        groups: Iterable[str] | None = None,
        logger: logging.Logger | None = None,
        clock: Clock | None = None,
        retention: timedelta | float | None = None,
        failed_retention: timedelta | float | None = None,
        observers: Sequence[Observer] | None = None,
    ) -> None:
        if isinstance(url_or_engine, AsyncEngine):
            self._engine = url_or_engine
            self._owns_engine = False
        elif isinstance(url_or_engine, str):
            self._engine = engine_from_url(url_or_engine)
            self._owns_engine = True
        else:
            raise ConfigurationError(
                f"Node needs a database URL or an AsyncEngine, not {type(url_or_engine).__name__}"
            )
        if registry is not None and not isinstance(registry, TaskRegistry):
            raise ConfigurationError("registry must be a TaskRegistry")
        if schema is not None:
            schema = check_schema(schema)
        self.registry = registry if registry is not None else TaskRegistry()
        self.concurrency = check_int("concurrency", concurrency, minimum=0)
        cleanup_concurrency = check_int("cleanup_concurrency", cleanup_concurrency, minimum=0)
        heartbeat_interval = check_seconds("heartbeat_interval", heartbeat_interval)
        node_timeout = check_seconds("node_timeout", node_timeout)
        if node_timeout < 2 * heartbeat_interval:
            raise ConfigurationError(
                "node_timeout must be at least twice heartbeat_interval, or live nodes are "
                "declared dead"
            )
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a callable returning seconds")
        self.max_context_bytes = check_int("max_context_bytes", max_context_bytes, minimum=1)
        kept = Retention(
            None if retention is None else check_duration("retention", retention),
            None
            if failed_retention is None
            else check_duration("failed_retention", failed_retention),
        )
        if self.concurrency == 0 and kept != Retention(None, None):
            raise ConfigurationError(
                "retention and failed_retention need a worker (concurrency > 0): a client-only "
                "node runs no pruner"
            )
        self._config = NodeConfig(
            concurrency=self.concurrency,
            cleanup_concurrency=cleanup_concurrency if self.concurrency else 0,
            heartbeat_interval=heartbeat_interval,
            node_timeout=node_timeout,
            poll_interval=check_seconds("poll_interval", poll_interval),
            cleanup_attempts=check_int("cleanup_attempts", cleanup_attempts, minimum=1),
            backoff=Backoff(
                check_seconds("retry_base", retry_base), check_seconds("retry_cap", retry_cap)
            ),
            name=None if name is None else check_name("name", name),
            policy=check_policy(policy),
            groups=check_groups(groups),
            max_context_bytes=self.max_context_bytes,
            clock=clock or time.monotonic,
            retention=None if kept == Retention(None, None) else kept,
        )
        self.auto_migrate = bool(auto_migrate)
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._telemetry = Telemetry.of(observers, self._logger)
        self._driver: Driver = driver_for(self._engine, schema)
        # A node cut off inside a transaction: the server ends it well before the node's peers
        # may rescue its tasks, which would otherwise wait on its row locks.
        self._driver.bound_idle_transactions(node_timeout * IDLE_TRANSACTION_FRACTION)
        self._watcher = TaskWatcher(self._driver, self._config.poll_interval, self._logger)
        self._runtime: NodeRuntime | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lifecycle = asyncio.Lock()
        self._started = False
        self._stopped = False
        self._stop_deadline: asyncio.Timeout | None = None
        """The bound of a stop in progress, which a later ``stop(timeout=…)`` can shorten."""

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The observers given to the node (``observers=``)."""
        return self._telemetry.observers

    @property
    def driver(self) -> Driver:
        """The node's driver: the queue operations it asks of the database (for tests and
        operators). The node and its services look each method up anew on every call, so a
        test injects a fault by replacing one — ``monkeypatch.setattr(node.driver, "claim",
        flaky)`` — before ``start()`` or while the node runs."""
        return self._driver

    @property
    def services(self) -> Services:
        """The services of a started node that runs tasks, and the state they share (for tests
        and operators): ``claimer``, ``heartbeat``, ``rescuer``, ``committer``, ``listener``
        (None on SQLite) and ``state``. Each service's ``run_once()`` runs one round of it
        beside its loop, e.g. ``await node.services.heartbeat.run_once()``. Still there after
        ``stop()``. Raises ``NodeNotStarted`` before ``start()``, ``ConfigurationError`` for a
        client-only node."""
        if self.concurrency == 0:
            raise ConfigurationError("a client-only node (concurrency=0) runs no services")
        runtime = self._runtime
        if runtime is None:
            raise NodeNotStarted("call `await node.start()` (or use `async with node`) first")
        return runtime.services

    @property
    def id(self) -> int | None:
        """This node's id in the nodes table (None for a client-only or unstarted node)."""
        runtime = self._runtime
        return runtime.state.node_id if runtime is not None and self._started else None

    @property
    def running(self) -> bool:
        """Whether the node is started and not stopped — by ``stop()``, or on its own when a
        service of it kept crashing (see ``failure``)."""
        supervisor = self._supervisor
        return self._started and not self._stopped and (supervisor is None or not supervisor.done())

    @property
    def failure(self) -> str | None:
        """Why the node stopped on its own (a service it could not recover), or None."""
        runtime = self._runtime
        return runtime.state.failure if runtime is not None else None

    async def wait_stopped(self) -> None:
        """Return when the node has stopped: by ``stop()``, or on its own (``failure``).
        Returns at once for a client-only or unstarted node."""
        supervisor = self._supervisor
        if supervisor is not None:
            await asyncio.wait([supervisor])

    async def migrate(self) -> list[int]:
        """Create or upgrade the tables; returns the migration versions applied."""
        if self._stopped:
            raise NodeStopped("the node was stopped")
        return await self._driver.migrate()

    async def start(self) -> None:
        """Check (or migrate) the schema, register the node and start its services."""
        async with self._lifecycle:
            if self._stopped:
                raise NodeStopped("a stopped node cannot be started again; create a new Node")
            if self._started:
                return
            if self.auto_migrate:
                await self._driver.migrate()
            else:
                await self._driver.check_schema()
            if self.concurrency > 0 and len(self.registry):
                # For the nodes that create tasks of types they have not imported.
                types = tuple(
                    StoredTaskType(t.name, t.max_attempts, t.has_cleanup) for t in self.registry
                )
                await self._driver.register_task_types(RegisterTypesParams(types))
            if self.concurrency > 0:
                state = NodeState(
                    self._driver, self.registry, self._config, self._logger, self._telemetry
                )
                runtime = NodeRuntime(state)
                ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                supervisor = asyncio.create_task(
                    self._supervise(runtime, ready), name="aioasync_tasks-node"
                )
                try:
                    await asyncio.wait([ready, supervisor], return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    # Cancelled while starting: stop what was started, leave nothing behind.
                    runtime.shutdown()
                    supervisor.cancel()
                    await asyncio.wait([supervisor])
                    raise
                if not ready.done():
                    supervisor.result()  # raises what went wrong
                self._supervisor = supervisor
                self._runtime = runtime
            self._started = True

    async def _supervise(self, runtime: NodeRuntime, ready: asyncio.Future[None]) -> None:
        _current_node.set(self)  # inherited by every task the node runs
        try:
            async with anyio.create_task_group() as group:
                await group.start(runtime.run)
                ready.set_result(None)
        except Exception:
            if not ready.done():
                raise  # start() reports it
            self._logger.exception("the node's services failed; it runs no more tasks")

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a bound, not a cancel scope
        """Stop gracefully: no more claims, every running task is asked to stop and gets its
        ``stop_timeout``; then their checkpoints are stored, RUNNING tasks are handed back as
        PENDING for any node, and the node deregisters. Idempotent.

        ``timeout`` bounds the whole stop; when it runs out the remaining tasks are cancelled
        and handed back from their last checkpoints. Called while a stop is in progress, a shorter
        ``timeout`` shortens it (a second Ctrl-C), and the call returns when it is done.
        """
        deadline = self._stop_deadline
        if deadline is not None and timeout is not None and not deadline.expired():
            when = asyncio.get_running_loop().time() + timeout
            current = deadline.when()
            if current is None or when < current:
                deadline.reschedule(when)
        async with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            try:
                await self._stop_runtime(timeout)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(DISPOSE_TIMEOUT):
                    await self._watcher.close()
                    # Heartbeats cancelled on the way out still finish their transactions.
                    await self._driver.in_flight.close(timeout=DISPOSE_TIMEOUT / 2)
                    if self._owns_engine:
                        await self._engine.dispose()

    async def _stop_runtime(self, timeout: float | None) -> None:  # noqa: ASYNC109 - a bound
        supervisor, runtime = self._supervisor, self._runtime
        if supervisor is None or runtime is None:
            return
        runtime.shutdown()
        try:
            async with asyncio.timeout(timeout) as self._stop_deadline:
                await asyncio.wait([supervisor])
        except TimeoutError:
            self._logger.warning("stop timed out; cancelling the remaining tasks")
            supervisor.cancel()
            # Executions that ignore cancellation are abandoned after a moment and the node
            # deregisters with a bound of its own: the whole wait is bounded here too.
            await asyncio.wait([supervisor], timeout=STOP_MARGIN - DISPOSE_TIMEOUT)
        finally:
            self._stop_deadline = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _ready(self) -> Driver:
        if self._stopped:
            raise NodeStopped("the node was stopped")
        if not self._started:
            raise NodeNotStarted("call `await node.start()` (or use `async with node`) first")
        return self._driver

    # -- task types -------------------------------------------------------------------------

    def register_task(
        self,
        type: str,
        running: TaskFunction | None = None,
        deleting: TaskFunction | None = None,
        **options: Any,
    ) -> TaskType:
        """Register a task type in this node's registry (before ``start()``)."""
        if self._started:
            raise ConfigurationError("register task types before the node starts")
        return self.registry.register_task(type, running, deleting, **options)

    # -- creating ---------------------------------------------------------------------------

    def _new_task(self, type: object, context: object, options: Mapping[str, object]) -> _Draft:
        """A new task from ``create_task``'s arguments, every one checked (no I/O). A type this
        node's registry lacks takes its options from the task types table (``_resolve``)."""
        # The defaults of ``TaskOptions`` live here, and only here.
        name = check_type_name(type)
        task_type = self.registry.get(name) if name in self.registry else None
        if task_type is not None and task_type.context_type is not None:
            context = task_type.encode_context(context)  # a typed value, stored as JSON
        context = check_context(context, self.max_context_bytes)
        user = options.get("user", "")
        group = options.get("group", "default")
        auto_run = options.get("auto_run", True)
        priority = options.get("priority", 0)
        run_at = options.get("run_at")
        max_attempts = options.get("max_attempts")
        has_cleanup = options.get("has_cleanup")
        if not isinstance(auto_run, bool):
            raise ConfigurationError("auto_run must be a bool")
        if run_at is not None and (not isinstance(run_at, datetime) or run_at.utcoffset() is None):
            raise ConfigurationError("run_at must be a timezone-aware datetime (or None)")
        unique_key = options.get("unique_key")
        if unique_key is not None:
            unique_key = check_unique_key(unique_key)
        elif options.get("on_conflict") is not None:
            raise ConfigurationError("on_conflict needs a unique_key")
        on_conflict = check_on_conflict(options.get("on_conflict", "error"))
        if max_attempts is not None:
            max_attempts = check_int("max_attempts", max_attempts, minimum=1)
        if has_cleanup is not None and not isinstance(has_cleanup, bool):
            raise ConfigurationError("has_cleanup must be a bool (or None)")
        if task_type is not None and has_cleanup not in (None, task_type.has_cleanup):
            raise ConfigurationError(
                f"has_cleanup={has_cleanup} for task type {name!r}, whose registered cleanup "
                f"handler says {task_type.has_cleanup}: leave it out"
            )
        new = NewTask(
            type=name,
            context=context,
            user=check_user(user),
            group=check_group(group),
            priority=check_int("priority", priority),
            max_attempts=max_attempts or (task_type.max_attempts if task_type else 1),
            has_cleanup=task_type.has_cleanup if task_type else bool(has_cleanup),
            state=State.PENDING if auto_run else State.INIT,
            run_at=run_at,
            unique_key=unique_key,
            on_conflict=on_conflict,
            trace_parent=self._telemetry.trace_parent() if self._telemetry.enabled else None,
        )
        if task_type is not None or (max_attempts is not None and has_cleanup is not None):
            return _Draft(new)
        return _Draft(new, stored=True, attempts_given=max_attempts is not None)

    async def _resolve(self, drafts: Sequence[_Draft]) -> list[NewTask]:
        """The new tasks, with the stored options of the types this node has not imported
        (one read for all of them; docs/design.md §4.6)."""
        names = tuple(sorted({d.task.type for d in drafts if d.stored}))
        if not names:
            return [d.task for d in drafts]
        found = await self._ready().get_task_types(TaskTypesQuery(names))
        stored = {t.name: t for t in found}
        tasks = []
        for d in drafts:
            options = stored.get(d.task.type)
            if not d.stored:
                tasks.append(d.task)
            elif options is not None:
                tasks.append(
                    replace(
                        d.task,
                        max_attempts=d.task.max_attempts
                        if d.attempts_given
                        else options.max_attempts,
                        has_cleanup=options.has_cleanup,
                    )
                )
            elif d.attempts_given:
                tasks.append(d.task)  # its options given: max_attempts, has_cleanup or False
            else:
                raise UnknownTaskType(
                    d.task.type,
                    f"unknown task type {d.task.type!r}: not in this node's registry, and no "
                    "worker has registered it; register it here, start a worker that has it, "
                    "or pass max_attempts= (and has_cleanup=True if it has a cleanup handler)",
                )
        return tasks

    async def create_task(
        self,
        type: str,
        context: object = "",
        *,
        connection: AsyncConnection | None = None,
        session: AsyncSession | None = None,
        **options: Unpack[TaskOptions],
    ) -> int:
        """Create a task; returns its id. ``context`` is a ``str``, or a value of the type's
        ``context_type`` (``ContextError`` for any other). ``options``: ``user`` (""), ``group``
        ("default"), ``auto_run`` (True; False leaves it INIT until ``run_task``), ``priority`` (0),
        ``run_at`` (None: now), ``max_attempts`` (None: the task type's), ``unique_key``
        (None), ``on_conflict`` ("error") and ``has_cleanup`` (None: the task type's).

        A type this node's registry lacks takes its options from the task types table, where
        every worker stores those of the types it runs; when no worker has, ``max_attempts``
        (and ``has_cleanup=True`` for a type with a cleanup handler) must be given, or
        ``UnknownTaskType`` is raised (docs/how-to.md, "Create tasks of types a process has
        not imported").

        With a ``unique_key``, at most one live task (INIT, PENDING, RUNNING, CANCELING,
        PAUSED) of the type holds it. When one does already, ``on_conflict`` says what happens:
        ``"error"`` raises ``DuplicateTask``; ``"skip"`` creates nothing and returns that task's
        id; ``"replace"`` gives that task this one's context and options (it keeps its id and
        state, and starts afresh) and returns its id — or raises ``DuplicateTask`` if it is
        running (docs/how-to.md, "Create unique tasks").

        With ``connection=`` or ``session=`` the task is inserted in the caller's transaction
        and exists only if that transaction commits (transactional outbox).
        """
        unknown = set(options) - _OPTION_KEYS
        if unknown:
            raise ConfigurationError(f"unknown options: {sorted(unknown)}")
        draft = self._new_task(type, context, options)
        ids = await self._insert([draft], connection, session)
        return ids[0]

    async def create_tasks(
        self,
        tasks: Sequence[Mapping[str, Any]],
        *,
        connection: AsyncConnection | None = None,
        session: AsyncSession | None = None,
    ) -> list[int]:
        """Create many tasks in one round trip; each item is a mapping with the keyword
        arguments of ``create_task`` (``type`` required; ``unique_key`` and ``on_conflict``
        per item). Returns the ids in order: for an item skipped or replaced, the id of the
        live task that holds its key. ``DuplicateTask`` creates none of them."""
        if isinstance(tasks, Mapping | str) or not isinstance(tasks, Sequence):
            raise ConfigurationError("create_tasks takes a list of mappings")
        new: list[_Draft] = []
        for index, item in enumerate(tasks):
            if not isinstance(item, Mapping):
                raise ConfigurationError(f"tasks[{index}] must be a mapping")
            unknown = set(item) - _OPTION_KEYS - {"type", "context"}
            if unknown:
                raise ConfigurationError(f"tasks[{index}] has unknown keys: {sorted(unknown)}")
            if "type" not in item:
                raise ConfigurationError(f"tasks[{index}] has no 'type'")
            new.append(self._new_task(item["type"], item.get("context", ""), item))
        if not new:
            self._ready()
            return []
        return await self._insert(new, connection, session)

    async def _insert(
        self,
        drafts: list[_Draft],
        connection: AsyncConnection | None,
        session: AsyncSession | None,
    ) -> list[int]:
        if connection is not None and session is not None:
            raise ConfigurationError("give connection= or session=, not both")
        if session is not None:
            if not isinstance(session, AsyncSession):
                raise ConfigurationError("session must be an AsyncSession")
        elif connection is not None and not isinstance(connection, AsyncConnection):
            raise ConfigurationError("connection must be an AsyncConnection")
        backend = self._ready()
        new = await self._resolve(drafts)
        if session is not None:
            connection = await session.connection()
        ids = await backend.insert_many(InsertParams(new, connection))
        self._wake_local()
        if self._telemetry.enabled:
            counts = Counter((t.type, t.group) for t in new)
            for (type_name, group), count in counts.items():
                self._telemetry.created(type_name, group, count)
        return ids

    def _wake_local(self) -> None:
        """Let this node's own claimer look at once (other nodes hear a NOTIFY, or poll)."""
        if self._runtime is not None:
            self._runtime.state.wake()

    # -- controlling ------------------------------------------------------------------------

    async def _operate(
        self,
        task_id: object,
        operation: Operation,
        *,
        force: bool = False,
        group: str | None = None,
    ) -> None:
        task_id = check_task_id(task_id)
        backend = self._ready()
        result = await backend.operate(OperateParams(task_id, operation, force=force, group=group))
        if result.outcome.changed:
            self._wake_local()
        if result.outcome.stop and result.owner is not None:
            self._stop_here([(task_id, result.owner)], lost=result.outcome.state is None)

    def _stop_here(self, stopped: Iterable[tuple[int, int]], *, lost: bool) -> None:
        """Stop at once the executions of ``stopped`` (task id, owner) that run on this node;
        other owners hear it from their heartbeat or a notification."""
        runtime = self._runtime
        if runtime is None:
            return
        for task_id, owner in stopped:
            if owner == runtime.state.node_id:
                runtime.state.stop_local(task_id, lost=lost)

    async def run_task(self, task_id: int) -> None:
        """Queue an INIT, PAUSED or FAILED task (FAILED: a fresh series of attempts)."""
        await self._operate(task_id, Operation.RUN)

    async def pause_task(self, task_id: int) -> None:
        """Pause a task; a running one is told to stop and becomes PAUSED once it has."""
        await self._operate(task_id, Operation.PAUSE)

    async def delete_task(self, task_id: int, *, force: bool = False) -> None:
        """Delete a task. With a cleanup handler it goes through DELETING (a running task is
        stopped first); ``force=True`` removes the row at once in every state."""
        if not isinstance(force, bool):
            raise ConfigurationError("force must be a bool")
        await self._operate(task_id, Operation.DELETE, force=force)

    async def change_task_group(self, task_id: int, group: str) -> None:
        """Move a task to another group (queue); allowed in every state but DELETING."""
        group = check_group(group)
        await self._operate(task_id, Operation.CHANGE_GROUP, group=group)

    async def delete_tasks(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        types: Iterable[str] | None = None,
        states: Iterable[State | str] | None = None,
        older_than: timedelta | float | None = None,
        force: bool = False,
    ) -> int:
        """Delete every task that matches all the given filters — those of ``get_tasks``, and
        ``older_than`` (a ``timedelta`` or seconds): not changed for that long, by
        ``updated_at`` — as ``delete_task`` deletes one (a cleanup handler runs, a running task
        is stopped first; ``force=True`` removes them at once). At least one filter is needed.
        Works in batches of a few hundred tasks, one transaction each; returns how many tasks
        the delete changed (removed, DELETING, or told to stop)."""
        f = self._filter(user, group, types, states)
        age = None if older_than is None else check_duration("older_than", older_than)
        if not isinstance(force, bool):
            raise ConfigurationError("force must be a bool")
        if (f.user, f.group, f.types, f.states, age) == (None, None, None, None, None):
            raise ConfigurationError(
                "delete_tasks needs a filter (user, group, types, states or older_than); "
                "to delete every task, name every state: states=list(State)"
            )
        backend = self._ready()
        deleted, after = 0, 0
        while True:
            params = DeleteParams(f, older_than=age, force=force, after=after)
            result = await backend.delete_matching(params)
            deleted += result.deleted
            self._stop_here(result.stopped, lost=force)
            if result.after is None:
                break
            after = result.after
        if deleted:
            self._wake_local()
        return deleted

    # -- querying ---------------------------------------------------------------------------

    async def get_task(self, task_id: int) -> Task:
        """A snapshot of one task; ``TaskNotFound`` when there is none."""
        task_id = check_task_id(task_id)
        return await self._ready().get_task(task_id)

    def _filter(  # noqa: PLR0917 - private, mirrors the public filters
        self,
        user: object,
        group: object,
        types: object,
        states: object,
        offset: object = 0,
        limit: object = 100,
    ) -> TaskFilter:
        return TaskFilter(
            user=None if user is None else check_user(user),
            group=None if group is None else check_group(group),
            types=check_types(types),
            states=check_states(states),
            offset=check_int("offset", offset, minimum=0, maximum=INT64_MAX),
            limit=check_int("limit", limit, minimum=1, maximum=MAX_PAGE_SIZE),
        )

    async def get_tasks(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        types: Iterable[str] | None = None,
        states: Iterable[State | str] | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks matching every given filter, newest first. ``limit`` is 1 to 1000
        (``limit=0`` is an error, never an empty page); page on with ``offset``."""
        f = self._filter(user, group, types, states, offset, limit)
        return await self._ready().get_tasks(f)

    async def count_tasks(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        types: Iterable[str] | None = None,
        states: Iterable[State | str] | None = None,
    ) -> int:
        """How many tasks match the filters (the same filters as ``get_tasks``)."""
        f = self._filter(user, group, types, states)
        return await self._ready().count_tasks(f)

    async def wait_task(self, task_id: int, *, timeout: float | None = None) -> Task:  # noqa: ASYNC109 - the documented bound of a wait, raised as WaitTimeout
        """Wait until the task is FINISHED or FAILED and return that snapshot. Raises
        ``TaskNotFound`` when there is no such task or it is removed meanwhile (deleted, or
        ended with ``delete=True``), and ``WaitTimeout`` (a ``TimeoutError``) after
        ``timeout`` seconds. Woken by a notification on PostgreSQL, polling on SQLite."""
        task_id = check_task_id(task_id)
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        self._ready()
        return await self._watcher.wait(task_id, timeout)

    def watch(self, task_id: int) -> AsyncGenerator[Task]:
        """``async for task in node.watch(task_id)``: a snapshot of the task now, then one
        after each change as it commits (a checkpoint, a claim, an operation; a slow loop gets
        the latest), ending after the FINISHED or FAILED one. ``TaskNotFound`` when the task
        is gone."""
        task_id = check_task_id(task_id)
        self._ready()
        return self._watcher.watch(task_id)

    # -- groups and nodes -------------------------------------------------------------------

    async def pause_group(self, group: str, *, stop_running: bool = False) -> None:
        """Claim nothing more from ``group``; with ``stop_running=True`` also pause its running
        tasks."""
        group = check_group(group)
        if not isinstance(stop_running, bool):
            raise ConfigurationError("stop_running must be a bool")
        stopped = await self._ready().pause_group(PauseGroupParams(group, stop_running))
        self._stop_here(stopped, lost=False)

    async def resume_group(self, group: str) -> None:
        """Claim from ``group`` again."""
        await self._ready().set_group(SetGroupParams(check_group(group), paused=False))
        self._wake_local()

    async def set_group_limits(
        self,
        group: str,
        *,
        max_running: int | None = None,
        max_running_per_user: int | None = None,
    ) -> None:
        """Store cluster-wide limits for ``group`` (None: no limit); every node obeys them."""
        group = check_group(group)
        if max_running is not None:
            check_int("max_running", max_running, minimum=1)
        if max_running_per_user is not None:
            check_int("max_running_per_user", max_running_per_user, minimum=1)
        limits = Limits(max_running, max_running_per_user)
        await self._ready().set_group(SetGroupParams(group, limits=limits))
        self._wake_local()

    async def get_groups(self) -> list[Group]:
        """Every group with tasks or settings, and its settings."""
        return await self._ready().get_groups()

    async def get_nodes(self) -> list[NodeInfo]:
        """The registered (live, or not yet rescued) nodes."""
        return await self._ready().get_nodes()

    # -- periodic tasks ---------------------------------------------------------------------

    async def schedule(
        self,
        name: str,
        type: str,
        cron: str | None = None,
        *,
        every: float | timedelta | None = None,
        timezone: str | None = None,
        context: str = "",
        user: str = "",
        group: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> Schedule:
        """Create or replace the schedule ``name``: at each tick of ``cron`` (in ``timezone``,
        UTC by default) or of ``every`` seconds, a task of ``type`` is enqueued with these
        options, due at its tick — once per tick, whichever worker nodes run. Replacing a
        schedule with the same period keeps its next tick."""
        name = check_name("name", name)
        period = check_period(cron, every, timezone)
        task_type = self.registry.get(check_type_name(type))
        params = PutScheduleParams(
            name=name,
            type=task_type.name,
            period=period,
            context=check_context(context, self.max_context_bytes),
            user=check_user(user),
            group=check_group(group),
            priority=check_int("priority", priority),
            max_attempts=None
            if max_attempts is None
            else check_int("max_attempts", max_attempts, minimum=1),
            declared=False,
            next_tick=period.after(datetime.now(UTC)),
        )
        stored = await self._ready().put_schedule(params)
        if self._runtime is not None:
            self._runtime.services.ticker.wake()
        return stored

    async def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name`` (its tasks already enqueued stay); whether it existed.
        A schedule declared with a task type comes back when a node with the type starts."""
        return await self._ready().delete_schedule(UnscheduleParams(check_name("name", name)))

    async def get_schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        return await self._ready().get_schedules()
