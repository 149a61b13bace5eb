"""Database URLs and connection errors, against real servers.

libpq parameters in a PostgreSQL URL (``?sslmode=…&connect_timeout=…&application_name=…``, as
managed services hand them out) are translated for asyncpg and actually connect; an unknown one
is refused before any I/O. A database that cannot be reached gives a ``DatabaseError`` whose
message names the place (host, port, database — never the password) and the driver's error, and
is never empty (a connect timeout used to give ``DatabaseError('')``). A failing statement says
which statement kind failed where. MySQL and MariaDB URLs get aiomysql and utf8mb4.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _db import DbTarget, MysqlServer, free_port
from _helpers import make_node, raw_engine, wait_for
from sqlalchemy import make_url

from aioasync_tasks import ConfigurationError, DatabaseError, Node, Report, TaskRegistry
from aioasync_tasks._urls import engine_from_url

SESSION_SQL = (
    "SELECT current_setting('application_name'), coalesce((SELECT ssl FROM pg_stat_ssl"
    " WHERE pid = pg_backend_pid()), false)"
)


def _registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("t")
    async def _task(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    return registry


def _with_query(db: DbTarget, query: str) -> str:
    url = make_url(db.url)
    return url.render_as_string(hide_password=False) + ("&" if url.query else "?") + query


async def _tables_in(db: DbTarget) -> list[str]:
    """The library's tables in the test's schema (or SQLite file), read behind its back."""
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
            return sorted(n for n in names if n.startswith("aioasync"))
    finally:
        await engine.dispose()


async def _server_has_ssl(db: DbTarget) -> bool:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text("SHOW ssl"))).scalar() == "on"
    finally:
        await engine.dispose()


async def _session(node: Node) -> tuple[str, bool]:
    async with node.engine.connect() as conn:
        name, ssl = (await conn.execute(sa.text(SESSION_SQL))).one()
        return name, ssl


# -- libpq parameters, translated -------------------------------------------------------------


@pytest.mark.postgres_only
@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
async def test_sslmode_and_friends_connect(db: DbTarget, sslmode: str) -> None:
    url = _with_query(db, f"sslmode={sslmode}&connect_timeout=2&application_name=billing-{sslmode}")
    async with Node(url, schema=db.schema, concurrency=0, registry=_registry()) as node:
        task_id = await node.create_task("t", "c")
        assert (await node.get_task(task_id)).context == "c"
        name, ssl = await _session(node)
        assert name == f"billing-{sslmode}"
        if sslmode == "disable":
            assert ssl is False


@pytest.mark.postgres_only
async def test_sslmode_require_gives_a_clear_error_or_tls(db: DbTarget) -> None:
    """Against a server without TLS, ``sslmode=require`` is a ``DatabaseError`` at start that
    says where and why (it used to be a TypeError from asyncpg); with TLS it connects over it."""
    node = Node(_with_query(db, "sslmode=require"), schema=db.schema, concurrency=0)
    host = f"{make_url(db.url).host}:{make_url(db.url).port or 5432}"
    try:
        if await _server_has_ssl(db):
            await node.start()
            assert (await _session(node))[1] is True
            return
        with pytest.raises(DatabaseError) as raised:
            await node.start()
    finally:
        await node.stop()
    message = str(raised.value)
    assert message.startswith(f"could not connect to PostgreSQL at {host}/")
    assert "SSL" in message
    assert not isinstance(raised.value.__cause__, TypeError)
    assert await _tables_in(db) == []  # nothing written


@pytest.mark.postgres_only
async def test_asyncpg_parameters_pass_through(db: DbTarget) -> None:
    query = (
        "ssl=disable&timeout=5&command_timeout=30&statement_cache_size=0"
        "&prepared_statement_cache_size=0&target_session_attrs=any"
    )
    node = Node(_with_query(db, query), schema=db.schema, concurrency=0, registry=_registry())
    async with node:
        await node.create_tasks([{"type": "t"}, {"type": "t"}])
        assert await node.count_tasks() == 2
        assert (await _session(node))[1] is False


@pytest.mark.postgres_only
async def test_an_unknown_parameter_is_refused_before_any_io(db: DbTarget) -> None:
    with pytest.raises(ConfigurationError, match="unsupported PostgreSQL URL parameter 'sslmod'"):
        Node(_with_query(db, "sslmod=require"), schema=db.schema)
    assert await _tables_in(db) == []


# -- connection errors ------------------------------------------------------------------------


async def test_a_closed_port_names_host_and_port() -> None:
    port = free_port()
    node = Node(f"postgresql://postgres:s3cret@127.0.0.1:{port}/test", concurrency=0)
    try:
        with pytest.raises(DatabaseError) as raised:
            await node.start()
    finally:
        await node.stop()
    message = str(raised.value)
    assert message.startswith(
        f"could not connect to PostgreSQL at 127.0.0.1:{port}/test: ConnectionRefusedError: "
    )
    assert "s3cret" not in message
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never answers (a server that hangs)."""
    clients: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in clients:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connect_timeout_gives_a_message_not_an_empty_error(silent_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/test?connect_timeout=0.5"
    node = Node(url, concurrency=0)
    try:
        with pytest.raises(DatabaseError) as raised:
            await node.start()
    finally:
        await node.stop()
    assert str(raised.value) == (
        f"could not connect to PostgreSQL at 127.0.0.1:{silent_port}/test: TimeoutError"
    )


async def test_a_missing_sqlite_directory_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "tasks.db"
    node = Node(f"sqlite+aiosqlite:///{path}", concurrency=0)
    before = set(_aiosqlite_threads())
    try:
        with pytest.raises(DatabaseError) as raised:
            await node.start()
    finally:
        await node.stop()
        # aiosqlite answers a failed connect's close from its thread without being awaited:
        # let it finish while this test's event loop still runs.
        await wait_for(lambda: set(_aiosqlite_threads()) <= before, what="aiosqlite's thread")
    assert str(raised.value) == (
        f"could not connect to SQLite at {path}: OperationalError: unable to open database file"
    )


def _aiosqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def test_a_failing_statement_says_which_and_where(db: DbTarget) -> None:
    async with make_node(db, concurrency=0) as node:
        engine = raw_engine(db)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text("DROP TABLE aioasync_tasks"))
        finally:
            await engine.dispose()
        with pytest.raises(DatabaseError) as raised:
            await node.count_tasks()
    message = str(raised.value)
    if db.is_postgres:
        url = make_url(db.url)
        where = f"PostgreSQL at {url.host}:{url.port or 5432}/{url.database}"
        assert message.startswith(f"SELECT failed on {where}: UndefinedTableError: ")
    elif db.backend == "mysql":
        url = make_url(db.url)
        where = f"MySQL at {url.host}:{url.port or 3306}/{url.database}"
        table = f"{url.database}.aioasync_tasks"
        assert message == (
            f"SELECT failed on {where}: ProgrammingError: (1146, \"Table '{table}' doesn't exist\")"
        )
    else:
        where = f"SQLite at {make_url(db.url).database}"
        assert (
            message == f"SELECT failed on {where}: OperationalError: no such table: aioasync_tasks"
        )


