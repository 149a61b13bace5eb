"""``demo``: the main job of the README (see ``aioasync_tasks._demo``)."""

from __future__ import annotations

import asyncio

import click

from .._demo import run_demo
from .._demo.database import DEMO_DB, DEMO_SCHEMA
from .client import Settings


@click.command()
@click.option(
    "--db",
    "demo_db",
    default=None,
    metavar="URL",
    help="The demo's database, wiped at start [default: the global --db when given on the "
    f"command line, else {DEMO_DB}].",
)
@click.option(
    "--schema",
    "demo_schema",
    default=None,
    metavar="NAME",
    help=f"PostgreSQL schema of the demo [default: {DEMO_SCHEMA}].",
)
@click.option("--workers", type=click.IntRange(2, 8), default=2, show_default=True)
@click.pass_obj
def demo(settings: Settings, demo_db: str | None, demo_schema: str | None, workers: int) -> None:
    """The main job: dot products and matrix multiplies for two users on worker processes,
    with live progress, pause/resume, a move to another group and a hand-off between workers.

    It never uses AIOASYNC_TASKS_DB, and refuses a database holding other tasks than its own.
    """
    url = demo_db or (settings.db if settings.db_given else None)
    schema = demo_schema or (settings.schema if settings.schema_given else None)
    asyncio.run(run_demo(url, schema, workers=workers, echo=click.echo))
