"""Test database targets: PostgreSQL discovery, and MySQL/MariaDB discovery (at the end).

Importable from tests as ``from _db import DbTarget`` (``tests`` is on ``pythonpath``).

PostgreSQL is found, in order, from:

1. ``AIOASYNC_TASKS_TEST_DSN`` (``postgresql://`` or ``postgresql+asyncpg://``); if it is set
   but unreachable that is an error, not a skip;
2. a server on 127.0.0.1:5432 (user ``postgres``, database ``test``, trust auth);
3. a throwaway cluster started with ``initdb``/``pg_ctl`` in a temp dir on a free port;
4. otherwise PostgreSQL tests are skipped with one reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]  # no type information

from aioasync_tasks._backends._migrations import migration_files

DSN_ENV = "AIOASYNC_TASKS_TEST_DSN"
LOCAL_HOST = "127.0.0.1"
LOCAL_PORT = 5432
LOCAL_USER = "postgres"
LOCAL_DATABASES = ("test", "postgres")
CONNECT_TIMEOUT = 2.0

_T = TypeVar("_T")

POOLED = "pgbouncer"
"""The backend of a PostgreSQL target behind PgBouncer in transaction pooling mode."""


@dataclass(frozen=True)
class DbTarget:
    """Where a test's database lives.

    ``url`` is an SQLAlchemy async URL (``sqlite+aiosqlite://…``, ``postgresql+asyncpg://…`` or
    ``mysql+aiomysql://…/t_<hex>``). ``schema`` is the per-test PostgreSQL schema (``None`` for
    SQLite and MySQL, whose tests get a fresh file or database).
    """

    backend: str
    url: str
    schema: str | None

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgres"

    @property
    def pooled(self) -> bool:
        """Behind a PgBouncer in transaction pooling mode (``tests/_pgbouncer.py``)."""
        return self.backend == POOLED

    @property
    def dialect(self) -> str:
        """The folder of its driver under ``aioasync_tasks/_backends/``."""
        return {
            "postgres": "postgresql",
            POOLED: "postgresql",
            "sqlite": "sqlite",
            "mysql": "mysql",
        }[self.backend]

    @property
    def shipped_versions(self) -> list[int]:
        """The versions of its shipped migrations (a database may lack some that others have:
        ``aioasync_tasks._schema.SCHEMA_VERSION``)."""
        return [version for version, _ in migration_files(self.dialect)]

    def connect_args(self) -> dict[str, Any]:
        """``connect_args`` for ``create_async_engine`` that put ``schema`` on the search path."""
        if self.schema is None:
            return {}
        return {"server_settings": {"search_path": self.schema}}


class PgUnavailableError(Exception):
    """No PostgreSQL could be found or started; the message is the skip reason."""


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run *coro* in a private event loop that never becomes the thread's current loop.

    Unlike ``asyncio.run`` this leaves whatever loop pytest-asyncio installed untouched.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def to_asyncpg_dsn(url: str) -> str:
    """SQLAlchemy URL -> libpq-style DSN that ``asyncpg.connect`` accepts."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def to_sqlalchemy_url(dsn: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+asyncpg://" + dsn[len(prefix) :]
    raise ValueError(f"{DSN_ENV} must be a postgresql:// or postgresql+asyncpg:// URL, got {dsn!r}")


