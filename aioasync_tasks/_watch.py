"""Waiting for a task to end and watching it progress (``Node.wait_task``, ``Node.watch``;
docs/design.md §18).

A node, a client-only node too, has one ``TaskWatcher``. Where the database notifies
(PostgreSQL), the first wait opens one listening connection on the schema's task-event channel,
kept until the node stops, and each waited-for task is *marked* (``Driver.watch_tasks``) for
``MARK_SECONDS``, renewed while someone waits: the writes of a marked task — a checkpoint
batch, a claim, a completion, an operation — send a task event in their own transaction, so
only watched tasks cost a notification. A waiter subscribes, marks, then reads the task: a
write before the mark is in what it reads (the mark waits for the row's lock), a write after it
notifies. Where the database does not notify (SQLite), waiters read the task with a back-off
from ``FIRST_POLL`` up to the node's ``poll_interval``.

Reads are the truth, notifications only say when to read: a waiter reads again at least every
``BACKSTOP_POLLS`` poll intervals, and at once after the listening connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import anyio

from ._backends._driver import (
    TASK_DONE,
    Driver,
    ListenParams,
    WatchParams,
    parse_task_event,
)
from ._errors import DatabaseError, WaitTimeout
from ._models import State, Task

FINAL_STATES = (State.FINISHED, State.FAILED)
"""The states that end a wait."""
MARK_SECONDS = 60.0
"""How long a mark lasts; renewed every third of it while someone waits."""
FIRST_POLL = 0.02
"""The first pause between two reads of a poll (SQLite, or while not listening)."""
BACKOFF = 1.5
BACKSTOP_POLLS = 10
"""While listening, a waiter reads the task again at least every this many poll intervals."""
RELISTEN_AFTER = 1.0


@dataclass(eq=False, slots=True)
class _Waiter:
    task_id: int
    progress: bool
    """Woken by every change of the task (``watch``), not only by its end (``wait_task``)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class TaskWatcher:
    """The waits and watches of one node."""

    def __init__(self, backend: Driver, poll_interval: float, logger: logging.Logger) -> None:
        self._backend = backend
        self._poll_interval = poll_interval
        self._log = logger
        self._waiters: dict[int, set[_Waiter]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()
        """Set once the listener has connected, or failed to: waiters may go on."""
        self._listening = False

    # -- the public operations ----------------------------------------------------------

    async def wait(self, task_id: int, timeout: float | None) -> Task:  # noqa: ASYNC109 - a bound, reported as WaitTimeout
        """The task once it is FINISHED or FAILED; ``TaskNotFound`` if it is (or becomes)
        gone; ``WaitTimeout`` after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout) as bound:
                async with self._subscribed(task_id, progress=False) as waiter:
                    delay = FIRST_POLL
                    while True:
                        waiter.changed.clear()
                        task = await self._backend.get_task(task_id)
                        if task.state in FINAL_STATES:
                            return task
                        delay = await self._pause(waiter, delay)
        except TimeoutError:
            if not bound.expired():
                raise
            assert timeout is not None
            raise WaitTimeout(task_id, timeout) from None

    async def watch(self, task_id: int) -> AsyncGenerator[Task]:
        """Snapshots of the task: now, then after each change as it commits (a slow reader
        gets the latest), the last one FINISHED or FAILED; ``TaskNotFound`` when it is gone."""
        async with self._subscribed(task_id, progress=True) as waiter:
            delay = FIRST_POLL
            last: Task | None = None
            while True:
                waiter.changed.clear()
                task = await self._backend.get_task(task_id)
                if task != last:
                    yield task
                    last = task
                    delay = FIRST_POLL
                if task.state in FINAL_STATES:
                    return
                delay = await self._pause(waiter, delay)

    async def close(self) -> None:
        """Stop listening (the node stops)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        self._listening = False

    # -- subscriptions ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _subscribed(self, task_id: int, *, progress: bool) -> AsyncIterator[_Waiter]:
        waiter = _Waiter(task_id, progress)
        self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            if self._backend.supports_notify:
                self._start_listening()
                await self._tried.wait()
                await self._backend.watch_tasks(WatchParams((task_id,), MARK_SECONDS))
            yield waiter
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[task_id]

    async def _pause(self, waiter: _Waiter, delay: float) -> float:
        """Wait for a change of the waiter's task, at most until the next read is due; the
        pause after the next one."""
        if self._listening:
            wait, following = BACKSTOP_POLLS * self._poll_interval, FIRST_POLL
        else:
            wait = delay
            following = min(delay * BACKOFF, max(self._poll_interval, FIRST_POLL))
        with anyio.move_on_after(wait):
            await waiter.changed.wait()
        return following

    def _wake(self, task_ids: list[int], *, done: bool) -> None:
        for task_id in task_ids:
            for waiter in self._waiters.get(task_id, ()):
                if done or waiter.progress:
                    waiter.changed.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.changed.set()

    # -- the listener (databases that notify) ---------------------------------------------

    def _start_listening(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen_loop(), name="aioasync_tasks-watch"
            )

    def _on_message(self, payload: str) -> None:
        kind, ids = parse_task_event(payload)
        if ids:
            self._wake(ids, done=kind == TASK_DONE)

    async def _listen_loop(self) -> None:
        """Listen, renew the marks of the tasks waited for, and listen again after a lost
        connection; waiters read their tasks again whenever events may have been missed."""
        try:
            while True:
                try:
                    async with self._backend.listen_tasks(ListenParams(self._on_message)) as lost:
                        self._listening = True
                        self._tried.set()
                        self._wake_all()  # anything missed while not listening
                        while not lost.is_set():
                            with anyio.move_on_after(MARK_SECONDS / 3):
                                await lost.wait()
                            if not lost.is_set():
                                await self._renew_marks()
                except DatabaseError as exc:
                    self._log.warning("cannot listen for task events (polling): %s", exc)
                except Exception:  # a bug: never lose it, keep the waiters going by polls
                    self._log.exception("the listener of task events failed (polling)")
                self._listening = False
                self._tried.set()
                self._wake_all()
                await anyio.sleep(RELISTEN_AFTER)
        finally:
            self._listening = False
            self._tried.set()

    async def _renew_marks(self) -> None:
        ids = tuple(sorted(self._waiters))  # rows locked in id order, as the other writes do
        if not ids:
            return
        try:
            await self._backend.watch_tasks(WatchParams(ids, MARK_SECONDS))
        except DatabaseError as exc:
            self._log.warning("could not renew the marks of watched tasks: %s", exc)
