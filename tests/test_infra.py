"""The database fixtures themselves work on every backend."""

from __future__ import annotations

import re

import pytest
from _db import DbTarget
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


async def _check(db: DbTarget) -> None:
    engine = create_async_engine(db.url, connect_args=db.connect_args())
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            if db.backend == "postgres":
                assert db.schema is not None
                found = await conn.execute(
                    text("SELECT count(*) FROM pg_namespace WHERE nspname = :schema"),
                    {"schema": db.schema},
                )
                assert found.scalar_one() == 1
                current = await conn.execute(text("SELECT current_schema()"))
                assert current.scalar_one() == db.schema
            else:
                assert db.schema is None
            if db.backend == "mysql":  # a fresh database of utf8mb4 on a utf8mb4 connection
                found = await conn.execute(
                    text("SELECT @@character_set_database, @@character_set_connection")
                )
                assert tuple(found.one()) == ("utf8mb4", "utf8mb4")
    finally:
        await engine.dispose()


async def test_db_fixture_connects(db: DbTarget) -> None:
    assert db.backend in {"sqlite", "postgres", "mysql"}
    await _check(db)


async def test_sqlite_db_fixture(sqlite_db: DbTarget) -> None:
    assert sqlite_db.backend == "sqlite"
    assert sqlite_db.url.startswith("sqlite+aiosqlite:///")
    await _check(sqlite_db)


async def test_pg_db_fixture(pg_db: DbTarget) -> None:
    assert pg_db.backend == "postgres"
    assert pg_db.url.startswith("postgresql+asyncpg://")
    assert pg_db.schema is not None
    assert re.fullmatch(r"t_[0-9a-f]{12}", pg_db.schema)
    await _check(pg_db)


@pytest.mark.postgres_only
def test_postgres_only_marker_drops_sqlite(db: DbTarget, request: pytest.FixtureRequest) -> None:
    assert db.backend == "postgres"
    assert request.node.callspec.id == "postgres"
