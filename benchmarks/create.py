"""Create throughput: ``create_task`` one by one (each awaited), and ``create_tasks`` in
batches; tasks/s. No node runs the tasks (a client-only node creates them).

A raw row is printed next to each: the same inserts written directly on asyncpg / sqlite3
(one ``INSERT … RETURNING id`` per task, one ``INSERT … SELECT FROM unnest(…)`` per batch) /
aiomysql (one autocommit ``INSERT`` per task, its id from the insert id; per batch, one
transaction of multi-row ``INSERT … VALUES`` of up to 1,000 rows each, ids not read back).

    python benchmarks/create.py --backend postgres                 # N=2000 single, 1000/20000
    python benchmarks/create.py --backend sqlite --single 2000 --batch 1000 --batch 20000
    python benchmarks/create.py --backend mysql
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from _node_proc import build_registry

from aioasync_tasks import Node

_PG_INSERT = (
    "INSERT INTO {t} (type, user_name, group_name, state, context, priority, attempts,"
    " max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
    " VALUES ($1, $2, $3, 'pending', $4, 0, 0, 1, false, false, now(), now(), now())"
    " RETURNING id"
)
_PG_INSERT_MANY = (
    "INSERT INTO {t} (type, user_name, group_name, state, context, priority, attempts,"
    " max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
    " SELECT v.type, v.u, v.g, 'pending', v.ctx, 0, 0, 1, false, false, now(), now(), now()"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS v(type, u, g, ctx)"
    " RETURNING id"
)
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SQLITE_INSERT = (
    "INSERT INTO {t} (type, user_name, group_name, state, context, priority, attempts,"
    " max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
    " VALUES (?, ?, ?, 'pending', ?, 0, 0, 1, 0, 0, {now}, {now}, {now}) RETURNING id"
)

_MYSQL_NOW = "UTC_TIMESTAMP(6)"
_MYSQL_INSERT = (
    "INSERT INTO {t} (type, user_name, group_name, state, context, priority, attempts,"
    " max_attempts, has_cleanup, handoff, created_at, updated_at, run_at) VALUES {values}"
)
_MYSQL_ROW = "(%s, %s, %s, 'pending', %s, 0, 0, 1, false, false, {now}, {now}, {now})"
_MYSQL_ROWS_PER_STATEMENT = 1000


async def library_single(node: Node, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        await node.create_task("noop", str(i), group=c.GROUP)
    return time.perf_counter() - t0


async def library_batches(node: Node, total: int, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        size = min(batch, total - start)
        await node.create_tasks([{"type": "noop", "context": "x", "group": c.GROUP}] * size)
    return time.perf_counter() - t0


async def raw_single(db: c.BenchDb, n: int) -> float:
    if db.backend == "postgres":
        conn = await asyncpg.connect(db.pg_dsn)
        try:
            sql = _PG_INSERT.format(t=db.tasks_table)
            t0 = time.perf_counter()
            for i in range(n):
                await conn.fetchval(sql, "noop", "", c.GROUP, str(i))
            return time.perf_counter() - t0
        finally:
            await conn.close()
    if db.backend == "mysql":
        return await _mysql_raw(db, n, 1)
    return await asyncio.to_thread(_sqlite_raw, db, n, 1)


async def raw_batches(db: c.BenchDb, total: int, batch: int) -> float:
    if db.backend == "postgres":
        conn = await asyncpg.connect(db.pg_dsn)
        try:
            sql = _PG_INSERT_MANY.format(t=db.tasks_table)
            t0 = time.perf_counter()
            for start in range(0, total, batch):
                size = min(batch, total - start)
                await conn.fetch(sql, ["noop"] * size, [""] * size, [c.GROUP] * size, ["x"] * size)
            return time.perf_counter() - t0
        finally:
            await conn.close()
    if db.backend == "mysql":
        return await _mysql_raw(db, total, batch)
    return await asyncio.to_thread(_sqlite_raw, db, total, batch)


async def _mysql_raw(db: c.BenchDb, total: int, batch: int) -> float:
    """batch=1: one autocommit INSERT per task, its id read (``lastrowid``); else one
    transaction per batch of multi-row INSERT statements (1,000 rows each; no ids read)."""
    assert db.mysql_kwargs is not None
    conn = await c.mysql_connect(db.mysql_kwargs, db.database)
    row = _MYSQL_ROW.format(now=_MYSQL_NOW)
    try:
        async with conn.cursor() as cur:
            t0 = time.perf_counter()
            if batch == 1:
                sql = _MYSQL_INSERT.format(t=db.tasks_table, values=row)
                for i in range(total):
                    await cur.execute(sql, ("noop", "", c.GROUP, str(i)))
                    assert cur.lastrowid
            else:
                for start in range(0, total, batch):
                    size = min(batch, total - start)
                    await conn.begin()
                    for first in range(0, size, _MYSQL_ROWS_PER_STATEMENT):
                        rows = min(_MYSQL_ROWS_PER_STATEMENT, size - first)
                        sql = _MYSQL_INSERT.format(t=db.tasks_table, values=", ".join([row] * rows))
                        await cur.execute(sql, ("noop", "", c.GROUP, "x") * rows)
                    await conn.commit()
            return time.perf_counter() - t0
    finally:
        conn.close()


def _sqlite_raw(db: c.BenchDb, total: int, batch: int) -> float:
    """One write transaction per batch (batch=1: per task), one INSERT per row (sqlite3)."""
    assert db.path is not None
    conn = sqlite3.connect(db.path, isolation_level=None, timeout=60)
    try:
        sql = _SQLITE_INSERT.format(t=db.tasks_table, now=_SQLITE_NOW)
        t0 = time.perf_counter()
        for start in range(0, total, batch):
            size = min(batch, total - start)
            conn.execute("BEGIN IMMEDIATE")
            for i in range(size):
                conn.execute(sql, ("noop", "", c.GROUP, str(start + i))).fetchall()
            conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


async def _main(args: argparse.Namespace) -> None:
    load = c.load_average()
    batches = args.batch or [1000, 20_000]
    total = max(args.batch_total, *batches)
    results: list[dict[str, Any]] = []
    async with c.bench_db(args.backend, args.dsn) as db:
        node = Node(db.url, concurrency=0, registry=build_registry(), **db.node_kwargs())
        async with node:
            await node.create_task("noop", group=c.GROUP)  # warm up the pool and statements
            seconds = await library_single(node, args.single)
            raw = await raw_single(db, args.single)
            results.append(_row("one by one", args.single, 1, seconds, raw))
            for batch in batches:
                seconds = await library_batches(node, total, batch)
                raw = await raw_batches(db, total, batch)
                results.append(_row(f"create_tasks x{batch}", total, batch, seconds, raw))
    c.print_table(
        f"create ({args.backend}, loadavg at start {load}, at end {c.load_average()})",
        ["mode", "tasks", "tasks/s", "raw tasks/s", "vs raw", "seconds"],
        [
            [
                r["mode"],
                r["n"],
                r["tasks_per_s"],
                r["raw_tasks_per_s"],
                f"{r['ratio_to_raw']:.0%}",
                r["seconds"],
            ]
            for r in results
        ],
    )
    c.emit_json("create", args.backend, results, loadavg_start=load)


def _row(mode: str, n: int, batch: int, seconds: float, raw: float) -> dict[str, Any]:
    return {
        "mode": mode,
        "n": n,
        "batch": batch,
        "seconds": round(seconds, 4),
        "tasks_per_s": round(n / seconds, 1),
        "raw_tasks_per_s": round(n / raw, 1),
        "ratio_to_raw": round(raw / seconds, 3),
    }


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--single", type=int, default=2000, help="tasks created one by one (default 2000)"
    )
    parser.add_argument(
        "--batch", type=int, action="append", help="batch size, repeatable (default 1000 and 20000)"
    )
    parser.add_argument(
        "--batch-total",
        type=int,
        default=20_000,
        help="tasks created per batch size (default 20000; at least one batch)",
    )
    args = parser.parse_args()
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
