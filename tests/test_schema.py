"""Conformance: the schema and its migrations (``docs/how-to.md``, "Manage the schema:
migrations and Alembic"), on every backend.

Migrating an empty database yields exactly ``aioasync_tasks.metadata`` — tables, columns (type
affinity and nullability), primary keys, indexes (columns, order, partial or not), check
constraints — as SQLAlchemy's inspector sees the real database. Migrating is idempotent and safe
from two nodes at once; a missing or newer schema is refused with ``SchemaError``; on PostgreSQL
two ``schema=`` values are two independent systems.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import LONG_BOUND, make_node, raw_engine, wait_for
from sqlalchemy.engine import Connection

import aioasync_tasks
from aioasync_tasks import Report, SchemaError, State, TaskNotFound, TaskRegistry, metadata
from aioasync_tasks._backends._migrations import migration_files, split_sql
from aioasync_tasks._schema import MYSQL, MYSQL_LIVE_KEY, MYSQL_STATE_LED, SCHEMA_VERSION

VERSIONS = "aioasync_schema_version"


def _affinity(type_: sa.types.TypeEngine[Any], dialect: sa.engine.Dialect) -> str:
    """What kind of value a column holds, from its DDL type name (SQLite's affinity rules,
    with timestamps and booleans kept apart)."""
    ddl = type_.compile(dialect=dialect).upper()
    if "TIMESTAMP" in ddl or "DATETIME" in ddl:
        return "timestamp"
    if "BOOL" in ddl or ddl == "TINYINT(1)":  # MySQL's BOOL is TINYINT(1)
        return "boolean"
    if "INT" in ddl:
        return "integer"
    if any(word in ddl for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if any(word in ddl for word in ("REAL", "FLOA", "DOUB")):
        return "real"
    return "numeric"


def _declared(dialect: sa.engine.Dialect) -> dict[str, Any]:
    """The shape of ``aioasync_tasks.metadata`` on ``dialect``."""
    shape: dict[str, Any] = {}
    for table in metadata.sorted_tables:
        indexes = {}
        for index in table.indexes:
            columns, descending = [], set()
            for expression in index.expressions:
                if isinstance(expression, sa.UnaryExpression):  # column.desc()
                    column = expression.element
                    assert isinstance(column, sa.Column)
                    descending.add(column.name)
                else:
                    assert isinstance(expression, sa.Column), expression
                    column = expression
                columns.append(column.name)
            # MySQL has no partial indexes (no "where" option): its indexes cover every row.
            partial = index.dialect_options[dialect.name].get("where") is not None
            if index.name == "aioasync_tasks_unique_idx" and dialect.name in MYSQL:
                # No partial index there: the generated live_key stands in for its predicate.
                columns = [MYSQL_LIVE_KEY if c == "unique_key" else c for c in columns]
            if index.name in MYSQL_STATE_LED and dialect.name in MYSQL:
                columns = ["state", *columns]  # the partial index's state, leading instead
            indexes[index.name] = (columns, sorted(descending), partial, bool(index.unique))
        shape[table.name] = {
            "columns": {
                c.name: (_affinity(c.type, dialect), bool(c.nullable)) for c in table.columns
            },
            "primary_key": [c.name for c in table.primary_key.columns],
            "indexes": indexes,
            "checks": sorted(
                str(c.name) for c in table.constraints if isinstance(c, sa.CheckConstraint)
            ),
        }
    if dialect.name in MYSQL:
        shape["aioasync_tasks"]["columns"][MYSQL_LIVE_KEY] = ("text", True)
    return shape


def _reflected(sync: Connection, schema: str | None) -> dict[str, Any]:
    """The same shape, read from the database by SQLAlchemy's inspector."""
    inspector = sa.inspect(sync)
    dialect = sync.dialect
    shape: dict[str, Any] = {}
    for name in inspector.get_table_names(schema=schema):
        indexes = {}
        for index in inspector.get_indexes(name, schema=schema):
            columns = [str(c) for c in index["column_names"]]
            if dialect.name == "sqlite":  # the inspector does not report DESC there
                info = sync.exec_driver_sql(f'PRAGMA index_xinfo("{index["name"]}")')
                descending = sorted(row[2] for row in info if row[5] and row[3])
            elif dialect.name in ("mysql", "mariadb"):  # nor there: SHOW INDEX has it
                shown = sync.exec_driver_sql(f"SHOW INDEX FROM {name}").mappings()
                descending = sorted(
                    r["Column_name"]
                    for r in shown
                    if r["Key_name"] == index["name"] and r["Collation"] == "D"
                )
            else:
                sorting = index.get("column_sorting", {})
                descending = sorted(c for c, how in sorting.items() if "desc" in how)
            options = index.get("dialect_options", {})
            partial = options.get(f"{dialect.name}_where") is not None
            indexes[index["name"]] = (columns, descending, partial, bool(index["unique"]))
        shape[name] = {
            "columns": {
                c["name"]: (_affinity(c["type"], dialect), bool(c["nullable"]))
                for c in inspector.get_columns(name, schema=schema)
            },
            "primary_key": inspector.get_pk_constraint(name, schema=schema)["constrained_columns"],
            "indexes": indexes,
            "checks": sorted(
                str(c["name"]) for c in inspector.get_check_constraints(name, schema=schema)
            ),
        }
    return shape


