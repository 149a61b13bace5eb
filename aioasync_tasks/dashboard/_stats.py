"""What the overview page and ``/metrics`` show, read from the database in one short read each
time they are asked for: counts of tasks by group and state, the running tasks of each node,
the tasks that ended in the last minutes, and the database clock (heartbeat ages are measured
on it, as the nodes' liveness is). Exact across the cluster, never a per-process counter."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .._models import Group, NodeInfo, State
from .._node import Node
from .._schema import MYSQL, tasks_table, time_from_db

THROUGHPUT_WINDOWS = (1, 5, 15)
"""The windows, in minutes, of the tasks that ended recently."""

_ACTIVE = (State.RUNNING.value, State.CANCELING.value)
_ENDED = (State.FINISHED.value, State.FAILED.value)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A live node, with its heartbeat age (database clock) and its running tasks."""

    info: NodeInfo
    heartbeat_age: float
    running: int


@dataclass(frozen=True, slots=True)
class Ended:
    """The tasks that ended (FINISHED, FAILED) in the last ``minutes``."""

    minutes: int
    finished: int
    failed: int


@dataclass(frozen=True, slots=True)
class Overview:
    now: datetime
    """The database clock when read."""
    counts: dict[str, dict[State, int]]
    """Group → state → tasks (states without tasks left out)."""
    groups: list[Group]
    nodes: list[NodeRow]
    ended: list[Ended]
    totals: dict[State, int] = field(default_factory=dict)
    """State → tasks, over all groups."""

    def count(self, group: str, state: State) -> int:
        return self.counts.get(group, {}).get(state, 0)


def _tasks(node: Node) -> sa.Table:
    """The tasks table in the node's schema (PostgreSQL), as the node's driver names it."""
    schema: str | None = getattr(node.driver, "schema", None)
    return tasks_table.to_metadata(sa.MetaData(), schema=schema) if schema else tasks_table


async def _db_now(conn: AsyncConnection) -> datetime:
    if conn.dialect.name == "sqlite":
        query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    elif conn.dialect.name in MYSQL:
        query = "SELECT UTC_TIMESTAMP(6)"  # now() is the session's local time there
    else:
        query = "SELECT now()"
    return time_from_db((await conn.exec_driver_sql(query)).scalar_one())


async def read_overview(node: Node) -> Overview:
    """Counts, nodes, groups and recent ends, as the database has them now."""
    groups = await node.get_groups()
    infos = await node.get_nodes()
    t = _tasks(node)
    async with node.engine.connect() as conn:
        now = await _db_now(conn)
        by_group = await conn.execute(
            sa.select(t.c.group_name, t.c.state, sa.func.count()).group_by(
                t.c.group_name, t.c.state
            )
        )
        counts: dict[str, dict[State, int]] = {}
        totals: dict[State, int] = {}
        for group, state, n in by_group:
            counts.setdefault(group, {})[State(state)] = n
            totals[State(state)] = totals.get(State(state), 0) + n
        owners = await conn.execute(
            sa.select(t.c.node_id, sa.func.count())
            .where(t.c.node_id.is_not(None), t.c.state.in_(_ACTIVE))
            .group_by(t.c.node_id)
        )
        running: dict[int, int] = dict(owners.all())
        since = {m: now - timedelta(minutes=m) for m in THROUGHPUT_WINDOWS}
        longest = since[max(THROUGHPUT_WINDOWS)]
        columns = [
            sa.func.sum(sa.case((sa.and_(t.c.done_at >= since[m], t.c.state == state), 1), else_=0))
            for m in THROUGHPUT_WINDOWS
            for state in _ENDED
        ]
        sums = (
            await conn.execute(
                sa.select(*columns).where(t.c.state.in_(_ENDED), t.c.done_at >= longest)
            )
        ).one()
    ended = [
        Ended(m, int(sums[2 * i] or 0), int(sums[2 * i + 1] or 0))
        for i, m in enumerate(THROUGHPUT_WINDOWS)
    ]
    for group in groups:
        counts.setdefault(group.name, {})
    nodes = [
        NodeRow(
            info,
            max(0.0, (now - info.heartbeat_at).total_seconds()),
            int(running.get(info.id, 0)),
        )
        for info in infos
    ]
    return Overview(now, counts, groups, nodes, ended, totals)
