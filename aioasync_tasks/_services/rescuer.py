"""The rescuer: releases the tasks of other nodes whose heartbeat is older than *their own*
``node_timeout``, and of rows whose node is gone (docs/design.md §10.1).
"""

from __future__ import annotations

import random

import anyio

from .._backends._driver import RescueParams
from .._errors import DatabaseError
from .state import NodeState


class Rescuer:
    """Looks for dead nodes every 0.5 to 1.5 ``heartbeat_interval`` (at random, so that the
    rescuers of many nodes spread out)."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._state.config.heartbeat_interval * (0.5 + random.random()))
            await self.run_once()

    async def run_once(self) -> int:
        """One rescue; returns how many tasks it released."""
        state = self._state
        try:
            released = await state.driver.rescue(
                RescueParams(state.node_id, state.config.cleanup_attempts)
            )
        except DatabaseError as exc:
            state.log.warning("rescue failed: %s", exc)
            return 0
        if released:
            state.log.warning("rescued %d task(s) of dead nodes", released)
            state.wake()
        return released
