"""Wake-up latency: an idle node (concurrency 10) in its own process; the benchmark creates
tasks 20 ms apart, and each task stores ``time.time()`` of its first line as its context.

Two figures per task (same machine, so ``time.time()`` differences are meaningful):

- *create → first line*: from the moment ``create_task`` is called;
- *commit → first line*: from the moment ``create_task`` returned (the task is durable).

On PostgreSQL the node is woken by NOTIFY; on SQLite and MySQL/MariaDB (no NOTIFY) it has only
its poll interval (the library's default 1 s unless ``--poll-interval`` is given), so their
figure is mostly that: about half the interval on average.

    python benchmarks/latency.py --backend postgres            # 200 tasks, 20 ms apart
    python benchmarks/latency.py --backend sqlite --poll-interval 0.05
    python benchmarks/latency.py --backend mysql --poll-interval 0.05
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
from _node_proc import build_registry

from aioasync_tasks import Node, State


def _stats(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(c.percentile(values_ms, 50), 2),
        "p90_ms": round(c.percentile(values_ms, 90), 2),
        "p99_ms": round(c.percentile(values_ms, 99), 2),
        "max_ms": round(max(values_ms), 2),
        "min_ms": round(min(values_ms), 2),
    }


async def measure(
    db: c.BenchDb,
    *,
    n: int,
    interval: float,
    concurrency: int,
    deadline: float,
    poll_interval: float | None = None,
    node_args: list[str] | None = None,
) -> tuple[list[float], list[float]]:
    """An idle node in its own process; ``n`` tasks created ``interval`` s apart. Returns the
    milliseconds from each create call, and from its return, to the task's first line."""
    client = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
    async with client:
        argv = [*db.node_args(), "--concurrency", str(concurrency), *(node_args or [])]
        if poll_interval is not None:
            argv += ["--poll-interval", str(poll_interval)]
        async with c.node_procs([argv]) as procs:
            await asyncio.sleep(0.5)  # let the node settle into idle (first poll done)
            created: dict[int, tuple[float, float]] = {}
            next_at = time.monotonic()
            for _ in range(n):
                next_at += interval
                before = time.time()
                task_id = await client.create_task("stamp", group=c.GROUP)
                created[task_id] = (before, time.time())
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            async with c.Probe(db) as probe:
                await probe.wait_drained(db.tasks_table, n, deadline, procs=procs)
        tasks = []
        for offset in range(0, n, 1000):
            tasks += await client.get_tasks(states=[State.FINISHED], offset=offset, limit=1000)
    from_call, from_commit = [], []
    for task in tasks:
        before, after = created[task.id]
        first_line = float(task.context)
        from_call.append((first_line - before) * 1000)
        from_commit.append((first_line - after) * 1000)
    return from_call, from_commit


async def _main(args: argparse.Namespace) -> None:
    load = c.load_average()
    deadline = time.monotonic() + args.timeout
    async with c.bench_db(args.backend, args.dsn) as db:
        from_call, from_commit = await measure(
            db,
            n=args.n,
            interval=args.interval,
            concurrency=args.concurrency,
            deadline=deadline,
            poll_interval=args.poll_interval,
        )
    results = {
        "n": args.n,
        "interval_ms": args.interval * 1000,
        "concurrency": args.concurrency,
        "poll_interval": args.poll_interval,
        "create_to_first_line": _stats(from_call),
        "commit_to_first_line": _stats(from_commit),
    }
    rows: list[list[Any]] = []
    for name, key in (
        ("create -> first line", "create_to_first_line"),
        ("commit -> first line", "commit_to_first_line"),
    ):
        s = results[key]
        rows.append([name, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["min_ms"]])
    c.print_table(
        f"wake-up latency ({args.backend}, {args.n} tasks {args.interval * 1000:.0f} ms apart, "
        f"poll_interval={args.poll_interval or 'default (1 s)'}, loadavg at start {load}, "
        f"at end {c.load_average()})",
        ["", "p50 ms", "p90 ms", "p99 ms", "max ms", "min ms"],
        rows,
    )
    c.emit_json("latency", args.backend, results, loadavg_start=load)


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="tasks (default 200)")
    parser.add_argument(
        "--interval", type=float, default=0.02, help="seconds between creates (default 0.02)"
    )
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--poll-interval", type=float, help="the node's poll_interval (default: the library's)"
    )
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
