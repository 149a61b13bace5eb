"""Shared by the dashboard's tests (``test_dashboard.py``, ``test_dashboard_browser.py``): the
``steps`` task type, which counts with progress and a message, and reading the dashboard's
pages."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from aioasync_tasks import Report, TaskRegistry

registry = TaskRegistry()


@registry.task("steps")
async def steps(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    """Count ``i`` up to ``n``, a step every ``delay`` seconds, reporting progress."""
    state = json.loads(context)
    while state["i"] < state["n"]:
        if stop.is_set():
            return
        await asyncio.sleep(state.get("delay", 0.0))
        state["i"] += 1
        yield Report(
            context=json.dumps(state),
            progress=state["i"] / state["n"],
            message=f"step {state['i']} of {state['n']}",
        )
    yield Report.finished(context=json.dumps(state))


def steps_context(n: int, delay: float = 0.0, **extra: object) -> str:
    return json.dumps({"i": 0, "n": n, "delay": delay, **extra})


def form_token(html: str) -> str:
    """The dashboard's form token, from a page with a form."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, "the page has no form token"
    return found.group(1)


def listed_ids(html: str) -> list[int]:
    """The ids of the tasks of a task list page, in order."""
    return [int(m) for m in re.findall(r'<tr data-task="(\d+)"', html)]
