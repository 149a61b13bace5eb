"""The ticker: the service of a worker node that enqueues the ticks of periodic schedules
(docs/design.md §17).

Every worker node runs one, for the task types of its registry. At start it declares the
schedules of those types (``cron=``/``every=`` of the registry; each named after its type).
Then it asks the database to enqueue whatever is due (``Driver.tick``: one transaction that
inserts each due tick's task and advances the schedule by compare-and-set, so a tick is
enqueued once however many nodes tick), and sleeps until the next tick is due — at most
``POLLS`` poll intervals, so that a schedule another node adds is seen — or until ``wake()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import anyio

from .._backends._driver import Driver, PutScheduleParams, ScheduledType, TickParams, TickResult
from .._errors import DatabaseError
from .._registry import TaskRegistry

POLLS = 5
"""The longest sleep of the ticker, in ``poll_interval``s (5 s by default)."""
MIN_SLEEP = 0.02
"""The shortest sleep between two rounds: a schedule still due is held by another node."""
RETRY_AFTER = 1.0
"""Seconds before the next round after a failed one."""


class Ticker:
    """Enqueues the ticks of the schedules of ``registry``'s types; ``run()`` loops around
    ``run_once()``."""

    def __init__(
        self,
        backend: Driver,
        registry: TaskRegistry,
        log: Callable[[], logging.LoggerAdapter[logging.Logger]],
        poll_interval: float,
    ) -> None:
        self._backend = backend
        self._log = log
        self._max_sleep = POLLS * poll_interval
        self._types = TickParams(
            tuple(ScheduledType(t.name, t.max_attempts, t.has_cleanup) for t in registry)
        )
        self._declared = [(t.name, period) for t in registry if (period := t.period) is not None]
        self._declare_pending = bool(self._declared)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the schedules now (one was added or changed on this node)."""
        self._wake.set()

    async def declare(self) -> None:
        """Create or update the schedules declared with the registry's types. A schedule whose
        period is unchanged keeps its next tick."""
        now = datetime.now(UTC)
        for name, period in self._declared:
            await self._backend.put_schedule(
                PutScheduleParams(
                    name=name,
                    type=name,
                    period=period,
                    context="",
                    user="",
                    group="default",
                    priority=0,
                    max_attempts=None,
                    declared=True,
                    next_tick=period.after(now),
                )
            )
        self._declare_pending = False

    async def run_once(self) -> TickResult:
        """Enqueue the due ticks (declaring the registry's schedules first, once)."""
        if self._declare_pending:
            await self.declare()
        result = await self._backend.tick(self._types)
        log = self._log()
        for fired in result.fired:
            if fired.skipped:
                log.warning(
                    "schedule %s missed ticks (no node enqueued them in time): only the latest, "
                    "%s, is enqueued, as task %d",
                    fired.schedule,
                    fired.tick.isoformat(),
                    fired.task_id,
                )
            else:
                log.info(
                    "schedule %s: tick %s enqueued as task %d",
                    fired.schedule,
                    fired.tick.isoformat(),
                    fired.task_id,
                )
        for name, why in result.broken:
            log.error("schedule %s: its period cannot be computed here (%s); put off", name, why)
        return result

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                result = await self.run_once()
            except DatabaseError as exc:
                self._log().warning("enqueueing periodic tasks failed: %s", exc)
                wait = RETRY_AFTER
            else:
                due = self._max_sleep if result.next_due is None else result.next_due
                wait = max(min(due, self._max_sleep), MIN_SLEEP)
            with anyio.move_on_after(wait):
                await self._wake.wait()
