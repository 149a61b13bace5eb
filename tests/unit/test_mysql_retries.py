"""``MysqlDriver.rolled_back_retry``: a create that InnoDB chose as a deadlock's victim (its
whole transaction rolled back) is tried again, a few times, after a short jittered pause; no
other failure is (docs/design.md §16.1)."""

from __future__ import annotations

import pymysql  # type: ignore[import-untyped]  # no type information
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aioasync_tasks import DatabaseError
from aioasync_tasks._backends._sqldriver import DEADLOCK_RETRIES
from aioasync_tasks._backends.mysql import MysqlDriver


def _failure(code: int) -> DatabaseError:
    orig = pymysql.err.OperationalError(code, "message")
    error = DatabaseError("SELECT failed on MySQL", transient=True)
    error.__cause__ = sa.exc.OperationalError("SELECT 1", {}, orig)
    return error


@pytest.fixture
def driver() -> MysqlDriver:
    # No connection is made: the engine only names the dialect.
    return MysqlDriver(create_async_engine("mysql+aiomysql://nobody@127.0.0.1:1/x"))


def test_a_deadlock_victim_is_tried_again_a_few_times(driver: MysqlDriver) -> None:
    delays = [driver.rolled_back_retry(_failure(1213), attempt) for attempt in range(10)]
    assert all(d is not None and 0 <= d <= 0.01 * 2**i for i, d in enumerate(delays[:5]))
    assert delays[DEADLOCK_RETRIES:] == [None] * (10 - DEADLOCK_RETRIES)


@pytest.mark.parametrize("code", [1205, 1062, 2013])
def test_other_failures_are_not_retried(driver: MysqlDriver, code: int) -> None:
    # A lock wait timeout undoes the statement only; a lost connection may have committed.
    assert driver.rolled_back_retry(_failure(code), 0) is None
