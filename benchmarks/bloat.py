"""Bloat resistance (PostgreSQL): completions per second with a transaction left open — a
pinned xmin horizon, as a ``psql`` prompt left in a transaction or a long report causes —
against the same load without it, in one run.

A node process (``--concurrency``, default 100) runs no-op tasks that a producer creates at
``--rate`` tasks a second (default 800) in batches every 100 ms. Phase one, *clean*, lasts
``--clean`` seconds (default 60); then a separate connection opens a REPEATABLE READ transaction,
reads one row and stays idle in it (its snapshot keeps every row version that any later
transaction deleted or updated: VACUUM cannot remove them) for ``--stressed`` seconds (default
240), while the producer goes on. Completions are counted per ``--window`` seconds (default 10)
from ``done_at``; the figures are the median rate of the clean windows, the rate of the last
stressed windows (the last quarter of the phase), their ratio, and the backlog (PENDING tasks)
and the dead row versions of the tasks table at the end of each phase.

    python benchmarks/bloat.py                                  # 60 s clean, 240 s stressed
    python benchmarks/bloat.py --clean 20 --stressed 60 --rate 400   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no type information

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from _node_proc import build_registry

from aioasync_tasks import Node

BATCH_EVERY = 0.1
"""Seconds between two batches of the producer."""


async def produce(client: Node, rate: float, stop: asyncio.Event) -> int:
    """Create ``rate`` tasks a second, in batches every ``BATCH_EVERY`` s, until ``stop``."""
    created, started = 0, time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate) - created
        if due > 0:
            await client.create_tasks([{"type": "noop", "group": c.GROUP}] * due)
            created += due
        await asyncio.sleep(BATCH_EVERY)
    return created


async def table_state(conn: Any, db: c.BenchDb) -> dict[str, int]:
    """PENDING tasks, and the tasks table's dead row versions as the statistics see them."""
    table = db.tasks_table
    pending = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE state = 'pending'")
    dead = await conn.fetchval(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
        db.schema,
        "aioasync_tasks",
    )
    return {"pending": int(pending), "dead_rows": int(dead or 0)}


async def completions(conn: Any, db: c.BenchDb, since: float, window: float) -> list[int]:
    """Tasks finished per ``window`` seconds from ``since`` (epoch seconds, database clock)."""
    rows = await conn.fetch(
        f"SELECT floor((EXTRACT(EPOCH FROM done_at) - $1) / $2)::int AS w, count(*) AS n "
        f"FROM {db.tasks_table} WHERE state = 'finished' AND EXTRACT(EPOCH FROM done_at) >= $1 "
        "GROUP BY 1 ORDER BY 1",
        since,
        window,
    )
    found = {r["w"]: r["n"] for r in rows}
    return [found.get(w, 0) for w in range(max(found, default=-1) + 1)]


async def measure(db: c.BenchDb, args: argparse.Namespace) -> dict[str, Any]:
    assert db.pg_dsn is not None
    client = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
    argv = [*db.node_args(), "--concurrency", str(args.concurrency)]
    probe = await asyncpg.connect(db.pg_dsn)
    pinner = await asyncpg.connect(db.pg_dsn)
    try:
        async with client, c.node_procs([argv]):
            stop = asyncio.Event()
            since = float(await probe.fetchval("SELECT EXTRACT(EPOCH FROM now())"))
            producing = asyncio.create_task(produce(client, args.rate, stop))
            await asyncio.sleep(args.clean)
            clean_state = await table_state(probe, db)
            pinned_at = float(await probe.fetchval("SELECT EXTRACT(EPOCH FROM now())"))
            pin = pinner.transaction(isolation="repeatable_read")
            await pin.start()
            await pinner.fetchval("SELECT count(*) FROM pg_class")  # takes the snapshot
            try:
                await asyncio.sleep(args.stressed)
                stressed_state = await table_state(probe, db)
                ended_at = float(await probe.fetchval("SELECT EXTRACT(EPOCH FROM now())"))
            finally:
                await pin.rollback()
                stop.set()
                created = await producing
            windows = await completions(probe, db, since, args.window)
    finally:
        await probe.close()
        await pinner.close()
    per_second = [n / args.window for n in windows]
    clean_count = int(args.clean // args.window)
    # Whole windows only: from the first after the pin to the last before the end.
    first_stressed = int((pinned_at - since) // args.window) + 1
    stressed = per_second[first_stressed : int((ended_at - since) // args.window)]
    last = stressed[-max(1, len(stressed) // 4) :]
    clean_rate = statistics.median(per_second[1:clean_count] or per_second[:1])
    stressed_rate = statistics.median(last) if last else 0.0
    return {
        "rate": args.rate,
        "clean_s": args.clean,
        "stressed_s": args.stressed,
        "window_s": args.window,
        "created": created,
        "per_window": per_second,
        "clean_tasks_per_s": round(clean_rate, 1),
        "stressed_tasks_per_s": round(stressed_rate, 1),
        "ratio": round(stressed_rate / clean_rate, 3) if clean_rate else None,
        "after_clean": clean_state,
        "after_stressed": stressed_state,
    }


async def _main(args: argparse.Namespace) -> None:
    if args.backend != "postgres":
        raise SystemExit("bloat.py measures PostgreSQL only (MVCC row versions, VACUUM)")
    load = c.load_average()
    async with c.bench_db(args.backend, args.dsn) as db:
        results = await measure(db, args)
    c.print_table(
        f"completions per {args.window:.0f} s window, tasks/s (rate {args.rate}/s; clean "
        f"{args.clean:.0f} s, then a transaction held open {args.stressed:.0f} s; loadavg at "
        f"start {load}, at end {c.load_average()})",
        ["window", "tasks/s"],
        [[i, round(v, 1)] for i, v in enumerate(results["per_window"])],
    )
    c.print_table(
        "bloat resistance",
        ["clean tasks/s", "stressed tasks/s", "stressed/clean", "pending after", "dead rows after"],
        [
            [
                results["clean_tasks_per_s"],
                results["stressed_tasks_per_s"],
                results["ratio"],
                f"{results['after_clean']['pending']} -> {results['after_stressed']['pending']}",
                f"{results['after_clean']['dead_rows']} -> "
                f"{results['after_stressed']['dead_rows']}",
            ]
        ],
    )
    c.emit_json("bloat", args.backend, results, loadavg_start=load)


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=800.0, help="tasks/s created (800)")
    parser.add_argument("--clean", type=float, default=60.0, help="seconds without (60)")
    parser.add_argument(
        "--stressed", type=float, default=240.0, help="seconds with the open transaction (240)"
    )
    parser.add_argument("--window", type=float, default=10.0, help="seconds per window (10)")
    parser.add_argument("--concurrency", type=int, default=100, help="node concurrency (100)")
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
