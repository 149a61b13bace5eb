"""The queries of the PostgreSQL backend, and the claim of the MySQL one, use indexes on a big
table.

100,000 tasks are created through ``create_tasks`` and spread over users, groups, types and
states; the statements the library really runs are captured from the node's engine (a
``before_cursor_execute`` listener) while the public methods run, and then EXPLAINed with the
parameters they ran with. No plan may read ``aioasync_tasks`` with a Seq Scan: not the claim and
cleanup claim (on 100,000 PENDING rows, and on a realistic mix), not ``get_tasks`` or
``count_tasks`` with one filter on user, group or state.

A plan is checked twice: the custom plan PostgreSQL makes for these parameter values, and the
generic plan it may switch to once asyncpg's prepared statement has run a few times
(``plan_cache_mode = force_generic_plan``). For ``get_tasks`` on a rare filter value whose rows
are all old, the index must also serve the filter itself (an ``Index Cond`` on the column): a
walk of the primary key backwards with a ``Filter`` would read nearly the whole table to find
its page. The table is VACUUMed and ANALYZEd first, as autovacuum would have done.

On MariaDB (or MySQL), the claim's statements and the next-due query are EXPLAINed the same way
(``EXPLAIN FORMAT=JSON``, the table ANALYZEd first): no table of the plan is read whole, the
queues are found by a loose scan of the active index, each queue's tasks are read from the queue
index, the chosen rows are locked and updated by their primary key, and the next due time is
read from a ``run_at`` index (docs/design.md §16.1). The rescuer's lock of owned tasks reads
the owner index.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _db import DbTarget
from _helpers import BOUND, Capture, Captured, RawCapture, make_node, raw_engine, wait_for
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Node, Report, State, TaskRegistry
from aioasync_tasks._backends.postgresql import OUR_PLANS, set_statement

pytestmark = pytest.mark.slow

TABLE = "aioasync_tasks"
ROWS = 100_000
BATCH = 10_000
USERS = 50
GROUPS = 20
TYPES = [f"type{i}" for i in range(5)]
CLEANUP_TYPE = TYPES[0]
WORKER_CONCURRENCY = 10


def build_registry(types: Sequence[str] = TYPES) -> TaskRegistry:
    registry = TaskRegistry()

    async def wait_for_stop(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context=context)
        await stop.wait()  # hold the slot; handed back as PENDING when the node stops

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    for name in types:
        registry.register_task(name, wait_for_stop, cleanup if name == CLEANUP_TYPE else None)
    return registry


async def fill(node: Node) -> int:
    """Create ``ROWS`` PENDING tasks over users, groups and types; returns the first id."""
    first: int | None = None
    for start in range(0, ROWS, BATCH):
        ids = await node.create_tasks(
            [
                {
                    "type": TYPES[i % len(TYPES)],
                    "context": '{"step": 0}',
                    "user": f"u{i % USERS:02d}",
                    "group": f"g{i % GROUPS:02d}",
                    "priority": 1 if i % 10 == 0 else 0,
                }
                for i in range(start, start + BATCH)
            ]
        )
        first = ids[0] if first is None else first
    assert first is not None
    return first


async def fill_with_groups(node: Node) -> int:
    """``fill``, with one group paused and one with limits, as a claim finds them."""
    first = await fill(node)
    await node.pause_group("g02")
    await node.set_group_limits("g01", max_running=5, max_running_per_user=2)
    return first


MIXED_STATES = """
UPDATE aioasync_tasks SET
  state = CASE
    WHEN id - :first < 1500 THEN 'failed'
    WHEN id - :first < 2500 THEN 'deleting'
    WHEN id - :first < 90000 THEN 'finished'
    WHEN id - :first < 92000 THEN 'paused'
    WHEN id - :first < 93000 THEN 'init'
    WHEN id - :first < 94000 THEN 'running'
    WHEN id - :first < 94200 THEN 'canceling'
    ELSE 'pending' END,
  requested = CASE WHEN id - :first BETWEEN 94000 AND 94199 THEN 'pause' END,
  node_id = CASE WHEN id - :first BETWEEN 93000 AND 94199 THEN 1 END,
  error = CASE WHEN id - :first < 1500 THEN 'boom' END,
  done_at = CASE WHEN id - :first < 90000 THEN now() END,
  group_name = CASE WHEN id - :first < 1000 THEN 'archive' ELSE group_name END,
  user_name = CASE WHEN id - :first BETWEEN 1000 AND 1999 THEN 'early' ELSE user_name END
