"""Scale: drain throughput and node memory as the backlog grows, and node memory with many
tasks running at once.

1. Drain (P=1, C=100 unless told) of N = 10,000 → 100,000 no-op tasks (``--huge`` adds
   1,000,000), each on a fresh database; tasks/s and the node process's peak RSS (sampled every
   50 ms inside the node). Memory should be flat in N: a node holds only what it runs.
2. One node with concurrency 1,000 and 1,000 tasks that sleep (default 5 s): RSS once all
   1,000 run, against the same node's RSS when idle.

    python benchmarks/scale.py --backend postgres
    python benchmarks/scale.py --backend postgres --huge --timeout 3600
    python benchmarks/scale.py --backend sqlite --sizes 10000,50000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import drain
import raw_baseline
from _node_proc import build_registry

from aioasync_tasks import Node

MB = 2**20


async def sleeping(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    async with c.bench_db(args.backend, args.dsn) as db:
        client = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
        async with client, c.Probe(db) as probe:
            await client.pause_group(c.GROUP)
            await client.create_tasks(
                [{"type": "sleep", "context": str(args.sleep), "group": c.GROUP}] * args.running
            )
            argv = drain.node_args(db, args.running, args)
            async with c.node_procs([argv]) as procs:
                idle = await procs[0].command("rss")
                t0 = time.monotonic()
                await client.resume_group(c.GROUP)
                await probe.wait_drained(
                    db.tasks_table,
                    args.running,
                    deadline,
                    states=("running", "finished"),
                    procs=procs,
                )
                all_running_s = time.monotonic() - t0
                busy = await procs[0].command("rss")
                await probe.wait_drained(db.tasks_table, args.running, deadline, procs=procs)
                final = await procs[0].stop()
    return {
        "running": args.running,
        "sleep_s": args.sleep,
        "seconds_until_all_running": round(all_running_s, 3),
        "idle_rss_mb": round(idle["rss"] / MB, 1),
        "all_running_rss_mb": round(busy["rss"] / MB, 1),
        "peak_rss_mb": round(final.get("peak_rss", 0) / MB, 1),
        "kb_per_running_task": round((busy["rss"] - idle["rss"]) / 1024 / args.running, 1),
    }


async def _main(args: argparse.Namespace) -> None:
    load = c.load_average()
    deadline = time.monotonic() + args.timeout
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.huge:
        sizes.append(1_000_000)
    p, cc = args.config
    drains = []
    for n in sizes:
        async with c.bench_db(args.backend, args.dsn) as db:
            r = await drain.run_drain(
                db, n=n, processes=p, concurrency=cc, args=args, deadline=deadline
            )
        if args.baseline:
            raw = await raw_baseline.run_baseline(
                args.backend, args.dsn, n=n, processes=p, concurrency=cc, deadline=deadline
            )
            r["raw_tasks_per_s"] = raw["tasks_per_s"]
            r["ratio_to_raw"] = round(r["tasks_per_s"] / raw["tasks_per_s"], 3)
        drains.append(r)
        print(
            f"  n={n:,}: {r['tasks_per_s']:,.0f} tasks/s, peak RSS {r['peak_rss_mb'][0]} MB",
            flush=True,
        )
    c.print_table(
        f"scale: drain ({args.backend}, P={p} C={cc}, loadavg at start {load}, at end "
        f"{c.load_average()})",
        ["N", "tasks/s", "vs raw", "seconds", "create s", "node peak RSS MB"],
        [
            [
                r["n"],
                r["tasks_per_s"],
                f"{r['ratio_to_raw']:.0%}" if r.get("ratio_to_raw") else "-",
                r["seconds"],
                r["create_seconds"],
                r["peak_rss_mb"][0],
            ]
            for r in drains
        ],
    )
    sleep_result = None
    if args.running:
        sleep_result = await sleeping(args, deadline)
        s = sleep_result
        c.print_table(
            f"scale: {s['running']:,} sleeping tasks on one node ({args.backend})",
            [
                "running",
                "until all run s",
                "idle RSS MB",
                "all running RSS MB",
                "peak RSS MB",
                "KiB/task",
            ],
            [
                [
                    s["running"],
                    s["seconds_until_all_running"],
                    s["idle_rss_mb"],
                    s["all_running_rss_mb"],
                    s["peak_rss_mb"],
                    s["kb_per_running_task"],
                ]
            ],
        )
    c.emit_json(
        "scale", args.backend, {"drain": drains, "sleeping": sleep_result}, loadavg_start=load
    )


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="10000,30000,100000",
        help="comma-separated backlog sizes (default 10000,30000,100000)",
    )
    parser.add_argument("--huge", action="store_true", help="also N=1,000,000 (slow)")
    parser.add_argument(
        "--config",
        type=raw_baseline.parse_config,
        default=(1, 100),
        help="PxC for the drains (default 1x100)",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="also run the raw baseline at every size"
    )
    parser.add_argument(
        "--running",
        type=int,
        default=1000,
        help="sleeping tasks run at once for the memory test (0: skip)",
    )
    parser.add_argument(
        "--sleep", type=float, default=5.0, help="seconds each sleeping task sleeps (default 5)"
    )
    parser.add_argument("--poll-interval", type=float, help="node poll_interval")
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
