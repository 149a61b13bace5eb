"""Shared plumbing of the benchmarks: a throwaway database, node processes, tables, JSON.

Every benchmark gets its own PostgreSQL schema ``bench_<random>`` (dropped at the end), its
own MySQL/MariaDB database ``bench_<random>`` (dropped at the end) or its own SQLite file in a
temporary folder (removed at the end). Node processes run
``benchmarks/_node_proc.py`` with ``sys.executable`` and are always stopped (then killed if
they do not exit) before the benchmark returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
NODE_PROC = HERE / "_node_proc.py"
DEFAULT_DSN = "postgresql+asyncpg://postgres@127.0.0.1/test"
DEFAULT_MYSQL_DSN = "mysql://root@127.0.0.1:3306/test"
"""The MySQL/MariaDB server; its database is only where the benchmark connects to create (and
drop) its own ``bench_<random>`` one."""
GROUP = "bench"


# -- command line --------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=("postgres", "sqlite", "mysql"), default="postgres")
    parser.add_argument(
        "--dsn",
        help=f"server URL: PostgreSQL (SQLAlchemy form, default {DEFAULT_DSN}) or MySQL/MariaDB "
        f"(default {DEFAULT_MYSQL_DSN}); unused on SQLite",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="bound on the whole benchmark in seconds (default 600); on expiry it cleans up "
        "and exits with status 2",
    )
    return parser


def run_main(coro_factory: Any, timeout: float) -> None:
    """Run the benchmark's coroutine under a global deadline."""

    async def bounded() -> None:
        try:
            await asyncio.wait_for(coro_factory(), timeout)
        except TimeoutError:
            print(f"benchmark exceeded --timeout={timeout}s; cleaned up", file=sys.stderr)
            raise SystemExit(2) from None

    asyncio.run(bounded())


# -- output --------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "mem_mb": mem,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    print()
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    print()


def library_version() -> dict[str, Any]:
    """Which code was measured: the git commit (read-only ``git rev-parse``) and a digest of
    the package's source files as imported (the working tree may differ from the commit)."""
    import aioasync_tasks  # noqa: PLC0415 - after sys.path is set up by the caller

    package = Path(aioasync_tasks.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".sql"):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=package.parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    return {"path": str(package), "commit": commit, "source_sha256": digest.hexdigest()[:12]}


def emit_json(benchmark: str, backend: str, results: Any, **extra: Any) -> None:
    """The one JSON line a benchmark prints last."""
    record = {
        "benchmark": benchmark,
        "backend": backend,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": load_average(),
        "machine": machine(),
        "library": library_version(),
        **extra,
        "results": results,
    }
    print(json.dumps(record, sort_keys=False), flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- the throwaway database ----------------------------------------------------------------


def default_dsn(backend: str) -> str:
    return DEFAULT_MYSQL_DSN if backend == "mysql" else DEFAULT_DSN


def mysql_connect_kwargs(dsn: str) -> dict[str, Any]:
    """``aiomysql.connect`` arguments of a ``mysql[+aiomysql]://`` URL, without its database."""
    parts = urlsplit(dsn)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "charset": "utf8mb4",
        "autocommit": True,  # every probe sees the latest commits (no REPEATABLE READ snapshot)
    }


async def mysql_connect(kwargs: dict[str, Any], database: str | None = None) -> Any:
    import aiomysql  # type: ignore[import-untyped]  # noqa: PLC0415 - MySQL runs only

    return await aiomysql.connect(**kwargs, **({"db": database} if database else {}))


def asyncpg_dsn(dsn: str) -> str:
    """The SQLAlchemy URL as asyncpg wants it."""
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql://" + dsn[len(prefix) :]
    return dsn


@dataclass
class BenchDb:
    """Where one benchmark run keeps its tables."""

    backend: str
    url: str
    """SQLAlchemy URL for ``Node``."""
    schema: str | None = None
    """PostgreSQL schema (None on SQLite)."""
    path: str | None = None
    """SQLite file (None on PostgreSQL)."""
    pg_dsn: str | None = None
    """asyncpg DSN (None on SQLite and MySQL)."""
    database: str | None = None
    """MySQL/MariaDB database (None on PostgreSQL and SQLite)."""
    mysql_kwargs: dict[str, Any] | None = None
    """``aiomysql.connect`` arguments of the server (None on PostgreSQL and SQLite)."""
    _tmpdir: str | None = field(default=None, repr=False)

    @property
    def tasks_table(self) -> str:
        return f'"{self.schema}".aioasync_tasks' if self.schema else "aioasync_tasks"

    def node_args(self) -> list[str]:
        args = ["--url", self.url]
        if self.schema:
            args += ["--schema", self.schema]
        return args

    def node_kwargs(self) -> dict[str, Any]:
        return {"schema": self.schema} if self.schema else {}