# -- MySQL and MariaDB ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dialect"),
    [
        ("mysql://u@db.example/tasks", "mysql"),
        ("mysql+aiomysql://u@db.example/tasks", "mysql"),
        ("mariadb://u@db.example/tasks", "mariadb"),
        ("mariadb+aiomysql://u@db.example/tasks", "mariadb"),
    ],
)
async def test_mysql_urls_get_aiomysql(url: str, dialect: str) -> None:
    engine = engine_from_url(url)
    try:
        assert (engine.dialect.name, engine.dialect.driver) == (dialect, "aiomysql")
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("charset=latin1", "charset='latin1': use one of utf8mb4"),
        ("sslmode=require", "unsupported MySQL URL parameter 'sslmode'"),
    ],
)
def test_mysql_url_parameters_are_checked(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        engine_from_url(f"mysql://u@db.example/tasks?{query}")


def test_mysql_without_the_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "aiomysql" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigurationError, match=re.escape("pip install 'aioasync-tasks[mysql]'")):
        engine_from_url("mysql://u@db.example/tasks")


async def test_a_bare_mysql_url_talks_utf8mb4(mysql_server: MysqlServer) -> None:
    engine = engine_from_url(f"{mysql_server.url}/mysql")
    try:
        async with engine.connect() as conn:
            found = await conn.execute(sa.text("SELECT @@character_set_connection, '\U0001f600'"))
            assert tuple(found.one()) == ("utf8mb4", "\U0001f600")
    finally:
        await engine.dispose()