"""
"""History: mostly FINISHED; the oldest 1.5 % FAILED and 1 % DELETING; the newest rows PAUSED,
INIT, RUNNING, CANCELING and PENDING. Group ``archive`` and user ``early`` own 1 % each, all old."""


async def set_mixed_states(engine: AsyncEngine, first: int) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql(MIXED_STATES.replace(":first", str(int(first))))
    await vacuum_analyze(engine)


async def vacuum_analyze(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.exec_driver_sql(f"VACUUM ANALYZE {TABLE}")  # not in a transaction


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def render(plan: dict[str, Any], depth: int = 0) -> str:
    """One line per plan node, for failure messages."""
    parts = [plan["Node Type"], plan.get("Relation Name", ""), plan.get("Index Name", "")]
    for key in ("Index Cond", "Filter"):
        if key in plan:
            parts.append(f"{key}: {plan[key]}")
    lines = ["  " * depth + " ".join(p for p in parts if p)]
    lines += [render(child, depth + 1) for child in plan.get("Plans", [])]
    return "\n".join(lines)


def task_index_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's index scans of the tasks table (its indexes are named ``aioasync_tasks_*``)."""
    return [
        node
        for node in plan_nodes(plan)
        if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
        and node.get("Index Name", "").startswith(TABLE + "_")
    ]


def check_uses_index(plan: dict[str, Any], what: str, *, filter_column: str | None = None) -> None:
    """No Seq Scan of the tasks table; an index scan of it; with ``filter_column``, an index
    serving that column (an ``Index Cond`` on it, not only a ``Filter``)."""
    text = render(plan)
    seq_scans = [
        n
        for n in plan_nodes(plan)
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == TABLE
    ]
    assert not seq_scans, f"{what}: Seq Scan on {TABLE}\n{text}"
    scans = task_index_scans(plan)
    assert scans, f"{what}: no index scan of {TABLE}\n{text}"
    if filter_column is not None:
        served = [n for n in scans if filter_column in n.get("Index Cond", "")]
        assert served, f"{what}: no index serves the filter on {filter_column}\n{text}"


