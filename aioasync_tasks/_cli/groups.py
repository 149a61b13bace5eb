"""``groups``: list groups (queues) with their settings; pause, resume or limit one."""

from __future__ import annotations

from typing import Any

import click

from .._models import State
from .._node import Node
from .client import Settings, with_client
from .output import emit, fields, json_option, table, text

_HEADERS = ["GROUP", "PAUSED", "MAX_RUNNING", "MAX_PER_USER", "PENDING", "RUNNING", "TASKS"]


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


async def _groups_with_counts(node: Node) -> list[dict[str, Any]]:
    """Every group's settings, with how many of its tasks are pending, running and in all."""
    found = []
    for group in await node.get_groups():
        found.append(
            {
                **fields(group),
                "pending": await node.count_tasks(group=group.name, states=[State.PENDING]),
                "running": await node.count_tasks(
                    group=group.name, states=[State.RUNNING, State.CANCELING]
                ),
                "tasks": await node.count_tasks(group=group.name),
            }
        )
    return found


def _groups_text(found: list[dict[str, Any]]) -> str:
    if not found:
        return "no groups"
    rows = [
        [
            g["name"],
            "yes" if g["paused"] else "no",
            text(g["max_running"]),
            text(g["max_running_per_user"]),
            str(g["pending"]),
            str(g["running"]),
            str(g["tasks"]),
        ]
        for g in found
    ]
    return table(_HEADERS, rows)


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def groups(ctx: click.Context, as_json: bool) -> None:
    """List groups (queues) with their settings; or pause, resume or limit one.

    With --json: {"groups": [{"name", "paused", "max_running", "max_running_per_user",
    "pending", "running", "tasks"}, ...]}.
    """
    if ctx.invoked_subcommand is not None:
        return
    found = with_client(ctx.obj, _groups_with_counts)
    emit(as_json, {"groups": found}, _groups_text(found))


async def _require(node: Node, name: str, create: bool) -> None:
    """Refuse a group that has neither tasks nor settings — a typo, most likely — unless
    ``--create`` asks for it."""
    if create or any(g.name == name for g in await node.get_groups()):
        return
    raise click.ClickException(
        f"group {name!r} has no tasks and no settings: check its name, or pass --create to "
        "create it"
    )


_CREATE = click.option(
    "--create", is_flag=True, help="Also for a group that has no tasks and no settings yet."
)


@groups.command("pause")
@click.argument("name")
@click.option("--stop-running", is_flag=True, help="Also pause the group's running tasks.")
@_CREATE
@click.pass_obj
def pause_group(settings: Settings, name: str, stop_running: bool, create: bool) -> None:
    """Claim nothing more from group NAME."""

    async def apply(node: Node) -> None:
        await _require(node, name, create)
        await node.pause_group(name, stop_running=stop_running)

    with_client(settings, apply)
    extra = ", its running tasks told to pause" if stop_running else ""
    click.echo(f"group {name}: paused{extra}")


@groups.command("resume")
@click.argument("name")
@_CREATE
@click.pass_obj
def resume_group(settings: Settings, name: str, create: bool) -> None:
    """Claim from group NAME again."""

    async def apply(node: Node) -> None:
        await _require(node, name, create)
        await node.resume_group(name)

    with_client(settings, apply)
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
@_CREATE
@json_option
@click.pass_obj
def group_limits(
    settings: Settings,
    name: str,
    *,
    max_running: int | None,
    max_running_per_user: int | None,
    create: bool,
    as_json: bool,
) -> None:
    """Show or set the cluster-wide limits of group NAME (an option left out is kept).

    With --json: {"name", "max_running", "max_running_per_user"}, null for no limit.
    """

    async def apply(node: Node) -> tuple[int | None, int | None]:
        await _require(node, name, create)
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

    total, per_user = with_client(settings, apply)
    emit(
        as_json,
        {"name": name, "max_running": total, "max_running_per_user": per_user},
        f"group {name}: max_running {total or 'none'}, max_running_per_user {per_user or 'none'}",
    )
