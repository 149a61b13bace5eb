"""Peers: the same workloads on aioasync_tasks and on pgqueuer 1.6.0, interleaved in one run on
the same PostgreSQL; each figure is printed with the other library's and their ratio.

Workloads (each on a fresh schema, both libraries with their durable defaults — logged tables,
the server's ``fsync``/``synchronous_commit``):

- *create one by one*: N tasks (default 2,000), each create awaited — ``Node.create_task``;
  pgqueuer ``Queries.enqueue(entrypoint, payload)``;
- *create in batches of 1,000* (20,000 tasks) — ``Node.create_tasks``; pgqueuer ``enqueue``
  with lists;
- *drain* of N no-op tasks (default 20,000) by P worker processes of concurrency C (default
  1x100 and 2x10): ours as in ``drain.py`` (created in a paused group, resumed once the nodes
  are READY); pgqueuer's workers (``PgQueuer.run(max_concurrent_tasks=C, batch_size=C//2)``,
  the largest batch it accepts for that cap) start first and listen, then the N jobs are
  enqueued in one statement. Both are timed by the database clock, from the first claim to the
  last completion: ``min(started_at)``→``max(done_at)``; pgqueuer: the first ``picked`` to the
  last ``successful`` row of its log table;
- *wake-up latency*: an idle worker of concurrency 10 in its own process, 200 tasks created
  20 ms apart; from the create call to the task's first line (``time.time()`` in both
  processes), p50 and p99.

The ratio is ours ÷ pgqueuer's: above 1 is better for throughput, below 1 for latency. With
``--rounds R`` every workload runs R times for each library, the order alternating each round,
and medians are printed. Both run on the default asyncio loop unless ``--loop uvloop`` (which
pgqueuer's own CLI picks when it is installed).

    pip install -e '.[bench]'           # pgqueuer==1.6.0
    python benchmarks/peers.py                          # everything, one round
    python benchmarks/peers.py --rounds 3 --only drain --config 1x100
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import create
import drain
import latency
import raw_baseline
from _node_proc import build_registry

from aioasync_tasks import Node

PGQ_PROC = Path(__file__).resolve().parent / "_pgq_proc.py"
WORKLOADS = ("create", "drain", "latency")


# -- pgqueuer ------------------------------------------------------------------------------


async def pgq_connect(db: c.BenchDb) -> Any:
    """An asyncpg connection whose search_path is the benchmark's schema."""
    return await asyncpg.connect(db.pg_dsn, server_settings={"search_path": str(db.schema)})


async def pgq_install(db: c.BenchDb) -> tuple[Any, Any]:
    """pgqueuer's tables in the schema (its ``install``); a connection and its ``Queries``."""
    from pgqueuer import AsyncpgDriver, Queries  # noqa: PLC0415 - optional dependency

    conn = await pgq_connect(db)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    return conn, queries


class _PgqProcs:
    """``c.node_procs`` running ``_pgq_proc.py`` instead of ``_node_proc.py``."""

    def __init__(self, all_args: list[list[str]]) -> None:
        self.all_args = all_args

    async def __aenter__(self) -> list[c.NodeProc]:
        self.procs = [c.NodeProc(a) for a in self.all_args]
        for p in self.procs:
            p.args = [sys.executable, str(PGQ_PROC), *p.args[2:]]
        try:
            await asyncio.gather(*(p.start() for p in self.procs))
        except BaseException:
            for p in self.procs:
                p.kill()
            raise
        return self.procs

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.shield(
                asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)
            )
        finally:
            for p in self.procs:
                p.kill()


