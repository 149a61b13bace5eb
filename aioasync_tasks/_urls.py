"""Database URLs: from the URL a user gives to an engine."""

from __future__ import annotations

from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._errors import ConfigurationError


def engine_from_url(url: str) -> AsyncEngine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL: {url!r}") from exc
    drivers = {
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
    }
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    if parsed.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: use postgresql+asyncpg:// "
            "or sqlite+aiosqlite:///path"
        )
    if parsed.drivername == "sqlite+aiosqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "SQLite needs a file (sqlite+aiosqlite:///path/to/tasks.db): an in-memory database "
            "cannot be shared between connections or nodes"
        )
    return create_async_engine(parsed)
