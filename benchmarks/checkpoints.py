"""Checkpoint throughput: T running tasks (default 100) each yielding K durable checkpoints
(default 1,000; ``Report(context=str(i))``) on one node process with concurrency T; reports/s
from the first claim to the last completion (database timestamps).

Each ``yield`` returns only once its checkpoint is stored, so this measures the group commit:
how many reports one flush carries and how fast flushes follow each other.

    python benchmarks/checkpoints.py --backend postgres            # 100 tasks x 1000
    python benchmarks/checkpoints.py --backend sqlite --tasks 100 --checkpoints 1000
    python benchmarks/checkpoints.py --backend mysql
    python benchmarks/checkpoints.py --backend postgres --watched   # every task watched

With ``--watched`` every task is marked as watched (as ``Node.wait_task``/``watch`` mark them),
so each checkpoint batch also sends a task event (PostgreSQL; docs/design.md §18); one
listener counts the events, and nobody reads the tasks again, so the figure is the node's
cost of the notifications alone.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from _node_proc import build_registry

from aioasync_tasks import Node
from aioasync_tasks._backends._driver import ListenParams, WatchParams


async def _main(args: argparse.Namespace) -> None:
    load = c.load_average()
    deadline = time.monotonic() + args.timeout
    async with c.bench_db(args.backend, args.dsn) as db:
        client = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
        async with client, c.Probe(db) as probe:
            await client.pause_group(c.GROUP)
            ids = await client.create_tasks(
                [{"type": "checkpoints", "context": "", "group": c.GROUP}] * args.tasks
            )
            events: list[str] = []
            listening = contextlib.AsyncExitStack()
            if args.watched and client.driver.supports_notify:
                await client.driver.watch_tasks(WatchParams(tuple(ids), 3600.0))
                await listening.enter_async_context(
                    client.driver.listen_tasks(ListenParams(events.append))
                )
            argv = [
                *db.node_args(),
                "--concurrency",
                str(args.tasks),
                "--checkpoints",
                str(args.checkpoints),
            ]
            async with c.node_procs([argv]) as procs:
                wall0 = time.monotonic()
                await client.resume_group(c.GROUP)
                wall1 = await probe.wait_drained(db.tasks_table, args.tasks, deadline, procs=procs)
                node_result = await procs[0].stop()
            await listening.aclose()
            count, seconds = await probe.span(db.tasks_table)
            contexts = {t.context for t in await client.get_tasks(limit=1)}
    if count != args.tasks:
        raise RuntimeError(f"{count} of {args.tasks} tasks finished")
    if contexts != {str(args.checkpoints - 1)}:
        raise RuntimeError(f"unexpected last checkpoint {contexts}")
    reports = args.tasks * args.checkpoints
    result = {
        "tasks": args.tasks,
        "checkpoints_per_task": args.checkpoints,
        "reports": reports,
        "seconds": round(seconds, 4),
        "wall_seconds": round(wall1 - wall0, 4),
        "reports_per_s": round(reports / seconds, 1),
        "peak_rss_mb": round(node_result.get("peak_rss", 0) / 2**20, 1),
        "checkpoint_flushes": node_result.get("calls", {}).get("checkpoint"),
        "reports_per_flush": node_result.get("rows_per_call", {}).get("checkpoint"),
        "watched": args.watched,
        "task_events_heard": len(events),
        "gc_collections": node_result.get("gc_collections"),
        "gc_seconds": node_result.get("gc_seconds"),
    }
    c.print_table(
        f"checkpoints ({args.backend}{', watched' if args.watched else ''}, loadavg at start "
        f"{load}, at end {c.load_average()})",
        [
            "tasks",
            "checkpoints/task",
            "reports/s",
            "seconds",
            "wall s",
            "flushes",
            "reports/flush",
            "events",
        ],
        [
            [
                args.tasks,
                args.checkpoints,
                result["reports_per_s"],
                result["seconds"],
                result["wall_seconds"],
                result["checkpoint_flushes"],
                result["reports_per_flush"],
                result["task_events_heard"],
            ]
        ],
    )
    c.emit_json("checkpoints", args.backend, result, loadavg_start=load)


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100, help="running tasks (default 100)")
    parser.add_argument(
        "--checkpoints", type=int, default=1000, help="checkpoints per task (default 1000)"
    )
    parser.add_argument(
        "--watched", action="store_true", help="mark every task watched (task events sent)"
    )
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
