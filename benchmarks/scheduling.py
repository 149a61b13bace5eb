"""Scheduling cost: claims with fair share and group limits on a large backlog (``docs/how-to.md``,
"Use groups, limits and priorities").

100,000 pending tasks spread over 1,000 users and 10 groups (``-n``, ``--users``, ``--groups``)
— ``--spread queues`` puts every user in every group (10,000 (group, user) queues, 10 tasks
each), ``--spread users`` puts each user in one group (1,000 queues, 100 tasks each). Then:

- **claim of 10**: the time of one claim statement of up to 10 tasks (the node's whole claim
  transaction), repeated; p50/p99 for ``FairShare`` and ``Fifo``;
- **drain**: a node in this process (concurrency 100) runs no-op tasks until ``--drain`` of
  them have finished, without limits and with ``max_running`` / ``max_running_per_user`` on
  every group; tasks/s.

A claim looks at a window of at most 64 (group, user) queues (more for a node with many free
slots; docs/design.md §6.3), so its cost grows with neither the number of queues nor the
number of tasks. (Before the window, it walked every non-empty queue.)

    python benchmarks/scheduling.py --backend postgres
    python benchmarks/scheduling.py --backend postgres --spread users
    python benchmarks/scheduling.py --backend sqlite
    python benchmarks/scheduling.py --backend postgres --users 10000 --rounds 5   # 100,000 queues
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from aioasync_tasks import FairShare, Fifo, Node, Report, SchedulingPolicy, State, TaskRegistry
from aioasync_tasks._backends._driver import ClaimParams, DeregisterParams, RegisterParams

BATCH = 10_000


def registry() -> TaskRegistry:
    tasks = TaskRegistry()

    @tasks.task("noop")
    async def noop(context: str, stop: asyncio.Event) -> Any:
        yield Report.finished()

    return tasks


def spec(i: int, args: argparse.Namespace) -> dict[str, Any]:
    user = i % args.users
    group = (i // args.users) % args.groups if args.spread == "queues" else user % args.groups
    return {"type": "noop", "user": f"user{user}", "group": f"group{group}"}


async def fill(node: Node, args: argparse.Namespace) -> None:
    for start in range(0, args.n, BATCH):
        await node.create_tasks([spec(i, args) for i in range(start, min(args.n, start + BATCH))])


async def hold_running(node: Node, count: int) -> int | None:
    """Claim ``count`` tasks for a node of its own that never runs them (FairShare spreads
    them over the queues), so that every timed claim has that many tasks running in the
    cluster; returns that node's id (None: ``count`` is 0)."""
    if count <= 0:
        return None
    backend = node.driver
    holder = await backend.register_node(
        RegisterParams("bench-holder", count, ["noop"], heartbeat_interval=5.0, node_timeout=30.0)
    )
    held = 0
    while held < count:
        result = await backend.claim(
            ClaimParams(holder, ["noop"], min(1000, count - held), FairShare())
        )
        held += len(result.claimed)
        assert result.claimed, "the backlog ran out before the running tasks were claimed"
    return holder


async def time_claims(node: Node, policy: SchedulingPolicy, rounds: int) -> list[float]:
    backend = node.driver
    node_id = await backend.register_node(
        RegisterParams("bench-claimer", 10, ["noop"], heartbeat_interval=5.0, node_timeout=30.0)
    )
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = await backend.claim(ClaimParams(node_id, ["noop"], 10, policy))
        times.append((time.perf_counter() - started) * 1000)
        assert len(result.claimed) == 10, result
    await backend.deregister(
        DeregisterParams(node_id, cleanup_attempts=3)
    )  # hands the claimed tasks back
    return times


async def drain(db: c.BenchDb, count: int, deadline: float) -> float:
    async with Node(db.url, registry=registry(), concurrency=100, **db.node_kwargs()) as node:
        started = time.perf_counter()
        while await node.count_tasks(states=[State.FINISHED]) < count:
            if time.perf_counter() > deadline:
                raise TimeoutError("drain did not finish in time")
            await asyncio.sleep(0.05)
        return count / (time.perf_counter() - started)


async def _main(args: argparse.Namespace) -> None:
    deadline = time.perf_counter() + args.timeout - 30
    results: dict[str, Any] = {}
    async with c.bench_db(args.backend, args.dsn, prefix="bench_sched") as db:
        async with Node(db.url, registry=registry(), concurrency=0, **db.node_kwargs()) as client:
            started = time.perf_counter()
            await fill(client, args)
            results["fill_s"] = time.perf_counter() - started
            rows = []
            holder = await hold_running(client, args.running)
            for policy in (FairShare(), Fifo()):
                times = await time_claims(client, policy, args.rounds)
                name = type(policy).__name__
                results[f"claim10_{name}_ms"] = {
                    "p50": c.percentile(times, 50),
                    "p99": c.percentile(times, 99),
                }
                rows.append([name, c.percentile(times, 50), c.percentile(times, 99), len(times)])
            if holder is not None:  # its tasks handed back, for the drains
                await client.driver.deregister(DeregisterParams(holder, cleanup_attempts=3))
            results["running"] = args.running
            c.print_table(
                f"claim of 10 ({args.backend}, {args.n:,} pending, {args.users:,} users x "
                f"{args.groups} groups, {args.spread} spread, {args.running:,} running, "
                f"load {c.load_average()})",
                ["policy", "p50 ms", "p99 ms", "claims"],
                rows,
            )
        drain_rows = []
        free = await drain(db, args.drain, deadline)
        results["drain_free_per_s"] = free
        drain_rows.append(["none", free])
        async with Node(db.url, registry=registry(), concurrency=0, **db.node_kwargs()) as client:
            for g in range(args.groups):
                await client.set_group_limits(
                    f"group{g}", max_running=args.max_running, max_running_per_user=2
                )
        limited = await drain(db, 2 * args.drain, deadline)
        results["drain_limited_per_s"] = limited
        drain_rows.append([f"max_running={args.max_running}, per user 2, each group", limited])
        c.print_table(
            f"drain with a node of concurrency 100 ({args.backend}, {args.drain:,} tasks each)",
            ["limits", "tasks/s"],
            drain_rows,
        )
    c.emit_json(
        "scheduling",
        args.backend,
        results,
        n=args.n,
        users=args.users,
        groups=args.groups,
        spread=args.spread,
    )


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="pending tasks (default 100000)")
    parser.add_argument("--spread", choices=("queues", "users"), default="queues")
    parser.add_argument("--users", type=int, default=1_000, help="users (default 1000)")
    parser.add_argument("--groups", type=int, default=10, help="groups (default 10)")
    parser.add_argument("--rounds", type=int, default=50, help="claims timed per policy")
    parser.add_argument("--drain", type=int, default=10_000, help="tasks per drain run")
    parser.add_argument("--max-running", type=int, default=5, help="per-group limit")
    parser.add_argument(
        "--running",
        type=int,
        default=0,
        help="tasks held running by another node while the claims are timed (default 0)",
    )
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
