"""The command line's side of the storage features (``docs/reference.md``, "Command line"):
progress in ``tasks list`` and ``tasks show``, bulk ``tasks delete`` by filter, and ``groups``
commands that refuse an unknown group without ``--create``. Run as a subprocess, on each
backend, with the helpers of ``test_cli``."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator

import click
import pytest
from _db import DbTarget
from _helpers import HERMETIC_ENV, db_args, make_node, wait_state
from test_cli import Result, cli, cli_json, expect_ok, table_rows

from aioasync_tasks import Report, State, TaskRegistry
from aioasync_tasks._cli.tasks import parse_age

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


async def cli_with_input(*args: str, db: DbTarget, answer: bytes) -> Result:
    """The command line with ``answer`` on its stdin (a confirmation), never the terminal's."""
    command = [sys.executable, "-m", "aioasync_tasks", *db_args(db), *args]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=HERMETIC_ENV,
    )
    out, err = await asyncio.wait_for(process.communicate(answer), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def test_tasks_delete_in_bulk_asks_first(db: DbTarget) -> None:
    async with make_node(db, _registry(), concurrency=2) as node:
        ended = [await node.create_task("halfway", user="alice") for _ in range(2)]
        kept = await node.create_task("quick", auto_run=False, user="bob")
        for task_id in ended:
            await wait_state(node, task_id, State.FAILED)

        args = ("tasks", "delete", "--state", "failed", "--user", "alice")
        declined = await cli_with_input(*args, db=db, answer=b"n\n")
        assert declined.code == 0, declined
        assert "Delete every task with state failed, user alice?" in declined.out
        assert declined.out.strip().endswith("nothing deleted")
        unanswered = await cli_with_input(*args, db=db, answer=b"")
        assert unanswered.code == 1
        assert "pass --yes" in unanswered.error_line
        assert await node.count_tasks() == 3

        confirmed = await cli_with_input(*args, db=db, answer=b"y\n")
        assert confirmed.code == 0, confirmed
        assert confirmed.out.strip().endswith("deleted 2 tasks")
        assert [t.id for t in await node.get_tasks()] == [kept]

        out = expect_ok(await cli("tasks", "delete", "--older-than", "7d", "--yes", db=db))
        assert out.strip() == "deleted 0 tasks"
        out = expect_ok(await cli("tasks", "delete", "--type", "quick", "-y", db=db))
        assert out.strip() == "deleted 1 task"
        assert await node.count_tasks() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tasks", "delete"], "give a task ID, or filters"),
        (["tasks", "delete", "7", "--state", "failed"], "a task ID or filters"),
        (["tasks", "delete", "--older-than", "soon", "--yes"], "is not an age"),
        (["tasks", "delete", "--older-than", "0d", "--yes"], "is not a positive age"),
        (["tasks", "delete", "--state", "gone", "--yes"], "'gone' is not one of"),
    ],
)
async def test_tasks_delete_usage_errors(db: DbTarget, args: list[str], message: str) -> None:
    async with make_node(db, _registry(), concurrency=0):
        result = await cli(*args, db=db)
    assert result.code == 2
    assert message in result.error_line


@pytest.mark.parametrize(
    "parse", [("90", 90.0), ("45s", 45.0), ("30m", 1800.0), ("1d12h", 129600.0), ("2w", 1209600.0)]
)
def test_ages_of_the_command_line(parse: tuple[str, float]) -> None:
    text, seconds = parse
    assert parse_age(click.Context(click.Command("x")), click.Option(["--x"]), text) == seconds


async def test_groups_commands_refuse_an_unknown_group_without_create(db: DbTarget) -> None:
    async with make_node(db, _registry(), concurrency=0) as node:
        await node.create_task("quick", group="known", auto_run=False)
        for args in (
            ["pause", "typo"],
            ["resume", "typo"],
            ["limits", "typo", "--max-running", "2"],
        ):
            result = await cli("groups", *args, db=db)
            assert result.code == 1, (args, result)
            assert result.error_line == (
                "aioasync-tasks: error: group 'typo' has no tasks and no settings: check its "
                "name, or pass --create to create it"
            )
        assert [g.name for g in await node.get_groups()] == ["known"]  # nothing was created
        result = await cli("groups", "limits", "typo", db=db)  # showing, too
        assert result.code == 1

        expect_ok(await cli("groups", "pause", "known", db=db))  # it has tasks
        out = expect_ok(await cli("groups", "pause", "fresh", "--create", db=db))
        assert out.strip() == "group fresh: paused"
        out = expect_ok(
            await cli("groups", "limits", "other", "--max-running", "3", "--create", db=db)
        )
        assert out.strip() == "group other: max_running 3, max_running_per_user none"
        assert [(g.name, g.paused, g.max_running) for g in await node.get_groups()] == [
            ("fresh", True, None),
            ("known", True, None),
            ("other", False, 3),
        ]
        expect_ok(await cli("groups", "resume", "fresh", db=db))  # it has settings
        assert [g.name for g in await node.get_groups()] == ["known", "other"]
