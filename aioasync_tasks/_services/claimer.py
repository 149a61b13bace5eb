"""The claimer: claims as many due tasks as the node has free slots, in one statement, then
cleanups in their own slots, and starts an execution for each (docs/design.md §6.8). Woken by
NOTIFY, by a freed slot, by a local operation, or by the poll interval (docs/design.md §14).
"""

from __future__ import annotations

import asyncio
import random

import anyio

from .._backends._driver import (
    ClaimCursor,
    Claimed,
    ClaimParams,
    CleanupClaimParams,
    ReleaseClaimsParams,
)
from .._committer import Committer
from .._errors import DatabaseError
from .._logging import task_logger
from .._runner import Execution, StopReason
from .._telemetry import Attempt
from .state import NodeState

CLAIM_WINDOWS = 4
"""The most claims a node makes at once while they come back short from full windows of
queues: how far past queues with nothing to give it looks before it sleeps."""


class Claimer:
    """Claims tasks and cleanups and starts their executions."""

    def __init__(self, state: NodeState, committer: Committer) -> None:
        self._state = state
        self._committer = committer
        self._next_due: float | None = None
        """Seconds until the next delayed task is due, as the last claim saw it."""
        self._cursor = ClaimCursor()
        """Where the next claim's window of queues starts (docs/design.md §6.3)."""

    async def run(self) -> None:
        """Claim, then sleep for ``poll_interval`` (±10 %), or until the next delayed task is
        due, unless woken first. Ends at the first look after the node began to stop."""
        # Never cancelled mid-claim: a claim cut short after its commit would leave tasks
        # claimed with nobody to run them.
        state = self._state
        while not state.stopping.is_set():
            state.wakeup.clear()
            try:
                await self.run_once()
            except DatabaseError as exc:
                state.log.warning("claim failed: %s", exc)
            wait = state.config.poll_interval * (0.9 + 0.2 * random.random())
            if self._next_due is not None:
                wait = min(wait, self._next_due)
            with anyio.move_on_after(wait):
                await state.wakeup.wait()

    async def run_once(self) -> int:
        """Claim tasks (and cleanups) for the free slots; returns how many were started."""
        state = self._state
        if not state.may_claim():
            return 0
        state.claiming = True
        try:
            started = await self._claim_tasks()
            started += await self._claim_cleanups()
        finally:
            state.claiming = False
        return started

    async def _claim_tasks(self) -> int:
        """Claim for the free slots; while claims come back short from full windows of queues,
        claim again from where the window ended, up to ``CLAIM_WINDOWS`` claims (docs/design.md
        §6.3)."""
        state = self._state
        config = state.config
        started = 0
        for _ in range(CLAIM_WINDOWS):
            running = sum(1 for e in state.executions.values() if not (e.cleanup or e.ending))
            free = config.concurrency - running
            if free <= 0:
                return started
            node_id = state.node_id
            result = await state.driver.claim(
                ClaimParams(
                    node_id,
                    state.types,
                    free,
                    config.policy,
                    config.groups,
                    busy=list(state.executions),
                    after=self._cursor,
                )
            )
            self._next_due = result.next_due
            self._cursor = result.cursor
            started += await self._start_claimed(result.claimed, node_id, cleanup=False)
            if not result.more or len(result.claimed) >= free or not state.may_claim():
                break
        return started

    async def _claim_cleanups(self) -> int:
        state = self._state
        cleaning = sum(1 for e in state.executions.values() if e.cleanup)
        node_id = state.node_id
        claimed = await state.driver.claim_cleanups(
            CleanupClaimParams(
                node_id,
                state.cleanup_types,
                state.config.cleanup_concurrency - cleaning,
                busy=list(state.executions),
            )
        )
        return await self._start_claimed(claimed, node_id, cleanup=True)

    async def _start_claimed(self, claimed: list[Claimed], node_id: int, *, cleanup: bool) -> int:
        if not claimed:
            return 0
        state = self._state
        if node_id != state.node_id or state.lease_lost or not state.lease_valid():
            # The claim came back after the lease ran out (or the node was fenced meanwhile):
            # its tasks must not start; they go back to the queue untouched.
            state.log.warning("a claim came back after the lease ran out; handing it back")
            claims = {c.id: c.token for c in claimed}
            await state.driver.release_claims(ReleaseClaimsParams(node_id, claims))
            return 0
        for item in claimed:
            self._start(item, node_id, cleanup=cleanup)
        return len(claimed)

    def _start(self, claimed: Claimed, node_id: int, *, cleanup: bool) -> None:
        state = self._state
        attempt = _attempt(claimed, node_id, cleanup, state) if state.telemetry.enabled else None
        execution = Execution(
            claimed,
            state.registry.get(claimed.type),
            node_id=node_id,
            cleanup=cleanup,
            committer=self._committer,
            backoff=state.config.backoff,
            lease_valid=state.lease_valid,
            max_context_bytes=state.config.max_context_bytes,
            clock=state.clock,
            ended=state.wake,
            attempt=attempt,
            telemetry=state.telemetry,
            logger=task_logger(
                state.logger,
                node_id=node_id,
                task_id=claimed.id,
                type=claimed.type,
                user=claimed.user,
                group=claimed.group,
            ),
        )
        if state.stopping.is_set():
            # Claimed by a claim that was in flight when the node began to stop (a transaction
            # is not cancelled halfway): the task starts stopped and is handed back at once.
            execution.request_stop(StopReason.SHUTDOWN)
        state.executions[claimed.id] = execution
        task = asyncio.get_running_loop().create_task(self._execute(execution))
        state.running.add(task)
        task.add_done_callback(state.running.discard)

    async def _execute(self, execution: Execution) -> None:
        state = self._state
        try:
            await execution.run()
        except Exception:  # a bug of the runner itself: never lose it silently
            state.log.exception("the runner of task %s failed", execution.task_id)
            raise
        finally:
            if state.executions.get(execution.task_id) is execution:
                del state.executions[execution.task_id]
            state.wake()


def _attempt(claimed: Claimed, node_id: int, cleanup: bool, state: NodeState) -> Attempt:
    """What the node's observers are told of an attempt (built only when there are some)."""
    return Attempt(
        task_id=claimed.id,
        type=claimed.type,
        user=claimed.user,
        group=claimed.group,
        number=claimed.attempts,
        max_attempts=state.config.cleanup_attempts if cleanup else claimed.max_attempts,
        cleanup=cleanup,
        node_id=node_id,
        waited=claimed.waited,
        trace_parent=claimed.trace_parent,
    )
