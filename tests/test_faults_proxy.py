"""The fault-injecting proxy (``_faults.PgProxy``) breaks the network for real.

Each test checks what the client saw through the proxy (raw asyncpg or SQLAlchemy's asyncio
engine) and what the server did, over a direct connection, and that the fault fired: a proxy
that did nothing fails every test here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]  # no type information
import pytest
from _db import DbTarget, PgServer, to_asyncpg_dsn
from _faults import PgProxy
from _helpers import wait_for
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

CLIENTS = ("asyncpg", "sqlalchemy")
INSERT = "INSERT INTO items VALUES ($1)"


async def connect(db: DbTarget, **options: object) -> asyncpg.Connection:
    """A raw asyncpg connection to ``db`` (through the proxy if ``db`` is proxied)."""
    settings = {"search_path": db.schema} if db.schema else {}
    return await asyncpg.connect(to_asyncpg_dsn(db.url), server_settings=settings, **options)


@pytest.fixture
async def direct(pg_db: DbTarget) -> AsyncIterator[asyncpg.Connection]:
    """A connection straight to the server, in the test's schema, with a fresh ``items``."""
    conn = await connect(pg_db)
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    try:
        yield conn
    finally:
        await conn.close()


def engine_for(db: DbTarget, **options: object) -> AsyncEngine:
    return create_async_engine(db.url, connect_args=db.connect_args(), **options)


async def items(direct: asyncpg.Connection) -> list[int]:
    return [row["id"] for row in await direct.fetch("SELECT id FROM items ORDER BY id")]


async def wait_backend_gone(direct: asyncpg.Connection, pid: int) -> None:
    """Wait until the server ended the backend of a reset connection (its transaction over)."""

    async def gone() -> bool:
        found = await direct.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        return bool(found == 0)

    await wait_for(gone, what=f"backend {pid} to end")


def reset_by_peer(error: BaseException) -> bool:
    """True if ``error`` comes from an RST (ECONNRESET), not from an orderly close."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionResetError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def insert_in_transaction(client: str, db: DbTarget, item: int) -> tuple[Exception, int]:
    """Insert ``item`` in a transaction through ``client``; its commit must fail with a
    connection error.  Returns that error and the server pid of the connection."""
    error: pytest.ExceptionInfo[Exception]
    if client == "asyncpg":
        conn = await connect(db)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(INSERT, item)
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as error:
                await transaction.commit()
            return error.value, conn.get_server_pid()
        finally:
            await conn.close()
    engine = engine_for(db)
    try:
        async with engine.connect() as sa_conn:
            transaction = await sa_conn.begin()
            pid: int = (await sa_conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await sa_conn.execute(text("INSERT INTO items VALUES (:id)"), {"id": item})
            with pytest.raises(DBAPIError) as sa_error:
                await transaction.commit()
            assert sa_error.value.connection_invalidated
            return sa_error.value, pid
    finally:
        await engine.dispose()


def last_statements(proxy: PgProxy, count: int) -> list[tuple[str, str]]:
    """The last ``count`` statements of the last connection that sent one."""
    seen = proxy.statements()
    conn = seen[-1].conn
    return [(s.kind, s.sql) for s in seen if s.conn == conn][-count:]


@pytest.mark.parametrize("chunk_size", [7, 65536])
async def test_passthrough_frames_messages_split_across_reads(
    pg_server: PgServer, pg_db: DbTarget, direct: asyncpg.Connection, chunk_size: int
) -> None:
    """Big messages both ways, read 7 bytes at a time, go through whole; the reply count stays
    in step, so a later fault still drops exactly the COMMIT's reply."""
    with PgProxy.for_url(pg_server.url, chunk_size=chunk_size) as proxy:
        conn = await connect(proxy.target(pg_db))
        try:
            assert proxy.ssl_requests == 1  # asyncpg's sslmode=prefer asked, got 'N'
            big = "x" * 100_000
            assert await conn.fetchval("SELECT length($1::text)", big) == len(big)
            assert await conn.fetchval("SELECT repeat('y', 100000)") == "y" * 100_000
            fault = proxy.drop_reply_to(rb"^commit")
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                async with conn.transaction():
                    await conn.execute(INSERT, 1)
            assert fault.dropped == [b"CZ"]  # CommandComplete + ReadyForQuery, nothing else
        finally:
            await conn.close()
        assert proxy.resets == 1
    assert await items(direct) == [1]


