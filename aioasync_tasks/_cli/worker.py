"""``worker``, which runs a node until SIGINT or SIGTERM, and ``migrate``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from .._errors import NodeStopped
from .._node import Node
from .._registry import TaskRegistry
from .client import Settings, load_registry, reach, with_client
from .migrations import migration_script, newest_version

FORCE_STOP_TIMEOUT = 2.0
"""Seconds a worker's forced stop (second signal) gives its tasks before cancelling them."""

_log = logging.getLogger("aioasync_tasks.cli")
_SECONDS = click.FloatRange(min=0, min_open=True)


async def _work(settings: Settings, registry: TaskRegistry, options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    node = Node(settings.db, registry=registry, schema=settings.schema, **options)
    try:
        await reach(settings, node.start())
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


@click.command()
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
    task_registry = load_registry(registry)
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
    asyncio.run(_work(settings, task_registry, options))


@click.command()
@click.option(
    "--sql",
    "as_sql",
    is_flag=True,
    help="Print the SQL of the migrations, for your own migration tool, instead of applying "
    "them: for the dialect of --db, which is not connected to.",
)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="VERSION",
    help="With --sql: only the migrations after this schema version.",
)
@click.pass_obj
def migrate(settings: Settings, as_sql: bool, since: int) -> None:
    """Create or upgrade the tables (or, with --sql, print the SQL that does)."""
    if as_sql:
        click.echo(migration_script(settings.db, settings.schema, since=since), nl=False)
        return
    applied = with_client(settings, lambda node: reach(settings, node.migrate()), start=False)
    if applied:
        versions = ", ".join(str(v) for v in applied)
        click.echo(f"{settings.where}: applied migration {versions}; schema version {applied[-1]}")
    else:
        newest = newest_version(settings.db)
        click.echo(f"{settings.where}: schema version {newest} is up to date")