async def _probe(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def _try_local_server(host: str, port: int) -> tuple[str | None, str]:
    """Return (url, "") if a usable server is on host:port, else (None, why not)."""
    if not _port_open(host, port):
        return None, f"nothing on {host}:{port}"
    errors = []
    for database in LOCAL_DATABASES:
        url = f"postgresql+asyncpg://{LOCAL_USER}@{host}:{port}/{database}"
        try:
            run_sync(_probe(to_asyncpg_dsn(url)))
        except Exception as exc:  # any failure means: not usable
            errors.append(f"{database}: {_describe(exc)}")
        else:
            return url, ""
    return None, f"{host}:{port} refused user {LOCAL_USER!r} ({'; '.join(errors)})"


def find_pg_bindir() -> Path | None:
    """A directory holding both ``initdb`` and ``pg_ctl``, or None."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
        candidates.append(Path(initdb).parent)

    def version_key(path: str) -> tuple[int, ...]:
        version = Path(path).parent.name
        return tuple(int(p) for p in version.split(".") if p.isdigit())

    candidates.extend(
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def free_port() -> int:
    """A local TCP port nobody listens on (bound, then closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayCluster:
    """A private PostgreSQL cluster in a temp dir, listening on 127.0.0.1:<free port>."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.tmpdir = Path(tempfile.mkdtemp(prefix="aioasync-tasks-pg-"))
        self.datadir = self.tmpdir / "data"
        self.logfile = self.tmpdir / "postgres.log"
        self.port = 0
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the cluster as the 'postgres' OS user.
            runuser = shutil.which("runuser")
            try:
                pg_user = pwd.getpwnam("postgres")
            except KeyError:
                pg_user = None
            if runuser is None or pg_user is None:
                self.remove()
                raise PgUnavailableError(
                    "running as root, and no 'postgres' OS user or runuser to run initdb as"
                )
            os.chown(self.tmpdir, pg_user.pw_uid, pg_user.pw_gid)
            self._prefix = [runuser, "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{LOCAL_HOST}:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            [*self._prefix, *args],
            cwd=self.tmpdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).strip().splitlines()
            last = output[-1] if output else ""
            raise PgUnavailableError(
                f"{Path(args[0]).name} exited with {proc.returncode}: {last}".rstrip(": ")
            )

    def start(self) -> None:
        try:
            self._run(
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", "postgres",
                "-A", "trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            )  # fmt: skip
            self._start_server()
            run_sync(_probe(to_asyncpg_dsn(self.url)))
        except BaseException:
            self.stop()
            raise

    def _start_server(self, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):  # the free port can be taken before we bind it
            self.port = free_port()
            with (self.datadir / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"listen_addresses = '{LOCAL_HOST}'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.tmpdir}'\n"
                    "max_connections = 200\n"
                    "fsync = off\n"
                    "synchronous_commit = off\n"
                    "full_page_writes = off\n"
                )
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D", str(self.datadir),
                    "-l", str(self.logfile),
                    "-w", "-t", "60",
                    "start",
                )  # fmt: skip
            except PgUnavailableError:
                if attempt == attempts:
                    raise
            else:
                return

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            with contextlib.suppress(PgUnavailableError, subprocess.TimeoutExpired):
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"
                )
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@dataclass
class PgServer:
    """A reachable PostgreSQL server; ``cluster`` is set when this session started it."""

    url: str
    source: str
    cluster: ThrowawayCluster | None = None

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def discover_postgres(host: str = LOCAL_HOST, port: int = LOCAL_PORT) -> PgServer:
    """Find or start PostgreSQL in the order the module docstring gives; raise
    PgUnavailableError to skip.

    An explicit ``AIOASYNC_TASKS_TEST_DSN`` that cannot be reached raises RuntimeError instead:
    asking for PostgreSQL and silently skipping it would hide a broken setup.
    """
    dsn = os.environ.get(DSN_ENV, "").strip()
    if dsn:
        url = to_sqlalchemy_url(dsn)
        try:
            run_sync(_probe(to_asyncpg_dsn(url)))
        except Exception as exc:  # any failure means: not usable
            raise RuntimeError(f"{DSN_ENV} is set but unusable: {_describe(exc)}") from exc
        return PgServer(url=url, source=DSN_ENV)

    url_or_none, local_why = _try_local_server(host, port)
    if url_or_none is not None:
        return PgServer(url=url_or_none, source=f"{host}:{port}")

    bindir = find_pg_bindir()
    if bindir is None:
        cluster_why = "no initdb/pg_ctl found"
    else:
        try:
            cluster = ThrowawayCluster(bindir)
            cluster.start()
        except PgUnavailableError as exc:
            cluster_why = f"throwaway cluster with {bindir}/initdb failed: {exc}"
        except Exception as exc:  # any failure means: not usable
            cluster_why = f"throwaway cluster with {bindir}/initdb failed: {_describe(exc)}"
        else:
            return PgServer(
                url=cluster.url, source=f"throwaway cluster {cluster.tmpdir}", cluster=cluster
            )

    raise PgUnavailableError(f"PostgreSQL not available: no {DSN_ENV}, {local_why}, {cluster_why}")


def new_schema_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def _create_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


async def _drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=10)
    try:
        # A leaked connection holding locks in the schema makes this fail loudly, not hang.
        await conn.execute("SET lock_timeout = '20s'")
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def create_schema(url: str, schema: str) -> None:
    run_sync(_create_schema(url, schema))


def drop_schema(url: str, schema: str) -> None:
    run_sync(_drop_schema(url, schema))


# -- MySQL and MariaDB ------------------------------------------------------------------------

MYSQL_URL_ENV = "AIOASYNC_TASKS_TEST_MYSQL_URL"
"""A MySQL or MariaDB server for the ``mysql`` target (``mysql://user:pass@host:port``; a
database in it is ignored: each test gets a fresh one). Set but unreachable: an error."""
MYSQL_LOCAL = "mysql://root@127.0.0.1:3306"


class MysqlUnavailableError(Exception):
    """No MySQL or MariaDB server could be reached; the message is the skip reason."""


@dataclass(frozen=True)
class MysqlServer:
    """A reachable MySQL or MariaDB server; tests get a fresh database ``t_<12 hex>`` on it."""

    url: str
    source: str

    def target(self, database: str) -> DbTarget:
        return DbTarget(
            backend="mysql",
            url=self.url.replace("mysql://", "mysql+aiomysql://", 1)
            + f"/{database}?charset=utf8mb4",
            schema=None,
        )


def _mysql_connect(url: str) -> Any:
    import pymysql  # type: ignore[import-untyped]  # noqa: PLC0415 - the mysql target only

    parsed = urlsplit(url)
    return pymysql.connect(
        host=parsed.hostname or LOCAL_HOST,
        port=parsed.port or 3306,
        user=unquote(parsed.username or "root"),
        password=unquote(parsed.password or ""),
        charset="utf8mb4",
        connect_timeout=CONNECT_TIMEOUT,
        autocommit=True,
    )


def _server_url(url: str) -> str:
    """``mysql://user@host:port`` from a URL of any of our MySQL schemes, without a database."""
    parsed = urlsplit(url)
    return f"mysql://{parsed.netloc}"


def discover_mysql() -> MysqlServer:
    """``AIOASYNC_TASKS_TEST_MYSQL_URL``, else a server on 127.0.0.1:3306 (user root, no
    password); raise MysqlUnavailableError to skip."""
    given = os.environ.get(MYSQL_URL_ENV, "").strip()
    url = _server_url(given or MYSQL_LOCAL)
    try:
        import pymysql  # noqa: F401, PLC0415 - only to say why the target is skipped
    except ImportError as exc:
        raise MysqlUnavailableError("MySQL not available: aiomysql is not installed") from exc
    try:
        _mysql_connect(url).close()
    except Exception as exc:  # any failure means: not usable
        if given:
            raise RuntimeError(f"{MYSQL_URL_ENV} is set but unusable: {_describe(exc)}") from exc
        raise MysqlUnavailableError(
            f"MySQL not available: no {MYSQL_URL_ENV}, {MYSQL_LOCAL}: {_describe(exc)}"
        ) from exc
    return MysqlServer(url=url, source=MYSQL_URL_ENV if given else MYSQL_LOCAL)


def create_mysql_database(server: MysqlServer, database: str) -> None:
    conn = _mysql_connect(server.url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
    finally:
        conn.close()


def drop_mysql_database(server: MysqlServer, database: str) -> None:
    conn = _mysql_connect(server.url)
    try:
        with conn.cursor() as cursor:
            # A leaked connection holding locks makes this fail loudly, not hang.
            cursor.execute("SET SESSION lock_wait_timeout = 20")
            cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
    finally:
        conn.close()
