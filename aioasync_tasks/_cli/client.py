"""The global options (``Settings``) and the one way a command reaches the database:
``with_client`` runs an action on a client-only node and stops it — never creating a SQLite
file that is not there (only ``migrate`` and ``worker`` create one)."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
import sqlalchemy as sa
from sqlalchemy import make_url

from .._errors import ConfigurationError, DatabaseError, SchemaError
from .._node import Node
from .._registry import TaskRegistry

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

    @property
    def sqlite_file(self) -> Path | None:
        """The absolute path of a SQLite database's file; None for another database."""
        try:
            url = make_url(self.db)
        except sa.exc.ArgumentError:
            return None  # the node reports the bad URL
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return Path(url.database).resolve()

    def require_existing(self) -> None:
        """Refuse a SQLite database whose file is missing, naming it (connecting would create
        an empty file, and the command would find nothing in it)."""
        path = self.sqlite_file
        if path is not None and not path.exists():
            raise SchemaError(
                f"no database at {path} ({self.where}): create it with `aioasync-tasks "
                "migrate`, or name another with --db or AIOASYNC_TASKS_DB"
            )


async def reach(settings: Settings, first_call: Awaitable[_T]) -> _T:
    """Await a node's first call to the database; if it fails, the error names the database."""
    try:
        return await first_call
    except DatabaseError as exc:
        raise DatabaseError(f"cannot use the database {settings.where}: {exc}") from exc
    except SchemaError as exc:
        raise SchemaError(f"database {settings.where}: {exc}") from exc


def with_client(
    settings: Settings,
    action: Callable[[Node], Awaitable[_T]],
    *,
    start: bool = True,
    registry: TaskRegistry | None = None,
) -> _T:
    """Run ``action`` with a client-only node (``concurrency=0``, with ``registry`` if given)
    and stop the node; returns what ``action`` returned. The node never migrates
    (``aioasync-tasks migrate`` does), and a missing SQLite file is an error, not created;
    ``start=False`` leaves it unstarted, for ``migrate`` itself."""
    if start:
        settings.require_existing()

    async def run() -> _T:
        node = Node(
            settings.db,
            registry=registry,
            schema=settings.schema,
            concurrency=0,
            auto_migrate=False,
        )
        try:
            if start:
                await reach(settings, node.start())
            return await action(node)
        finally:
            await node.stop()

    return asyncio.run(run())


def load_registry(spec: str) -> TaskRegistry:
    """The ``TaskRegistry`` that ``module:attribute`` names (``worker``, ``tasks create``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"{spec!r} is not module:attribute, e.g. myapp.tasks:registry",
            param_hint="'MODULE:REGISTRY'",
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the working directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a missing import inside the module: its traceback helps
        raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(target, TaskRegistry):
        raise ConfigurationError(f"{spec} is a {type(target).__name__}, not a TaskRegistry")
    if not len(target):
        raise ConfigurationError(f"{spec} has no task types registered")
    return target
