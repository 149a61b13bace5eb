"""The executing part of a node: its row, its services and its running tasks
(docs/explanation.md, "A node is cut off").

Services, each a loop around a ``*_once`` method that tests can call directly, each supervised
(a crash is logged with its traceback and the service restarts with back-off; a service that
keeps crashing stops the node, which hands its tasks back):

- **claimer** — claims as many due tasks as there are free slots, in one statement; woken by
  NOTIFY, by a freed slot, or by the poll interval;
- **committer** — group-commits checkpoints and completions (``_committer``);
- **heartbeat** — renews the node's row with the database clock and reads the node's tasks in
  the same round trip: pending stop requests are delivered, a task whose row is gone or no
  longer ours is stopped at once, a row we own without running it is handed back
  (reconciliation), a missing node row means we were declared dead (fencing);
- **lease** — a watchdog: when the node has not renewed its row for ¾ of ``node_timeout``
  (measured on its own monotonic clock from the moment it *sent* the last successful heartbeat)
  it stops its tasks before any other node can consider it dead;
- **rescuer** — releases the tasks of other nodes whose heartbeat is older than *their own*
  ``node_timeout``, and of rows whose node is gone;
- **listener** (PostgreSQL) — LISTEN for wake-ups and stop requests;
- **ticker** — enqueues the ticks of periodic schedules (``_ticker``).

Nothing here waits for a task to end except the graceful stop: fencing and a lost lease only
*ask* the executions to stop; each lost execution then releases its own row, guarded by its
claim token, when it has ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ._backends._driver import Claimed, Driver, Owned
from ._committer import Committer
from ._errors import DatabaseError
from ._logging import node_logger, task_logger
from ._models import State
from ._registry import TaskRegistry
from ._runner import Backoff, Execution, StopReason
from ._scheduling import SchedulingPolicy
from ._states import ACTIVE_STATES
from ._ticker import Ticker

LEASE_FRACTION = 0.75
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Seconds before a crashed service restarts: the n-th crash in a row waits the n-th delay."""
MAX_CRASHES = 5
"""Crashes in a row after which a service is given up and the node stops."""
STABLE_AFTER = 60.0
"""Seconds a service must run without crashing for its next crash to count as the first."""
ABANDON_AFTER = 1.0
"""Seconds ``stop()`` waits, once its time is up, for cancelled executions to end; an execution
that ignores cancellation longer is abandoned (its row is handed back all the same)."""
MAX_HEARTBEATS = 3
"""Heartbeats in flight at once at most (each holds a connection while it waits)."""
DEREGISTER_TIMEOUT = 2.0
"""The bound of the last statement of a stop: removing the node's row."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int
    cleanup_concurrency: int
    heartbeat_interval: float
    node_timeout: float
    poll_interval: float
    cleanup_attempts: int
    backoff: Backoff
    name: str | None
    policy: SchedulingPolicy
    groups: tuple[str, ...] | None
    max_context_bytes: int
    clock: Callable[[], float] = field(default=time.monotonic)
    """The node's monotonic clock for leases and heartbeats (tests inject their own)."""