def sql_literal(value: object) -> str:
    """A literal for EXECUTE (the values are the test's own or a node's: NULL, text, numbers,
    times, lists of them; an empty list is left for the statement's own cast to type)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list | tuple) and not value:
        return "'{}'"
    if isinstance(value, list | tuple):
        cast = "" if all(isinstance(v, int | None) for v in value) else "::text[]"
        return "ARRAY[" + ", ".join(sql_literal(v) for v in value) + "]" + cast
    raise TypeError(f"no literal for {value!r}")


def _plan_of(value: Any) -> dict[str, Any]:
    document = json.loads(value) if isinstance(value, str) else value
    plan: dict[str, Any] = document[0]["Plan"]
    return plan


async def explain(engine: AsyncEngine, captured: Captured) -> dict[str, Any]:
    """The custom plan of a captured statement with the parameters it ran with."""
    statement, parameters = captured
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)
        plan = _plan_of(result.scalar_one())
        await conn.rollback()
    return plan


async def explain_generic(engine: AsyncEngine, captured: Captured) -> dict[str, Any]:
    """The generic plan of a captured statement, as a reused prepared statement may run it."""
    statement, parameters = captured
    args = ", ".join(sql_literal(v) for v in parameters)
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        await conn.exec_driver_sql("PREPARE captured AS " + statement)
        result = await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) EXECUTE captured({args})")
        plan = _plan_of(result.scalar_one())
        await conn.rollback()  # the settings are session-wide: do not leave them in the pool
        await conn.exec_driver_sql("DEALLOCATE captured")
        await conn.exec_driver_sql("RESET plan_cache_mode")
    return plan


async def check_both_plans(
    engine: AsyncEngine, captured: Captured, what: str, *, filter_column: str | None = None
) -> None:
    check_uses_index(await explain(engine, captured), what, filter_column=filter_column)
    # A generic plan cannot know the value is rare: only "no Seq Scan" is required of it.
    check_uses_index(await explain_generic(engine, captured), f"{what} (generic plan)")


def is_claim(statement: str) -> bool:
    return re.search(r"\bchosen AS \(", statement) is not None and "RETURNING" in statement


def is_claim_window(statement: str) -> bool:
    return re.search(r"\bwalk\(group_name", statement) is not None


def is_cleanup_claim(statement: str) -> bool:
    return (
        re.search(r"state = 'deleting' AND (\w+\.)?node_id IS NULL", statement) is not None
        and statement.lstrip().startswith(("UPDATE", "WITH"))
        and "RETURNING" in statement
    )


async def capture_claims(
    db: DbTarget, registry: TaskRegistry
) -> tuple[Captured, Captured, Captured]:
    """Run a worker node until it has claimed once; return its claim window, its claim and
    its cleanup claim (in a transaction or as one statement: §6.9)."""
    worker = make_node(db, registry, concurrency=WORKER_CONCURRENCY)
    with Capture(worker.engine) as capture, RawCapture() as raw:

        def find(predicate: Callable[[str], bool]) -> list[Captured]:
            return capture.find(predicate) + raw.find(predicate)

        async with worker:
            await wait_for(
                lambda: bool(find(is_claim) and find(is_cleanup_claim)),
                timeout=60,
                what="the worker's claim and cleanup claim",
            )
            # Graceful stop: the claimed tasks go back to PENDING.
    return find(is_claim_window)[0], find(is_claim)[0], find(is_cleanup_claim)[0]


@pytest.mark.postgres_only
async def test_claim_uses_indexes_on_100k_pending(db: DbTarget) -> None:
    registry = build_registry()
    engine = raw_engine(db)
    try:
        async with make_node(db, registry, concurrency=0) as client:
            first = await fill_with_groups(client)
            assert await client.count_tasks(states=[State.PENDING]) == ROWS
            await vacuum_analyze(engine)
            window, claim, cleanup_claim = await capture_claims(db, registry)
            assert await client.count_tasks(states=[State.PENDING]) == ROWS  # handed back

            await check_both_plans(engine, window, "claim window, 100k pending")
            await check_both_plans(engine, claim, "claim, 100k pending")
            await check_both_plans(engine, cleanup_claim, "cleanup claim, 100k pending")

            await set_mixed_states(engine, first)
            await check_both_plans(engine, window, "claim window, mixed states")
            await check_both_plans(engine, claim, "claim, mixed states")
            await check_both_plans(engine, cleanup_claim, "cleanup claim, mixed states")
    finally:
        await engine.dispose()


YOUNG_TASKS = 16
"""The tasks of the young table the hot statements are first planned on."""


def touches_tasks(statement: str) -> bool:
    """A statement that reads or writes the tasks table (not one of the other tables only)."""
    return re.search(rf"\b{TABLE}\b(?!_)", statement) is not None


def rows_read(plan: dict[str, Any]) -> int:
    """The rows an executed plan read from the tasks table: those its scans of the table or
    of its indexes returned or filtered out, in every loop."""
    return sum(
        (
            n["Actual Rows"]
            + n.get("Rows Removed by Filter", 0)
            + n.get("Rows Removed by Index Recheck", 0)
        )
        * n["Actual Loops"]
        for n in plan_nodes(plan)
        if n.get("Relation Name") == TABLE
    )


async def prepare_captured(conn: Any, name: str, captured: Captured) -> str:
    """Prepare a captured statement as ``name`` on ``conn`` (asyncpg's, with the node's
    planner settings); the ``EXECUTE`` that runs it with the parameters it ran with."""
    sql, args = captured
    await conn.execute(f"PREPARE {name} AS {sql}")
    types = await conn.fetchval(
        "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = $1", name
    )
    literals = ", ".join(f"CAST({sql_literal(v)} AS {t})" for v, t in zip(args, types, strict=True))
    return f"EXECUTE {name}({literals})"


async def explain_analyze(conn: Any, execute: str, *, before: str = "") -> dict[str, Any]:
    """The plan of ``execute`` as it ran (EXPLAIN ANALYZE) after the statement ``before`` (if
    any), the writes of both rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        if before:
            await conn.execute(before)
        return _plan_of(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {execute}"))
    finally:
        await transaction.rollback()


def rows_handled(plan: dict[str, Any]) -> int:
    """The rows the nodes of an executed plan that do not read the tasks table (joins, the
    batch's arrays, sorts, CTEs) produced or filtered out, in every loop: a plan that compares
    each row of a batch with each row it read handles their product. (What the table's scans
    read, dead index entries included, is ``rows_read``'s concern.)"""
    return sum(
        (
            n["Actual Rows"]
            + n.get("Rows Removed by Filter", 0)
            + n.get("Rows Removed by Join Filter", 0)
        )
        * n["Actual Loops"]
        for n in plan_nodes(plan)
        if n.get("Relation Name") != TABLE and not n.get("Index Name", "").startswith(TABLE)
    )


def rows_updated(plan: dict[str, Any]) -> int:
    """The rows an executed plan's UPDATE was given to write."""
    (update,) = [n for n in plan_nodes(plan) if n["Node Type"] == "ModifyTable"]
    fed: int = update["Plans"][0]["Actual Rows"] * update["Plans"][0]["Actual Loops"]
    return fed


BIG_BATCH = 200
"""Tasks running at once on the node of the batch-write test."""


@pytest.mark.postgres_only
async def test_a_batch_write_handles_each_of_its_rows_once(db: DbTarget) -> None:
    """A checkpoint batch, a batch of certain ends and a batch of locked writes
    (``checkpoint_at_once``, ``complete_at_once``, ``update_tasks``) read each value of a row
    at the row's place in the batch's arrays (``batch_row``, docs/design.md §15), never by
    joining the batch to the table: a generic plan made on a young table joined them as a
    nested loop, each row of the table against every row of the batch — 80,000 rows handled
    for a batch of 200, a checkpoint batch of 100 taking 3.6 ms, one of 1,000 180 ms. The
    statements are captured as a node of 200 slots runs them on a young table, then run
    again on their generic plans there (EXPLAIN ANALYZE, rolled back): none may handle more
    than ten rows for each row of its batch."""
    released = asyncio.Event()
    registry = TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="checkpointed")
        await released.wait()
        if context == "fail":
            raise RuntimeError("fails, to be retried: its end goes through the locked path")
        yield Report.finished()

    registry.register_task("job", job, max_attempts=2)
    engine = raw_engine(db)
    try:
        async with make_node(db, registry, concurrency=0) as client:
            worker = make_node(db, registry, concurrency=BIG_BATCH)
            with Capture(worker.engine) as locked, RawCapture() as raw:
                async with worker:
                    await client.pause_group("default")
                    ids = await client.create_tasks(
                        [
                            {"type": "job", "context": "fail" if i % 2 else ""}
                            for i in range(BIG_BATCH)
                        ]
                    )
                    await client.resume_group("default")

                    async def all_checkpointed() -> bool:
                        tasks = await client.get_tasks(states=[State.RUNNING], limit=BIG_BATCH)
                        return sum(t.context == "checkpointed" for t in tasks) == BIG_BATCH

                    await wait_for(all_checkpointed, what="every task's checkpoint")
                    (node,) = await client.get_nodes()
                    await client.pause_group("default")  # no second attempt: tokens stay
                    released.set()

                    async def all_ended() -> bool:
                        ended = await client.count_tasks(states=[State.FINISHED, State.PENDING])
                        return ended == len(ids)  # the failed ones wait for their retry

                    await wait_for(all_ended, what="every task's end")

            def batch_size(captured: Captured) -> int:
                return max((len(v) for v in captured[1] if isinstance(v, list | tuple)), default=0)

            batches = {
                "checkpoint_at_once": max(raw.find(is_checkpoint), key=batch_size),
                "complete_at_once": max(raw.find(is_complete_at_once), key=batch_size),
                "update_tasks": max(locked.find(is_update_tasks), key=batch_size),
            }
            async with engine.connect() as session:
                conn: Any = (await session.get_raw_connection()).driver_connection  # asyncpg's
                await conn.execute(set_statement(OUR_PLANS))  # as the node's sessions
                costly = []
                for name, captured in batches.items():
                    size = batch_size(captured)
                    assert size >= BIG_BATCH // 10, f"{name}: a batch of {size} rows proves little"
                    # The batch's rows as they were when it ran: running, owned by the node,
                    # under their tokens (which their ends left in place).
                    running = (
                        f"UPDATE {TABLE} SET state = 'running', requested = NULL,"
                        f" node_id = {node.id}"
                    )
                    execute = await prepare_captured(conn, name, captured)
                    plan = await explain_analyze(conn, execute, before=running)
                    handled = rows_handled(plan)
                    assert rows_updated(plan) == size, f"{name}: not run on its rows"
                    if handled > 10 * size:
                        costly.append(f"{name}: {handled} rows for {size}\n{render(plan)}")
                await session.invalidate()  # its prepared statements and settings go with it
    finally:
        await engine.dispose()
    assert not costly, "\n\n".join(costly)