async def test_hold_stops_every_byte_until_release(
    pg_proxy: PgProxy, pg_proxy_db: DbTarget, direct: asyncpg.Connection
) -> None:
    conn = await connect(pg_proxy_db)
    pg_proxy.hold()
    query = asyncio.create_task(conn.fetchval("SELECT 'held_marker'"))
    connecting = asyncio.create_task(connect(pg_proxy_db))
    try:
        done, _ = await asyncio.wait({query, connecting}, timeout=1.0)
        assert not done
        assert pg_proxy.accepted == 2  # the new connection was accepted, not forwarded
        reached = await direct.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE '%held' || '_marker%' AND pid <> pg_backend_pid()"
        )
        assert reached == 0  # the held query never reached the server

        pg_proxy.release()
        assert await query == "held_marker"
        fresh = await connecting
        assert await fresh.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT 2") == 2  # held, not broken
        assert pg_proxy.resets == 0
    finally:
        pg_proxy.release()
        for outcome in await asyncio.gather(query, connecting, return_exceptions=True):
            if isinstance(outcome, asyncpg.Connection):
                await outcome.close()
        await conn.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_drop_reply_to_commit_commits_but_the_client_gets_a_reset(
    client: str, pg_proxy: PgProxy, pg_proxy_db: DbTarget, direct: asyncpg.Connection
) -> None:
    fault = pg_proxy.drop_reply_to(rb"^COMMIT")

    error, pid = await insert_in_transaction(client, pg_proxy_db, 1)

    await fault.wait()
    assert fault.fired == 1
    assert fault.statements == [b"COMMIT;"]  # asyncpg's Transaction.commit: a simple query
    assert fault.dropped == [b"CZ"]  # the server answered COMMIT; the client never saw it
    assert reset_by_peer(error)
    # BEGIN and COMMIT are simple queries; the INSERT is Parse, then Bind/Execute/Sync
    assert last_statements(pg_proxy, 3) == [("P", INSERT), ("B", INSERT), ("Q", "COMMIT;")]
    await wait_backend_gone(direct, pid)
    assert await items(direct) == [1]


@pytest.mark.parametrize("client", CLIENTS)
async def test_reset_on_commit_never_commits(
    client: str, pg_proxy: PgProxy, pg_proxy_db: DbTarget, direct: asyncpg.Connection
) -> None:
    fault = pg_proxy.reset_on(rb"^COMMIT")

    error, pid = await insert_in_transaction(client, pg_proxy_db, 1)

    assert fault.done.is_set()
    assert fault.fired == 1
    assert fault.statements == [b"COMMIT;"]
    assert reset_by_peer(error)
    await wait_backend_gone(direct, pid)  # the server rolled the transaction back
    assert await items(direct) == []


async def test_faults_match_the_execution_of_a_cached_prepared_statement(
    pg_proxy: PgProxy, pg_proxy_db: DbTarget, direct: asyncpg.Connection
) -> None:
    """asyncpg runs a cached statement with Bind/Execute/Sync and no Parse: faults match the
    Bind (with the SQL of its Parse) and drop the reply through the Sync's ReadyForQuery."""
    conn = await connect(pg_proxy_db)
    try:
        await conn.execute(INSERT, 1)  # prepared and cached here
        dropping = pg_proxy.drop_reply_to(rb"insert into items")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as info:
            await conn.execute(INSERT, 2)
    finally:
        await conn.close()
    assert reset_by_peer(info.value)
    assert dropping.dropped == [b"2CZ"]  # BindComplete, CommandComplete, ReadyForQuery
    assert last_statements(pg_proxy, 1) == [("B", INSERT)]
    assert await items(direct) == [1, 2]  # autocommit: applied, reply lost

    conn = await connect(pg_proxy_db)
    try:
        await conn.execute(INSERT, 3)
        resetting = pg_proxy.reset_on(rb"insert into items")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await conn.execute(INSERT, 4)
    finally:
        await conn.close()
    assert resetting.fired == 1
    assert await items(direct) == [1, 2, 3]  # the Bind never reached the server


async def test_fault_fires_count_times_then_disarms(
    pg_proxy: PgProxy, pg_proxy_db: DbTarget
) -> None:
    fault = pg_proxy.reset_on(rb"SELECT 'boom'", count=2)
    outcomes: list[str] = []
    for _ in range(3):
        conn = await connect(pg_proxy_db)
        try:
            outcomes.append(await conn.fetchval("SELECT 'boom'"))
        except asyncpg.ConnectionDoesNotExistError:
            outcomes.append("reset")
        finally:
            await conn.close()
    assert outcomes == ["reset", "reset", "boom"]
    assert fault.fired == 2
    assert fault.done.is_set()
    assert not fault.armed


@pytest.mark.parametrize("pre_ping", [False, True], ids=["retry", "pre_ping"])
async def test_reset_all_breaks_a_pooled_connection_and_the_next_checkout_works(
    pre_ping: bool, pg_proxy: PgProxy, pg_proxy_db: DbTarget
) -> None:
    engine = engine_for(pg_proxy_db, pool_size=1, max_overflow=0, pool_pre_ping=pre_ping)

    async def backend_pid() -> int:
        async with engine.connect() as conn:
            pid: int = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            return pid

    try:
        first = await backend_pid()
        assert pg_proxy.reset_all() == 1
        if not pre_ping:  # the pooled connection is checked out broken: one error, then fine
            with pytest.raises(DBAPIError) as info:
                await backend_pid()
            assert info.value.connection_invalidated
        second = await backend_pid()  # with pre_ping the pool replaced it at checkout
    finally:
        await engine.dispose()
    assert second != first
    assert pg_proxy.resets == 1
    assert pg_proxy.accepted == 2
