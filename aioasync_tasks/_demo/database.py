"""The demo's database: where it is, and emptying it — only if it holds nothing but an earlier
demo's tasks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from .._schema import TASKS, metadata
from .._urls import engine_from_url
from ..samples import registry
from .errors import DemoFailed

DEMO_DB = "sqlite+aiosqlite:///aioasync_tasks_demo.db"
DEMO_SCHEMA = "aioasync_tasks_demo"
_OUR_TABLES = frozenset(metadata.tables)
"""Every table of the library's schema."""


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL; None for a server's database."""
    parsed = make_url(url)
    return parsed.database if parsed.get_backend_name() == "sqlite" else None


def describe(url: str, schema: str | None) -> str:
    """Where the demo runs, for its first line."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return "SQLite"
    if schema is not None:
        return f"PostgreSQL, schema {schema!r}"
    return f"MySQL/MariaDB, database {parsed.database!r}"


def demo_database(url: str | None, schema: str | None) -> tuple[str, str | None]:
    """The demo's URL (an absolute SQLite path, so that workers find the same file) and
    schema (PostgreSQL only, default ``aioasync_tasks_demo``; on MySQL and MariaDB the URL's
    database holds the tables)."""
    parsed = make_url(url or DEMO_DB)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        if schema is not None:
            raise DemoFailed("--schema is for PostgreSQL; give MySQL another database instead")
        if not parsed.database:
            raise DemoFailed("the demo needs a database in the URL: mysql://user@host/dbname")
        return parsed.render_as_string(hide_password=False), None
    if parsed.get_backend_name() == "sqlite":
        if schema is not None:
            raise DemoFailed("--schema is for PostgreSQL; give SQLite another file instead")
        if not parsed.database or parsed.database == ":memory:":
            raise DemoFailed("the demo needs a SQLite file: sqlite+aiosqlite:///path/demo.db")
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
        return parsed.render_as_string(hide_password=False), None
    return parsed.render_as_string(hide_password=False), schema or DEMO_SCHEMA


async def reset(url: str, schema: str | None) -> None:
    """Empty the demo database — but only if it holds nothing but an earlier demo's tasks."""
    engine: AsyncEngine = engine_from_url(url)
    where = f"schema {schema!r}" if schema else "this database"
    try:
        async with engine.connect() as conn:

            def tables(sync: sa.Connection) -> list[str]:
                return sa.inspect(sync).get_table_names(schema=schema)

            names = set(await conn.run_sync(tables))
            foreign = names - _OUR_TABLES
            if foreign and schema is None:
                raise DemoFailed(
                    f"{where} has other tables ({', '.join(sorted(foreign))}); the demo wipes "
                    "its database: give it another --db"
                )
            prefix = engine.dialect.identifier_preparer.quote_schema(schema) + "." if schema else ""

            def qualify(table: str) -> str:
                return prefix + table

            if TASKS in names:
                others = await conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM {qualify(TASKS)} WHERE type NOT IN :types"
                    ).bindparams(sa.bindparam("types", registry.names, expanding=True))
                )
                if others:
                    raise DemoFailed(
                        f"{where} holds tasks that are not the demo's; the demo wipes its "
                        "database: give it another --db or --schema"
                    )
            if sqlite_file(url) is None:  # a server's schema or database: drop our tables
                for table in sorted(names & _OUR_TABLES):
                    await conn.execute(sa.text(f"DROP TABLE {qualify(table)} CASCADE"))
                await conn.commit()
    except sa.exc.DBAPIError as exc:
        raise DemoFailed(f"cannot use the demo database: {str(exc.orig).strip()}") from exc
    except OSError as exc:
        raise DemoFailed(f"cannot reach the demo database: {exc}") from exc
    finally:
        await engine.dispose()
    database = sqlite_file(url)
    if database is not None:
        await asyncio.to_thread(_remove_sqlite_files, database)


def _remove_sqlite_files(database: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(database + suffix).unlink(missing_ok=True)
