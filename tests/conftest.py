"""Shared fixtures: one database target per backend.

Fixtures
--------
``db``
    Function-scoped, parametrised over ``sqlite``, ``postgres`` and ``mysql`` (test ids
    ``[sqlite]``, ``[postgres]``, ``[mysql]``), and for the driver suite ``pgbouncer`` too
    (``POOLED``); yields a :class:`_db.DbTarget`.  Tests marked
    ``postgres_only`` get only the ``postgres`` parameter.  Fixtures that depend on ``db`` are
    parametrised too.
``sqlite_db`` / ``pg_db``
    The same, for one backend only.
``other_pg_db``
    A second fresh schema beside ``pg_db``, on the same server.
``pg_server``
    Session-scoped :class:`_db.PgServer` (found or started once); skips when unavailable.
``mysql_server``
    Session-scoped :class:`_db.MysqlServer` (``AIOASYNC_TASKS_TEST_MYSQL_URL``, or MySQL or
    MariaDB on 127.0.0.1:3306 as root); skips when unavailable.
``pg_proxy`` / ``pg_proxy_db``
    A fault-injecting :class:`_faults.PgProxy` in front of ``pg_server`` (closed after the
    test), and ``pg_db`` (same fresh schema) with its URL through that proxy.
``pgbouncer``
    Session-scoped :class:`_pgbouncer.PgBouncer`: a real PgBouncer process in transaction
    pooling mode in front of ``pg_server`` (skips when there is no ``pgbouncer`` binary).
``raw``
    An engine of the test's own on ``db`` (``_helpers.raw_engine``), to look at the rows behind
    the library's back; disposed of after the test.
``cluster``
    Node processes on ``db`` (``_cluster.Cluster``).

SQLite targets are a fresh file under ``tmp_path``; PostgreSQL targets are a fresh schema
``t_<12 hex>`` created before the test and dropped (CASCADE) after it; MySQL targets a fresh
database ``t_<12 hex>``, dropped after the test.  Connect with::

    engine = create_async_engine(db.url, connect_args=db.connect_args())
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _cluster import Cluster, open_cluster
from _db import (
    POOLED,
    DbTarget,
    MysqlServer,
    MysqlUnavailableError,
    PgServer,
    PgUnavailableError,
    create_mysql_database,
    create_schema,
    discover_mysql,
    discover_postgres,
    drop_mysql_database,
    drop_schema,
    new_schema_name,
)
from _faults import PgProxy
from _helpers import raw_engine
from _pgbouncer import PgBouncer, PgBouncerUnavailableError, find_pgbouncer
from sqlalchemy.ext.asyncio import AsyncEngine

BACKENDS = ("sqlite", "postgres", "mysql")
POOLED_SUITES = ("driver.",)
"""The test packages that run on ``POOLED`` as well: the driver conformance suite."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "db" in names:
            return  # the test chose its backends itself
    if metafunc.definition.get_closest_marker("postgres_only") is not None:
        backends: tuple[str, ...] = ("postgres",)
    else:
        backends = BACKENDS
    if metafunc.module.__name__.startswith(POOLED_SUITES):
        backends += (POOLED,)
    metafunc.parametrize("db", backends, indirect=True, ids=list(backends))


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(
    config: pytest.Config, report: pytest.CollectReport | pytest.TestReport
) -> Generator[None, dict[str, Any] | None, dict[str, Any] | None]:
    """Reports as pytest-xdist's workers send them (``-n 2``), with lone surrogates escaped:
    tests of text no database can store log such text, and execnet refuses to send a string
    UTF-8 cannot encode (the worker crashed)."""
    data = yield
    return None if data is None else _utf8_safe(data)


def _utf8_safe(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_utf8_safe(v) for v in value)
    return value


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server; skips every PostgreSQL test with one reason if none."""
    try:
        server = discover_postgres()
    except PgUnavailableError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mysql_server() -> MysqlServer:
    """The session's MySQL or MariaDB server; skips every MySQL test with one reason if none."""
    try:
        return discover_mysql()
    except MysqlUnavailableError as exc:
        pytest.skip(str(exc))


def _mysql_target(server: MysqlServer) -> Iterator[DbTarget]:
    database = new_schema_name()
    create_mysql_database(server, database)
    try:
        yield server.target(database)
    finally:
        drop_mysql_database(server, database)


def _sqlite_target(tmp_path: Path) -> DbTarget:
    return DbTarget(
        backend="sqlite", url=f"sqlite+aiosqlite:///{tmp_path / 'tasks.db'}", schema=None
    )


def _pg_target(server: PgServer) -> Iterator[DbTarget]:
    schema = new_schema_name()
    create_schema(server.url, schema)
    try:
        yield DbTarget(backend="postgres", url=server.url, schema=schema)
    finally:
        drop_schema(server.url, schema)


def _pooled_target(server: PgServer, bouncer: PgBouncer) -> Iterator[DbTarget]:
    """A fresh schema reached through ``bouncer``, listening on a direct connection (its URL
    takes no search path: PgBouncer refuses that startup parameter)."""
    for target in _pg_target(server):
        yield DbTarget(backend=POOLED, url=bouncer.pooled_url(listen=True), schema=target.schema)


@pytest.fixture
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A fresh database on the backend named by the ``sqlite``/``postgres``/``mysql``
    parameter."""
    backend = getattr(request, "param", None)
    if backend == "sqlite":
        yield _sqlite_target(tmp_path)
    elif backend == "postgres":
        yield from _pg_target(request.getfixturevalue("pg_server"))
    elif backend == "mysql":
        yield from _mysql_target(request.getfixturevalue("mysql_server"))
    elif backend == POOLED:
        yield from _pooled_target(
            request.getfixturevalue("pg_server"), request.getfixturevalue("pgbouncer")
        )
    else:
        raise pytest.UsageError(f"db fixture got unexpected backend {backend!r}")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> DbTarget:
    """A fresh SQLite database file under ``tmp_path``."""
    return _sqlite_target(tmp_path)


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[DbTarget]:
    """A fresh PostgreSQL schema; skipped when PostgreSQL is unavailable."""
    yield from _pg_target(pg_server)


@pytest.fixture
def other_pg_db(pg_server: PgServer) -> Iterator[DbTarget]:
    """A second fresh schema on the same PostgreSQL database."""
    yield from _pg_target(pg_server)


@pytest.fixture
def pg_proxy(pg_server: PgServer) -> Iterator[PgProxy]:
    """A :class:`_faults.PgProxy` in front of the session's server; every connection through it
    is reset when the test ends."""
    with PgProxy.for_url(pg_server.url) as proxy:
        yield proxy


@pytest.fixture
def pg_proxy_db(pg_db: DbTarget, pg_proxy: PgProxy) -> DbTarget:
    """``pg_db`` through ``pg_proxy``: same schema, URL on the proxy's port.  The proxy closes
    before the schema is dropped (which goes to the server directly)."""
    return pg_proxy.target(pg_db)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the session's server, stopped at the
    end of the session."""
    try:
        binary = find_pgbouncer()
    except PgBouncerUnavailableError as exc:
        pytest.skip(str(exc))
    bouncer = PgBouncer(binary, pg_server.url)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
async def raw(db: DbTarget) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on ``db``, disposed of after the test."""
    engine = raw_engine(db)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def cluster(db: DbTarget) -> AsyncIterator[Cluster]:
    """Node processes on the test database (see ``_cluster``)."""
    async with open_cluster(db) as result:
        yield result
