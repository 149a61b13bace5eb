"""Drain throughput: N pending no-op tasks, P node processes x C concurrency.

The tasks are created (``create_tasks`` in batches) in a paused group; the node processes are
started and announce READY; then the group is resumed and the clock runs from the first claim
(``min(started_at)``) to the last completion (``max(done_at)``), both stamped by the database.
Every configuration is also run on the raw-SQL baseline (``raw_baseline.py``) in the same run,
and the library's result is printed as a ratio to it.

    python benchmarks/drain.py --backend postgres -n 20000              # 1x100 and 2x10
    python benchmarks/drain.py --backend sqlite -n 20000 --config 1x100
    python benchmarks/drain.py --backend mysql -n 20000 --config 1x100  # MariaDB/MySQL
    python benchmarks/drain.py -n 20000 --config 1x100 --profile pyinstrument   # profile node
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import raw_baseline
from _node_proc import build_registry

from aioasync_tasks import Node

CREATE_BATCH = 5_000


async def create_pending(node: Node, n: int, task_type: str = "noop", context: str = "") -> None:
    """``n`` tasks in the (paused) bench group, ``create_tasks`` in batches."""
    for start in range(0, n, CREATE_BATCH):
        size = min(CREATE_BATCH, n - start)
        await node.create_tasks([{"type": task_type, "context": context, "group": c.GROUP}] * size)


def node_args(db: c.BenchDb, concurrency: int, args: argparse.Namespace) -> list[str]:
    extra = ["--concurrency", str(concurrency)]
    poll = getattr(args, "poll_interval", None)
    if poll is not None:
        extra += ["--poll-interval", str(poll)]
    gc_mode = getattr(args, "gc", None)
    if gc_mode:
        extra += ["--gc", gc_mode]
    loop = getattr(args, "loop", None)
    if loop and loop != "asyncio":
        extra += ["--loop", loop]
    observing = getattr(args, "observers", None)
    if observing and observing != "none":
        extra += ["--observers", observing]
    if getattr(args, "cleanup_handler", False):
        extra += ["--cleanup-handler"]
    return db.node_args() + extra


async def run_drain(
    db: c.BenchDb,
    *,
    n: int,
    processes: int,
    concurrency: int,
    args: argparse.Namespace,
    deadline: float,
    profile_out: str | None = None,
    wrap: list[str] | None = None,
) -> dict[str, Any]:
    """One drain on a fresh database ``db``; returns the measurements."""
    client = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
    async with client:
        await client.pause_group(c.GROUP)
        t0 = time.monotonic()
        await create_pending(client, n)
        create_s = time.monotonic() - t0
        async with c.Probe(db) as probe:
            await probe.analyze(db.tasks_table)
            argv = [node_args(db, concurrency, args) for _ in range(processes)]
            if profile_out:
                argv[0] += ["--profile-out", profile_out]
            async with c.node_procs(argv, wrap=wrap or []) as procs:
                server_cpu0 = c.server_cpu_seconds(db.backend)
                wall0 = time.monotonic()
                await client.resume_group(c.GROUP)  # NOTIFY wake on PostgreSQL, else polls
                wall1 = await probe.wait_drained(db.tasks_table, n, deadline, procs=procs)
                server_cpu = c.server_cpu_seconds(db.backend) - server_cpu0
                results = await asyncio.gather(*(p.stop() for p in procs))
            count, seconds = await probe.span(db.tasks_table)
    if count != n:
        raise RuntimeError(f"{count} of {n} tasks finished")
    return {
        "n": n,
        "processes": processes,
        "concurrency": concurrency,
        "seconds": round(seconds, 4),
        "wall_seconds": round(wall1 - wall0, 4),
        "tasks_per_s": round(n / seconds, 1) if seconds else None,
        "create_seconds": round(create_s, 3),
        "executed_per_process": [r.get("executed") for r in results],
        "peak_rss_mb": [round(r.get("peak_rss", 0) / 2**20, 1) for r in results],
        "node_cpu_seconds": [r.get("cpu_seconds") for r in results],
        "postgres_cpu_seconds": round(server_cpu, 3) if db.backend == "postgres" else None,
        "server_cpu_seconds": round(server_cpu, 3) if db.backend != "sqlite" else None,
        "node_stats": [
            {k: r[k] for k in ("calls", "rows_per_call", "gc_collections", "gc_seconds") if k in r}
            for r in results
        ],
    }


def diagnostics_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per node process: how it used the database, the garbage collector, and the
    CPU it (and, on PostgreSQL and MySQL, the database server's processes together) used over
    the wall time of the drain (100% = one core; the machine has ``nproc`` cores)."""
    rows = []
    for i, st in enumerate(result["node_stats"]):
        calls, per = st.get("calls", {}), st.get("rows_per_call", {})
        executed = result["executed_per_process"][i] or 0
        tx = calls.get("tx_write", 0) + calls.get("tx_read", 0)
        rows.append(
            [
                f"{result['processes']}x{result['concurrency']} #{i + 1}",
                executed,
                calls.get("claim", 0),
                calls.get("claim_empty", 0),
                per.get("claim", 0.0),
                calls.get("complete", 0),
                per.get("complete", 0.0),
                round(tx / executed, 2) if executed else "-",
                round(calls.get("statements", 0) / executed, 2) if executed else "-",
                "/".join(str(x) for x in st.get("gc_collections", [])),
                sum(st.get("gc_seconds", [])),
                _percent(result["node_cpu_seconds"][i], result["wall_seconds"]),
                _percent(result["server_cpu_seconds"], result["wall_seconds"]) if i == 0 else "",
            ]
        )
    return rows


