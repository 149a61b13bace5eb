"""The database drivers: one folder per database (its driver, ``queries.sql`` and
``migrations/``), all implementing the protocol of ``_driver``."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from .._errors import ConfigurationError
from .._schema import MYSQL
from ._sqldriver import SqlDriver
from .mysql import MysqlDriver
from .postgresql import PostgresDriver
from .sqlite import SqliteDriver


def driver_for(engine: AsyncEngine, schema: str | None) -> SqlDriver:
    """The driver for ``engine``'s database."""
    name = engine.dialect.name
    if name == "postgresql":
        if engine.dialect.driver != "asyncpg":
            raise ConfigurationError("PostgreSQL needs the asyncpg driver: postgresql+asyncpg://")
        return PostgresDriver(engine, schema)
    if name == "sqlite":
        if schema is not None:
            raise ConfigurationError("schema= is for PostgreSQL; use another SQLite file instead")
        return SqliteDriver(engine)
    if name in MYSQL:
        if engine.dialect.driver != "aiomysql":
            raise ConfigurationError(
                "MySQL and MariaDB need the aiomysql driver: mysql+aiomysql://"
            )
        if schema is not None:
            raise ConfigurationError("schema= is for PostgreSQL; name another MySQL database")
        return MysqlDriver(engine)
    raise ConfigurationError(
        f"unsupported database {name!r}: use PostgreSQL, SQLite, MySQL or MariaDB"
    )


__all__ = ["MysqlDriver", "PostgresDriver", "SqlDriver", "SqliteDriver", "driver_for"]