async def _shape(db: DbTarget) -> dict[str, Any]:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_reflected, db.schema)
    finally:
        await engine.dispose()


async def _versions(db: DbTarget) -> list[int]:
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sa.text(f"SELECT version FROM {VERSIONS} ORDER BY version"))
            return [int(v) for v in result.scalars()]
    finally:
        await engine.dispose()


async def test_migrating_an_empty_database_yields_the_metadata(db: DbTarget) -> None:
    assert await _shape(db) == {}
    node = make_node(db, concurrency=0)
    try:
        assert await node.migrate() == db.shipped_versions
        dialect = node.engine.dialect
    finally:
        await node.stop()
    shape = await _shape(db)
    declared = _declared(dialect)
    assert sorted(shape) == sorted(declared)
    for table in declared:
        for part in ("columns", "primary_key", "indexes", "checks"):
            assert shape[table][part] == declared[table][part], (table, part)
    assert shape == declared
    assert set(metadata.tables) == {
        "aioasync_tasks",
        "aioasync_nodes",
        "aioasync_groups",
        "aioasync_task_types",
        "aioasync_schedules",
        VERSIONS,
    }
    assert aioasync_tasks.metadata is metadata
    assert await _versions(db) == db.shipped_versions


async def test_migrate_is_idempotent(db: DbTarget) -> None:
    node = make_node(db, concurrency=0)
    try:
        assert await node.migrate() == db.shipped_versions
        shape = await _shape(db)
        assert await node.migrate() == []
        assert await node.migrate() == []
    finally:
        await node.stop()
    async with make_node(db, concurrency=0) as started:  # auto_migrate on a current schema
        assert await started.count_tasks() == 0
    assert await _shape(db) == shape
    assert await _versions(db) == db.shipped_versions


async def test_concurrent_migrations_from_two_nodes_are_safe(db: DbTarget) -> None:
    first, second = make_node(db, concurrency=0), make_node(db, concurrency=0)
    try:
        applied = await asyncio.gather(first.migrate(), second.migrate())
    finally:
        await first.stop()
        await second.stop()
    assert sorted(applied) == [[], db.shipped_versions]  # one of them did it all, the other nothing
    assert await _versions(db) == db.shipped_versions


