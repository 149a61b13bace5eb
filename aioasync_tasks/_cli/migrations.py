"""``migrate --sql``: the library's migrations as one SQL script, for an application's own
migration tool (Alembic, Flyway, sqitch, psql in a deploy step …).

The dialect is read from the URL, without connecting. Each migration is the shipped file as
it is, followed by the row that records its version, as ``Node.migrate()`` writes it: a node
checks that version at start, so a schema made by the script is one the library accepts. The
header says how to run it: in one transaction, except on MySQL, whose DDL commits as it goes.
"""

from __future__ import annotations

from .._backends._migrations import migration_files
from .._errors import ConfigurationError
from .._schema import MYSQL, VERSIONS
from .._urls import engine_from_url
from .._validation import check_schema

NOW = {
    "postgresql": "now()",
    "sqlite": "(julianday('now') - 2440587.5) * 86400.0",  # epoch seconds, as the library stores
    "mysql": "UTC_TIMESTAMP(6)",
    "mariadb": "UTC_TIMESTAMP(6)",
}
"""The database clock in each dialect, in the form the library stores its times."""


def dialect_of(url: str) -> str:
    """The SQL dialect of a database URL (checked as a node checks it), without connecting."""
    engine = engine_from_url(url)  # makes no connection
    try:
        return engine.dialect.name
    finally:
        engine.sync_engine.dispose()


def shipped_for(dialect: str) -> list[tuple[int, str]]:
    """The shipped migrations for an SQLAlchemy dialect name, as (version, SQL)."""
    return migration_files("mysql" if dialect == "mariadb" else dialect)


def newest_version(url: str) -> int:
    """The newest shipped version for the dialect of ``url`` (``SCHEMA_VERSION`` may be another
    database's)."""
    return shipped_for(dialect_of(url))[-1][0]


def migration_script(url: str, schema: str | None, *, since: int = 0) -> str:
    """The SQL of the migrations after version ``since`` for the dialect of ``url``, with the
    rows that record their versions; on PostgreSQL, in ``schema`` if given."""
    dialect = dialect_of(url)
    if schema is not None and dialect != "postgresql":
        raise ConfigurationError(
            "--schema is for PostgreSQL; SQLite keeps the tables in its file, MySQL in the "
            "URL's database"
        )
    shipped = shipped_for(dialect)
    newest = shipped[-1][0]
    migrations = [(v, sql) for v, sql in shipped if v > since]
    lines = [
        f"-- aioasync_tasks: the migrations after schema version {since} for {dialect}, "
        f"up to version {newest}",
        "-- (printed by `aioasync-tasks migrate --sql`).",
    ]
    if dialect in MYSQL:
        lines += [
            "-- MySQL commits at every DDL statement, so they cannot run in one transaction: run",
            "-- them in order; after a failure, the statements before it stay applied, so go on",
            "-- from the one that failed.",
        ]
    else:
        lines.append("-- Run them in one transaction.")
    lines.append("-- Nodes then find the schema up to date, and may start with auto_migrate=False.")
    if not migrations:
        lines.append(f"-- nothing to do: version {newest} is the newest")
    elif schema is not None:
        quoted = '"' + check_schema(schema) + '"'
        lines += [f"CREATE SCHEMA IF NOT EXISTS {quoted};", f"SET search_path TO {quoted};"]
    for version, sql in migrations:
        lines += [
            "",
            f"-- migration {version}",
            sql.strip(),
            f"INSERT INTO {VERSIONS} (version, applied_at) VALUES ({version}, {NOW[dialect]});",
        ]
    return "\n".join(lines) + "\n"
