"""A claim takes at most ``limit`` tasks whatever plan PostgreSQL chooses.

On statistics that say the tasks table is empty, PostgreSQL may run the locking subquery of
an ``UPDATE … FROM (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` again for every row it updates;
each run skips the rows the earlier ones locked and takes the next: a cleanup claim of 1 took
3 tasks. The claims lock their rows once, in a MATERIALIZED common table expression
(``_backends/postgresql/queries.sql``)."""

from __future__ import annotations

import pytest
from _db import DbTarget
from _helpers import raw_engine
from driver._driverkit import new_task, register
from sqlalchemy import text

from aioasync_tasks import Operation
from aioasync_tasks._backends import driver_for
from aioasync_tasks._backends._driver import (
    ClaimParams,
    CleanupClaimParams,
    InsertParams,
    OperateParams,
)
from aioasync_tasks._scheduling import Fifo

pytestmark = pytest.mark.postgres_only


async def test_claims_take_at_most_limit_on_empty_table_statistics(db: DbTarget) -> None:
    engine = raw_engine(db)
    try:
        driver = driver_for(engine, db.schema)
        await driver.migrate()
        node = await register(driver)
        holder = await engine.connect()
        try:
            # An old snapshot keeps the dead rows below from being removed, while VACUUM
            # records that the table has no live rows.
            await holder.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
            await holder.execute(text("SELECT 1"))
            gone = await driver.insert_many(InsertParams([new_task("x") for _ in range(5)]))
            async with engine.begin() as conn:
                await conn.execute(
                    text("DELETE FROM aioasync_tasks WHERE id = ANY(:ids)"), {"ids": gone}
                )
            async with engine.connect() as plain:
                auto = await plain.execution_options(isolation_level="AUTOCOMMIT")
                await auto.execute(text("VACUUM aioasync_tasks"))
        finally:
            await holder.close()
        cleanups = await driver.insert_many(
            InsertParams([new_task("c", has_cleanup=True) for _ in range(3)])
        )
        for task_id in cleanups:
            await driver.operate(OperateParams(task_id, Operation.DELETE))
        await driver.insert_many(InsertParams([new_task("p") for _ in range(3)]))

        cleaned = await driver.claim_cleanups(CleanupClaimParams(node, ["c"], 1))
        claimed = await driver.claim(ClaimParams(node, ["p"], 1, Fifo()))

        assert len(cleaned) == 1, cleaned
        assert len(claimed.claimed) == 1, claimed
    finally:
        await engine.dispose()
