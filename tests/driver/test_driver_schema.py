"""Driver conformance: the schema operations (``schema_version``, ``migrate``,
``check_schema``).

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import pytest
from _db import DbTarget

from aioasync_tasks import SchemaError
from aioasync_tasks._schema import SCHEMA_VERSION
from driver._driverkit import new_driver, open_engine


async def test_migrate_applies_every_version_once(db: DbTarget) -> None:
    async with open_engine(db) as engine:
        driver = await new_driver(engine, db, migrate=False)
        assert await driver.schema_version() is None
        with pytest.raises(SchemaError, match="missing"):
            await driver.check_schema()

        assert await driver.migrate() == list(range(1, SCHEMA_VERSION + 1))
        assert await driver.schema_version() == SCHEMA_VERSION
        await driver.check_schema()

        assert await driver.migrate() == []
        assert await driver.schema_version() == SCHEMA_VERSION
