"""``dashboard``: serve the web dashboard (``aioasync_tasks.dashboard``) with uvicorn, on
127.0.0.1 unless told otherwise. Read-only unless ``--actions``; actions on an address other
than the local host need a user and password (HTTP basic authentication)."""

from __future__ import annotations

import asyncio
import ipaddress

import click

from .._node import Node
from .client import Settings, reach

LOCAL_NAMES = {"localhost", "ip6-localhost"}


def is_local(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (a loopback address)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--actions",
    is_flag=True,
    help="Allow pausing, resuming, moving and deleting tasks and changing groups "
    "(read-only without it).",
)
@click.option(
    "--user",
    envvar="AIOASYNC_TASKS_DASHBOARD_USER",
    default=None,
    help="Require HTTP basic authentication with this user; env AIOASYNC_TASKS_DASHBOARD_USER.",
)
@click.option(
    "--password",
    envvar="AIOASYNC_TASKS_DASHBOARD_PASSWORD",
    default=None,
    help="The password of --user; better given in env AIOASYNC_TASKS_DASHBOARD_PASSWORD "
    "(a command line is visible to other users of the machine).",
)
@click.option("--title", default="aioasync_tasks", show_default=True, help="The pages' title.")
@click.pass_obj
def dashboard(  # noqa: PLR0917 - click passes each option as an argument
    settings: Settings,
    host: str,
    port: int,
    actions: bool,
    user: str | None,
    password: str | None,
    title: str,
) -> None:
    """Serve the web dashboard: counts by group and state, live nodes, groups, every task with
    its live progress, and Prometheus metrics at /metrics. Runs until SIGINT/SIGTERM.

    Needs the dashboard extra: pip install 'aioasync-tasks[dashboard]'.
    """
    if (user is None) != (password is None):
        raise click.UsageError("--user and --password go together")
    if actions and not is_local(host) and user is None:
        raise click.UsageError(
            f"--actions on {host}, which other machines can reach, needs --user and --password "
            "(or AIOASYNC_TASKS_DASHBOARD_USER and AIOASYNC_TASKS_DASHBOARD_PASSWORD)"
        )
    try:
        import uvicorn  # noqa: PLC0415 - an optional extra, imported when the command runs

        from ..dashboard import create_app  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"the dashboard needs the 'dashboard' extra ({exc.name} is missing): "
            "pip install 'aioasync-tasks[dashboard]'"
        ) from None
    settings.require_existing()
    auth = None if user is None or password is None else (user, password)

    async def serve() -> None:
        node = Node(settings.db, schema=settings.schema, concurrency=0, auto_migrate=False)
        try:
            await reach(settings, node.start())
            app = create_app(node, actions=actions, auth=auth, title=title)
            config = uvicorn.Config(
                app, host=host, port=port, log_level="info", timeout_graceful_shutdown=2
            )
            mode = "actions enabled" if actions else "read-only"
            login = ", basic authentication" if auth else ""
            click.echo(f"dashboard of {settings.where} ({mode}{login})", err=True)
            await uvicorn.Server(config).serve()
        finally:
            await node.stop()

    asyncio.run(serve())