class Worker:
    """Runs tasks for one node; created by ``Node.start()`` when the node executes tasks."""

    def __init__(
        self,
        backend: Driver,
        registry: TaskRegistry,
        config: WorkerConfig,
        logger: logging.Logger,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.config = config
        self._clock = config.clock
        self._logger = logger
        self.log = node_logger(logger, None)
        self.node_id = 0
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.executions: dict[int, Execution] = {}
        self.committer = Committer(backend, cleanup_attempts=config.cleanup_attempts, logger=logger)
        self.ticker = Ticker(backend, registry, lambda: self.log, config.poll_interval)
        self._wake = asyncio.Event()
        self._stop_poll = asyncio.Event()
        self._listening = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        """The asyncio tasks of the executions (plain tasks: an anyio task group's spawn
        costs several times more, and a node may start thousands per second)."""
        self._lease_deadline = 0.0
        self._lease_lost = False
        self._claiming = False
        """A claim is in flight: it may have committed rows that no execution holds yet."""
        self._fencing = False
        self._next_due: float | None = None
        self.fenced = asyncio.Event()
        """Set each time the node found itself declared dead (for tests)."""
        self.failure: str | None = None
        """Why the node stopped on its own (a service that kept crashing), or None."""
        self._types = registry.names
        self._cleanup_types = [t.name for t in registry if t.has_cleanup]

    # -- lifecycle --------------------------------------------------------------------------

    async def register(self) -> None:
        sent = self._clock()
        self.node_id = await self.backend.register_node(
            self.name,
            self.config.concurrency,
            self._types,
            heartbeat_interval=self.config.heartbeat_interval,
            node_timeout=self.config.node_timeout,
        )
        self._lease_deadline = sent + self.config.node_timeout * LEASE_FRACTION
        self.log = node_logger(self._logger, self.node_id)
        self.log.info("node registered as %s with types %s", self.name, ", ".join(self._types))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the services until ``shutdown()`` (or a service is given up), then stop
        gracefully (docs/explanation.md, "A node shuts down gracefully")."""
        with anyio.CancelScope(shield=True):  # a row registered is a row deregistered below
            await self.register()
        try:
            async with anyio.create_task_group() as services:
                for name, service in (
                    ("committer", self.committer.run),
                    ("heartbeat", self._heartbeat_loop),
                    ("lease", self._lease_loop),
                    ("rescuer", self._rescue_loop),
                    ("stop poll", self._stop_poll_loop),
                    ("ticker", self.ticker.run),
                ):
                    services.start_soon(self._supervised, name, service)
                if self.backend.supports_notify:
                    services.start_soon(self._supervised, "listener", self._listen_loop)
                    await self._listening.wait()
                claimer_done = anyio.Event()
                services.start_soon(self._run_claimer, claimer_done)
                task_status.started()
                try:
                    await self._shutdown.wait()
                    # The claimer finishes its claim in flight and exits first, so that no task
                    # handed back below can be claimed again by this node on its way out.
                    self.wake()
                    await claimer_done.wait()
                    for execution in list(self.executions.values()):
                        execution.request_stop(StopReason.SHUTDOWN)
                    while self._running:
                        await asyncio.wait(set(self._running))
                finally:
                    await self._cancel_executions()  # only left when stop() ran out of time
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DEREGISTER_TIMEOUT):
                try:
                    await self.backend.deregister(
                        self.node_id, cleanup_attempts=self.config.cleanup_attempts
                    )
                    self.log.info("node deregistered")
                except DatabaseError as exc:
                    self.log.error("could not deregister: %s", exc)  # noqa: TRY400 - expected

    def shutdown(self) -> None:
        self._shutdown.set()

    def wake(self) -> None:
        self._wake.set()

    def lease_valid(self) -> bool:
        return self._clock() < self._lease_deadline

    async def _supervised(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """Run ``service``; restart it with back-off when it crashes; after ``MAX_CRASHES``
        crashes in a row, give it up and stop the node."""
        crashes = 0
        while True:
            started = self._clock()
            try:
                await service()
            except Exception:
                if self._clock() - started > STABLE_AFTER:
                    crashes = 0
                crashes += 1
                self.log.exception("the %s service crashed (%d in a row)", name, crashes)
                if crashes >= MAX_CRASHES:
                    self.failure = f"the {name} service crashed {crashes} times in a row"
                    self.log.critical("%s: stopping the node", self.failure)
                    self.shutdown()
                    return
            else:
                return
            await anyio.sleep(RESTART_DELAYS[min(crashes, len(RESTART_DELAYS)) - 1])

    async def _cancel_executions(self) -> None:
        running = list(self._running)
        for task in running:
            task.cancel()
        if not running:
            return
        with anyio.CancelScope(shield=True):
            _, stubborn = await asyncio.wait(running, timeout=ABANDON_AFTER)
        if stubborn:
            self.log.error(
                "%d task(s) ignored cancellation; abandoned, their rows handed back",
                len(stubborn),
            )

    # -- claimer ----------------------------------------------------------------------------

    async def _run_claimer(self, done: anyio.Event) -> None:
        try:
            await self._supervised("claimer", self._claim_loop)
        finally:
            done.set()

    async def _claim_loop(self) -> None:
        # Never cancelled mid-claim: a claim cut short after its commit would leave tasks
        # claimed with nobody to run them. It ends at the first look after shutdown().
        while not self._shutdown.is_set():
            self._wake.clear()
            try:
                await self.claim_once()
            except DatabaseError as exc:
                self.log.warning("claim failed: %s", exc)
            wait = self.config.poll_interval * (0.9 + 0.2 * random.random())
            if self._next_due is not None:
                wait = min(wait, self._next_due)
            with anyio.move_on_after(wait):
                await self._wake.wait()

    def _may_claim(self) -> bool:
        return not (self._lease_lost or self._shutdown.is_set()) and self.lease_valid()

    async def claim_once(self) -> int:
        """Claim tasks (and cleanups) for the free slots; returns how many were started."""
        if not self._may_claim():
            return 0
        self._claiming = True
        try:
            started = await self._claim_tasks()
            started += await self._claim_cleanups()
        finally:
            self._claiming = False
        return started

    async def _claim_tasks(self) -> int:
        running = sum(1 for e in self.executions.values() if not e.cleanup)
        node_id = self.node_id
        result = await self.backend.claim(
            node_id,
            self._types,
            self.config.concurrency - running,
            self.config.policy,
            self.config.groups,
            busy=list(self.executions),
        )
        self._next_due = result.next_due
        return await self._start_claimed(result.claimed, node_id, cleanup=False)

    async def _claim_cleanups(self) -> int:
        cleaning = sum(1 for e in self.executions.values() if e.cleanup)
        node_id = self.node_id
        claimed = await self.backend.claim_cleanups(
            node_id,
            self._cleanup_types,
            self.config.cleanup_concurrency - cleaning,
            busy=list(self.executions),
        )
        return await self._start_claimed(claimed, node_id, cleanup=True)

    async def _start_claimed(self, claimed: list[Claimed], node_id: int, *, cleanup: bool) -> int:
        if not claimed:
            return 0
        if node_id != self.node_id or self._lease_lost or not self.lease_valid():
            # The claim came back after the lease ran out (or the node was fenced meanwhile):
            # its tasks must not start; they go back to the queue untouched.
            self.log.warning("a claim came back after the lease ran out; handing it back")
            await self.backend.release_claims(node_id, {c.id: c.token for c in claimed})
            return 0
        for item in claimed:
            self._start(item, node_id, cleanup=cleanup)
        return len(claimed)

    def _start(self, claimed: Claimed, node_id: int, *, cleanup: bool) -> None:
        execution = Execution(
            claimed,
            self.registry.get(claimed.type),
            node_id=node_id,
            cleanup=cleanup,
            committer=self.committer,
            backoff=self.config.backoff,
            lease_valid=self.lease_valid,
            max_context_bytes=self.config.max_context_bytes,
            clock=self._clock,
            logger=task_logger(
                self._logger,
                node_id=node_id,
                task_id=claimed.id,
                type=claimed.type,
                user=claimed.user,
                group=claimed.group,
            ),
        )
        if self._shutdown.is_set():
            # Claimed by a claim that was in flight when the node began to stop (a transaction
            # is not cancelled halfway): the task starts stopped and is handed back at once.
            execution.request_stop(StopReason.SHUTDOWN)
        self.executions[claimed.id] = execution
        task = asyncio.get_running_loop().create_task(self._execute(execution))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, execution: Execution) -> None:
        try:
            await execution.run()
        except Exception:  # a bug of the runner itself: never lose it silently
            self.log.exception("the runner of task %s failed", execution.task_id)
            raise
        finally:
            if self.executions.get(execution.task_id) is execution:
                del self.executions[execution.task_id]
            self.wake()

    def stop_local(self, task_id: int, *, lost: bool) -> None:
        """Deliver a stop request for a task this node runs (no round trip needed)."""
        execution = self.executions.get(task_id)
        if execution is not None:
            execution.request_stop(StopReason.LOST if lost else StopReason.USER)

    # -- heartbeat, stop requests, fencing, reconciliation ----------------------------------

    async def _heartbeat_loop(self) -> None:
        """A heartbeat every ``heartbeat_interval``, whether or not the previous one has come
        back: a heartbeat kept waiting (a busy SQLite file, a slow server) does not hold back
        the next, so the lease is lost only when none of them gets through in time. At most
        ``MAX_HEARTBEATS`` are in flight."""
        loop = asyncio.get_running_loop()
        beats: set[asyncio.Task[None]] = set()
        try:
            while True:
                began = loop.time()
                if len(beats) < MAX_HEARTBEATS:
                    beats.add(loop.create_task(self.heartbeat_once()))
                await asyncio.wait(beats, timeout=self.config.heartbeat_interval)
                for beat in [b for b in beats if b.done()]:
                    beats.discard(beat)
                    beat.result()  # a crash of the heartbeat is the service's crash
                await anyio.sleep(max(self.config.heartbeat_interval - (loop.time() - began), 0))
        finally:
            for beat in beats:
                beat.cancel()

    async def heartbeat_once(self) -> None:
        sent = self._clock()
        node_id = self.node_id
        try:
            # Not cancelled when slow (a statement cut off mid-flight can leave its connection
            # stuck); the lease watchdog acts on an expiring lease meanwhile.
            owned = await self.backend.heartbeat(node_id)
            if node_id != self.node_id or self._fencing:
                return  # sent before the node fenced itself: it says nothing of the new id
            if owned is None:
                await self._fence()
                return
        except DatabaseError as exc:
            self.log.warning("heartbeat failed: %s", exc)
            self._check_lease()
            return
        self._lease_deadline = max(
            self._lease_deadline, sent + self.config.node_timeout * LEASE_FRACTION
        )
        if self._lease_lost and self.lease_valid():
            self._lease_lost = False
            self.log.info("database reachable again: claiming again")
            self.wake()
        self._deliver(owned, sent)
        if not self._claiming:
            # Every claim that committed before the heartbeat read the rows has returned and
            # started its executions by now, except one whose reply was lost.
            await self._reconcile(owned)

    async def _lease_loop(self) -> None:
        """Act on an expiring lease on time, even while a heartbeat is still waiting."""
        while True:
            remaining = self._lease_deadline - self._clock()
            await anyio.sleep(min(max(remaining, 0.05), self.config.heartbeat_interval))
            self._check_lease()

    def _check_lease(self) -> None:
        if self.lease_valid() or self._lease_lost:
            return
        self._lease_lost = True
        self.log.error("lost contact with the database for too long: stopping all tasks")
        for execution in list(self.executions.values()):
            execution.request_stop(StopReason.LOST)

    async def _fence(self) -> None:
        """Our row is gone: another node declared us dead and may run our tasks now. Stop
        them at once (their late writes carry the old node id and are rejected) and register
        anew; nothing waits for them to end."""
        self.log.error("node row is gone (declared dead): stopping all tasks at once")
        for execution in list(self.executions.values()):
            execution.request_stop(StopReason.LOST)
        self._fencing = True
        try:
            await self.register()
        finally:
            self._fencing = False
        self._lease_lost = False
        self.fenced.set()
        self.wake()

    def _deliver(self, owned: list[Owned], sent: float) -> None:
        rows = {row.id: row for row in owned}
        for execution in list(self.executions.values()):
            if execution.claimed_at >= sent or execution.node_id != self.node_id:
                continue
            row = rows.get(execution.task_id)
            expected = {State.DELETING} if execution.cleanup else ACTIVE_STATES
            if row is None or row.token != execution.token or row.state not in expected:
                execution.request_stop(StopReason.LOST)
            elif row.state is State.CANCELING:
                execution.request_stop(StopReason.USER)

    async def _reconcile(self, owned: list[Owned]) -> None:
        """Hand back every row this node owns without running it: a claim whose COMMIT
        reply was lost, a claim that failed half-way. Guarded by the claim token, so a row
        that changed meanwhile is left alone."""
        orphans = {
            row.id: row.token
            for row in owned
            if (execution := self.executions.get(row.id)) is None or execution.token != row.token
        }
        if orphans:
            released = await self.backend.release_claims(self.node_id, orphans)
            if released:
                self.log.warning(
                    "released %d task(s) this node owned without running them: %s",
                    released,
                    ", ".join(str(i) for i in sorted(orphans)),
                )
                self.wake()

    async def _stop_poll_loop(self) -> None:
        while True:
            await self._stop_poll.wait()
            self._stop_poll.clear()
            await self.poll_stops_once()

    async def poll_stops_once(self) -> None:
        """Read this node's tasks and deliver stop requests (after a NOTIFY)."""
        sent = self._clock()
        try:
            owned = await self.backend.owned(self.node_id)
        except DatabaseError as exc:
            self.log.warning("stop poll failed: %s", exc)
            return
        self._deliver(owned, sent)

    # -- rescuer ----------------------------------------------------------------------------

    async def _rescue_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.heartbeat_interval * (0.5 + random.random()))
            await self.rescue_once()

    async def rescue_once(self) -> int:
        try:
            released = await self.backend.rescue(
                self.node_id, cleanup_attempts=self.config.cleanup_attempts
            )
        except DatabaseError as exc:
            self.log.warning("rescue failed: %s", exc)
            return 0
        if released:
            self.log.warning("rescued %d task(s) of dead nodes", released)
            self.wake()
        return released

    # -- listener (PostgreSQL) --------------------------------------------------------------

    async def _listen_loop(self) -> None:
        """Listen, and listen again a second after the connection is lost. Sets
        ``_listening`` after the first try, so that the node starts once it would hear a
        notification (or knows it cannot, and polls meanwhile)."""
        try:
            while True:
                try:
                    async with self.backend.listen(self._on_notify) as lost:
                        if self._listening.is_set():
                            self.wake()  # notifications may have been missed meanwhile
                            self._stop_poll.set()
                        self._listening.set()
                        await lost.wait()
                except DatabaseError as exc:
                    self.log.warning("listener connection failed: %s", exc)
                self._listening.set()
                await anyio.sleep(1.0)
        finally:
            self._listening.set()  # a crash too: the node must not wait for it to start

    def _on_notify(self, payload: str) -> None:
        if payload == "wake":
            self.wake()
        elif payload.startswith("stop:") and payload[5:] == str(self.node_id):
            self._stop_poll.set()
