"""What the overview page and ``/metrics`` show, read from the database in one short read each
time they are asked for: counts of tasks by group and state, the running tasks of each node,
the tasks that ended in the last minutes, and the database clock (heartbeat ages are measured
on it, as the nodes' liveness is). Exact across the cluster, never a per-process counter."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from .._backends._driver import EndedCount, StatsParams
from .._models import Group, NodeInfo, State
from .._node import Node

THROUGHPUT_WINDOWS = (1, 5, 15)
"""The windows, in minutes, of the tasks that ended recently."""


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A live node, with its heartbeat age (database clock) and its running tasks."""

    info: NodeInfo
    heartbeat_age: float
    running: int


@dataclass(frozen=True, slots=True)
class Overview:
    now: datetime
    """The database clock when read."""
    counts: dict[str, dict[State, int]]
    """Group → state → tasks (states without tasks left out)."""
    groups: list[Group]
    nodes: list[NodeRow]
    ended: list[EndedCount]
    """The tasks that ended in the last 1, 5 and 15 minutes (``THROUGHPUT_WINDOWS``)."""
    totals: dict[State, int] = field(default_factory=dict)
    """State → tasks, over all groups."""

    def count(self, group: str, state: State) -> int:
        return self.counts.get(group, {}).get(state, 0)


async def read_overview(node: Node) -> Overview:
    """Counts, nodes, groups and recent ends, as the database has them now."""
    groups = await node.get_groups()
    infos = await node.get_nodes()
    stats = await node.driver.queue_stats(
        StatsParams(windows=tuple(60.0 * m for m in THROUGHPUT_WINDOWS))
    )
    counts: dict[str, dict[State, int]] = {}
    totals: dict[State, int] = {}
    for (name, state), n in stats.counts.items():
        counts.setdefault(name, {})[state] = n
        totals[state] = totals.get(state, 0) + n
    for group in groups:
        counts.setdefault(group.name, {})
    nodes = [
        NodeRow(
            info,
            max(0.0, (stats.now - info.heartbeat_at).total_seconds()),
            stats.running.get(info.id, 0),
        )
        for info in infos
    ]
    return Overview(stats.now, counts, groups, nodes, stats.ended, totals)
