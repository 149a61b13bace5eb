"""The global options (``Settings``) and the one way a command reaches the database:
``with_client`` runs an action on a client-only node and stops it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import make_url

from .._errors import DatabaseError
from .._node import Node

DEFAULT_DB = "sqlite+aiosqlite:///aioasync_tasks.db"
"""The embedded default: a SQLite file in the working directory."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Settings:
    """The global options."""

    db: str
    schema: str | None
    db_given: bool = False
    """``--db``/``--schema`` came from the command line (not the environment or default)."""
    schema_given: bool = False

    @property
    def where(self) -> str:
        """The database for messages, without its password."""
        try:
            shown = make_url(self.db).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            shown = self.db
        return f"{shown} (schema {self.schema})" if self.schema else shown


async def reach(settings: Settings, first_call: Awaitable[_T]) -> _T:
    """Await a node's first call to the database; if it fails, the error names the database."""
    try:
        return await first_call
    except DatabaseError as exc:
        raise DatabaseError(f"cannot use the database {settings.where}: {exc}") from exc


def with_client(
    settings: Settings, action: Callable[[Node], Awaitable[_T]], *, start: bool = True
) -> _T:
    """Run ``action`` with a client-only node (``concurrency=0``) and stop the node; returns
    what ``action`` returned. The node never migrates (``aioasync-tasks migrate`` does);
    ``start=False`` leaves it unstarted, for ``migrate`` itself."""

    async def run() -> _T:
        node = Node(settings.db, schema=settings.schema, concurrency=0, auto_migrate=False)
        try:
            if start:
                await reach(settings, node.start())
            return await action(node)
        finally:
            await node.stop()

    return asyncio.run(run())
