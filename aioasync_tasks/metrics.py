"""Prometheus metrics of one process: ``Node(..., observers=[PrometheusMetrics()])`` counts
what the node does — tasks created, claimed, and how their attempts ended, by type and group;
the claim latency; run durations; flushes of checkpoints; lost leases and fencing — in a
``prometheus_client`` registry (the default one unless given). Serve it with
``prometheus_client`` as usual, or on the dashboard's ``/metrics`` (``aioasync_tasks.dashboard``),
which adds the numbers of the whole cluster, read from the database.

Needs ``prometheus_client``: ``pip install 'aioasync-tasks[metrics]'`` (the ``dashboard`` extra
has it too). See docs/reference.md, "Metrics and tracing".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        "aioasync_tasks.metrics needs prometheus_client: pip install 'aioasync-tasks[metrics]'",
        name=exc.name,
    ) from exc

from ._telemetry import Attempt, AttemptOutcome, Observer

__all__ = ["PREFIX", "PrometheusMetrics"]

PREFIX = "aioasync_tasks"
"""The prefix of every metric's name."""

SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip
"""The buckets of claim latency and run duration: from milliseconds (a woken node) to an hour
(a backlog, a long task)."""
WRITES_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""The buckets of the writes (checkpoints and completions) of one flush."""

_TASK = ("type", "group", "kind")


@dataclass(frozen=True, slots=True)
class _Families:
    """The metrics of one registry, shared by every ``PrometheusMetrics`` that uses it."""

    created: Counter
    claimed: Counter
    attempts: Counter
    claim_latency: Histogram
    run_duration: Histogram
    flush_seconds: Histogram
    flush_writes: Histogram
    lease_losses: Counter
    fencings: Counter

    @classmethod
    def make(cls, registry: CollectorRegistry) -> _Families:
        return cls(
            created=Counter(
                f"{PREFIX}_created",
                "Tasks created by this process (a unique task skipped or replaced counts too).",
                ["type", "group"],
                registry=registry,
            ),
            claimed=Counter(
                f"{PREFIX}_claimed",
                "Attempts this process claimed and started (kind: task or cleanup).",
                _TASK,
                registry=registry,
            ),
            attempts=Counter(
                f"{PREFIX}_attempts",
                "Attempts that ended on this process, by outcome: finished, retried (failed "
                "with attempts left), failed (for good), stopped (paused, deleted, handed "
                "back) or lost (no longer this node's).",
                (*_TASK, "outcome"),
                registry=registry,
            ),
            claim_latency=Histogram(
                f"{PREFIX}_claim_latency_seconds",
                "From when a task was due (created, run_at or retry) to its claim, on the "
                "database clock.",
                _TASK,
                buckets=SECONDS_BUCKETS,
                registry=registry,
            ),
            run_duration=Histogram(
                f"{PREFIX}_run_duration_seconds",
                "From an attempt's claim to its end being written.",
                _TASK,
                buckets=SECONDS_BUCKETS,
                registry=registry,
            ),
            flush_seconds=Histogram(
                f"{PREFIX}_flush_seconds",
                "One write of the checkpoints and completions that waited (group commit).",
                registry=registry,
            ),
            flush_writes=Histogram(
                f"{PREFIX}_flush_writes",
                "Checkpoints and completions written by one flush.",
                buckets=WRITES_BUCKETS,
                registry=registry,
            ),
            lease_losses=Counter(
                f"{PREFIX}_lease_losses",
                "Times a node of this process could not renew its lease in time and stopped "
                "its tasks.",
                registry=registry,
            ),
            fencings=Counter(
                f"{PREFIX}_fencings",
                "Times a node of this process found itself declared dead by its peers "
                "(fenced) and registered anew.",
                registry=registry,
            ),
        )


@dataclass(slots=True)
class _Series:
    """The children of the per-task metrics for one (type, group, kind): looked up once, not
    for every attempt."""

    claimed: Counter
    claim_latency: Histogram
    run_duration: Histogram
    outcomes: dict[AttemptOutcome, Counter]


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


class PrometheusMetrics(Observer):
    """Counts what the nodes it is given to do, in ``registry`` (default: prometheus_client's
    ``REGISTRY``). Several instances, and several nodes, may share a registry: they count
    into the same metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        families = _BY_REGISTRY.get(self.registry)
        if families is None:
            families = _BY_REGISTRY[self.registry] = _Families.make(self.registry)
        self._m = families
        self._series: dict[tuple[str, str, bool], _Series] = {}

    def _of(self, attempt: Attempt) -> _Series:
        key = (attempt.type, attempt.group, attempt.cleanup)
        series = self._series.get(key)
        if series is None:
            labels = (attempt.type, attempt.group, "cleanup" if attempt.cleanup else "task")
            m = self._m
            series = self._series[key] = _Series(
                claimed=m.claimed.labels(*labels),
                claim_latency=m.claim_latency.labels(*labels),
                run_duration=m.run_duration.labels(*labels),
                outcomes={o: m.attempts.labels(*labels, o.value) for o in AttemptOutcome},
            )
        return series

    def created(self, type: str, group: str, count: int) -> None:
        self._m.created.labels(type, group).inc(count)

    def started(self, attempt: Attempt) -> None:
        series = self._of(attempt)
        series.claimed.inc()
        series.claim_latency.observe(attempt.waited)

    def ended(
        self, attempt: Attempt, outcome: AttemptOutcome, seconds: float, error: str | None
    ) -> None:
        series = self._of(attempt)
        series.outcomes[outcome].inc()
        series.run_duration.observe(seconds)

    def flushed(self, checkpoints: int, completions: int, seconds: float) -> None:
        self._m.flush_seconds.observe(seconds)
        self._m.flush_writes.observe(checkpoints + completions)

    def lease_lost(self) -> None:
        self._m.lease_losses.inc()

    def fenced(self) -> None:
        self._m.fencings.inc()
