"""The raw-SQL limit: the drain's claim-batch → finish-batch cycle with no framework.

PostgreSQL: asyncpg directly. A table shaped like the library's (same columns, same indexes
unless ``--lean``), N pending rows, P processes each with C "slots": claim up to C rows with
``UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED LIMIT k) … RETURNING``, "run" each (a no-op),
mark them finished with one ``UPDATE … WHERE id = ANY($1)``, repeat until nothing is left.
SQLite: the same cycle on the ``sqlite3`` module (``BEGIN IMMEDIATE``; ``UPDATE … RETURNING``).
MySQL/MariaDB: aiomysql directly; neither has ``UPDATE … RETURNING``, so a claim is one
transaction of ``SELECT id, type, context … ORDER BY … LIMIT k FOR UPDATE SKIP LOCKED`` and the
``UPDATE`` of those ids, and the finish one autocommit ``UPDATE … WHERE id IN (…)``; the table
has the library's MySQL columns and indexes (after its migration 6), and the ready index leads
with ``state``, as MySQL's stand-in for a partial index.

``--shape library`` (PostgreSQL) replays the round trips the library makes per cycle instead:
claim = BEGIN, a lock query, the claim, COMMIT; finish = BEGIN, ``SELECT … FOR UPDATE`` of the
rows, one ``UPDATE`` per row (asyncpg ``executemany``), COMMIT — the same SQL cost with no
Python framework, to tell round trips from Python overhead.

Throughput is measured like the library's drain: rows / (last ``done_at`` - first
``started_at``), both stamped by the database clock.

    python benchmarks/raw_baseline.py --backend postgres -n 20000 --config 1x100 --config 2x10

``drain.py`` imports ``run_baseline`` so every drain result has its ratio to a baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

SELF = str(Path(__file__).resolve())
TABLE = "raw_tasks"
SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"

# Same columns and indexes as the library's aioasync_tasks (migration 1).
_PG_DDL = """
CREATE TABLE {t} (
    id BIGSERIAL PRIMARY KEY, type VARCHAR(200) NOT NULL, user_name TEXT NOT NULL,
    group_name TEXT NOT NULL, state VARCHAR(16) NOT NULL, requested VARCHAR(16),
    context TEXT NOT NULL, priority INTEGER NOT NULL, attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, has_cleanup BOOLEAN NOT NULL, handoff BOOLEAN NOT NULL,
    error TEXT, node_id BIGINT, created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ, done_at TIMESTAMPTZ, run_at TIMESTAMPTZ NOT NULL)
"""
_SQLITE_DDL = """
CREATE TABLE {t} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type VARCHAR(200) NOT NULL, user_name TEXT NOT NULL,
    group_name TEXT NOT NULL, state VARCHAR(16) NOT NULL, requested VARCHAR(16),
    context TEXT NOT NULL, priority INTEGER NOT NULL, attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, has_cleanup BOOLEAN NOT NULL, handoff BOOLEAN NOT NULL,
    error TEXT, node_id INTEGER, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    started_at REAL, done_at REAL, run_at REAL NOT NULL)