def pgq_procs(
    db: c.BenchDb, processes: int, concurrency: int, args: argparse.Namespace
) -> _PgqProcs:
    argv = [
        "--dsn",
        str(db.pg_dsn),
        "--schema",
        str(db.schema),
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(max(1, concurrency // 2)),
        "--loop",
        args.loop,
    ]
    return _PgqProcs([list(argv) for _ in range(processes)])


async def pgq_wait(conn: Any, total: int, deadline: float, procs: list[c.NodeProc]) -> None:
    """Until ``total`` jobs are logged as successful."""
    while True:
        for p in procs:
            p.check_alive()
        done = await conn.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
        if done >= total:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pgqueuer: only {done} of {total} jobs done before the deadline")
        await asyncio.sleep(0.05)


async def theirs_create(db: c.BenchDb, args: argparse.Namespace) -> dict[str, float]:
    conn, queries = await pgq_install(db)
    try:
        await queries.enqueue("noop", b"warm-up")
        t0 = time.perf_counter()
        for i in range(args.single):
            await queries.enqueue("noop", str(i).encode())
        single = args.single / (time.perf_counter() - t0)
        batch, total = 1000, args.batch_total
        t0 = time.perf_counter()
        for start in range(0, total, batch):
            size = min(batch, total - start)
            await queries.enqueue(["noop"] * size, [b"x"] * size, [0] * size)
        batched = total / (time.perf_counter() - t0)
    finally:
        await conn.close()
    return {"create_single": single, "create_batch": batched}


async def theirs_drain(
    db: c.BenchDb, processes: int, concurrency: int, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    conn, queries = await pgq_install(db)
    try:
        async with pgq_procs(db, processes, concurrency, args) as procs:
            # One statement: every job becomes visible at its commit (and its NOTIFY wakes the
            # idle workers), as the library's resumed group does.
            await queries.enqueue(["noop"] * args.n, [b""] * args.n, [0] * args.n)
            await pgq_wait(conn, args.n, deadline, procs)
            results = await asyncio.gather(*(p.stop() for p in procs))
        seconds = await conn.fetchval(
            "SELECT extract(epoch FROM max(created) FILTER (WHERE status = 'successful')"
            " - min(created) FILTER (WHERE status = 'picked')) FROM pgqueuer_log"
        )
    finally:
        await conn.close()
    seconds = float(seconds)
    return {
        "tasks_per_s": args.n / seconds,
        "seconds": seconds,
        "executed_per_process": [r.get("executed") for r in results],
        "worker_cpu_seconds": [r.get("cpu_seconds") for r in results],
    }


async def theirs_latency(
    db: c.BenchDb, args: argparse.Namespace, deadline: float
) -> tuple[list[float], list[float]]:
    conn, queries = await pgq_install(db)
    try:
        async with pgq_procs(db, 1, args.latency_concurrency, args) as procs:
            await asyncio.sleep(0.5)
            created: dict[int, tuple[float, float]] = {}
            next_at = time.monotonic()
            for _ in range(args.latency_n):
                next_at += args.interval
                before = time.time()
                (job_id,) = await queries.enqueue("stamp", b"")
                created[int(job_id)] = (before, time.time())
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await pgq_wait(conn, args.latency_n, deadline, procs)
            (result,) = await asyncio.gather(*(p.stop() for p in procs))
    finally:
        await conn.close()
    stamps = {int(k): float(v) for k, v in result["stamps"].items()}
    from_call = [(stamps[i] - before) * 1000 for i, (before, _) in created.items()]
    from_commit = [(stamps[i] - after) * 1000 for i, (_, after) in created.items()]
    return from_call, from_commit


# -- aioasync_tasks ------------------------------------------------------------------------


async def ours_create(db: c.BenchDb, args: argparse.Namespace) -> dict[str, float]:
    node = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
    async with node:
        await node.create_task("noop", "warm-up", group=c.GROUP)
        single = args.single / await create.library_single(node, args.single)
        batched = args.batch_total / await create.library_batches(node, args.batch_total, 1000)
    return {"create_single": single, "create_batch": batched}


async def ours_drain(
    db: c.BenchDb, processes: int, concurrency: int, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    result = await drain.run_drain(
        db, n=args.n, processes=processes, concurrency=concurrency, args=args, deadline=deadline
    )
    result["worker_cpu_seconds"] = result["node_cpu_seconds"]
    return result


async def ours_latency(
    db: c.BenchDb, args: argparse.Namespace, deadline: float
) -> tuple[list[float], list[float]]:
    extra = ["--loop", args.loop] if args.loop != "asyncio" else []
    return await latency.measure(
        db,
        n=args.latency_n,
        interval=args.interval,
        concurrency=args.latency_concurrency,
        deadline=deadline,
        node_args=extra,
    )


# -- the run -------------------------------------------------------------------------------


async def one_side(
    side: str, workload: str, args: argparse.Namespace, deadline: float
) -> dict[str, float]:
    """One workload on one library, on a fresh schema: {figure name: value}."""
    figures: dict[str, float] = {}
    if workload == "create":
        async with c.bench_db("postgres", args.dsn, prefix="peers") as db:
            fn = ours_create if side == "ours" else theirs_create
            figures.update(await fn(db, args))
    elif workload == "latency":
        async with c.bench_db("postgres", args.dsn, prefix="peers") as db:
            fl = ours_latency if side == "ours" else theirs_latency
            from_call, _ = await fl(db, args, deadline)
        figures["latency_p50"] = c.percentile(from_call, 50)
        figures["latency_p99"] = c.percentile(from_call, 99)
    else:
        for p, cc in args.config:
            async with c.bench_db("postgres", args.dsn, prefix="peers") as db:
                fd = ours_drain if side == "ours" else theirs_drain
                r = await fd(db, p, cc, args, deadline)
            figures[f"drain_{p}x{cc}"] = r["tasks_per_s"]
            cpu = sum(x or 0.0 for x in r["worker_cpu_seconds"])
            # (The postgres processes' CPU is left out: the server is shared, and connections
            # that end during the run take their CPU time with them.)
            figures[f"drain_{p}x{cc}_cpu_us"] = cpu / args.n * 1e6
    return figures


def rows_for(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(figure key, label, which way is better)."""
    rows: list[tuple[str, str, str]] = []
    if "create" in args.only:
        rows += [
            ("create_single", f"create one by one, awaited ({args.single:,}), tasks/s", "higher"),
            (
                "create_batch",
                f"create in batches of 1,000 ({args.batch_total:,}), tasks/s",
                "higher",
            ),
        ]
    if "drain" in args.only:
        for p, cc in args.config:
            key = f"drain_{p}x{cc}"
            rows += [
                (key, f"drain {p} x {cc} ({args.n:,} no-op), tasks/s", "higher"),
                (f"{key}_cpu_us", f"drain {p} x {cc}: worker CPU per task, us", "lower"),
            ]
    if "latency" in args.only:
        rows += [
            ("latency_p50", "wake-up create -> task starts, p50 ms", "lower"),
            ("latency_p99", "wake-up create -> task starts, p99 ms", "lower"),
        ]
    return rows


async def _main(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    load = c.load_average()
    print(
        f"peers: pgqueuer vs aioasync_tasks, rounds={args.rounds}, loop={args.loop},"
        f" loadavg={load}",
        flush=True,
    )
    samples: dict[str, dict[str, list[float]]] = {"ours": {}, "theirs": {}}
    for r in range(args.rounds):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for workload in WORKLOADS:
            if workload not in args.only:
                continue
            for side in order:
                figures = await one_side(side, workload, args, deadline)
                for key, value in figures.items():
                    samples[side].setdefault(key, []).append(value)
                print(f"  round {r + 1} {workload} {side}: {_short(figures)}", flush=True)
    table, results = [], []
    for key, label, better in rows_for(args):
        ours = statistics.median(samples["ours"][key])
        theirs = statistics.median(samples["theirs"][key])
        ratio = ours / theirs if theirs else float("nan")
        table.append([label, round(ours, 2), round(theirs, 2), f"{ratio:.2f}", better])
        results.append(
            {
                "figure": key,
                "ours": samples["ours"][key],
                "pgqueuer": samples["theirs"][key],
                "ratio_of_medians": round(ratio, 3),
                "better": better,
            }
        )
    c.print_table(
        f"peers (postgres, aioasync_tasks vs pgqueuer 1.6.0, {args.rounds} round(s), medians;"
        f" loop {args.loop}; loadavg at start {load}, at end {c.load_average()})",
        ["workload", "aioasync_tasks", "pgqueuer", "ours/theirs", "better"],
        table,
    )
    c.emit_json("peers", "postgres", results, loadavg_start=load, loop=args.loop)


def _short(figures: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:,.1f}" for k, v in figures.items())


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(backend="postgres")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each workload per side")
    parser.add_argument(
        "--only",
        action="append",
        choices=WORKLOADS,
        help="workloads to run, repeatable (default all)",
    )
    parser.add_argument("--single", type=int, default=2000, help="one-by-one creates")
    parser.add_argument("--batch-total", type=int, default=20_000, help="tasks created in batches")
    parser.add_argument("-n", type=int, default=20_000, help="tasks drained (default 20000)")
    parser.add_argument(
        "--config",
        type=raw_baseline.parse_config,
        action="append",
        help="drain PxC, repeatable; default 1x100 and 2x10",
    )
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02, help="latency: seconds apart")
    parser.add_argument("--latency-concurrency", type=int, default=10)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.backend != "postgres":
        parser.error("pgqueuer runs on PostgreSQL only")
    args.only = args.only or list(WORKLOADS)
    args.config = args.config or [(1, 100), (2, 10)]
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
