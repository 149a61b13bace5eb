"""``tasks``: list, show, create and control tasks."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, cast

import click

from .._errors import ContextError, TaskNotFound
from .._models import State, Task
from .._node import MAX_PAGE_SIZE, Node, TaskOptions
from .._validation import OnConflict
from .client import Settings, load_registry, with_client
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
    """List, show, create and control tasks."""


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


def _filter_options(lead: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The filters of ``tasks list`` and of a bulk ``tasks delete``: --user, --group, --type and
    --state, each help text led by ``lead``."""
    options = [
        click.option("--user", default=None, help=f"{lead} this user's tasks."),
        click.option("--group", default=None, help=f"{lead} tasks of this group."),
        click.option(
            "--type", "types", multiple=True, help=f"{lead} tasks of this type (repeatable)."
        ),
        click.option(
            "--state",
            "states",
            multiple=True,
            type=click.Choice([s.value for s in State], case_sensitive=False),
            help=f"{lead} tasks in this state (repeatable).",
        ),
    ]

    def apply(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@tasks.command("list")
@_filter_options("Only")
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


def _optional_id(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    return None if value is None else _positive_id(ctx, param, value)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_age(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """An age in seconds from ``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""
    if value is None:
        return None
    spec = value.strip().lower().replace(" ", "")
    try:
        seconds = float(spec)
    except ValueError:
        parts = _AGE_PART.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise click.BadParameter(
                f"{value!r} is not an age: a number of seconds, or like 30m, 12h, 7d, 1d12h"
            ) from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise click.BadParameter(f"{value!r} is not a positive age")
    return seconds


@tasks.command("delete")
@click.argument("task_id", metavar="[ID]", type=int, required=False, callback=_optional_id)
@click.option("--force", is_flag=True, help="Remove the rows at once, without cleanup handlers.")
@_filter_options("In bulk:")
@click.option(
    "--older-than",
    metavar="AGE",
    callback=parse_age,
    help="In bulk: tasks not changed for AGE (90s, 30m, 12h, 7d, 2w, 1d12h).",
)
@click.option("--yes", "-y", is_flag=True, help="In bulk: delete without asking first.")
@click.pass_obj
def delete_task(
    settings: Settings,
    task_id: int | None,
    *,
    force: bool,
    states: tuple[str, ...],
    types: tuple[str, ...],
    group: str | None,
    user: str | None,
    older_than: float | None,
    yes: bool,
) -> None:
    """Delete task ID (through its cleanup handler, if its type has one), or, without an ID,
    every task that matches all the filters given (--state, --type, --group, --user,
    --older-than), after asking."""
    filters: dict[str, Any] = {
        "user": user,
        "group": group,
        "types": list(types) or None,
        "states": [s.lower() for s in states] or None,
        "older_than": older_than,
    }
    given = {name: value for name, value in filters.items() if value is not None}
    if task_id is not None:
        if given:
            raise click.UsageError("give a task ID or filters to delete in bulk, not both")
        _operate(settings, task_id, lambda node: node.delete_task(task_id, force=force))
        return
    if not given:
        raise click.UsageError(
            "give a task ID, or filters (--state, --type, --group, --user, --older-than) to "
            "delete in bulk"
        )
    if not yes:
        what = _describe_filters(given) + (", at once (--force)" if force else "")
        try:
            confirmed = click.confirm(f"Delete every task {what}?", default=False)
        except click.Abort:
            raise click.ClickException(
                "no answer: nothing deleted (pass --yes to delete without asking)"
            ) from None
        if not confirmed:
            click.echo("nothing deleted")
            return
    count = with_client(settings, lambda node: node.delete_tasks(**filters, force=force))
    click.echo(f"deleted {count} task{'' if count == 1 else 's'}")


def _describe_filters(given: dict[str, Any]) -> str:
    """``with state finished or failed, type report, not changed for 7d``."""
    parts = []
    for name in ("states", "types", "group", "user"):
        value = given.get(name)
        if isinstance(value, list):
            parts.append(f"{name.removesuffix('s')} {' or '.join(value)}")
        elif value is not None:
            parts.append(f"{name} {value}")
    if "older_than" in given:
        parts.append(f"not changed for {_age_text(given['older_than'])}")
    return "with " + ", ".join(parts)


def _age_text(seconds: float) -> str:
    """Seconds in the largest unit of ``parse_age`` that is at most them: ``7d``, ``90s``."""
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@tasks.command("move")
@_TASK_ID
@click.argument("group")
@click.pass_obj
def move_task(settings: Settings, task_id: int, group: str) -> None:
    """Move a task to another GROUP (queue)."""
    _operate(settings, task_id, lambda node: node.change_task_group(task_id, group))


def _parse_run_at(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """``+`` and an age of ``parse_age`` (``+90s``, ``+1d12h``) from now, or an ISO 8601 time
    (local time when it has no offset)."""
    if value is None:
        return None
    if value.strip().startswith("+"):
        seconds = parse_age(ctx, param, value.strip()[1:])
        assert seconds is not None
        return datetime.now().astimezone() + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither + and an age (+90s, +2h, +1d12h) nor an ISO 8601 time"
        ) from None
    return when if when.utcoffset() is not None else when.astimezone()


@tasks.command("create")
@click.argument("task_type", metavar="TYPE")
@click.argument("context", default="")
@click.option(
    "--registry",
    "registry_spec",
    metavar="MODULE:REGISTRY",
    help="The TaskRegistry that defines TYPE, to check a typed CONTEXT before writing "
    "[default: none: the options the workers stored for TYPE].",
)
@click.option("--user", default="", help="The task's user [default: none].")
@click.option("--group", default="default", show_default=True, help="The task's group (queue).")
@click.option(
    "--run-at",
    callback=_parse_run_at,
    metavar="TIME",
    help="When it is due: + and an age from now (+90s, +2h, +1d12h), or an ISO 8601 time "
    "(local unless it has an offset) [default: now].",
)
@click.option("--unique-key", help="At most one live task of TYPE holds this key.")
@click.option(
    "--on-conflict",
    type=click.Choice(["error", "skip", "replace"]),
    help="When a live task holds the key: fail, print that task, or give it this one's "
    "context and options [default: error].",
)
@json_option
@click.pass_obj
def create_task(
    settings: Settings,
    *,
    task_type: str,
    context: str,
    registry_spec: str | None,
    user: str,
    group: str,
    run_at: datetime | None,
    unique_key: str | None,
    on_conflict: str | None,
    as_json: bool,
) -> None:
    """Create a task of TYPE with CONTEXT (text; JSON for a type with a context type) and print
    it (with --json: the task as one object). Without --registry, TYPE's options are those a
    worker stored for it; with it, a typed CONTEXT is checked before anything is written."""
    registry = None if registry_spec is None else load_registry(registry_spec)
    value: object = context
    if registry is not None:
        kind = registry.get(task_type)
        if kind.context_type is not None:
            try:
                value = kind.decode_context(context)
            except ContextError as exc:
                raise click.BadParameter(str(exc), param_hint="CONTEXT") from None
    options: TaskOptions = {"user": user, "group": group, "run_at": run_at}
    if unique_key is not None:
        options["unique_key"] = unique_key
        if on_conflict is not None:
            options["on_conflict"] = cast(OnConflict, on_conflict)  # one of click's choices
    elif on_conflict is not None:
        raise click.BadParameter("needs --unique-key", param_hint="--on-conflict")

    async def create(node: Node) -> Task:
        task_id = await node.create_task(task_type, value, **options)
        return await node.get_task(task_id)

    task = with_client(settings, create, registry=registry)
    emit(as_json, fields(task), f"task {task.id}: {task_state(task)}, group {task.group}")
