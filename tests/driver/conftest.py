"""The driver conformance suite: every operation of the ``Driver`` protocol
(``aioasync_tasks/_backends/_driver.py``) and every transition of the task state machine
(``aioasync_tasks/_states.py``), checked against each driver by calling it directly — no
``Node``, no worker, no node process. River's ``riverdrivertest`` is the model: one test per
operation and per transition, run against every driver.

What the suite checks
---------------------
Tasks are brought into each starting situation of the state table (``_driverkit.Start``: INIT …
DELETING, CANCELING with each request, DELETING with its cleanup claimed) through the driver's
own operations — insert, claim, operate, complete — never by writing rows. A transition is then
applied through the driver and the row compared with what ``apply_operation`` / ``apply_event``
say for that cell; what the table leaves to the driver (attempts given back, hand-offs,
``run_at``) is checked against docs/explanation.md. Cells are collected per test and reported
together, one line each (``_driverkit.Problems``).

- ``test_driver_schema``: ``schema_version``, ``migrate``, ``check_schema``;
- ``test_driver_tasks``: ``insert_many`` (in the caller's transaction too), ``get_task``,
  ``get_tasks`` and ``count_tasks`` with each filter;
- ``test_driver_operations``: ``operate``, per operation over every cell;
- ``test_driver_claims``: ``claim`` and ``claim_cleanups`` (CLAIM and CLEANUP_CLAIM), limits,
  order, fencing;
- ``test_driver_executions``: ``complete`` per event over every cell, ``checkpoint``,
  ``release_claims``, claim-token staleness;
- ``test_driver_nodes``: ``register_node``, ``get_nodes``, ``heartbeat``, ``owned``,
  ``deregister`` (STOPPED), ``rescue`` (NODE_LOST);
- ``test_driver_groups``: ``set_group``, ``get_groups``, ``pause_group``, ``listen``;
- ``test_driver_schedules``: ``put_schedule``, ``get_schedules``, ``delete_schedule``, ``tick``
  (each tick enqueued once, by concurrent drivers too; only the latest missed tick);
- ``test_driver_stats``: ``queue_stats`` (the dashboard's counts, running tasks by node, recent
  ends per window).

A test that shows a driver disagreeing with the state table or the docs is marked
``xfail(strict=True)`` with the bug named in its reason, until the driver is fixed.

How a new driver uses it
------------------------
1. Make ``driver_for(engine, schema)`` (``aioasync_tasks/_backends/__init__.py``) return the
   new driver for its engine.
2. Give ``tests/conftest.py`` a target for the database: its name in ``BACKENDS`` and a branch
   of the ``db`` fixture that yields a ``DbTarget`` of a fresh, empty database (a file, a
   schema …). Every test here then runs once more, with the test id ``[<name>]``.
3. Run ``nice -n 10 .venv/bin/python -m pytest -q tests/driver``. The driver conforms when
   every test passes (and no xfail of a test meant for another driver's bug passes by accident:
   they are strict). PostgreSQL's runs twice: directly, and behind a real PgBouncer in
   transaction pooling mode (``[pgbouncer]``; skipped without the ``pgbouncer`` binary).

The suite reads behind the driver's back only where the protocol returns nothing to read: the
``token`` and ``handoff`` columns of the tasks table (``_driverkit.Peek``), and one test deletes
a node row (a node whose row is gone while it still owns tasks, which no operation reaches). A
driver whose storage is not SQL with these tables adapts ``Peek`` and that test.

``mypy`` checks it with the rest of the tests (``tests/driver`` is the package ``driver`` on
the ``tests`` path).

Fixtures
--------
``driver``
    The ``Driver`` that ``driver_for`` gives for the test database, migrated; one per backend,
    since it is built from the ``db`` fixture (``tests/conftest.py``), which every test that
    uses it gets once per backend.
``engine``
    The driver's engine (``engine_from_url(db.url)``, as a node makes it), disposed of after
    the test.
``peek``
    A ``_driverkit.Peek`` on the same engine, for the columns the driver does not return.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from _db import DbTarget
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks._backends._driver import Driver
from driver._driverkit import Peek, new_driver, open_engine


@pytest.fixture
async def engine(db: DbTarget) -> AsyncIterator[AsyncEngine]:
    async with open_engine(db) as result:
        yield result


@pytest.fixture
async def driver(db: DbTarget, engine: AsyncEngine) -> Driver:
    return await new_driver(engine, db)


@pytest.fixture
def peek(db: DbTarget, engine: AsyncEngine) -> Peek:
    return Peek(engine, db.schema)
