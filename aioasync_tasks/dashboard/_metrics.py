"""``/metrics``: the Prometheus text exposition of the queue, read from the database at scrape
time — so every dashboard of a cluster reports the same, exact numbers — followed by the
metrics of this process (``aioasync_tasks.metrics.PrometheusMetrics``) when the node has them.

A custom collector (``OverviewCollector``) turns one ``Overview`` into metric families; each
scrape reads the database once and renders it with a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._models import State
from .._node import Node
from ..metrics import PrometheusMetrics
from ._stats import Overview, read_overview

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "aioasync_tasks"


class OverviewCollector(Collector):
    """The metric families of one reading of the database."""

    def __init__(self, overview: Overview) -> None:
        self.overview = overview

    def collect(self) -> Iterator[Metric]:
        data = self.overview
        tasks = GaugeMetricFamily(
            f"{PREFIX}_tasks",
            "Tasks by group and state, as stored.",
            labels=["group", "state"],
        )
        for group in sorted(data.counts):
            for state in State:
                tasks.add_metric([group, state.value], data.count(group, state))
        yield tasks
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Tasks waiting to be claimed (PENDING) by group.",
            labels=["group"],
        )
        for group in sorted(data.counts):
            depth.add_metric([group], data.count(group, State.PENDING))
        yield depth
        by_state = GaugeMetricFamily(
            f"{PREFIX}_tasks_by_state", "Tasks by state, over all groups.", labels=["state"]
        )
        for state in State:
            by_state.add_metric([state.value], data.totals.get(state, 0))
        yield by_state
        yield GaugeMetricFamily(
            f"{PREFIX}_nodes", "Registered (live) worker nodes.", value=len(data.nodes)
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_node_heartbeat_age_seconds",
            "Seconds since each node's last heartbeat (database clock).",
            labels=["node", "name"],
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_node_running_tasks",
            "Tasks each node runs (RUNNING or CANCELING).",
            labels=["node", "name"],
        )
        for row in data.nodes:
            labels = [str(row.info.id), row.info.name]
            age.add_metric(labels, row.heartbeat_age)
            running.add_metric(labels, row.running)
        yield age
        yield running
        paused = GaugeMetricFamily(
            f"{PREFIX}_group_paused", "1 when the group is paused.", labels=["group"]
        )
        for settings in data.groups:
            paused.add_metric([settings.name], 1 if settings.paused else 0)
        yield paused
        ended = GaugeMetricFamily(
            f"{PREFIX}_ended_recently",
            "Tasks that ended (FINISHED or FAILED) in the last minutes.",
            labels=["minutes", "state"],
        )
        for window in data.ended:
            minutes = str(round(window.window / 60))
            ended.add_metric([minutes, State.FINISHED.value], window.finished)
            ended.add_metric([minutes, State.FAILED.value], window.failed)
        yield ended


async def exposition(node: Node) -> bytes:
    """The metrics as the database has them now, then those of the registries of the node's
    ``PrometheusMetrics`` observers (each once), in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OverviewCollector(await read_overview(node)))
    registries = [registry]
    for observer in node.observers:
        if isinstance(observer, PrometheusMetrics) and all(
            observer.registry is not r for r in registries
        ):
            registries.append(observer.registry)
    return b"".join(generate_latest(r) for r in registries)
