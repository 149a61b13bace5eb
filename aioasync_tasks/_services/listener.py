"""The listener (PostgreSQL): LISTEN for ``wake``, which wakes the claimer, and for
``stop:<node id>``, which makes the stop poll read this node's tasks (docs/design.md §14).
"""

from __future__ import annotations

import asyncio

import anyio

from .._errors import DatabaseError
from .state import NodeState

RECONNECT_AFTER = 1.0
"""Seconds between a lost (or refused) listening connection and the next try."""


class Listener:
    """Listens on one connection of its own, and again after it is lost."""

    def __init__(self, state: NodeState) -> None:
        self._state = state
        self.listening = asyncio.Event()
        """Set after the first try to listen, so that the node starts once it would hear a
        notification (or knows it cannot, and polls meanwhile)."""

    async def run(self) -> None:
        """Listen, and listen again a second after the connection is lost."""
        try:
            while True:
                await self.run_once()
                await anyio.sleep(RECONNECT_AFTER)
        finally:
            self.listening.set()  # a crash too: the node must not wait for it to start

    async def run_once(self) -> None:
        """Listen until the connection is lost (or cannot be had)."""
        state = self._state
        try:
            async with state.driver.listen(self.on_message) as lost:
                if self.listening.is_set():
                    state.wake()  # notifications may have been missed meanwhile
                    state.stop_poll.set()
                self.listening.set()
                await lost.wait()
        except DatabaseError as exc:
            state.log.warning("listener connection failed: %s", exc)
        self.listening.set()

    def on_message(self, payload: str) -> None:
        """Act on one notification."""
        state = self._state
        if payload == "wake":
            state.wake()
        elif payload.startswith("stop:") and payload[5:] == str(state.node_id):
            state.stop_poll.set()