async def test_concurrent_starts_with_auto_migrate_are_safe(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("noop")
    async def _noop(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    nodes = [make_node(db, registry, concurrency=1), make_node(db, registry, concurrency=0)]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        task_id = await nodes[1].create_task("noop")

        async def finished() -> bool:
            return (await nodes[1].get_task(task_id)).state is State.FINISHED

        await wait_for(finished, timeout=LONG_BOUND, what="the task to run")
    finally:
        for node in nodes:
            await node.stop()
    assert await _versions(db) == db.shipped_versions


async def test_start_without_auto_migrate_on_an_empty_database_fails(db: DbTarget) -> None:
    node = make_node(db, concurrency=0, auto_migrate=False)
    try:
        with pytest.raises(SchemaError, match="missing"):
            await node.start()
        assert not node.running
    finally:
        await node.stop()
    worker = make_node(db, concurrency=2, auto_migrate=False)
    try:
        with pytest.raises(SchemaError):
            await worker.start()
    finally:
        await worker.stop()
    assert await _shape(db) == {}  # nothing was created


async def test_start_without_auto_migrate_on_a_migrated_database(db: DbTarget) -> None:
    migrator = make_node(db, concurrency=0)
    try:
        await migrator.migrate()
    finally:
        await migrator.stop()
    async with make_node(db, concurrency=1, auto_migrate=False) as node:
        assert node.running
        assert len(await node.get_nodes()) == 1


async def _insert_version(db: DbTarget, version: int) -> None:
    versions = metadata.tables[VERSIONS]
    engine = raw_engine(db)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                versions.insert().values(version=version, applied_at=datetime.now(UTC))
            )
    finally:
        await engine.dispose()


@pytest.mark.parametrize("auto_migrate", [True, False])
async def test_a_schema_newer_than_the_library_is_refused(db: DbTarget, auto_migrate: bool) -> None:
    migrator = make_node(db, concurrency=0)
    try:
        await migrator.migrate()
    finally:
        await migrator.stop()
    await _insert_version(db, SCHEMA_VERSION + 1)
    shape = await _shape(db)

    for concurrency in (0, 2):
        node = make_node(db, concurrency=concurrency, auto_migrate=auto_migrate)
        try:
            with pytest.raises(SchemaError, match="newer"):
                await node.start()
            assert not node.running
            with pytest.raises(SchemaError, match="newer"):
                await node.migrate()
        finally:
            await node.stop()

    assert await _shape(db) == shape  # nothing changed
    assert await _versions(db) == [*db.shipped_versions, SCHEMA_VERSION + 1]
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            nodes = await conn.execute(sa.text("SELECT count(*) FROM aioasync_nodes"))
            assert nodes.scalar_one() == 0  # no node registered itself
    finally:
        await engine.dispose()


async def test_version_3_upgrades_a_version_2_database_with_its_rows(db: DbTarget) -> None:
    """Version 3 adds nullable columns, an index, the task types table, and drops the group
    rows that hold nothing but the defaults (a group row now exists only for settings)."""
    engine = raw_engine(db)
    dialect = db.dialect
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            for version, sql in migration_files(dialect)[:2]:
                for statement in split_sql(sql):
                    await conn.exec_driver_sql(statement)
                await conn.execute(
                    metadata.tables[VERSIONS].insert().values(version=version, applied_at=now)
                )
            groups = metadata.tables["aioasync_groups"]
            await conn.execute(
                groups.insert(),
                [
                    {"name": name, "paused": paused, "max_running": limit, "updated_at": now}
                    for name, paused, limit in [
                        ("plain", False, None),
                        ("paused", True, None),
                        ("limited", False, 2),
                    ]
                ],
            )
            tasks = metadata.tables["aioasync_tasks"]
            values = {
                "type": "job",
                "user_name": "",
                "group_name": "plain",
                "state": "pending",
                "context": "{}",
                "priority": 0,
                "attempts": 0,
                "max_attempts": 1,
                "has_cleanup": False,
                "handoff": False,
                "created_at": now,
                "updated_at": now,
                "run_at": now,
            }
            await conn.execute(tasks.insert().values(values))
    finally:
        await engine.dispose()

    async with make_node(db, concurrency=0) as node:
        assert await _versions(db) == db.shipped_versions
        (task,) = await node.get_tasks()
        assert (task.unique_key, task.progress, task.message) == (None, None, None)
        groups_left = {g.name: g for g in await node.get_groups()}
    assert sorted(groups_left) == ["limited", "paused", "plain"]  # "plain" by its task
    assert (groups_left["plain"].paused, groups_left["plain"].max_running) == (False, None)
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT name FROM aioasync_groups ORDER BY name"))
            assert [r[0] for r in rows] == ["limited", "paused"]
    finally:
        await engine.dispose()


# -- PostgreSQL schemas -----------------------------------------------------------------------


@pytest.mark.postgres_only
async def test_two_schemas_are_two_independent_systems(
    pg_db: DbTarget, other_pg_db: DbTarget
) -> None:
    registry = TaskRegistry()

    @registry.task("job")
    async def _job(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context=context + " done")

    async with (
        make_node(pg_db, registry, concurrency=0) as one,
        make_node(other_pg_db, registry, concurrency=0) as other,
    ):
        ours = [await one.create_task("job", f"one-{i}", group="shared") for i in range(3)]
        theirs = await other.create_task("job", "other-0", group="shared")
        assert await one.count_tasks() == 3
        assert await other.count_tasks() == 1
        # Each schema numbers its own tasks: the same id names different tasks, or none.
        assert (await other.get_task(theirs)).context == "other-0"
        assert (await one.get_task(ours[0])).context == "one-0"
        with pytest.raises(TaskNotFound):
            await other.get_task(max(ours))
        await one.pause_group("shared")
        assert [g.paused for g in await one.get_groups() if g.name == "shared"] == [True]
        assert [g.paused for g in await other.get_groups() if g.name == "shared"] == [False]

        # A worker of the other system runs its task, and never ours.
        async with make_node(other_pg_db, registry, concurrency=5) as worker:

            async def finished() -> bool:
                return (await other.get_task(theirs)).state is State.FINISHED

            await wait_for(finished, timeout=LONG_BOUND, what="the other system's task to run")
            assert [n.id for n in await other.get_nodes()] == [worker.id]
            assert await one.get_nodes() == []
            assert {t.state for t in await one.get_tasks()} == {State.PENDING}
            assert [t.attempts for t in await one.get_tasks()] == [0, 0, 0]
