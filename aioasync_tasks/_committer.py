"""Group commit: checkpoints and completions of all running tasks, one flush per batch.

A runner hands its write to the committer and waits; the committer writes everything that is
waiting in one go (one statement for the checkpoints, one short transaction for the
completions) and answers each runner with whether its write was accepted — it is not when the
row is no longer the execution's (rescued, force-deleted, fenced, claimed again: every write
carries the claim's token). While a flush is in flight new writes queue up, so batches grow
with load and latency stays one round trip when idle.

Failures are kept apart (docs/explanation.md, "Faults"):

- a *transient* failure (connection lost, server restarting, pool exhausted) is retried with
  back-off until it goes through — a checkpoint is durable before its task resumes, or the task
  does not resume; a node that cannot write for its lease stops its tasks meanwhile;
- a failure of the *data* (a value the database refuses) is narrowed down to the writes that
  cause it by writing each alone: a refused checkpoint fails its own task, with the reason; a
  refused completion is written again without its context, with the reason as its error; the
  other writes of the batch go through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import anyio
import anyio.abc

from ._backends._driver import Checkpoint, CheckpointParams, CompleteParams, Completion, Driver
from ._errors import DatabaseError
from ._telemetry import Telemetry
from ._validation import clean_error_text

RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(slots=True)
class _Batch:
    contexts: dict[int, Checkpoint] = field(default_factory=dict)
    context_waiters: dict[int, list[asyncio.Future[bool]]] = field(default_factory=dict)
    completions: list[Completion] = field(default_factory=list)
    completion_waiters: dict[int, list[asyncio.Future[bool]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.contexts or self.completions)


class Committer:
    """Buffers owner-bound writes per node id and flushes them in batches."""

    def __init__(
        self,
        backend: Driver,
        *,
        cleanup_attempts: int,
        logger: logging.Logger,
        telemetry: Telemetry,
    ) -> None:
        self._driver = backend
        self._telemetry = telemetry
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

    async def checkpoint(
        self,
        node_id: int,
        task_id: int,
        token: int,
        context: str | None,
        *,
        progress: float | None = None,
        message: str | None = None,
    ) -> bool:
        """Store ``context`` (and ``progress``, ``message``; None keeps each) for the execution
        of ``task_id`` holding ``token`` on ``node_id``; True once durable and accepted, False
        when the row is no longer the execution's. Raises ``DatabaseError`` when the database
        refuses this value."""
        batch = self._batch(node_id)
        new = Checkpoint(token, context, progress, message)
        waiting = batch.contexts.get(task_id)
        batch.contexts[task_id] = new if waiting is None else waiting.then(new)
        return await _wait(batch.context_waiters, task_id)

    async def complete(self, node_id: int, completion: Completion) -> bool:
        """Apply the end of an execution; True once durable and accepted."""
        batch = self._batch(node_id)
        batch.completions.append(completion)
        return await _wait(batch.completion_waiters, completion.task_id)

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
        waiting = list(batches.items())
        try:
            while waiting:
                node_id, batch = waiting[0]
                if batch:
                    await self._flush(node_id, batch)
                waiting.pop(0)
        except BaseException:
            # A crash (or the node's stop) must not lose what was not written: it waits for the
            # next flush, after the restart. Writing it twice is harmless (claim tokens).
            for node_id, batch in waiting:
                self._requeue(node_id, batch)
            raise

    def _requeue(self, node_id: int, batch: _Batch) -> None:
        """Put an unwritten batch back in front of what arrived since."""
        newer = self._batches.get(node_id)
        if newer is not None:
            batch.contexts.update(newer.contexts)
            _merge(batch.context_waiters, newer.context_waiters)
            batch.completions.extend(newer.completions)
            _merge(batch.completion_waiters, newer.completion_waiters)
        self._batches[node_id] = batch
        self._pending.set()

    async def _flush(self, node_id: int, batch: _Batch) -> None:
        began = time.monotonic()
        contexts = batch.contexts
        try:
            accepted = await self._retry(
                lambda: self._driver.checkpoint(CheckpointParams(node_id, contexts))
            )
        except DatabaseError:
            accepted = await self._checkpoints_one_by_one(node_id, batch)
        completions = batch.completions
        try:
            done = await self._retry(lambda: self._complete(node_id, completions))
        except DatabaseError:
            done = await self._completions_one_by_one(node_id, completions)
        self.flushes += 1
        if self._telemetry.enabled:
            self._telemetry.flushed(len(contexts), len(completions), time.monotonic() - began)
        _answer(batch.context_waiters, accepted)
        _answer(batch.completion_waiters, done)

    async def _complete(self, node_id: int, completions: list[Completion]) -> set[int]:
        return await self._driver.complete(
            CompleteParams(node_id, completions, self._cleanup_attempts)
        )

    async def _retry(self, write: Callable[[], Awaitable[set[int]]]) -> set[int]:
        """``write()``, retried with back-off while it fails for want of the database; a
        failure of the data is raised."""
        attempt = 0
        while True:
            try:
                result = await write()
            except DatabaseError as exc:
                if not exc.transient:
                    raise
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                attempt += 1
                self._log.warning("flush failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            else:
                return result

    async def _checkpoints_one_by_one(self, node_id: int, batch: _Batch) -> set[int]:
        accepted: set[int] = set()
        for task_id, checkpoint in batch.contexts.items():
            try:
                accepted |= await self._retry(
                    functools.partial(
                        self._driver.checkpoint, CheckpointParams(node_id, {task_id: checkpoint})
                    )
                )
            except DatabaseError as exc:
                self._log.warning("checkpoint of task %s refused: %s", task_id, exc)
                for waiter in batch.context_waiters.get(task_id, ()):
                    if not waiter.done():
                        waiter.set_exception(exc)
        return accepted

    async def _completions_one_by_one(
        self, node_id: int, completions: list[Completion]
    ) -> set[int]:
        done: set[int] = set()
        for completion in completions:
            try:
                done |= await self._retry(functools.partial(self._complete, node_id, [completion]))
                continue
            except DatabaseError as exc:
                error = clean_error_text(f"the task's final write was refused: {exc}")
                self._log.warning("final write of task %s refused: %s", completion.task_id, exc)
            # Without the refused values: the task's state still moves on, with the reason.
            bare = replace(completion, context=None, error=error)
            try:
                done |= await self._retry(functools.partial(self._complete, node_id, [bare]))
            except DatabaseError as exc:
                self._log.error("final write of task %s refused again: %s", completion.task_id, exc)
        return done


async def _wait(waiters: dict[int, list[asyncio.Future[bool]]], task_id: int) -> bool:
    """Wait for the flush of a write of ``task_id``, on a future of the caller's own: a caller
    that is cancelled cancels only its own, and the flush passes it by. A task has one write
    waiting at a time, but an execution cut off while it waited may leave its write to the
    same batch as the next execution's."""
    waiter = asyncio.get_running_loop().create_future()
    same_task = waiters.get(task_id)
    if same_task is None:
        waiters[task_id] = [waiter]
    else:
        same_task.append(waiter)
    accepted: bool = await waiter
    return accepted


def _answer(waiters: dict[int, list[asyncio.Future[bool]]], accepted: set[int]) -> None:
    """Tell each waiting write whether its task's write was accepted."""
    for task_id, same_task in waiters.items():
        for waiter in same_task:
            if not waiter.done():  # done: its caller was cancelled
                waiter.set_result(task_id in accepted)


def _merge(
    older: dict[int, list[asyncio.Future[bool]]], newer: dict[int, list[asyncio.Future[bool]]]
) -> None:
    """The waiters of a newer batch added to those of an older one it is merged into."""
    for task_id, waiters in newer.items():
        older.setdefault(task_id, []).extend(waiters)
