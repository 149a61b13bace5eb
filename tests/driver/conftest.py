"""Fixtures of the driver conformance suite (see ``test_driver_schema.py`` for the suite).

``driver``
    The ``Driver`` that ``backend_for`` gives for the test database, migrated; one per backend,
    since it is built from the ``db`` fixture (``tests/conftest.py``), which every test that
    uses it gets once per backend.
``peek``
    A ``Peek`` on the same database, for the columns the driver does not return.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from _db import DbTarget
from _driverkit import Peek, open_driver

from aioasync_tasks._backends._driver import Driver


@pytest.fixture
async def driver(db: DbTarget) -> AsyncIterator[Driver]:
    async with open_driver(db) as result:
        yield result


@pytest.fixture
async def peek(db: DbTarget) -> AsyncIterator[Peek]:
    result = Peek(db)
    try:
        yield result
    finally:
        await result.close()
