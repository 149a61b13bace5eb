"""Group commit: checkpoints and completions of all running tasks, one flush per batch.

A runner hands its write to the committer and waits; the committer writes everything that is
waiting in one go (one statement for the checkpoints, one short transaction for the
completions) and answers each runner with whether its write was accepted — it is not when the
row is no longer owned by the node (rescued, force-deleted, fenced). While a flush is in
flight new writes queue up, so batches grow with load and latency stays one round trip when
idle. A failed flush (database unreachable) is retried: a checkpoint is durable before the task
resumes, or the task does not resume.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ._backends import Backend
from ._backends._base import Completion
from ._errors import DatabaseError

RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class _Batch:
    contexts: dict[int, str] = field(default_factory=dict)
    context_waiters: dict[int, asyncio.Future[bool]] = field(default_factory=dict)
    completions: list[Completion] = field(default_factory=list)
    completion_waiters: dict[int, asyncio.Future[bool]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.contexts or self.completions)


class Committer:
    """Buffers owner-bound writes per node id and flushes them in batches."""

    def __init__(self, backend: Backend, *, cleanup_attempts: int, logger: logging.Logger) -> None:
        self._backend = backend
        self._cleanup_attempts = cleanup_attempts
        self._log = logger
        self._batches: dict[int, _Batch] = {}
        self._pending = asyncio.Event()
        self.flushes = 0
        """How many flushes ran (for tests and benchmarks)."""

    def _batch(self, node_id: int) -> _Batch:
        batch = self._batches.get(node_id)
        if batch is None:
            batch = self._batches[node_id] = _Batch()
        self._pending.set()
        return batch

    async def checkpoint(self, node_id: int, task_id: int, context: str) -> bool:
        """Store ``context`` for a task run by ``node_id``; True once durable and accepted."""
        batch = self._batch(node_id)
        batch.contexts[task_id] = context
        waiter = batch.context_waiters.get(task_id)
        if waiter is None:
            waiter = batch.context_waiters[task_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(waiter)

    async def complete(self, node_id: int, completion: Completion) -> bool:
        """Apply the end of an execution; True once durable and accepted."""
        batch = self._batch(node_id)
        batch.completions.append(completion)
        waiter = asyncio.get_running_loop().create_future()
        batch.completion_waiters[completion.task_id] = waiter
        return await asyncio.shield(waiter)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._pending.wait()
            await self.run_once()

    async def run_once(self) -> None:
        """Flush everything waiting now, retrying while the database is unreachable."""
        self._pending.clear()
        batches, self._batches = self._batches, {}
        for node_id, batch in batches.items():
            if batch:
                await self._flush(node_id, batch)

    async def _flush(self, node_id: int, batch: _Batch) -> None:
        attempt = 0
        while True:
            try:
                accepted = await self._backend.checkpoint(node_id, batch.contexts)
                done = await self._backend.complete(
                    node_id, batch.completions, cleanup_attempts=self._cleanup_attempts
                )
                break
            except DatabaseError as exc:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                attempt += 1
                self._log.warning("flush failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        self.flushes += 1
        for task_id, waiter in batch.context_waiters.items():
            if not waiter.done():
                waiter.set_result(task_id in accepted)
        for task_id, waiter in batch.completion_waiters.items():
            if not waiter.done():
                waiter.set_result(task_id in done)
