"""OpenTelemetry metrics and spans of one process: ``Node(..., observers=[OpenTelemetry()])``.

Spans: one per attempt of a task (``run <type>``, or ``cleanup <type>`` for its cleanup
handler), of kind CONSUMER, current while the task's code runs (so the spans the task makes
are its children), linked to the span that was current when the task was created — by a
process whose node had this observer too; the link crosses processes through the task's row
(its ``trace_parent``). A failed attempt's span has status ERROR.

Metrics (instruments of the meter ``aioasync_tasks``): ``aioasync_tasks.tasks.created``,
``aioasync_tasks.tasks.claimed``, ``aioasync_tasks.attempts`` (by outcome),
``aioasync_tasks.claim.latency``, ``aioasync_tasks.run.duration``,
``aioasync_tasks.flush.duration``, ``aioasync_tasks.flush.writes``,
``aioasync_tasks.lease.losses``, ``aioasync_tasks.fencings``.

The queue of the whole cluster — tasks by group and state, PENDING tasks by group, live nodes —
is read from the database, so it is opt-in and best done by one process:
``async with observer.queue_gauges(node):`` reads it every ``every`` seconds for the observable
gauges ``aioasync_tasks.queue.tasks``, ``aioasync_tasks.queue.depth`` and
``aioasync_tasks.nodes``.

Needs the OpenTelemetry API: ``pip install 'aioasync-tasks[opentelemetry]'``; the SDK and the
exporters are the application's to set up. See docs/reference.md, "Metrics and tracing".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from contextvars import Token
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    from opentelemetry import context, metrics, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        "aioasync_tasks.opentelemetry needs the OpenTelemetry API: "
        "pip install 'aioasync-tasks[opentelemetry]'",
        name=exc.name,
    ) from exc

from ._backends._driver import QueueStats, StatsParams
from ._errors import AsyncTasksError, ConfigurationError
from ._logging import LOGGER_NAME
from ._models import State
from ._node import Node
from ._telemetry import Attempt, AttemptOutcome, Observer

__all__ = ["OpenTelemetry"]

SCOPE = "aioasync_tasks"
"""The name of the tracer and of the meter."""
_FAILED = (AttemptOutcome.FAILED, AttemptOutcome.RETRIED)
_PROPAGATOR = TraceContextTextMapPropagator()
_log = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True, slots=True)
class _Reading:
    stats: QueueStats
    nodes: int
    seen: frozenset[tuple[str, State]]
    """Every (group, state) reported since the gauges began: one that empties reads 0."""


class _Queue:
    """The last reading of the queue, for the observable gauges (read on the exporter's
    thread: a reading is replaced whole, never changed in place)."""

    def __init__(self) -> None:
        self.reading: _Reading | None = None
        self._seen: frozenset[tuple[str, State]] = frozenset()
        """Kept across failed reads (the event loop's only)."""

    def update(self, stats: QueueStats | None, nodes: int) -> None:
        """A new reading (None: the read failed)."""
        if stats is None:
            self.reading = None
            return
        self._seen |= frozenset(stats.counts)
        self.reading = _Reading(stats, nodes, self._seen)

    def tasks(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        reading = self.reading
        if reading is None:
            return []
        return [
            metrics.Observation(
                reading.stats.counts.get(key, 0),
                {"aioasync_tasks.group": key[0], "aioasync_tasks.state": key[1].value},
            )
            for key in sorted(reading.seen)
        ]

    def depth(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        reading = self.reading
        if reading is None:
            return []
        return [
            metrics.Observation(
                reading.stats.counts.get((group, State.PENDING), 0),
                {"aioasync_tasks.group": group},
            )
            for group in sorted({group for group, _ in reading.seen})
        ]

    def live_nodes(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        reading = self.reading
        return [] if reading is None else [metrics.Observation(reading.nodes)]


def _version() -> str:
    try:
        return version("aioasync-tasks")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return ""


class OpenTelemetry(Observer):
    """Spans and metrics through the OpenTelemetry API: the global tracer and meter providers,
    unless ``tracer_provider`` or ``meter_provider`` is given."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(SCOPE, _version(), tracer_provider)
        meter = metrics.get_meter(SCOPE, _version(), meter_provider)
        self._created = meter.create_counter(
            "aioasync_tasks.tasks.created", "{task}", "Tasks created by this process."
        )
        self._claimed = meter.create_counter(
            "aioasync_tasks.tasks.claimed", "{attempt}", "Attempts claimed and started."
        )
        self._attempts = meter.create_counter(
            "aioasync_tasks.attempts", "{attempt}", "Attempts that ended, by outcome."
        )
        self._latency = meter.create_histogram(
            "aioasync_tasks.claim.latency", "s", "From when a task was due to its claim."
        )
        self._duration = meter.create_histogram(
            "aioasync_tasks.run.duration", "s", "From an attempt's claim to its end written."
        )
        self._flush = meter.create_histogram(
            "aioasync_tasks.flush.duration", "s", "One write of checkpoints and completions."
        )
        self._writes = meter.create_histogram(
            "aioasync_tasks.flush.writes", "{write}", "Checkpoints and completions of a flush."
        )
        self._lease_losses = meter.create_counter(
            "aioasync_tasks.lease.losses", "{event}", "Leases not renewed in time."
        )
        self._fencings = meter.create_counter(
            "aioasync_tasks.fencings", "{event}", "Times a node was declared dead by its peers."
        )
        self._meter = meter
        self._queue: _Queue | None = None
        self._gauges_made = False
        self._spans: dict[Attempt, tuple[trace.Span, Token[context.Context]]] = {}
        self._attributes: dict[tuple[str, str, bool], dict[str, Any]] = {}
        """The attributes of each (type, group, cleanup), made once."""
        self._outcomes: dict[tuple[str, str, bool, AttemptOutcome], dict[str, Any]] = {}

    def _of(self, attempt: Attempt) -> dict[str, Any]:
        key = (attempt.type, attempt.group, attempt.cleanup)
        found = self._attributes.get(key)
        if found is None:
            found = self._attributes[key] = {
                "aioasync_tasks.type": attempt.type,
                "aioasync_tasks.group": attempt.group,
                "aioasync_tasks.kind": "cleanup" if attempt.cleanup else "task",
            }
        return found

    def _ended_as(self, attempt: Attempt, outcome: AttemptOutcome) -> dict[str, Any]:
        key = (attempt.type, attempt.group, attempt.cleanup, outcome)
        found = self._outcomes.get(key)
        if found is None:
            found = self._outcomes[key] = {
                **self._of(attempt),
                "aioasync_tasks.outcome": outcome.value,
            }
        return found

    @contextlib.asynccontextmanager
    async def queue_gauges(self, node: Node, *, every: float = 15.0) -> AsyncIterator[None]:
        """Read the queue through ``node`` (started) now and every ``every`` seconds until the
        block ends, for the gauges ``aioasync_tasks.queue.tasks`` (by group and state),
        ``aioasync_tasks.queue.depth`` (PENDING, by group) and ``aioasync_tasks.nodes``. One
        process of a cluster is enough. A failed read is logged and the gauges report nothing
        until the next one succeeds."""
        if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
            raise ConfigurationError("every must be a number of seconds above 0")
        if self._queue is not None:
            raise ConfigurationError("queue_gauges is already reading for this observer")
        queue = self._queue = _Queue()
        if not self._gauges_made:  # once: the gauges read whichever reading is current
            self._gauges_made = True
            self._meter.create_observable_gauge(
                "aioasync_tasks.queue.tasks",
                [lambda o: self._queue.tasks(o) if self._queue else []],
                "{task}",
                "Tasks by group and state.",
            )
            self._meter.create_observable_gauge(
                "aioasync_tasks.queue.depth",
                [lambda o: self._queue.depth(o) if self._queue else []],
                "{task}",
                "PENDING tasks by group.",
            )
            self._meter.create_observable_gauge(
                "aioasync_tasks.nodes",
                [lambda o: self._queue.live_nodes(o) if self._queue else []],
                "{node}",
                "Live (registered) nodes.",
            )

        async def read() -> None:
            try:
                stats = await node.driver.queue_stats(StatsParams(()))
                nodes = len(await node.get_nodes())
            except AsyncTasksError as exc:
                _log.warning("queue_gauges: the queue could not be read: %s", exc)
                queue.update(None, 0)
            else:
                queue.update(stats, nodes)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(every)
                await read()

        await read()
        refreshing = asyncio.create_task(refresh(), name="aioasync_tasks-queue-gauges")
        try:
            yield
        finally:
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing
            self._queue = None  # the gauges report nothing once the block has ended

    def trace_parent(self) -> str | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)  # nothing when no span is current
        return carrier.get("traceparent")

    def created(self, type: str, group: str, count: int) -> None:
        self._created.add(count, {"aioasync_tasks.type": type, "aioasync_tasks.group": group})

    def started(self, attempt: Attempt) -> None:
        labels = self._of(attempt)
        self._claimed.add(1, labels)
        self._latency.record(attempt.waited, labels)
        links = []
        if attempt.trace_parent is not None:
            creator = trace.get_current_span(
                _PROPAGATOR.extract({"traceparent": attempt.trace_parent})
            ).get_span_context()
            if creator.is_valid:
                links.append(trace.Link(creator))
        span = self._tracer.start_span(
            f"{'cleanup' if attempt.cleanup else 'run'} {attempt.type}",
            context=context.Context(),  # a trace of its own, linked to its creator's
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                **labels,
                "aioasync_tasks.task_id": attempt.task_id,
                "aioasync_tasks.attempt": attempt.number,
                "aioasync_tasks.max_attempts": attempt.max_attempts,
                "aioasync_tasks.node_id": attempt.node_id,
                "aioasync_tasks.waited": attempt.waited,
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        self._spans[attempt] = (span, token)

    def ended(
        self, attempt: Attempt, outcome: AttemptOutcome, seconds: float, error: str | None
    ) -> None:
        self._attempts.add(1, self._ended_as(attempt, outcome))
        self._duration.record(seconds, self._of(attempt))
        found = self._spans.pop(attempt, None)
        if found is None:
            return
        span, token = found
        span.set_attribute("aioasync_tasks.outcome", outcome.value)
        if outcome in _FAILED:
            last = error.strip().splitlines()[-1] if error and error.strip() else outcome.value
            span.set_status(trace.Status(trace.StatusCode.ERROR, last))
        span.end()
        context.detach(token)

    def flushed(self, checkpoints: int, completions: int, seconds: float) -> None:
        self._flush.record(seconds)
        self._writes.record(checkpoints + completions)

    def lease_lost(self) -> None:
        self._lease_losses.add(1)

    def fenced(self) -> None:
        self._fencings.add(1)
