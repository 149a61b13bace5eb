"""``NodeRuntime``: the executing part of a node, composed of its services (docs/design.md §8;
docs/explanation.md, "A node is cut off"). It registers the node, runs the services supervised,
stops gracefully and deregisters.

A crashed service is logged with its traceback and restarts with back-off; a service that
keeps crashing stops the node, which hands its tasks back (docs/design.md §8.3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from .._backends._driver import DeregisterParams
from .._committer import Committer
from .._errors import DatabaseError
from .._runner import StopReason
from .claimer import Claimer
from .heartbeat import Heartbeat
from .listener import Listener
from .pruner import Pruner
from .rescuer import Rescuer
from .state import NodeState
from .ticker import Ticker

RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Seconds before a crashed service restarts: the n-th crash in a row waits the n-th delay."""
MAX_CRASHES = 5
"""Crashes in a row after which a service is given up and the node stops."""
STABLE_AFTER = 60.0
"""Seconds a service must run without crashing for its next crash to count as the first."""
ABANDON_AFTER = 1.0
"""Seconds ``stop()`` waits, once its time is up, for cancelled executions to end; an execution
that ignores cancellation longer is abandoned (its row is handed back all the same)."""
DEREGISTER_TIMEOUT = 2.0
"""The bound of the last statement of a stop: removing the node's row."""


@dataclass(frozen=True, slots=True)
class Services:
    """The services of a node that runs tasks and the state they share (``Node.services``,
    for tests and operators). Each service has ``run()``, its loop, and ``run_once()``, one
    round of it, which a test may call while the node runs."""

    state: NodeState
    claimer: Claimer
    heartbeat: Heartbeat
    """Also the lease watchdog (``check_lease``) and the stop poll (``poll_stops_once``)."""
    rescuer: Rescuer
    committer: Committer
    listener: Listener | None
    """None where the database has no notifications (SQLite)."""
    pruner: Pruner | None
    """None without ``retention=`` or ``failed_retention=``."""
    ticker: Ticker
    """Enqueues the ticks of periodic schedules (docs/design.md §17)."""


class NodeRuntime:
    """Runs tasks for one node, composing its services around their shared ``state``; created
    by ``Node.start()`` when the node executes tasks."""

    def __init__(self, state: NodeState) -> None:
        driver = state.driver
        committer = Committer(
            driver,
            cleanup_attempts=state.config.cleanup_attempts,
            logger=state.logger,
            telemetry=state.telemetry,
        )
        self.state = state
        self.services = Services(
            state=state,
            claimer=Claimer(state, committer),
            heartbeat=Heartbeat(state),
            rescuer=Rescuer(state),
            committer=committer,
            listener=Listener(state) if driver.supports_notify else None,
            pruner=None
            if state.config.retention is None
            else Pruner(driver, state.config.retention, state.logger),
            ticker=Ticker(driver, state.registry, lambda: state.log, state.config.poll_interval),
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the services until ``shutdown()`` (or a service is given up), then stop
        gracefully (docs/design.md §12; docs/explanation.md, "A node shuts down
        gracefully")."""
        state, services = self.state, self.services
        with anyio.CancelScope(shield=True):  # a row registered is a row deregistered below
            await services.heartbeat.register()
        try:
            async with anyio.create_task_group() as group:
                for name, service in (
                    ("committer", services.committer.run),
                    ("heartbeat", services.heartbeat.run),
                    ("lease", services.heartbeat.watch_lease),
                    ("rescuer", services.rescuer.run),
                    ("stop poll", services.heartbeat.poll_stops),
                    ("ticker", services.ticker.run),
                ):
                    group.start_soon(self._supervised, name, service)
                if services.pruner is not None:
                    group.start_soon(self._supervised, "pruner", services.pruner.run)
                if services.listener is not None:
                    group.start_soon(self._supervised, "listener", services.listener.run)
                    await services.listener.listening.wait()
                claimer_done = anyio.Event()
                group.start_soon(self._run_claimer, claimer_done)
                task_status.started()
                try:
                    await state.stopping.wait()
                    # The claimer finishes its claim in flight and exits first, so that no task
                    # handed back below can be claimed again by this node on its way out.
                    state.wake()
                    await claimer_done.wait()
                    state.stop_all(StopReason.SHUTDOWN)
                    while state.running:
                        await asyncio.wait(set(state.running))
                finally:
                    await self._cancel_executions()  # only left when stop() ran out of time
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DEREGISTER_TIMEOUT):
                try:
                    await state.driver.deregister(
                        DeregisterParams(state.node_id, state.config.cleanup_attempts)
                    )
                    state.log.info("node deregistered")
                except DatabaseError as exc:
                    state.log.error("could not deregister: %s", exc)  # noqa: TRY400 - expected

    def shutdown(self) -> None:
        """Begin the graceful stop; ``run()`` returns when it is done."""
        self.state.stopping.set()

    async def _run_claimer(self, done: anyio.Event) -> None:
        try:
            await self._supervised("claimer", self.services.claimer.run)
        finally:
            done.set()

    async def _supervised(self, name: str, service: Callable[[], Awaitable[None]]) -> None:
        """Run ``service``; restart it with back-off when it crashes; after ``MAX_CRASHES``
        crashes in a row, give it up and stop the node."""
        state = self.state
        crashes = 0
        while True:
            started = state.clock()
            try:
                await service()
            except Exception:
                if state.clock() - started > STABLE_AFTER:
                    crashes = 0
                crashes += 1
                state.log.exception("the %s service crashed (%d in a row)", name, crashes)
                if crashes >= MAX_CRASHES:
                    state.failure = f"the {name} service crashed {crashes} times in a row"
                    state.log.critical("%s: stopping the node", state.failure)
                    self.shutdown()
                    return
            else:
                return
            await anyio.sleep(RESTART_DELAYS[min(crashes, len(RESTART_DELAYS)) - 1])

    async def _cancel_executions(self) -> None:
        running = list(self.state.running)
        for task in running:
            task.cancel()
        if not running:
            return
        with anyio.CancelScope(shield=True):
            _, stubborn = await asyncio.wait(running, timeout=ABANDON_AFTER)
        if stubborn:
            self.state.log.error(
                "%d task(s) ignored cancellation; abandoned, their rows handed back",
                len(stubborn),
            )
