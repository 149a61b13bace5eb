"""The command line's side of the storage features (``docs/reference.md``, "Command line"):
progress in ``tasks list`` and ``tasks show``, bulk ``tasks delete`` by filter, and ``groups``
commands that refuse an unknown group without ``--create``. Run as a subprocess, on each
backend, with the helpers of ``test_cli``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from _db import DbTarget
from _helpers import make_node, wait_state
from test_cli import cli, cli_json, expect_ok, table_rows

from aioasync_tasks import Report, State, TaskRegistry

pytestmark = pytest.mark.slow


def _registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("halfway")
    async def halfway(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="half", progress=0.42, message="crunching")
        yield Report.failed("stopped halfway")

    @registry.task("quick")
    async def quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(progress=1.0)

    return registry


async def test_tasks_list_and_show_progress(db: DbTarget) -> None:
    async with make_node(db, _registry(), concurrency=2) as node:
        reported = await node.create_task("halfway", user="alice")
        silent = await node.create_task("quick", auto_run=False)
        await wait_state(node, reported, State.FAILED)

    rows = table_rows(expect_ok(await cli("tasks", "list", db=db)))
    assert rows[0][4:7] == ["STATE", "PROGRESS", "ATTEMPTS"]
    assert rows[1][:6] == [str(silent), "quick", "-", "default", "init", "-"]
    assert rows[2][:6] == [str(reported), "halfway", "alice", "default", "failed", "42%"]

    shown = expect_ok(await cli("tasks", "show", str(reported), db=db))
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in shown.strip().splitlines())
    assert (fields["progress"], fields["message"]) == ("42%", "crunching")
    document = await cli_json("tasks", "show", str(reported), db=db)
    assert (document["progress"], document["message"]) == (0.42, "crunching")
    assert document["unique_key"] is None
