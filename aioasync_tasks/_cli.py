"""The command line, ``aioasync-tasks`` (also ``python -m aioasync_tasks``), built on click.

Commands: ``worker`` runs a node until SIGINT/SIGTERM; ``migrate``; ``tasks list|show|run|
pause|delete|move``; ``groups`` (list, ``pause``, ``resume``, ``limits``); ``nodes``; ``demo``.
Management commands use a client-only node (``concurrency=0``) and never migrate by themselves.

This is the only module that reads environment variables: ``AIOASYNC_TASKS_DB`` and
``AIOASYNC_TASKS_SCHEMA``. Every library error ends the command with one line on stderr and
exit code 1; usage errors exit with 2; nothing prints a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import click
import sqlalchemy as sa
from sqlalchemy import make_url

from ._errors import (
    AsyncTasksError,
    ConfigurationError,
    DatabaseError,
    NodeStopped,
    TaskNotFound,
)
from ._models import State, Task
from ._node import MAX_PAGE_SIZE, Node
from ._registry import TaskRegistry
from ._schema import SCHEMA_VERSION

DEFAULT_DB = "sqlite+aiosqlite:///aioasync_tasks.db"
"""The embedded default: a SQLite file in the working directory."""
FORCE_STOP_TIMEOUT = 2.0
"""Seconds a worker's forced stop (second signal) gives its tasks before cancelling them."""
PROG = "aioasync-tasks"

_T = TypeVar("_T")
_log = logging.getLogger("aioasync_tasks.cli")


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
        return _describe_db(self.db, self.schema)


def _describe_db(url: str, schema: str | None) -> str:
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        shown = url
    return f"{shown} (schema {schema})" if schema else shown


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


@contextlib.asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[Node]:
    """A started client-only node; it does not migrate (``aioasync-tasks migrate`` does)."""
    node = Node(settings.db, schema=settings.schema, concurrency=0, auto_migrate=False)
    try:
        try:
            await node.start()
        except DatabaseError as exc:
            raise DatabaseError(f"cannot use the database {settings.where}: {exc}") from exc
        yield node
    finally:
        await node.stop()


# -- output ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text columns, left-aligned, two spaces apart."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    )


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _state(task: Task) -> str:
    if task.requested is not None:
        return f"{task.state.value} ({task.requested.value})"
    return task.state.value


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


# -- the command group ----------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="AIOASYNC_TASKS_DB",
    default=DEFAULT_DB,
    show_default=True,
    metavar="URL",
    help="Database URL: postgresql+asyncpg://… or sqlite+aiosqlite:///file; env AIOASYNC_TASKS_DB.",
)
@click.option(
    "--schema",
    envvar="AIOASYNC_TASKS_SCHEMA",
    default=None,
    metavar="NAME",
    help="PostgreSQL schema of the tables; env AIOASYNC_TASKS_SCHEMA.",
)
@click.version_option(package_name="aioasync-tasks", prog_name=PROG)
@click.pass_context
def cli(ctx: click.Context, db: str, schema: str | None) -> None:
    """Durable, decentralised, stateful background tasks on PostgreSQL or SQLite."""
    source = click.core.ParameterSource.COMMANDLINE
    ctx.obj = Settings(
        db=db,
        schema=schema or None,
        db_given=ctx.get_parameter_source("db") is source,
        schema_given=ctx.get_parameter_source("schema") is source,
    )


# -- worker ---------------------------------------------------------------------------------


def _load_registry(spec: str) -> TaskRegistry:
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


