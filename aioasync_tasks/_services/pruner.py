"""The pruner: a node's service that removes old FINISHED and FAILED tasks (retention,
docs/design.md §4.5).

Every worker with ``retention=`` (or ``failed_retention=``) runs a pruner; one round is one
``Driver.prune`` per batch, and only one node prunes at a time (the others skip their round),
so many workers with the same settings cost one pruner's work.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import anyio

from .._backends._driver import Driver, PruneParams
from .._errors import DatabaseError

PRUNE_BATCH = 1000
"""Tasks of each state one prune transaction removes at most."""
PRUNE_INTERVAL = 60.0
"""Seconds between rounds at most; shorter for short retentions (``Retention.interval``)."""
MIN_PRUNE_INTERVAL = 1.0
PRUNE_PAUSE = 0.05
"""Seconds between two batches of one round: the other writers get in (the write lock)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long FINISHED and FAILED tasks are kept, in seconds (None: for ever)."""

    finished: float | None
    failed: float | None

    @property
    def interval(self) -> float:
        """Seconds between pruning rounds: half the shortest retention, from 1 s to 60 s."""
        ages = [age for age in (self.finished, self.failed) if age is not None]
        return min(PRUNE_INTERVAL, max(MIN_PRUNE_INTERVAL, min(ages) / 2))


class Pruner:
    """A node's retention service: ``run`` loops, ``run_once`` is one round."""

    def __init__(self, driver: Driver, retention: Retention, logger: logging.Logger) -> None:
        self.driver = driver
        self.retention = retention
        self.log = logger
        self.params = PruneParams(retention.finished, retention.failed, limit=PRUNE_BATCH)

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.retention.interval * (0.5 + random.random()))
            await self.run_once()

    async def run_once(self) -> int:
        """Remove what is past its retention, batch after batch; returns how many tasks. A
        round another node is running already is skipped (0)."""
        removed = 0
        while True:
            try:
                result = await self.driver.prune(self.params)
            except DatabaseError as exc:
                self.log.warning("pruning old tasks failed: %s", exc)
                break
            removed += result.removed
            if not result.more:
                break
            await asyncio.sleep(PRUNE_PAUSE)
        if removed:
            self.log.info("removed %d finished or failed task(s) past their retention", removed)
        return removed
