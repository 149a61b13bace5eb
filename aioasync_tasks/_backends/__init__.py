"""Storage backends: one per SQL dialect, behind the shared ``Backend`` interface."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from .._errors import ConfigurationError
from ._base import Backend
from .postgres import PostgresBackend
from .sqlite import SqliteBackend


def backend_for(engine: AsyncEngine, schema: str | None) -> Backend:
    name = engine.dialect.name
    if name == "postgresql":
        if engine.dialect.driver != "asyncpg":
            raise ConfigurationError("PostgreSQL needs the asyncpg driver: postgresql+asyncpg://")
        return PostgresBackend(engine, schema)
    if name == "sqlite":
        if schema is not None:
            raise ConfigurationError("schema= is for PostgreSQL; use another SQLite file instead")
        return SqliteBackend(engine)
    raise ConfigurationError(f"unsupported database {name!r}: use PostgreSQL or SQLite")


__all__ = ["Backend", "PostgresBackend", "SqliteBackend", "backend_for"]
