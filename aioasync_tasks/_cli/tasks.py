"""``tasks``: list, show and control tasks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import click

from .._errors import TaskNotFound
from .._models import State, Task
from .._node import MAX_PAGE_SIZE, Node
from .client import Settings, with_client
from .output import (
    emit,
    fields,
    json_option,
    local_time,
    percent,
    shorten,
    table,
    task_state,
    text,
)


@click.group()
def tasks() -> None:
    """List, show and control tasks."""


def _positive_id(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"{value} is not a task id (ids start at 1)")
    return value


_TASK_ID = click.argument("task_id", metavar="ID", type=int, callback=_positive_id)
_HEADERS = [
    "ID",
    "TYPE",
    "USER",
    "GROUP",
    "STATE",
    "PROGRESS",
    "ATTEMPTS",
    "NODE",
    "UPDATED",
    "CONTEXT",
]


def _row(task: Task) -> list[str]:
    return [
        str(task.id),
        task.type,
        task.user or "-",
        task.group,
        task_state(task),
        percent(task.progress),
        f"{task.attempts}/{task.max_attempts}",
        text(task.node),
        local_time(task.updated_at),
        shorten(task.context, 40),
    ]


def _page_text(page: list[Task], total: int, offset: int) -> str:
    if not page:
        return "no tasks" if not total else f"no tasks at offset {offset} (of {total})"
    lines = [table(_HEADERS, [_row(t) for t in page])]
    end = offset + len(page)
    if total > len(page):
        more = f"; page on with --offset {end}" if end < total else ""
        lines.append(f"tasks {offset + 1} to {end} of {total}{more}")
    return "\n".join(lines)


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
@json_option
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
    as_json: bool,
) -> None:
    """List tasks, newest first.

    With --json: {"tasks": [...], "total": N, "offset": O, "limit": L}, where total counts
    every task that matches the filters.
    """
    filters: dict[str, Any] = {
        "user": user,
        "group": group,
        "types": list(types) or None,
        "states": [s.lower() for s in states] or None,
    }

    async def fetch(node: Node) -> tuple[list[Task], int]:
        page = await node.get_tasks(**filters, offset=offset, limit=limit)
        return page, await node.count_tasks(**filters)

    page, total = with_client(settings, fetch)
    document = {
        "tasks": [fields(t) for t in page],
        "total": total,
        "offset": offset,
        "limit": limit,
    }
    emit(as_json, document, _page_text(page, total, offset))


@tasks.command("show")
@_TASK_ID
@json_option
@click.pass_obj
def show_task(settings: Settings, task_id: int, as_json: bool) -> None:
    """Show every field of one task (with --json: the task as one object)."""
    task = fields(with_client(settings, lambda node: node.get_task(task_id)))
    width = max(len(name) for name in task) + 1
    lines = []
    for name, value in task.items():
        shown = percent(value) if name == "progress" else text(value)
        first, *rest = shown.splitlines() or [""]
        lines.append(f"{name + ':':<{width}} {first}".rstrip())
        lines.extend(f"{'':<{width}} {line}".rstrip() for line in rest)
    emit(as_json, task, "\n".join(lines))


def _operate(
    settings: Settings, task_id: int, operation: Callable[[Node], Awaitable[None]]
) -> None:
    """Apply ``operation`` to the task, then print what became of it."""

    async def apply(node: Node) -> str:
        await operation(node)
        try:
            task = await node.get_task(task_id)
        except TaskNotFound:
            return f"task {task_id}: deleted"
        return f"task {task_id}: {task_state(task)}, group {task.group}"

    click.echo(with_client(settings, apply))


@tasks.command("run")
@_TASK_ID
@click.pass_obj
def run_task(settings: Settings, task_id: int) -> None:
    """Queue an INIT, PAUSED or FAILED task (FAILED: a fresh series of attempts)."""
    _operate(settings, task_id, lambda node: node.run_task(task_id))


@tasks.command("pause")
@_TASK_ID
@click.pass_obj
def pause_task(settings: Settings, task_id: int) -> None:
    """Pause a task; a running one stops at its next checkpoint."""
    _operate(settings, task_id, lambda node: node.pause_task(task_id))


@tasks.command("delete")
@_TASK_ID
@click.option("--force", is_flag=True, help="Remove the row at once, without the cleanup handler.")
@click.pass_obj
def delete_task(settings: Settings, task_id: int, force: bool) -> None:
    """Delete a task (through its cleanup handler, if its type has one)."""
    _operate(settings, task_id, lambda node: node.delete_task(task_id, force=force))


@tasks.command("move")
@_TASK_ID
@click.argument("group")
@click.pass_obj
def move_task(settings: Settings, task_id: int, group: str) -> None:
    """Move a task to another GROUP (queue)."""
    _operate(settings, task_id, lambda node: node.change_task_group(task_id, group))
