"""Driver conformance: the schema operations (``schema_version``, ``migrate``,
``check_schema``).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import pytest
from _db import DbTarget

from aioasync_tasks import SchemaError
from aioasync_tasks._backends._migrations import check_version, migration_files, missing_versions
from aioasync_tasks._schema import SCHEMA_VERSION
from driver._driverkit import Peek, new_driver, open_engine

SHIPPED = [version for version, _ in migration_files("sqlite")]


def test_the_databases_ship_their_versions_up_to_the_librarys() -> None:
    """The same versions everywhere, but for MySQL's version 6 (its claim indexes), and the
    newest of them is ``SCHEMA_VERSION``."""
    assert [v for v, _ in migration_files("postgresql")] == SHIPPED
    assert [v for v, _ in migration_files("mysql")] == sorted({*SHIPPED, 6})
    assert max(v for d in ("postgresql", "sqlite", "mysql") for v, _ in migration_files(d)) == (
        SCHEMA_VERSION
    )


async def test_migrate_applies_every_version_once(db: DbTarget) -> None:
    async with open_engine(db) as engine:
        driver = await new_driver(engine, db, migrate=False)
        assert await driver.schema_version() is None
        with pytest.raises(SchemaError, match="missing"):
            await driver.check_schema()

        assert await driver.migrate() == db.shipped_versions
        assert await driver.schema_version() == db.shipped_versions[-1]
        await driver.check_schema()

        assert await driver.migrate() == []
        assert await driver.schema_version() == db.shipped_versions[-1]


async def test_a_version_missing_below_the_newest_is_applied(db: DbTarget) -> None:
    """Versions are applied by what is recorded, not by the newest one: a database that lacks
    version 2 but has a newer one (migrated by a branch whose migrations were numbered apart)
    is told it is behind, and ``migrate`` applies version 2 alone."""
    async with open_engine(db) as engine:
        driver = await new_driver(engine, db)
        peek = Peek(engine, db.schema)
        # Undo version 2 (claim tokens, each node's liveness settings) and forget it.
        for table, column in [
            ("aioasync_tasks", "token"),
            ("aioasync_nodes", "heartbeat_interval"),
            ("aioasync_nodes", "node_timeout"),
        ]:
            await peek.execute(f"ALTER TABLE {peek.table(table)} DROP COLUMN {column}")
        await peek.execute(f"DELETE FROM {peek.table('aioasync_schema_version')} WHERE version = 2")
        assert await driver.schema_version() == max(v for v in db.shipped_versions if v != 2)
        with pytest.raises(SchemaError, match=r"older .*migrations 2 are not applied"):
            await driver.check_schema()

        assert await driver.migrate() == [2]
        await driver.check_schema()
        assert await driver.migrate() == []


def test_missing_versions_and_the_check_allow_gaps() -> None:
    assert missing_versions([1, 2, 4], []) == [1, 2, 4]
    assert missing_versions([1, 2, 4], [1, 2]) == [4]
    assert missing_versions([1, 2, 3, 4], [1, 2, 4]) == [3]
    assert missing_versions([1, 2, 4], [1, 2, 4]) == []
    top = SCHEMA_VERSION  # above 1
    check_version([1, top], [1, top])  # a gap in the shipped versions is fine
    with pytest.raises(SchemaError, match="missing"):
        check_version(None, [1])
    with pytest.raises(SchemaError, match="older"):
        check_version([top], [1, top])
    with pytest.raises(SchemaError, match="newer"):
        check_version([1, SCHEMA_VERSION + 1], [1])