DRAINED = 60_000
"""Tasks of the drained-table test: one queue, as in ``benchmarks/drain.py``. (On 20,000 the
old plans chose the queue index anyway; on 60,000 they read 179,712 rows per claim.)"""


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_a_claim_planned_on_a_fresh_backlog_still_seeks_once_it_is_drained(
    db: DbTarget,
) -> None:
    """An ANALYZE after a bulk create (autovacuum's, or the benchmark's) tells the planner
    that every row is PENDING; a generic plan made then found a queue's first PENDING row by
    walking the group or the user index, whose order served its ``ORDER BY`` as well as the
    queue index's — and once most of the backlog had run, every claim walked past every
    finished task (a drain of 60,000 fell from 9,000 to 2,150 tasks/s, the server's CPU at
    100 %). The walk's seeks now order by the queue index's whole key (``queue_order``,
    docs/design.md §15). The claim is captured as a node makes it on 60,000 PENDING tasks,
    ANALYZEd, and planned there; all but 100 of them then finish, and the claim runs again on
    its plan (EXPLAIN ANALYZE, rolled back): it may not read a tenth of the rows."""
    release = asyncio.Event()
    registry = TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        await release.wait()
        yield Report.finished()

    registry.register_task("job", job)
    engine = raw_engine(db)
    try:
        async with make_node(db, registry, concurrency=0) as client:
            for _ in range(DRAINED // BATCH):
                await client.create_tasks([{"type": "job"}] * BATCH)
            await vacuum_analyze(engine)
            with RawCapture() as raw:
                async with make_node(db, registry, concurrency=1):  # holds its one task
                    await wait_for(lambda: "claim_at_once" in raw.names, what="a claim")
                    claim = raw.find(is_claim)[0]
                    async with engine.connect() as session:
                        conn: Any = (await session.get_raw_connection()).driver_connection
                        await conn.execute(set_statement(OUR_PLANS))  # as the node's sessions
                        execute = await prepare_captured(conn, "drained", claim)
                        await conn.fetchval(f"EXPLAIN (FORMAT JSON) {execute}")  # planned now
                        await conn.execute(
                            f"UPDATE {TABLE} SET state = 'finished', done_at = now()"
                            f" WHERE state = 'pending' AND id <= (SELECT max(id) - 100"
                            f" FROM {TABLE})"
                        )
                        plan = await explain_analyze(conn, execute)
                        await session.invalidate()  # its prepared statement and settings
                    release.set()
    finally:
        await engine.dispose()
    assert rows_updated(plan) >= 1, render(plan)  # it claimed
    read = rows_read(plan)
    assert read <= DRAINED // 10, f"{read} rows read\n{render(plan)}"


def is_checkpoint(statement: str) -> bool:
    return (
        "AS watched" in statement
        and "context = COALESCE" in statement
        and ("done_at" not in statement)
    )


def is_complete_at_once(statement: str) -> bool:
    return "done_at = now()" in statement and "requested IS NULL" in statement


def is_update_tasks(statement: str) -> bool:
    return statement.lstrip().startswith("UPDATE") and "done_at = CASE" in statement


@pytest.mark.postgres_only
async def test_generic_plans_made_on_a_young_table_still_seek_on_a_big_one(db: DbTarget) -> None:
    """A node plans its statements once per connection (generic plans, docs/design.md §15),
    and PostgreSQL plans them again only after an ANALYZE of the table. A node started on a
    young table keeps the plans it made for a few rows while the table grows by thousands of
    rows a second, or for good where nothing runs ANALYZE: a plan that hashes the whole table,
    or scans every PENDING row to join them with the few it claims, is cheap on 16 rows and
    ruinous on 100,000 (the bloat benchmark saw claims take seconds). The hot statements —
    creates, both claims, cleanup claims, completions, checkpoints — are captured as a node
    runs them on a young table and planned there; the table then grows to 100,000 PENDING
    tasks, unanalyzed, and each statement runs again on its cached plan (EXPLAIN ANALYZE,
    rolled back). None may read a tenth of the table's rows: these plans read at most a
    hundred; the plans that were made before the planner settings of §15 read 100,000 to
    300,000."""
    checkpointed = asyncio.Event()
    registry = TaskRegistry()

    async def job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context='{"step": 1}')
        await checkpointed.wait()
        yield Report.finished()

    async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    for name in ["job", *TYPES]:  # TYPES: the tasks of fill
        registry.register_task(name, job)
    registry.register_task("cleaned", job, cleanup)
    engine = raw_engine(db)
    try:
        async with make_node(db, registry, concurrency=0) as client:
            await client.set_group_limits("limited", max_running=5)  # claimed in two statements
            worker = make_node(db, registry, concurrency=YOUNG_TASKS)
            with (
                Capture(client.engine) as created,
                Capture(worker.engine) as claimed,
                RawCapture() as raw,
            ):
                async with worker:
                    await client.delete_task(await client.create_task("cleaned", auto_run=False))
                    ids = [await client.create_task("job")]
                    ids += await client.create_tasks(
                        [{"type": "job", "group": "limited"}] * (YOUNG_TASKS // 2 - 1)
                        + [{"type": "job"}] * (YOUNG_TASKS // 2)
                    )
                    await wait_for(
                        lambda: "checkpoint_at_once" in raw.names,
                        what="a checkpoint in one statement",
                    )
                    checkpointed.set()
                    for task_id in ids:
                        await client.wait_task(task_id, timeout=BOUND)
            statements: dict[str, Any] = {}
            for sql, args in raw.statements + created.statements + claimed.statements:
                statements.setdefault(sql, args)
            hot = {sql: args for sql, args in statements.items() if touches_tasks(sql)}
            assert {
                "insert_task_and_wake",
                "claim_at_once",
                "complete_at_once",
                "claim_cleanups_at_once",
            } <= raw.names
            assert claimed.find(is_claim_window)  # the limited group's claim: two statements
            assert claimed.find(is_claim)

            async with engine.connect() as session:
                conn: Any = (await session.get_raw_connection()).driver_connection  # asyncpg's
                await conn.execute(set_statement(OUR_PLANS))  # as the node's sessions
                executes = {}
                for i, (sql, args) in enumerate(hot.items()):
                    executes[sql] = await prepare_captured(conn, f"young{i}", (sql, args))
                    await conn.fetchval(f"EXPLAIN (FORMAT JSON) {executes[sql]}")  # planned now
                await fill(client)  # 100,000 more rows, and no ANALYZE
                ruinous = []
                for sql in hot:
                    plan = await explain_analyze(conn, executes[sql])
                    read = rows_read(plan)
                    if read > ROWS // 10:
                        ruinous.append(f"{read} rows read by\n{sql}\n{render(plan)}")
                await session.invalidate()  # its prepared statements and plan mode go with it
    finally:
        await engine.dispose()
    assert not ruinous, "\n\n".join(ruinous)


QUERIES: list[tuple[str, dict[str, Any], str | None]] = [
    # (label, filter, column an index must serve for get_tasks: rare values, all old rows)
    ("user", {"user": "u07"}, None),
    ("rare old user", {"user": "early"}, "user_name"),
    ("group", {"group": "g03"}, None),
    ("rare old group", {"group": "archive"}, "group_name"),
    ("pending", {"states": [State.PENDING]}, None),
    ("running", {"states": [State.RUNNING]}, None),
    ("rare old state", {"states": [State.FAILED]}, "state"),
    ("deleting", {"states": [State.DELETING]}, "state"),
]


@pytest.mark.postgres_only
async def test_task_queries_use_indexes(db: DbTarget) -> None:
    engine = raw_engine(db)
    try:
        async with make_node(db, build_registry(), concurrency=0) as client:
            first = await fill(client)
            await set_mixed_states(engine, first)
            assert await client.count_tasks(states=[State.FAILED]) == 1500
            assert await client.count_tasks(group="archive") == 1000
            for label, filters, column in QUERIES:
                with Capture(client.engine) as capture:
                    page = await client.get_tasks(**filters)
                    count = await client.count_tasks(**filters)
                assert len(page) == min(count, 100)
                assert count > 0
                selects = capture.find(lambda s: TABLE in s and s.lstrip().startswith("SELECT"))
                assert len(selects) == 2, selects
                get_sql, count_sql = selects
                assert re.search(r"ORDER BY (\S+\.)?id DESC", get_sql[0]), get_sql[0]
                assert "count(" in count_sql[0]
                await check_both_plans(engine, get_sql, f"get_tasks {label}", filter_column=column)
                await check_both_plans(engine, count_sql, f"count_tasks {label}")
    finally:
        await engine.dispose()


@pytest.mark.postgres_only
async def test_retention_unique_keys_and_bulk_deletes_use_indexes(db: DbTarget) -> None:
    """docs/design.md §4.4, §4.5: the prune, the lookups of a unique key's holder and a bulk
    delete by state read indexes, not the whole table."""
    engine = raw_engine(db)
    try:
        async with make_node(db, build_registry(), concurrency=0) as client:
            first = await fill(client)
            await set_mixed_states(engine, first)
            keyed = await client.create_task(TYPES[1], unique_key="k", auto_run=False)
            await vacuum_analyze(engine)
            with Capture(client.engine) as capture:
                assert (
                    await client.create_task(TYPES[1], unique_key="k", on_conflict="skip") == keyed
                )
                await client.run_task(first)  # a FAILED task: its key's holder is looked up
                deleted = await client.delete_tasks(states=[State.FAILED], older_than=10**9)
                assert deleted == 0
            lock = capture.find(lambda s: "unique_key = " in s and "FOR UPDATE" in s)
            holder = capture.find(lambda s: "LEFT JOIN" in s and "unique_key" in s)
            bulk = capture.find(lambda s: s.lstrip().startswith("SELECT") and "FOR UPDATE" in s)
            assert lock
            assert holder
            await check_both_plans(engine, lock[0], "the unique key's holder, locked")
            await check_both_plans(engine, holder[0], "the holder of a FAILED task's key")
            await check_both_plans(engine, bulk[-1], "delete_tasks by state", filter_column="state")

        async with make_node(db, build_registry(), retention=3600, failed_retention=3600) as node:
            pruner = node.services.pruner
            assert pruner is not None
            with Capture(node.engine) as capture:
                assert await pruner.run_once() == 0  # every task ended just now
            prunes = capture.find(lambda s: s.lstrip().startswith("DELETE") and "done_at" in s)
            assert len(prunes) == 2  # FINISHED, then FAILED
            for prune in prunes:
                await check_both_plans(engine, prune, "prune", filter_column="done_at")
    finally:
        await engine.dispose()


# -- MySQL and MariaDB ------------------------------------------------------------------------


def mysql_tables(plan: Any) -> Iterator[dict[str, Any]]:
    """Every table read in a MariaDB or MySQL ``EXPLAIN FORMAT=JSON`` document, subqueries and
    derived tables included."""
    if isinstance(plan, dict):
        table = plan.get("table")
        if isinstance(table, dict) and "table_name" in table:
            yield table
        for value in plan.values():
            yield from mysql_tables(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from mysql_tables(value)


async def explain_mysql(engine: AsyncEngine, captured: Captured) -> list[dict[str, Any]]:
    """The tables of the plan of a captured statement with the parameters it ran with."""
    statement, parameters = captured
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql("EXPLAIN FORMAT=JSON " + statement, parameters)
        plan = json.loads(result.scalar_one())
        await conn.rollback()
    return list(mysql_tables(plan))


SMALL_TABLES = {"n", "g"}
"""The nodes and the groups (their aliases in the statements): a row per node or per group with
settings, which a plan may read whole."""


def check_mysql_plan(tables: list[dict[str, Any]], what: str, *indexes: str) -> None:
    """No table read whole but ``SMALL_TABLES`` (a JSON list of the statement's parameters is
    read whole: it is one), and each of ``indexes`` read (``name`` or ``name/group-by``: by a
    loose scan)."""
    text = "\n".join(
        f"{t['table_name']} {t.get('access_type')} {t.get('key', '')}"
        f"{' group-by' if t.get('using_index_for_group_by') else ''}"
        for t in tables
    )
    whole = [
        t
        for t in tables
        if t.get("access_type") in ("ALL", "index")
        and "table_function" not in t
        and not t["table_name"].startswith("<")  # a derived table, already bounded
        and t["table_name"] not in SMALL_TABLES
    ]
    assert not whole, f"{what}: a table read whole\n{text}"
    for index in indexes:
        name, _, how = index.partition("/")
        used = [t for t in tables if t.get("key") == name]
        if how == "group-by":
            used = [t for t in used if t.get("using_index_for_group_by")]
        assert used, f"{what}: {index} not used\n{text}"


def mysql_statement(capture: Capture, marker: str) -> Captured:
    (found, *_) = capture.find(lambda s: marker in s)
    return found


@pytest.mark.parametrize("db", ["mysql"], indirect=True)
async def test_mysql_claim_uses_indexes_on_100k_pending(db: DbTarget) -> None:
    registry = build_registry()
    rare = build_registry(["rare"])  # two due tasks and a delayed one: a claim comes back short
    engine = raw_engine(db)
    try:
        async with make_node(db, registry, concurrency=0) as client:
            first = await fill_with_groups(client)
            for run_at in (None, None, datetime.now(UTC) + timedelta(hours=1)):
                await client.create_task("rare", max_attempts=3, run_at=run_at)
            for stage in ("100k pending", "mixed states"):
                if stage == "mixed states":
                    async with engine.begin() as conn:
                        sql = MIXED_STATES.replace(":first", str(int(first)))
                        await conn.exec_driver_sql(sql)
                async with engine.connect() as conn:
                    await conn.exec_driver_sql(f"ANALYZE TABLE {TABLE}")
                for worker_registry in (registry, rare):
                    worker = make_node(db, worker_registry, concurrency=WORKER_CONCURRENCY)
                    with Capture(worker.engine) as capture:
                        async with worker:
                            await worker.services.claimer.run_once()
                            await worker.services.rescuer.run_once()
                    groups = mysql_statement(capture, "AS later")
                    window = mysql_statement(capture, "AS lap")
                    queues = mysql_statement(capture, "firsts AS (")
                    chosen = mysql_statement(capture, "chosen AS (")
                    what = f"{stage}, types {worker_registry.names}"
                    for step, statement in [("claim_groups", groups), ("claim_window", window)]:
                        check_mysql_plan(
                            await explain_mysql(engine, statement),
                            f"{step}, {what}",
                            "aioasync_tasks_active_idx/group-by",
                        )
                    check_mysql_plan(
                        await explain_mysql(engine, queues),
                        f"claim_queues, {what}",
                        "aioasync_tasks_queue_idx",
                    )
                    check_mysql_plan(
                        await explain_mysql(engine, chosen),
                        f"claim, {what}",
                        "aioasync_tasks_queue_idx",
                    )
                    for step, marker in [
                        ("lock_claims", "SELECT id, group_name, handoff FROM"),
                        ("take_claims", "t.handoff = false"),
                    ]:
                        tables = await explain_mysql(engine, mysql_statement(capture, marker))
                        check_mysql_plan(tables, f"{step}, {what}", "PRIMARY")
                    rescue = mysql_statement(capture, "NOT EXISTS (SELECT 1 FROM")
                    check_mysql_plan(
                        await explain_mysql(engine, rescue),
                        f"the rescuer's lock, {what}",
                        "aioasync_tasks_owner_idx",
                    )
                    if worker_registry is rare:
                        next_due = mysql_statement(capture, "min(run_at)")
                        tables = await explain_mysql(engine, next_due)
                        check_mysql_plan(tables, f"next_due, {what}")
                        keys = {t.get("key") for t in tables if t["table_name"] == TABLE}
                        assert keys <= {
                            "aioasync_tasks_ready_at_idx",
                            "aioasync_tasks_deleting_idx",  # on MySQL the same (run_at) index
                        }, keys
    finally:
        await engine.dispose()