def _percent(part: float | None, whole: float) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"


DIAGNOSTICS_HEADERS = [
    "node",
    "executed",
    "claims",
    "empty",
    "rows/claim",
    "flushes",
    "rows/flush",
    "tx/task",
    "stmts/task",
    "gc gen0/1/2",
    "gc s",
    "node CPU",
    "server CPU",
]


def _absolute(path: str) -> str:
    return str(Path(path).absolute())


async def _main(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    configs = args.config or [(1, 100), (2, 10)]
    load = c.load_average()
    print(
        f"drain: backend={args.backend} n={args.n} configs={configs} "
        f"poll_interval={args.poll_interval or 'default (1 s)'} loadavg={load}",
        flush=True,
    )
    rows, results, diagnostics = [], [], []
    for p, cc in configs:
        wrap: list[str] = []
        profile_out = spy_out = None
        if args.profile == "pyinstrument":
            profile_out = _absolute(args.profile_file or f"drain_{args.backend}_{p}x{cc}.txt")
        elif args.profile in ("py-spy", "py-spy-native"):
            spy_out = _absolute(args.profile_file or f"drain_{args.backend}_{p}x{cc}.svg")
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            # Blocking native sampling slows the node down a lot: keep its rate low.
            mode = (
                ["--native", "--rate", "100"]
                if args.profile == "py-spy-native"
                else ["--nonblocking", "--rate", "250"]
            )
            wrap = [spy, "record", *mode, "-o", spy_out, "--"]
            if spy_out.endswith(".txt"):
                wrap[-1:-1] = ["--format", "raw"]
        async with c.bench_db(args.backend, args.dsn) as db:
            lib = await run_drain(
                db,
                n=args.n,
                processes=p,
                concurrency=cc,
                args=args,
                deadline=deadline,
                profile_out=profile_out,
                wrap=wrap,
            )
        raw = None
        if not args.no_baseline:
            raw = await raw_baseline.run_baseline(
                args.backend,
                args.dsn,
                n=args.n,
                processes=p,
                concurrency=cc,
                shape=args.baseline_shape,
                deadline=deadline,
            )
        ratio = (lib["tasks_per_s"] / raw["tasks_per_s"]) if raw and raw["tasks_per_s"] else None
        lib["raw_tasks_per_s"] = raw["tasks_per_s"] if raw else None
        lib["ratio_to_raw"] = round(ratio, 3) if ratio is not None else None
        results.append(lib)
        diagnostics += diagnostics_rows(lib)
        rows.append(
            [
                p,
                cc,
                lib["tasks_per_s"],
                lib["raw_tasks_per_s"],
                f"{ratio:.0%}" if ratio is not None else "-",
                lib["seconds"],
                lib["wall_seconds"],
                "/".join(str(x) for x in lib["peak_rss_mb"]),
            ]
        )
        if profile_out or spy_out:
            print(f"profile written for {p}x{cc}: {profile_out or spy_out}", flush=True)
    c.print_table(
        f"drain ({args.backend}, n={args.n}, loadavg at start {load}, at end {c.load_average()})",
        ["P", "C", "tasks/s", "raw tasks/s", "vs raw", "seconds", "wall s", "peak RSS MB"],
        rows,
    )
    c.print_table(
        "drain: node diagnostics (counted inside the node processes)",
        DIAGNOSTICS_HEADERS,
        diagnostics,
    )
    c.emit_json("drain", args.backend, results, loadavg_start=load)


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="tasks to drain (default 20000)")
    parser.add_argument(
        "--config",
        type=raw_baseline.parse_config,
        action="append",
        help="PxC (processes x concurrency), repeatable; default 1x100 and 2x10",
    )
    parser.add_argument(
        "--poll-interval", type=float, help="node poll_interval (default: the library's, 1.0 s)"
    )
    parser.add_argument(
        "--gc",
        choices=("default", "freeze", "off"),
        help="experiment: gc.freeze() or gc.disable() in the nodes after start",
    )
    parser.add_argument(
        "--baseline-shape",
        choices=("minimal", "library"),
        default="minimal",
        help="raw baseline variant (see raw_baseline.py; default minimal)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw baseline")
    parser.add_argument(
        "--observers",
        choices=("none", "prometheus", "opentelemetry"),
        default="none",
        help="the nodes' observers (their cost): PrometheusMetrics or OpenTelemetry (SDK "
        "providers, nothing exported)",
    )
    parser.add_argument(
        "--cleanup-handler",
        action="store_true",
        help="the nodes also have a type with a cleanup handler: a cleanup claim every round",
    )
    parser.add_argument(
        "--profile",
        choices=("pyinstrument", "py-spy", "py-spy-native"),
        help="profile the first node process of each configuration",
    )
    parser.add_argument("--profile-file", help="profile output (.txt/.html; .svg/.txt for py-spy)")
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
