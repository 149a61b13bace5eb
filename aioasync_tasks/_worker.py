"""The executing part of a node: its row, its services and its running tasks (SPEC §6).

Services, each a loop around a ``*_once`` method that tests can call directly:

- **claimer** — claims as many due tasks as there are free slots, in one statement; woken by
  NOTIFY, by a freed slot, or by the poll interval;
- **committer** — group-commits checkpoints and completions (``_committer``);
- **heartbeat** — renews the node's row with the database clock and reads the node's tasks in
  the same round trip: pending stop requests are delivered, a task whose row is gone or no
  longer ours is stopped at once, a missing node row means we were declared dead (fencing);
- **rescuer** — releases the tasks of nodes whose heartbeat is older than ``node_timeout``;
- **listener** (PostgreSQL) — LISTEN for wake-ups and stop requests.

A node also fences itself: when it has not renewed its row for ¾ of ``node_timeout`` (measured
on its own monotonic clock from the moment it *sent* the last successful heartbeat), it cancels
its tasks before any other node can consider it dead, so a task never runs on two nodes at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from ._backends import Backend
from ._backends._base import Claimed, Owned
from ._committer import Committer
from ._errors import DatabaseError
from ._logging import node_logger, task_logger
from ._registry import TaskRegistry
from ._runner import Backoff, Execution, StopReason
from ._scheduling import SchedulingPolicy
from ._states import ACTIVE_STATES, State

LEASE_FRACTION = 0.75


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


class Worker:
    """Runs tasks for one node; created by ``Node.start()`` when the node executes tasks."""

    def __init__(
        self,
        backend: Backend,
        registry: TaskRegistry,
        config: WorkerConfig,
        logger: logging.Logger,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.config = config
        self._logger = logger
        self.log = node_logger(logger, None)
        self.node_id = 0
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.executions: dict[int, Execution] = {}
        self.committer = Committer(backend, cleanup_attempts=config.cleanup_attempts, logger=logger)
        self._wake = asyncio.Event()
        self._stop_poll = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        """The asyncio tasks of the executions (plain tasks: an anyio task group's spawn
        costs several times more, and a node may start thousands per second)."""
        self._fencing = False
        self._lease_deadline = 0.0
        self._lease_lost = False
        self._next_due: float | None = None
        self.fenced = asyncio.Event()
        """Set each time the node found itself declared dead (for tests)."""
        self._types = registry.names
        self._cleanup_types = [t.name for t in registry if t.has_cleanup]

    # -- lifecycle --------------------------------------------------------------------------

    async def register(self) -> None:
        self.node_id = await self.backend.register_node(
            self.name, self.config.concurrency, self._types
        )
        self._lease_deadline = time.monotonic() + self.config.node_timeout * LEASE_FRACTION
        self.log = node_logger(self._logger, self.node_id)
        self.log.info("node registered as %s with types %s", self.name, ", ".join(self._types))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the services until ``shutdown()``, then stop gracefully (SPEC §6)."""
        await self.register()
        try:
            async with anyio.create_task_group() as services:
                await services.start(self.committer.run)
                services.start_soon(self._heartbeat_loop)
                services.start_soon(self._lease_loop)
                services.start_soon(self._rescue_loop)
                services.start_soon(self._stop_poll_loop)
                if self.backend.supports_notify:
                    await services.start(self._listen_loop)
                try:
                    claimer_done = anyio.Event()
                    services.start_soon(self._claim_loop, claimer_done)
                    task_status.started()
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self.backend.deregister(self.node_id)
                    self.log.info("node deregistered")
                except DatabaseError as exc:
                    self.log.error("could not deregister: %s", exc)  # noqa: TRY400 - expected

    def shutdown(self) -> None:
        self._shutdown.set()

    def wake(self) -> None:
        self._wake.set()

    def lease_valid(self) -> bool:
        return time.monotonic() < self._lease_deadline

    # -- claimer ----------------------------------------------------------------------------

    async def _claim_loop(self, done: anyio.Event) -> None:
        # Never cancelled mid-claim: a claim cut short after its commit would leave tasks
        # claimed with nobody to run them. It ends at the first look after shutdown().
        try:
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
        finally:
            done.set()

    async def claim_once(self) -> int:
        """Claim tasks (and cleanups) for the free slots; returns how many were started."""
        if self._fencing or self._lease_lost or self._shutdown.is_set():
            return 0
        running = sum(1 for e in self.executions.values() if not e.cleanup)
        cleaning = len(self.executions) - running
        node_id = self.node_id
        free = self.config.concurrency - running
        result = await self.backend.claim(
            node_id, self._types, free, self.config.policy, self.config.groups
        )
        claimed = result.claimed
        self._next_due = result.next_due
        cleanups = await self.backend.claim_cleanups(
            node_id, self._cleanup_types, self.config.cleanup_concurrency - cleaning
        )
        for item in claimed:
            self._start(item, node_id, cleanup=False)
        for item in cleanups:
            self._start(item, node_id, cleanup=True)
        return len(claimed) + len(cleanups)

    def _start(self, claimed: Claimed, node_id: int, *, cleanup: bool) -> None:
        execution = Execution(
            claimed,
            self.registry.get(claimed.type),
            node_id=node_id,
            cleanup=cleanup,
            committer=self.committer,
            backoff=self.config.backoff,
            lease_valid=self.lease_valid,
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

    async def _cancel_executions(self) -> None:
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(running)

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

    # -- heartbeat, stop requests, fencing --------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.heartbeat_once()
            await anyio.sleep(self.config.heartbeat_interval)

    async def heartbeat_once(self) -> None:
        if self._fencing:
            return
        sent = time.monotonic()
        try:
            # Not cancelled when slow (a statement cut off mid-flight can leave its connection
            # stuck); the lease loop acts on an expiring lease meanwhile.
            owned = await self.backend.heartbeat(self.node_id)
        except DatabaseError as exc:
            self.log.warning("heartbeat failed: %s", exc)
            self._check_lease()
            return
        if owned is None:
            await self._fence()
            return
        self._lease_deadline = sent + self.config.node_timeout * LEASE_FRACTION
        if self._lease_lost:
            await self._recover_lease()
            return
        self._deliver(owned, sent)

    async def _lease_loop(self) -> None:
        """Act on an expiring lease on time, even while a heartbeat is still waiting."""
        while True:
            await anyio.sleep(max(self._lease_deadline - time.monotonic(), 0.05))
            self._check_lease()

    def _check_lease(self) -> None:
        if self.lease_valid() or self._lease_lost:
            return
        self._lease_lost = True
        self.log.error("lost contact with the database for too long: stopping all tasks")
        for execution in list(self.executions.values()):
            execution.request_stop(StopReason.LOST)

    async def _recover_lease(self) -> None:
        """Our row survived the outage: hand the tasks we cancelled back to the queue."""
        await self._wait_for_executions()
        await self.backend.release(self.node_id)
        self._lease_lost = False
        self.log.info("database reachable again; released the tasks stopped meanwhile")
        self.wake()

    async def _wait_for_executions(self) -> None:
        while self.executions:
            await next(iter(self.executions.values())).done.wait()

    async def _fence(self) -> None:
        """Our row is gone: another node declared us dead and may run our tasks now."""
        self._fencing = True
        old_id = self.node_id
        self.log.error("node row is gone (declared dead): stopping all tasks at once")
        for execution in list(self.executions.values()):
            execution.request_stop(StopReason.LOST)
        try:
            await self._wait_for_executions()
            await self.backend.release(old_id)  # whatever no rescuer released yet
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
            if row is None or row.state not in expected:
                execution.request_stop(StopReason.LOST)
            elif row.state is State.CANCELING:
                execution.request_stop(StopReason.USER)

    async def _stop_poll_loop(self) -> None:
        while True:
            await self._stop_poll.wait()
            self._stop_poll.clear()
            await self.poll_stops_once()

    async def poll_stops_once(self) -> None:
        """Read this node's tasks and deliver stop requests (after a NOTIFY)."""
        if self._fencing:
            return
        sent = time.monotonic()
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
            released = await self.backend.rescue(self.config.node_timeout)
        except DatabaseError as exc:
            self.log.warning("rescue failed: %s", exc)
            return 0
        if released:
            self.log.warning("rescued %d task(s) of dead nodes", released)
            self.wake()
        return released

    # -- listener (PostgreSQL) --------------------------------------------------------------

    async def _listen_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        channel = getattr(self.backend, "channel", "")
        started = False
        while True:
            try:
                async with self.backend.engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    driver: Any = raw.driver_connection
                    closed = asyncio.Event()
                    driver.add_termination_listener(lambda _conn, done=closed: done.set())
                    await driver.add_listener(channel, self._on_notify)
                    try:
                        if started:
                            self.wake()  # notifications may have been missed meanwhile
                            self._stop_poll.set()
                        else:
                            started = True
                            task_status.started()
                        await closed.wait()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await conn.invalidate()
            except (DatabaseError, OSError, Exception) as exc:
                self.log.warning("listener connection failed: %s", exc)
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(1.0)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == "wake":
            self.wake()
        elif payload.startswith("stop:") and payload[5:] == str(self.node_id):
            self._stop_poll.set()
