"""Observers: what a node tells metrics and tracing about its own work (docs/reference.md,
"Metrics and tracing").

A node calls its observers on the event loop, at a few points of its work: a task created, an
attempt started and ended, a flush of checkpoints and completions, a lost lease, fencing. An
observer is a plain object (``Observer``'s methods, each a no-op there, overridden where
wanted); ``aioasync_tasks.metrics.PrometheusMetrics`` and
``aioasync_tasks.opentelemetry.OpenTelemetry`` are two. These are counts of one process: the
numbers of the whole cluster are in the database (the dashboard's ``/metrics``).

An observer must be quick and must not block. What one raises is logged and ignored: a broken
metric never stops a task.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a task (or of its cleanup handler) on this node."""

    task_id: int
    type: str
    user: str
    group: str
    number: int
    """The attempt's number, from 1 (of the cleanup's attempts, for a cleanup)."""
    max_attempts: int
    """The task's ``max_attempts`` (the node's ``cleanup_attempts``, for a cleanup)."""
    cleanup: bool
    """The run of the task's cleanup handler, after it was deleted."""
    node_id: int
    waited: float
    """Seconds from when the task was due (created, or its ``run_at``, or its retry's time)
    to its claim, on the database clock."""
    trace_parent: str | None
    """The W3C traceparent of the span that created the task, when it was traced."""


class AttemptOutcome(enum.StrEnum):
    """How an attempt ended, as its node saw it."""

    FINISHED = "finished"
    """It finished (or, for a cleanup, the cleanup did and the task is gone)."""
    RETRIED = "retried"
    """It failed with attempts left: it runs again after its back-off."""
    FAILED = "failed"
    """It failed for good: no attempts left, or a stop request meanwhile, or a context that
    does not decode."""
    STOPPED = "stopped"
    """Stopped before its end: paused, deleted, or handed back when its node stopped."""
    LOST = "lost"
    """Its node no longer owned it (a lost lease, fencing, a forced delete): nothing of its
    end was written."""


class Observer:
    """The base class of observers: each method does nothing; override the ones you need."""

    def trace_parent(self) -> str | None:
        """When a task is created: the W3C traceparent of the current span, stored with the
        task for the spans of its attempts to link to (the first observer's that is not None
        is stored)."""
        return None

    def created(self, type: str, group: str, count: int) -> None:
        """``count`` tasks of ``type`` in ``group`` were created by this process (counted when
        the insert ran: in the caller's transaction, before it commits; a unique task skipped
        or replacing the live one counts too)."""

    def started(self, attempt: Attempt) -> None:
        """An attempt starts, in the asyncio task that runs it (a span made current here is
        the current span of the task's code)."""

    def ended(
        self, attempt: Attempt, outcome: AttemptOutcome, seconds: float, error: str | None
    ) -> None:
        """The attempt ended (its end is durable, or was refused: ``LOST``) after ``seconds``,
        in the asyncio task that ran it; ``error`` is the failure's text, if it failed."""

    def flushed(self, checkpoints: int, completions: int, seconds: float) -> None:
        """One write of the checkpoints and completions that waited: how many, how long."""

    def lease_lost(self) -> None:
        """The node could not renew its lease in time: it stopped every task it ran."""

    def fenced(self) -> None:
        """The node found itself declared dead by its peers: it stopped its tasks and
        registered anew."""


class Telemetry:
    """A node's observers, called in turn; what one raises is logged and ignored."""

    def __init__(self, observers: Sequence[Observer], logger: logging.Logger) -> None:
        self.observers = tuple(observers)
        self._log = logger
        self.enabled = bool(self.observers)
        """Whether any observer listens (the hot paths skip the calls otherwise)."""

    @classmethod
    def of(cls, observers: object, logger: logging.Logger) -> Telemetry:
        """The observers given to ``Node``, checked (no I/O)."""
        if observers is None:
            return cls((), logger)
        if isinstance(observers, Observer) or not isinstance(observers, Sequence | set):
            raise ConfigurationError("observers must be a list of Observer objects")
        found = list(observers)
        for item in found:
            if not isinstance(item, Observer):
                raise ConfigurationError(
                    f"observers must be Observer objects (aioasync_tasks.Observer), not "
                    f"{type(item).__name__}"
                )
        return cls(found, logger)

    def _answers(self, name: str, call: Callable[[Observer], Any]) -> Iterator[Any]:
        """``call`` on each observer in turn, lazily: what each returns; one that raises is
        logged and skipped."""
        for observer in self.observers:
            try:
                answer = call(observer)
            except Exception:
                self._log.exception("observer %s failed in %s", type(observer).__name__, name)
                continue
            yield answer

    def _call(self, name: str, call: Callable[[Observer], Any]) -> None:
        for _ in self._answers(name, call):
            pass

    def trace_parent(self) -> str | None:
        answers = self._answers("trace_parent", lambda o: o.trace_parent())
        return next((found for found in answers if found is not None), None)

    def created(self, type: str, group: str, count: int) -> None:
        self._call("created", lambda o: o.created(type, group, count))

    def started(self, attempt: Attempt) -> None:
        self._call("started", lambda o: o.started(attempt))

    def ended(
        self, attempt: Attempt, outcome: AttemptOutcome, seconds: float, error: str | None
    ) -> None:
        self._call("ended", lambda o: o.ended(attempt, outcome, seconds, error))

    def flushed(self, checkpoints: int, completions: int, seconds: float) -> None:
        self._call("flushed", lambda o: o.flushed(checkpoints, completions, seconds))

    def lease_lost(self) -> None:
        self._call("lease_lost", lambda o: o.lease_lost())

    def fenced(self) -> None:
        self._call("fenced", lambda o: o.fenced())