"""
_MYSQL_DDL = """
CREATE TABLE {t} (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, type VARCHAR(200) NOT NULL,
    user_name VARCHAR(200) NOT NULL, group_name VARCHAR(200) NOT NULL,
    state VARCHAR(16) NOT NULL, requested VARCHAR(16), context LONGTEXT NOT NULL,
    priority INTEGER NOT NULL, attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
    has_cleanup BOOL NOT NULL, handoff BOOL NOT NULL, error LONGTEXT, node_id BIGINT,
    created_at DATETIME(6) NOT NULL, updated_at DATETIME(6) NOT NULL, started_at DATETIME(6),
    done_at DATETIME(6), run_at DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
"""
_MYSQL_READY_INDEX = "CREATE INDEX {p}ready_idx ON {t} (state, handoff DESC, priority DESC, id)"
_MYSQL_OTHER_INDEXES = (
    "CREATE INDEX {p}active_idx ON {t} (state, group_name, user_name)",
    "CREATE INDEX {p}queue_idx ON {t}"
    " (state, group_name, user_name, handoff DESC, priority DESC, id)",
    "CREATE INDEX {p}deleting_idx ON {t} (run_at)",
    "CREATE INDEX {p}group_idx ON {t} (group_name, id)",
    "CREATE INDEX {p}owner_idx ON {t} (node_id)",
    "CREATE INDEX {p}ready_at_idx ON {t} (run_at)",
    "CREATE INDEX {p}state_idx ON {t} (state, id)",
    "CREATE INDEX {p}user_idx ON {t} (user_name, id)",
    "CREATE INDEX {p}done_idx ON {t} (state, done_at)",
)
MYSQL_NOW = "UTC_TIMESTAMP(6)"
_MYSQL_LOCK = (
    "SELECT id, type, context FROM {t} WHERE state = 'pending' AND run_at <= {now}"
    " ORDER BY handoff DESC, priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_MYSQL_CLAIM = (
    "UPDATE {t} SET state = 'running', node_id = %s, attempts = attempts + 1,"
    " started_at = COALESCE(started_at, {now}), updated_at = {now} WHERE id IN ({ids})"
)
_MYSQL_FINISH = (
    "UPDATE {t} SET state = 'finished', node_id = NULL, done_at = {now}, updated_at = {now}"
    " WHERE id IN ({ids}) AND node_id = %s AND state = 'running'"
)
_MYSQL_INSERT = (
    "INSERT INTO {t} (type, user_name, group_name, state, context, priority, attempts,"
    " max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
    " VALUES ('noop', '', 'bench', 'pending', '', 0, 0, 1, false, false, {now}, {now}, {now})"
)
_READY_INDEX = (
    "CREATE INDEX {p}ready_idx ON {t} (handoff DESC, priority DESC, id) WHERE state = 'pending'"
)
_OTHER_INDEXES = (
    "CREATE INDEX {p}active_idx ON {t} (group_name, user_name)"
    " WHERE state IN ('running', 'canceling')",
    "CREATE INDEX {p}deleting_idx ON {t} (run_at) WHERE state = 'deleting' AND node_id IS NULL",
    "CREATE INDEX {p}group_idx ON {t} (group_name, id)",
    "CREATE INDEX {p}owner_idx ON {t} (node_id) WHERE node_id IS NOT NULL",
    "CREATE INDEX {p}ready_at_idx ON {t} (run_at) WHERE state = 'pending'",
    "CREATE INDEX {p}state_idx ON {t} (state, id)",
    "CREATE INDEX {p}user_idx ON {t} (user_name, id)",
)

_PG_CLAIM = (
    "UPDATE {t} t SET state = 'running', node_id = $1, attempts = t.attempts + 1,"
    " started_at = COALESCE(t.started_at, now()), updated_at = now()"
    " FROM (SELECT id FROM {t} WHERE state = 'pending' AND run_at <= now()"
    " ORDER BY handoff DESC, priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED) c"
    " WHERE t.id = c.id RETURNING t.id, t.type, t.context"
)
_PG_FINISH = (
    "UPDATE {t} SET state = 'finished', node_id = NULL, done_at = now(), updated_at = now()"
    " WHERE id = ANY($1::bigint[]) AND node_id = $2 AND state = 'running'"
)
_SQLITE_CLAIM = (
    "UPDATE {t} SET state = 'running', node_id = ?, attempts = attempts + 1,"
    " started_at = COALESCE(started_at, {now}), updated_at = {now}"
    " WHERE id IN (SELECT id FROM {t} WHERE state = 'pending' AND run_at <= {now}"
    " ORDER BY handoff DESC, priority DESC, id LIMIT ?) RETURNING id, type, context"
)
_SQLITE_FINISH = (
    "UPDATE {t} SET state = 'finished', node_id = NULL, done_at = {now}, updated_at = {now}"
    " WHERE id IN (SELECT value FROM json_each(?)) AND node_id = ? AND state = 'running'"
)


def _indexes(table: str, prefix: str, lean: bool, backend: str) -> list[str]:
    if backend == "mysql":
        chosen = [_MYSQL_READY_INDEX] + ([] if lean else list(_MYSQL_OTHER_INDEXES))
    else:
        chosen = [_READY_INDEX] + ([] if lean else list(_OTHER_INDEXES))
    return [s.format(t=table, p=prefix) for s in chosen]


# -- setup ---------------------------------------------------------------------------------


async def _setup(db: c.BenchDb, n: int, lean: bool) -> str:
    """Create the raw table with ``n`` pending rows; returns its qualified name."""
    if db.backend == "postgres":
        table = f'"{db.schema}".{TABLE}'
        conn = await asyncpg.connect(db.pg_dsn)
        try:
            await conn.execute(_PG_DDL.format(t=table))
            for statement in _indexes(table, f"{TABLE}_", lean, db.backend):
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {table} (type, user_name, group_name, state, context, priority,"
                " attempts, max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
                " SELECT 'noop', '', 'bench', 'pending', '', 0, 0, 1, false, false,"
                " now(), now(), now() FROM generate_series(1, $1)",
                n,
            )
            await conn.execute(f"VACUUM ANALYZE {table}")
        finally:
            await conn.close()
        return table
    if db.backend == "mysql":
        assert db.mysql_kwargs is not None
        conn = await c.mysql_connect(db.mysql_kwargs, db.database)
        try:
            async with conn.cursor() as cur:
                await cur.execute(_MYSQL_DDL.format(t=TABLE))
                with warnings.catch_warnings():
                    # The deleting and ready indexes are both (run_at) here, as the library's
                    # are on MySQL; MariaDB warns of the duplicate.
                    warnings.filterwarnings("ignore", "Duplicate index")
                    for statement in _indexes(TABLE, f"{TABLE}_", lean, db.backend):
                        await cur.execute(statement)
                insert = _MYSQL_INSERT.format(t=TABLE, now=MYSQL_NOW)
                for start in range(0, n, 1000):  # one multi-row INSERT per 1,000
                    rows = min(1000, n - start)
                    values = insert.partition(" VALUES ")[2]
                    await cur.execute(insert + (", " + values) * (rows - 1))
                await cur.execute(f"ANALYZE TABLE {TABLE}")
                await cur.fetchall()
        finally:
            conn.close()
        return TABLE
    assert db.path is not None
    path = db.path

    def setup_sqlite() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SQLITE_DDL.format(t=TABLE))
            for statement in _indexes(TABLE, f"{TABLE}_", lean, db.backend):
                conn.execute(statement)
            conn.execute("BEGIN")
            conn.execute(
                f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
                f" INSERT INTO {TABLE} (type, user_name, group_name, state, context, priority,"
                " attempts, max_attempts, has_cleanup, handoff, created_at, updated_at, run_at)"
                f" SELECT 'noop', '', 'bench', 'pending', '', 0, 0, 1, 0, 0, {SQLITE_NOW},"
                f" {SQLITE_NOW}, {SQLITE_NOW} FROM s",
                (n,),
            )
            conn.execute("COMMIT")
            conn.execute("ANALYZE")
        finally:
            conn.close()

    await asyncio.to_thread(setup_sqlite)
    return TABLE


# -- the worker (runs in its own process) --------------------------------------------------


async def _pg_worker(dsn: str, table: str, node_id: int, slots: int, shape: str) -> int:
    conn = await asyncpg.connect(dsn)
    claim = _PG_CLAIM.format(t=table)
    finish = _PG_FINISH.format(t=table)
    lock = (
        f"SELECT id, state, attempts, max_attempts FROM {table}"
        " WHERE id = ANY($1::bigint[]) AND node_id = $2 ORDER BY id FOR UPDATE"
    )
    finish_one = (
        f"UPDATE {table} SET state = 'finished', node_id = NULL, done_at = now(),"
        " updated_at = now() WHERE id = $1"
    )
    await conn.execute("SELECT 1")
    print("READY", flush=True)
    sys.stdin.readline()  # "go"
    _GO_CPU[0] = _cpu()
    done = 0
    try:
        while True:
            if shape == "minimal":
                rows = await conn.fetch(claim, node_id, slots)
                if not rows:
                    return done
                ids = [r[0] for r in rows]  # "run" each: a no-op
                await conn.execute(finish, ids, node_id)
            else:  # the round trips the library makes (see the module docstring)
                async with conn.transaction():
                    await conn.fetch("SELECT 1 WHERE false")  # the limited-groups lock
                    rows = await conn.fetch(claim, node_id, slots)
                if not rows:
                    return done
                ids = [r[0] for r in rows]
                async with conn.transaction():
                    locked = await conn.fetch(lock, ids, node_id)
                    await conn.executemany(finish_one, [(r[0],) for r in locked])
            done += len(ids)
    finally:
        _report_done(done)
        await conn.close()


async def _mysql_worker(url: str, table: str, node_id: int, slots: int) -> int:
    conn = await c.mysql_connect(
        {**c.mysql_connect_kwargs(url), "autocommit": False}, urlsplit(url).path.lstrip("/")
    )
    lock = _MYSQL_LOCK.format(t=table, now=MYSQL_NOW)
    async with conn.cursor() as cur:
        # READ COMMITTED, as the library's writes: locking reads take no gap locks.
        await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    print("READY", flush=True)
    sys.stdin.readline()
    _GO_CPU[0] = _cpu()
    done = 0
    try:
        async with conn.cursor() as cur:
            while True:
                await cur.execute(lock, (slots,))
                rows = await cur.fetchall()
                if rows:
                    listed = ",".join(str(int(r[0])) for r in rows)
                    claim = _MYSQL_CLAIM.format(t=table, now=MYSQL_NOW, ids=listed)
                    await cur.execute(claim, (node_id,))
                await conn.commit()
                if not rows:
                    return done
                finish = _MYSQL_FINISH.format(t=table, now=MYSQL_NOW, ids=listed)  # no-ops
                await cur.execute(finish, (node_id,))
                await conn.commit()
                done += len(rows)
    finally:
        _report_done(done)
        conn.close()


def _sqlite_worker(path: str, table: str, node_id: int, slots: int) -> int:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA journal_mode = WAL")
    claim = _SQLITE_CLAIM.format(t=table, now=SQLITE_NOW)
    finish = _SQLITE_FINISH.format(t=table, now=SQLITE_NOW)
    print("READY", flush=True)
    sys.stdin.readline()
    _GO_CPU[0] = _cpu()
    done = 0
    try:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(claim, (node_id, slots)).fetchall()
            conn.execute("COMMIT")
            if not rows:
                return done
            ids = [r[0] for r in rows]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(finish, ("[" + ",".join(map(str, ids)) + "]", node_id))
            conn.execute("COMMIT")
            done += len(ids)
    finally:
        _report_done(done)
        conn.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report_done(done: int) -> None:
    """Say how many rows this worker finished and the CPU it used since "go", then keep the
    connection open until the driver closes our stdin: the driver reads the server's CPU
    time while our backend process still lives."""
    print(f"DONE {done} {_cpu() - _GO_CPU[0]:.4f}", flush=True)
    sys.stdin.read()


_GO_CPU = [0.0]


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--backend", required=True)
    parser.add_argument(
        "--target", required=True, help="asyncpg DSN, MySQL URL with its database, SQLite path"
    )
    parser.add_argument("--table", required=True)
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--shape", default="minimal")
    a = parser.parse_args(argv)
    if a.backend == "postgres":
        asyncio.run(_pg_worker(a.target, a.table, a.node, a.slots, a.shape))
    elif a.backend == "mysql":
        asyncio.run(_mysql_worker(a.target, a.table, a.node, a.slots))
    else:
        _sqlite_worker(a.target, a.table, a.node, a.slots)


# -- the driver ----------------------------------------------------------------------------


async def run_baseline(
    backend: str,
    dsn: str,
    *,
    n: int,
    processes: int,
    concurrency: int,
    lean: bool = False,
    shape: str = "minimal",
    deadline: float | None = None,
) -> dict[str, Any]:
    """Drain ``n`` raw rows with ``processes`` x ``concurrency``; returns the measurements."""
    deadline = deadline or time.monotonic() + 600
    async with c.bench_db(backend, dsn, prefix="bench_raw") as db:
        table = await _setup(db, n, lean)
        target = {"postgres": db.pg_dsn, "mysql": db.url}.get(backend, db.path)
        assert target is not None
        procs: list[asyncio.subprocess.Process] = []
        try:
            for i in range(processes):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    SELF,
                    "--worker",
                    "--backend",
                    backend,
                    "--target",
                    target,
                    "--table",
                    table,
                    "--node",
                    str(i + 1),
                    "--slots",
                    str(concurrency),
                    "--shape",
                    shape,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
                procs.append(proc)
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if not line.startswith(b"READY"):
                    raise RuntimeError(f"raw worker did not start: {line!r}")
            server_cpu0 = c.server_cpu_seconds(backend)
            wall0 = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            per_proc = []
            client_cpu = 0.0
            for proc in procs:
                assert proc.stdout is not None
                remaining = max(1.0, deadline - time.monotonic())
                line = await asyncio.wait_for(proc.stdout.readline(), remaining)
                if not line.startswith(b"DONE"):
                    raise RuntimeError(f"raw worker failed: {line!r}")
                per_proc.append(int(line.split()[1]))
                client_cpu += float(line.split()[2])
            wall = time.monotonic() - wall0
            # The workers' connections still live (PostgreSQL: their backends).
            server_cpu = c.server_cpu_seconds(backend) - server_cpu0
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), 30)

        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        async with c.Probe(db) as probe:
            count, seconds = await probe.span(table)
    if count != n:
        raise RuntimeError(f"raw baseline finished {count} of {n} rows")
    return {
        "n": n,
        "processes": processes,
        "concurrency": concurrency,
        "lean_indexes": lean,
        "shape": shape,
        "seconds": round(seconds, 4),
        "wall_seconds": round(wall, 4),
        "tasks_per_s": round(n / seconds, 1) if seconds else None,
        "per_process": per_proc,
        "client_cpu_seconds": round(client_cpu, 3),
        "server_cpu_seconds": round(server_cpu, 3) if backend != "sqlite" else None,
    }


def _share(part: float | None, whole: float) -> str:
    """CPU over wall time (100% = one core)."""
    return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"


def parse_config(text: str) -> tuple[int, int]:
    p, _, cc = text.lower().partition("x")
    return int(p), int(cc)


async def _main(args: argparse.Namespace) -> None:
    results = []
    load = c.load_average()
    for p, cc in args.config or [(1, 100), (2, 10)]:
        r = await run_baseline(
            args.backend,
            args.dsn,
            n=args.n,
            processes=p,
            concurrency=cc,
            lean=args.lean,
            shape=args.shape,
        )
        results.append(r)
    c.print_table(
        f"raw baseline ({args.backend}, n={args.n}, shape={args.shape}, loadavg at start {load})",
        ["P", "C", "tasks/s", "seconds", "wall s", "workers CPU", "server CPU"],
        [
            [
                r["processes"],
                r["concurrency"],
                r["tasks_per_s"],
                r["seconds"],
                r["wall_seconds"],
                _share(r["client_cpu_seconds"], r["wall_seconds"]),
                _share(r["server_cpu_seconds"], r["wall_seconds"]),
            ]
            for r in results
        ],
    )
    c.emit_json("raw_baseline", args.backend, results, loadavg_start=load)


def main() -> None:
    if "--worker" in sys.argv[1:]:
        _worker_main(sys.argv[1:])
        return
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="rows to drain (default 20000)")
    parser.add_argument(
        "--config",
        type=parse_config,
        action="append",
        help="PxC, repeatable (default: 1x100 and 2x10)",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="only the ready index (default: all the library's indexes)",
    )
    parser.add_argument(
        "--shape",
        choices=("minimal", "library"),
        default="minimal",
        help="minimal: 2 statements per cycle (the limit, default); library: the round trips "
        "the library makes today (PostgreSQL only)",
    )
    args = parser.parse_args()
    if args.backend != "postgres" and args.shape != "minimal":
        parser.error("--shape library is PostgreSQL's only")
    c.run_main(lambda: _main(args), args.timeout)


if __name__ == "__main__":
    main()
