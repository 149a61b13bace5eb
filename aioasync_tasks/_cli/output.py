"""What the commands print: plain text for people — tables, local times, ``-`` for nothing —
or, with ``--json``, one JSON document on stdout for scripts.

The JSON of a snapshot (``Task``, ``Group``, ``NodeInfo``) has every field by its name, enums as
their values, times in ISO 8601 (UTC, with the offset) and nothing as ``null``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from .._models import Task

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of text."
)


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


def local_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def task_state(task: Task) -> str:
    """The state, with the stop request of a CANCELING task: ``canceling (pause)``."""
    if task.requested is not None:
        return f"{task.state.value} ({task.requested.value})"
    return task.state.value


def percent(progress: float | None) -> str:
    """A task's progress as a whole percentage (``42%``), ``-`` when it reported none."""
    return "-" if progress is None else f"{progress:.0%}"


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with ``...``."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def text(value: object) -> str:
    """A field as text: ``-`` for None, local time, an enum's value."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return local_time(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def fields(snapshot: Any) -> dict[str, Any]:
    """A snapshot's fields by name, in order (for JSON: see ``to_json``)."""
    return {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")


def to_json(document: object) -> str:
    """``document`` (dicts, lists, numbers, text, times, enums) as indented JSON."""
    return json.dumps(document, indent=2, default=_json_value)


def emit(as_json: bool, document: object, text_form: str) -> None:
    """Print ``document`` as JSON when ``--json`` was given, else ``text_form``."""
    click.echo(to_json(document) if as_json else text_form)
