"""The heartbeat: the node's row, its lease, fencing, reconciliation and the delivery of stop
requests (docs/design.md §9, §10.2, §14).

Three loops, each supervised on its own:

- **heartbeat** (``run``) — renews the node's row with the database clock and reads the node's
  tasks in the same round trip: pending stop requests are delivered, a task whose row is gone
  or no longer ours is stopped at once, a row we own without running it is handed back
  (reconciliation), a missing node row means we were declared dead (fencing);
- **lease** (``watch_lease``) — a watchdog: when the node has not renewed its row for ¾ of
  ``node_timeout`` (measured on its own clock from the moment it *sent* the last successful
  heartbeat) it stops its tasks before any other node can consider it dead;
- **stop poll** (``poll_stops``) — reads the node's tasks when a ``stop:`` message came, and
  delivers their stop requests.

Nothing here waits for a task to end: fencing and a lost lease only *ask* the executions to
stop; each lost execution then releases its own row, guarded by its claim token, when it has
ended.
"""

from __future__ import annotations

import asyncio

import anyio

from .._backends._driver import Owned, RegisterParams, ReleaseClaimsParams
from .._errors import DatabaseError
from .._logging import node_logger
from .._models import State
from .._runner import StopReason
from .._states import ACTIVE_STATES
from .state import NodeState

MAX_HEARTBEATS = 3
"""Heartbeats in flight at once at most (each holds a connection while it waits)."""


class Heartbeat:
    """Keeps the node's row and lease, and its executions in line with their rows."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    async def register(self) -> None:
        """Insert the node's row (a new id each time) and start its lease (docs/design.md
        §8.1)."""
        state = self._state
        config = state.config
        sent = state.clock()
        state.node_id = await state.driver.register_node(
            RegisterParams(
                state.name,
                config.concurrency,
                state.types,
                heartbeat_interval=config.heartbeat_interval,
                node_timeout=config.node_timeout,
            )
        )
        state.start_lease(sent)
        state.log = node_logger(state.logger, state.node_id)
        state.log.info("node registered as %s with types %s", state.name, ", ".join(state.types))

    # -- the heartbeat ----------------------------------------------------------------------

    async def run(self) -> None:
        """A heartbeat every ``heartbeat_interval``, whether or not the previous one has come
        back: a heartbeat kept waiting (a busy SQLite file, a slow server) does not hold back
        the next, so the lease is lost only when none of them gets through in time. At most
        ``MAX_HEARTBEATS`` are in flight."""
        interval = self._state.config.heartbeat_interval
        loop = asyncio.get_running_loop()
        beats: set[asyncio.Task[None]] = set()
        try:
            while True:
                began = loop.time()
                if len(beats) < MAX_HEARTBEATS:
                    beats.add(loop.create_task(self.run_once()))
                await asyncio.wait(beats, timeout=interval)
                for beat in [b for b in beats if b.done()]:
                    beats.discard(beat)
                    beat.result()  # a crash of the heartbeat is the service's crash
                await anyio.sleep(max(interval - (loop.time() - began), 0))
        finally:
            for beat in beats:
                beat.cancel()

    async def run_once(self) -> None:
        """One heartbeat (docs/design.md §9.1)."""
        state = self._state
        sent = state.clock()
        node_id = state.node_id
        try:
            # Not cancelled when slow (a statement cut off mid-flight can leave its connection
            # stuck); the lease watchdog acts on an expiring lease meanwhile.
            owned = await state.driver.heartbeat(node_id)
            if node_id != state.node_id or state.fencing:
                return  # sent before the node fenced itself: it says nothing of the new id
            if owned is None:
                await self._fence()
                return
        except DatabaseError as exc:
            state.log.warning("heartbeat failed: %s", exc)
            self.check_lease()
            return
        state.renew_lease(sent)
        if state.lease_lost and state.lease_valid():
            state.lease_lost = False
            state.log.info("database reachable again: claiming again")
            state.wake()
        self._deliver(owned, sent)
        if not state.claiming:
            # Every claim that committed before the heartbeat read the rows has returned and
            # started its executions by now, except one whose reply was lost.
            await self._reconcile(owned)

    async def _fence(self) -> None:
        """Our row is gone: another node declared us dead and may run our tasks now. Stop
        them at once (their late writes carry the old node id and are rejected) and register
        anew; nothing waits for them to end (docs/design.md §9.4)."""
        state = self._state
        state.log.error("node row is gone (declared dead): stopping all tasks at once")
        state.stop_all(StopReason.LOST)
        state.fencing = True
        try:
            await self.register()
        finally:
            state.fencing = False
        state.lease_lost = False
        state.fenced.set()
        state.telemetry.fenced()
        state.wake()

    def _deliver(self, owned: list[Owned], sent: float) -> None:
        """Stop the executions whose rows say so (docs/design.md §9.2)."""
        state = self._state
        rows = {row.id: row for row in owned}
        for execution in list(state.executions.values()):
            if execution.claimed_at >= sent or execution.node_id != state.node_id:
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
        that changed meanwhile is left alone (docs/design.md §10.2)."""
        state = self._state
        orphans = {
            row.id: row.token
            for row in owned
            if (execution := state.executions.get(row.id)) is None or execution.token != row.token
        }
        if orphans:
            released = await state.driver.release_claims(
                ReleaseClaimsParams(state.node_id, orphans)
            )
            if released:
                state.log.warning(
                    "released %d task(s) this node owned without running them: %s",
                    released,
                    ", ".join(str(i) for i in sorted(orphans)),
                )
                state.wake()

    # -- the lease watchdog -----------------------------------------------------------------

    async def watch_lease(self) -> None:
        """Act on an expiring lease on time, even while a heartbeat is still waiting."""
        state = self._state
        while True:
            remaining = state.lease_deadline - state.clock()
            await anyio.sleep(min(max(remaining, 0.05), state.config.heartbeat_interval))
            self.check_lease()

    def check_lease(self) -> None:
        """One round of the watchdog: when the lease has run out, mark it lost and stop every
        execution (docs/design.md §9.3)."""
        state = self._state
        if state.lease_valid() or state.lease_lost:
            return
        state.lease_lost = True
        state.log.error("lost contact with the database for too long: stopping all tasks")
        state.stop_all(StopReason.LOST)
        state.telemetry.lease_lost()

    # -- the stop poll ----------------------------------------------------------------------

    async def poll_stops(self) -> None:
        """Read the node's tasks each time a ``stop:`` message asks for it."""
        state = self._state
        while True:
            await state.stop_poll.wait()
            state.stop_poll.clear()
            await self.poll_stops_once()

    async def poll_stops_once(self) -> None:
        """Read this node's tasks and deliver stop requests (after a NOTIFY)."""
        state = self._state
        sent = state.clock()
        try:
            owned = await state.driver.owned(state.node_id)
        except DatabaseError as exc:
            state.log.warning("stop poll failed: %s", exc)
            return
        self._deliver(owned, sent)
