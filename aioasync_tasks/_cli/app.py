"""The command group, its global options, and ``main``, the entry point.

Commands: ``worker`` runs a node until SIGINT/SIGTERM; ``migrate`` (``--sql`` prints it);
``tasks list|show|create|run|pause|delete|move``; ``groups`` (list, ``pause``, ``resume``,
``limits``); ``schedules list|remove``; ``nodes``; ``dashboard`` (the web dashboard, with the
``dashboard`` extra); ``demo``. Management commands use a client-only node
(``concurrency=0``), never migrate by themselves and never create a SQLite file; those that
list or show print JSON with ``--json``.

This is the only module that reads environment variables: ``AIOASYNC_TASKS_DB`` and
``AIOASYNC_TASKS_SCHEMA``, and the dashboard's ``AIOASYNC_TASKS_DASHBOARD_USER`` and
``AIOASYNC_TASKS_DASHBOARD_PASSWORD`` (as its options' click ``envvar``). Every library error
ends the command with one line on stderr and exit code 1; usage errors exit with 2; nothing
prints a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import click
import sqlalchemy as sa

from .._demo import DemoFailed
from .._errors import AsyncTasksError
from .client import DEFAULT_DB, Settings
from .dashboard import dashboard
from .demo import demo
from .groups import groups
from .nodes import nodes
from .schedules import schedules
from .tasks import tasks
from .worker import migrate, worker

PROG = "aioasync-tasks"


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
    """Durable, decentralised, stateful background tasks on PostgreSQL, SQLite, MySQL or MariaDB."""
    source = click.core.ParameterSource.COMMANDLINE
    ctx.obj = Settings(
        db=db,
        schema=schema or None,
        db_given=ctx.get_parameter_source("db") is source,
        schema_given=ctx.get_parameter_source("schema") is source,
    )


for _command in (worker, migrate, tasks, groups, schedules, nodes, dashboard, demo):
    cli.add_command(_command)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1 for errors, 2 for usage errors)."""
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
    except (AsyncTasksError, sa.exc.SQLAlchemyError, OSError) as exc:
        click.echo(f"{PROG}: error: {_one_line(exc)}", err=True)
        return 1
    return result if isinstance(result, int) else 0