async def _work(settings: Settings, registry: TaskRegistry, options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    node = Node(settings.db, registry=registry, schema=settings.schema, **options)
    try:
        try:
            await node.start()
        except DatabaseError as exc:
            raise DatabaseError(f"cannot use the database {settings.where}: {exc}") from exc
        _log.info(
            "worker running as node %s on %s: types %s, concurrency %d; "
            "stop it with Ctrl-C or SIGTERM",
            node.id,
            settings.where,
            ", ".join(registry.names),
            node.concurrency,
        )
        signalled = asyncio.create_task(signals.get())
        ended = asyncio.create_task(node.wait_stopped())
        await asyncio.wait({signalled, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not signalled.done():
            signalled.cancel()
            # The node stopped on its own (a service it could not recover): exit non-zero, so
            # that a process manager restarts the worker.
            raise NodeStopped(f"the node stopped on its own: {node.failure}")
        ended.cancel()
        received = signalled.result()
        _log.info(
            "%s: stopping gracefully, handing running tasks back from their checkpoints "
            "(send it again to stop at once)",
            received.name,
        )
        stopping = asyncio.create_task(node.stop())
        again = asyncio.create_task(signals.get())
        await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
        if again.done():
            _log.warning(
                "%s again: stopping now; tasks still running are released at their last checkpoint",
                again.result().name,
            )
            await node.stop(timeout=FORCE_STOP_TIMEOUT)  # shortens the stop in progress
        else:
            again.cancel()
        await stopping
        _log.info("worker stopped")
    finally:
        await node.stop(timeout=FORCE_STOP_TIMEOUT)
        for signum in handled:
            loop.remove_signal_handler(signum)


_SECONDS = click.FloatRange(min=0, min_open=True)


@cli.command()
@click.argument("registry", metavar="MODULE:REGISTRY")
@click.option("--concurrency", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--name", default=None, help="Node name shown by `nodes` [default: host:pid].")
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Run only tasks of this group (repeatable) [default: every group].",
)
@click.option("--heartbeat-interval", type=_SECONDS, default=5.0, show_default=True)
@click.option("--node-timeout", type=_SECONDS, default=30.0, show_default=True)
@click.option("--poll-interval", type=_SECONDS, default=1.0, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.pass_obj
def worker(
    settings: Settings,
    *,
    registry: str,
    concurrency: int,
    name: str | None,
    groups: tuple[str, ...],
    heartbeat_interval: float,
    node_timeout: float,
    poll_interval: float,
    log_level: str,
) -> None:
    """Run the tasks of MODULE:REGISTRY (a TaskRegistry) until SIGINT or SIGTERM.

    The first signal stops gracefully: running tasks are asked to stop and handed back from
    their last checkpoint, for any node to resume. A second signal stops at once.
    """
    task_registry = _load_registry(registry)
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = {
        "concurrency": concurrency,
        "name": name,
        "groups": groups or None,
        "heartbeat_interval": heartbeat_interval,
        "node_timeout": node_timeout,
        "poll_interval": poll_interval,
    }
    _run(_work(settings, task_registry, options))


# -- migrate --------------------------------------------------------------------------------


@cli.command()
@click.pass_obj
def migrate(settings: Settings) -> None:
    """Create or upgrade the tables."""

    async def apply() -> list[int]:
        node = Node(settings.db, schema=settings.schema, concurrency=0, auto_migrate=False)
        try:
            return await node.migrate()
        except DatabaseError as exc:
            raise DatabaseError(f"cannot use the database {settings.where}: {exc}") from exc
        finally:
            await node.stop()

    applied = _run(apply())
    if applied:
        versions = ", ".join(str(v) for v in applied)
        click.echo(f"{settings.where}: applied migration {versions}; schema version {applied[-1]}")
    else:
        click.echo(f"{settings.where}: schema version {SCHEMA_VERSION} is up to date")


# -- tasks ----------------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """List, show and control tasks."""


def _positive_id(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"{value} is not a task id (ids start at 1)")
    return value


_TASK_ID = click.argument("task_id", metavar="ID", type=int, callback=_positive_id)


@tasks.command("list")
@click.option("--user", default=None, help="Only this user's tasks.")
@click.option("--group", default=None, help="Only tasks of this group.")
@click.option("--type", "types", multiple=True, help="Only tasks of this type (repeatable).")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in State], case_sensitive=False),
    help="Only tasks in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, MAX_PAGE_SIZE), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.pass_obj
def list_tasks(
    settings: Settings,
    *,
    user: str | None,
    group: str | None,
    types: tuple[str, ...],
    states: tuple[str, ...],
    limit: int,
    offset: int,
) -> None:
    """List tasks, newest first."""
    filters: dict[str, Any] = {
        "user": user,
        "group": group,
        "types": list(types) or None,
        "states": [s.lower() for s in states] or None,
    }

    async def fetch() -> tuple[list[Task], int]:
        async with _client(settings) as node:
            page = await node.get_tasks(**filters, offset=offset, limit=limit)
            return page, await node.count_tasks(**filters)

    page, total = _run(fetch())
    if not page:
        click.echo("no tasks" if not total else f"no tasks at offset {offset} (of {total})")
        return
    rows = [
        [
            str(t.id),
            t.type,
            t.user or "-",
            t.group,
            _state(t),
            f"{t.attempts}/{t.max_attempts}",
            _value(t.node),
            _time(t.updated_at),
            _short(t.context, 40),
        ]
        for t in page
    ]
    headers = ["ID", "TYPE", "USER", "GROUP", "STATE", "ATTEMPTS", "NODE", "UPDATED", "CONTEXT"]
    click.echo(table(headers, rows))
    if total > len(page):
        more = f"; page on with --offset {offset + len(page)}" if offset + len(page) < total else ""
        click.echo(f"tasks {offset + 1} to {offset + len(page)} of {total}{more}")


@tasks.command("show")
@_TASK_ID
@click.pass_obj
def show_task(settings: Settings, task_id: int) -> None:
    """Show every field of one task."""

    async def fetch() -> Task:
        async with _client(settings) as node:
            return await node.get_task(task_id)

    task = _run(fetch())
    names = [f.name for f in dataclasses.fields(Task)]
    width = max(len(n) for n in names) + 1
    for name in names:
        text = _value(getattr(task, name))
        first, *rest = text.splitlines() or [""]
        click.echo(f"{name + ':':<{width}} {first}".rstrip())
        for line in rest:
            click.echo(f"{'':<{width}} {line}".rstrip())


async def _describe_after(node: Node, task_id: int) -> str:
    try:
        task = await node.get_task(task_id)
    except TaskNotFound:
        return f"task {task_id}: deleted"
    return f"task {task_id}: {_state(task)}, group {task.group}"


def _operate(settings: Settings, task_id: int, operation: str, **arguments: Any) -> None:
    async def apply() -> str:
        async with _client(settings) as node:
            await getattr(node, operation)(task_id, **arguments)
            return await _describe_after(node, task_id)

    click.echo(_run(apply()))


@tasks.command("run")
@_TASK_ID
@click.pass_obj
def run_task(settings: Settings, task_id: int) -> None:
    """Queue an INIT, PAUSED or FAILED task (FAILED: a fresh series of attempts)."""
    _operate(settings, task_id, "run_task")


@tasks.command("pause")
@_TASK_ID
@click.pass_obj
def pause_task(settings: Settings, task_id: int) -> None:
    """Pause a task; a running one stops at its next checkpoint."""
    _operate(settings, task_id, "pause_task")


@tasks.command("delete")
@_TASK_ID
@click.option("--force", is_flag=True, help="Remove the row at once, without the cleanup handler.")
@click.pass_obj
def delete_task(settings: Settings, task_id: int, force: bool) -> None:
    """Delete a task (through its cleanup handler, if its type has one)."""
    _operate(settings, task_id, "delete_task", force=force)


@tasks.command("move")
@_TASK_ID
@click.argument("group")
@click.pass_obj
def move_task(settings: Settings, task_id: int, group: str) -> None:
    """Move a task to another GROUP (queue)."""
    _operate(settings, task_id, "change_task_group", group=group)


# -- groups ---------------------------------------------------------------------------------


def _parse_limit(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A positive limit, ``none`` (0 here: no limit), or None when the option is left out."""
    if value is None:
        return None
    if value.strip().lower() in ("none", "unlimited"):
        return 0
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(f"{value!r} is not a positive number or 'none'")
    return number


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


@cli.group(invoke_without_command=True)
@click.pass_context
def groups(ctx: click.Context) -> None:
    """List groups (queues) with their settings; or pause, resume or limit one."""
    if ctx.invoked_subcommand is not None:
        return
    settings: Settings = ctx.obj

    async def fetch() -> list[list[str]]:
        async with _client(settings) as node:
            rows = []
            for group in await node.get_groups():
                pending = await node.count_tasks(group=group.name, states=[State.PENDING])
                running = await node.count_tasks(
                    group=group.name, states=[State.RUNNING, State.CANCELING]
                )
                total = await node.count_tasks(group=group.name)
                rows.append(
                    [
                        group.name,
                        "yes" if group.paused else "no",
                        _limit(group.max_running),
                        _limit(group.max_running_per_user),
                        str(pending),
                        str(running),
                        str(total),
                    ]
                )
            return rows

    rows = _run(fetch())
    if not rows:
        click.echo("no groups")
        return
    headers = ["GROUP", "PAUSED", "MAX_RUNNING", "MAX_PER_USER", "PENDING", "RUNNING", "TASKS"]
    click.echo(table(headers, rows))


@groups.command("pause")
@click.argument("name")
@click.option("--stop-running", is_flag=True, help="Also pause the group's running tasks.")
@click.pass_obj
def pause_group(settings: Settings, name: str, stop_running: bool) -> None:
    """Claim nothing more from group NAME."""

    async def apply() -> None:
        async with _client(settings) as node:
            await node.pause_group(name, stop_running=stop_running)

    _run(apply())
    extra = ", its running tasks told to pause" if stop_running else ""
    click.echo(f"group {name}: paused{extra}")


@groups.command("resume")
@click.argument("name")
@click.pass_obj
def resume_group(settings: Settings, name: str) -> None:
    """Claim from group NAME again."""

    async def apply() -> None:
        async with _client(settings) as node:
            await node.resume_group(name)

    _run(apply())
    click.echo(f"group {name}: resumed")


@groups.command("limits")
@click.argument("name")
@click.option(
    "--max-running",
    metavar="N|none",
    callback=_parse_limit,
    help="Running at once on all nodes together; 'none' for no limit.",
)
@click.option(
    "--max-running-per-user",
    metavar="N|none",
    callback=_parse_limit,
    help="Running at once per user; 'none' for no limit.",
)
@click.pass_obj
def group_limits(
    settings: Settings, name: str, *, max_running: int | None, max_running_per_user: int | None
) -> None:
    """Show or set the cluster-wide limits of group NAME (an option left out is kept)."""

    async def apply() -> tuple[int | None, int | None]:
        async with _client(settings) as node:
            current = next((g for g in await node.get_groups() if g.name == name), None)
            total = current.max_running if current else None
            per_user = current.max_running_per_user if current else None
            if max_running is None and max_running_per_user is None:
                return total, per_user
            if max_running is not None:
                total = max_running or None
            if max_running_per_user is not None:
                per_user = max_running_per_user or None
            await node.set_group_limits(name, max_running=total, max_running_per_user=per_user)
            return total, per_user

    total, per_user = _run(apply())
    click.echo(
        f"group {name}: max_running {total or 'none'}, max_running_per_user {per_user or 'none'}"
    )


# -- nodes ----------------------------------------------------------------------------------


@cli.command()
@click.pass_obj
def nodes(settings: Settings) -> None:
    """List the live nodes (those not yet found dead)."""

    async def fetch() -> list[list[str]]:
        async with _client(settings) as node:
            return [
                [
                    str(n.id),
                    n.name,
                    str(n.concurrency),
                    ",".join(n.types),
                    _time(n.started_at),
                    _time(n.heartbeat_at),
                ]
                for n in await node.get_nodes()
            ]

    rows = _run(fetch())
    if not rows:
        click.echo("no live nodes")
        return
    click.echo(table(["ID", "NAME", "CONCURRENCY", "TYPES", "STARTED", "HEARTBEAT"], rows))


# -- demo -----------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--db",
    "demo_db",
    default=None,
    metavar="URL",
    help="The demo's database, wiped at start [default: the global --db when given on the "
    "command line, else sqlite+aiosqlite:///aioasync_tasks_demo.db].",
)
@click.option(
    "--schema",
    "demo_schema",
    default=None,
    metavar="NAME",
    help="PostgreSQL schema of the demo [default: aioasync_tasks_demo].",
)
@click.option("--workers", type=click.IntRange(2, 8), default=2, show_default=True)
@click.pass_obj
def demo(settings: Settings, demo_db: str | None, demo_schema: str | None, workers: int) -> None:
    """The main job: dot products and matrix multiplies for two users on worker processes,
    with live progress, pause/resume, a move to another group and a hand-off between workers.

    It never uses AIOASYNC_TASKS_DB, and refuses a database holding other tasks than its own.
    """
    from ._demo import run_demo  # noqa: PLC0415 - the demo's machinery only when it runs

    url = demo_db or (settings.db if settings.db_given else None)
    schema = demo_schema or (settings.schema if settings.schema_given else None)
    _run(run_demo(url, schema, workers=workers, echo=click.echo))


# -- entry point ----------------------------------------------------------------------------


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1 for errors, 2 for usage errors)."""
    from ._demo import DemoFailed  # noqa: PLC0415 - keeps `import _cli` free of the demo

    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"{PROG}: usage error: {_one_line(exc.format_message())}{hint}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"{PROG}: error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt, asyncio.CancelledError):
        click.echo(f"{PROG}: interrupted", err=True)
        return 130
    except DemoFailed as exc:
        click.echo(f"{PROG}: demo failed: {_one_line(exc)}", err=True)
        return 1
    except (AsyncTasksError, sa.exc.SQLAlchemyError) as exc:
        click.echo(f"{PROG}: error: {_one_line(exc)}", err=True)
        return 1
    except OSError as exc:
        click.echo(f"{PROG}: error: {_one_line(exc)}", err=True)
        return 1
    return result if isinstance(result, int) else 0
