"""``schedules``: list the periodic tasks, remove one."""

from __future__ import annotations

import click

from .._models import Schedule
from .._node import Node
from .._periodic import Period
from .client import Settings, with_client
from .output import emit, fields, json_option, local_time, shorten, table, text

_HEADERS = ["NAME", "TYPE", "PERIOD", "NEXT TICK", "LAST TICK", "LAST TASK", "DECLARED", "CONTEXT"]


def _row(schedule: Schedule) -> list[str]:
    return [
        schedule.name,
        schedule.type,
        Period(schedule.cron, schedule.every, schedule.timezone).describe(),
        local_time(schedule.next_tick),
        local_time(schedule.last_tick),
        text(schedule.last_task),
        "yes" if schedule.declared else "no",
        shorten(schedule.context, 30) or "-",
    ]


@click.group()
def schedules() -> None:
    """List the periodic tasks, remove one."""


@schedules.command("list")
@json_option
@click.pass_obj
def list_schedules(settings: Settings, as_json: bool) -> None:
    """List the schedules by name, with their next and last ticks.

    With --json: {"schedules": [{"name", "type", "cron", "every", "timezone", "context", "user",
    "group", "priority", "max_attempts", "declared", "next_tick", "last_tick", "last_task",
    "created_at", "updated_at"}, ...]}.
    """
    found = with_client(settings, Node.get_schedules)
    text_form = table(_HEADERS, [_row(s) for s in found]) if found else "no schedules"
    emit(as_json, {"schedules": [fields(s) for s in found]}, text_form)


@schedules.command("remove")
@click.argument("name")
@click.pass_obj
def remove_schedule(settings: Settings, name: str) -> None:
    """Remove the schedule NAME (tasks it enqueued stay). A schedule declared with a task type
    comes back when a node with that type starts."""

    async def remove(node: Node) -> bool:
        return await node.unschedule(name)

    if not with_client(settings, remove):
        raise click.ClickException(f"no schedule named {name!r}")
    click.echo(f"schedule {name}: removed")