@contextlib.asynccontextmanager
async def bench_db(backend: str, dsn: str | None, prefix: str = "bench") -> AsyncIterator[BenchDb]:
    """A fresh schema (PostgreSQL), database (MySQL/MariaDB) or SQLite file, removed on exit
    whatever happens. ``dsn`` None: the backend's default server."""
    dsn = dsn or default_dsn(backend)
    if backend == "mysql":
        database = f"{prefix}_{secrets.token_hex(4)}"
        kwargs = mysql_connect_kwargs(dsn)
        conn = await mysql_connect(kwargs)
        try:
            async with conn.cursor() as cur:
                await cur.execute(
                    f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
        finally:
            conn.close()
        host = f"{kwargs['host']}:{kwargs['port']}"
        auth = urlsplit(dsn).netloc.rpartition("@")[0]
        url = f"mysql+aiomysql://{auth + '@' if auth else ''}{host}/{database}"
        try:
            yield BenchDb(backend, url, database=database, mysql_kwargs=kwargs)
        finally:
            conn = await mysql_connect(kwargs)
            try:
                async with conn.cursor() as cur:
                    await cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
            finally:
                conn.close()
    elif backend == "postgres":
        schema = f"{prefix}_{secrets.token_hex(4)}"
        pg = asyncpg_dsn(dsn)
        conn = await asyncpg.connect(pg)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()
        try:
            yield BenchDb(backend, dsn, schema=schema, pg_dsn=pg)
        finally:
            conn = await asyncpg.connect(pg)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    else:
        tmp = tempfile.mkdtemp(prefix=f"{prefix}_")
        path = os.path.join(tmp, "bench.db")
        try:
            yield BenchDb(backend, f"sqlite+aiosqlite:///{path}", path=path, _tmpdir=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class Probe:
    """A raw connection to look at the tables behind the library's back (no framework)."""

    def __init__(self, db: BenchDb) -> None:
        self.db = db
        self._pg: Any = None
        self._lite: sqlite3.Connection | None = None
        self._my: Any = None

    async def __aenter__(self) -> Probe:
        if self.db.backend == "mysql":
            assert self.db.mysql_kwargs is not None
            self._my = await mysql_connect(self.db.mysql_kwargs, self.db.database)
        elif self.db.backend == "postgres":
            self._pg = await asyncpg.connect(self.db.pg_dsn)
        else:
            assert self.db.path is not None
            self._lite = sqlite3.connect(
                self.db.path, isolation_level=None, timeout=60, check_same_thread=False
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pg is not None:
            await self._pg.close()
        if self._lite is not None:
            self._lite.close()
        if self._my is not None:
            self._my.close()

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run ``sql`` ($1-style parameters on PostgreSQL, ? on SQLite, %s on MySQL)."""
        if self._pg is not None:
            return [tuple(r) for r in await self._pg.fetch(sql, *args)]
        if self._my is not None:
            async with self._my.cursor() as cur:
                await cur.execute(sql, args or None)
                return [tuple(r) for r in await cur.fetchall()]
        assert self._lite is not None
        lite = self._lite
        return await asyncio.to_thread(lambda: lite.execute(sql, args).fetchall())

    async def execute(self, sql: str) -> None:
        if self._pg is not None:
            await self._pg.execute(sql)
        elif self._my is not None:
            await self.fetch(sql)
        else:
            assert self._lite is not None
            lite = self._lite
            await asyncio.to_thread(lite.execute, sql)

    async def analyze(self, table: str) -> None:
        """Fresh statistics after a bulk load (both the library and the baseline get it)."""
        if self._pg is not None:
            await self._pg.execute(f"VACUUM ANALYZE {table}")
        elif self._my is not None:
            await self.fetch(f"ANALYZE TABLE {table}")
        else:
            await self.execute("ANALYZE")

    async def count_states(self, table: str, states: Sequence[str]) -> int:
        marks = ", ".join(f"'{s}'" for s in states)
        rows = await self.fetch(f"SELECT count(*) FROM {table} WHERE state IN ({marks})")
        return int(rows[0][0])

    async def span(self, table: str, state: str = "finished") -> tuple[int, float]:
        """(rows in ``state``, seconds from the first claim to the last completion), measured
        with the database's own timestamps ``started_at``/``done_at``."""
        if self._pg is not None:
            rows = await self.fetch(
                f"SELECT count(*), extract(epoch FROM max(done_at) - min(started_at))"
                f" FROM {table} WHERE state = $1",
                state,
            )
        elif self._my is not None:
            rows = await self.fetch(
                f"SELECT count(*), TIMESTAMPDIFF(MICROSECOND, min(started_at), max(done_at))"
                f" / 1e6 FROM {table} WHERE state = %s",
                state,
            )
        else:
            rows = await self.fetch(
                f"SELECT count(*), max(done_at) - min(started_at) FROM {table} WHERE state = ?",
                state,
            )
        count, seconds = rows[0]
        return int(count), float(seconds or 0.0)

    async def wait_drained(
        self,
        table: str,
        total: int,
        deadline: float,
        *,
        states: Sequence[str] = ("finished",),
        procs: Sequence[NodeProc] = (),
    ) -> float:
        """Poll until ``total`` rows are in ``states``; returns the monotonic time seen.
        Fails at once when one of ``procs`` died."""
        interval = 0.05
        while True:
            for p in procs:
                p.check_alive()
            started = time.monotonic()
            done = await self.count_states(table, states)
            now = time.monotonic()
            if done >= total:
                return now
            if now > deadline:
                raise TimeoutError(f"only {done} of {total} tasks done before the deadline")
            # Keep the probe's own load on the database small on big tables.
            interval = min(1.0, max(0.05, 5 * (now - started)))
            await asyncio.sleep(interval)


SERVER_PROCESSES = {
    "postgres": ("postgres", "postmaster"),
    "mysql": ("mariadbd", "mysqld"),
    "sqlite": (),
}
"""The database server's process names, by backend (SQLite runs inside the nodes)."""


def postgres_cpu_seconds() -> float:
    """CPU time used so far by every ``postgres`` process of this machine (all databases:
    meaningful only when nothing else uses the server; 0.0 where /proc is not readable)."""
    return server_cpu_seconds("postgres")


def server_cpu_seconds(backend: str) -> float:
    """CPU time used so far by the database server's processes of this machine (``postgres``;
    ``mariadbd``/``mysqld``, all threads): every database of the server, so meaningful only
    when nothing else uses it; 0.0 on SQLite and where /proc is not readable."""
    names = SERVER_PROCESSES.get(backend, ())
    if not names:
        return 0.0
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        if name in names:
            fields = stat[stat.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# -- node processes ------------------------------------------------------------------------


class NodeProc:
    """One ``_node_proc.py`` process: READY once started; ``stop()`` closes its stdin, which
    makes it stop its node gracefully and print a RESULT line (peak RSS, counters)."""

    def __init__(self, args: Sequence[str], *, wrap: Sequence[str] = ()) -> None:
        self.args = [*wrap, sys.executable, str(NODE_PROC), *args]
        self.proc: asyncio.subprocess.Process | None = None
        self.result: dict[str, Any] = {}

    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the node logs warnings to our stderr
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the benchmark
        )
        line = await asyncio.wait_for(self._readline(), timeout)
        while not line or line.startswith("py-spy>"):  # a wrapping profiler talks first
            line = await asyncio.wait_for(self._readline(), timeout)
        if not line.startswith("READY"):
            raise RuntimeError(f"node process did not start: {line!r}")

    async def _readline(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            code = await self.proc.wait()
            raise RuntimeError(f"node process exited with status {code}")
        return raw.decode().strip()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"node process {self.proc.pid} died (status {self.proc.returncode})")

    async def command(self, text: str, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Send a one-line command (``rss``) and read its JSON answer."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self._readline(), timeout)
        answer: dict[str, Any] = json.loads(line.split(" ", 1)[1])
        return answer

    async def stop(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return self.result
        try:
            assert proc.stdin is not None
            assert proc.stdout is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.close()
            out = await asyncio.wait_for(proc.stdout.read(), timeout)
            for line in out.decode().splitlines():
                if line.startswith("RESULT "):
                    self.result = json.loads(line[7:])
            await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            self.kill()
            raise
        return self.result

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)


@contextlib.asynccontextmanager
async def node_procs(
    all_args: Sequence[Sequence[str]], *, wrap: Sequence[str] = ()
) -> AsyncIterator[list[NodeProc]]:
    """Start node processes (all READY on entry); stop them, killing stragglers, on exit."""
    procs = [NodeProc(a, wrap=wrap) for a in all_args]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        try:
            await asyncio.shield(asyncio.gather(*(p.stop() for p in procs), return_exceptions=True))
        finally:
            for p in procs:
                p.kill()


def kill_quietly(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
