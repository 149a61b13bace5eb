"""The command line, run as a subprocess (``python -m aioasync_tasks …``) on each backend."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _db import DbTarget
from _helpers import (
    HERMETIC_ENV,
    WORKER_TIMINGS,
    client_registry,
    db_args,
    make_node,
    raw_engine,
    spawn_cli,
    wait_for,
)
from sqlalchemy import make_url

from aioasync_tasks import Node, NodeInfo, Schedule, State, StopRequest, Task, TaskRegistry
from aioasync_tasks._backends._migrations import split_sql
from aioasync_tasks._cli.output import table
from aioasync_tasks._schema import SCHEMA_VERSION
from aioasync_tasks.samples import registry as seed_registry

pytestmark = pytest.mark.slow


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one line a failing command prints on stderr (fails the test otherwise)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert "Traceback" not in self.err
        return lines[0]


async def cli(
    *args: str,
    db: DbTarget | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,  # noqa: ASYNC109 - a bound on a subprocess, reported as a failure
) -> Result:
    command = [sys.executable, "-m", "aioasync_tasks", *(db_args(db) if db else []), *args]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env if env is not None else HERMETIC_ENV,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def expect_ok(result: Result) -> str:
    assert result.code == 0, f"exit {result.code}\n{result.out}\n{result.err}"
    assert "Traceback" not in result.err
    return result.out


def table_rows(out: str) -> list[list[str]]:
    """The rows of a plain text table (header first), split on runs of 2+ spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


@pytest.fixture
async def client(db: DbTarget) -> AsyncIterator[Node]:
    """A client-only node on the test database, which it migrates."""
    node = make_node(db, seed_registry, concurrency=0)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


# -- migrate, errors ------------------------------------------------------------------------


async def test_migrate(db: DbTarget) -> None:
    first = expect_ok(await cli("migrate", db=db))
    assert "applied migration 1" in first
    second = expect_ok(await cli("migrate", db=db))
    assert "is up to date" in second


async def test_missing_schema_is_one_line(db: DbTarget) -> None:
    if db.backend == "sqlite":  # a SQLite file that exists, without the tables
        await asyncio.to_thread(Path(db.url.removeprefix("sqlite+aiosqlite:///")).touch)
    result = await cli("tasks", "list", db=db)
    assert result.code == 1
    assert "aioasync-tasks migrate" in result.error_line
    assert db.url.split("@")[-1] in result.error_line  # the database it looked at


@pytest.mark.parametrize(
    "args",
    [
        ["tasks", "list"],
        ["tasks", "show", "1"],
        ["groups"],
        ["groups", "limits", "g"],
        ["nodes"],
        ["tasks", "pause", "1"],
        ["tasks", "create", "--registry", "aioasync_tasks.samples:registry", "dot", "{}"],
    ],
    ids=" ".join,
)
async def test_commands_never_create_a_database_file(tmp_path: Path, args: list[str]) -> None:
    result = await cli(*args, cwd=tmp_path)
    assert result.code == 1
    expected = (
        f"aioasync-tasks: error: no database at {tmp_path / 'aioasync_tasks.db'} "
        "(sqlite+aiosqlite:///aioasync_tasks.db): create it with `aioasync-tasks migrate`"
    )
    assert result.error_line.startswith(expected)
    assert os.listdir(tmp_path) == []


async def test_unreachable_database_is_one_line() -> None:
    result = await cli("--db", "postgresql+asyncpg://postgres@127.0.0.1:1/x", "tasks", "list")
    assert result.code == 1
    line = result.error_line
    assert line.startswith("aioasync-tasks: error: cannot use the database")
    assert "127.0.0.1:1" in line
    assert result.out == ""


async def test_bad_url_is_one_line() -> None:
    result = await cli("--db", "oracle://nobody@localhost/x", "nodes")
    assert result.code == 1
    assert "unsupported database URL scheme" in result.error_line


@pytest.mark.parametrize(
    "args",
    [
        ["tasks", "show", "abc"],
        ["tasks", "show"],
        ["tasks", "bogus"],
        ["bogus"],
        ["tasks", "list", "--state", "sleeping"],
        ["tasks", "list", "--limit", "0"],
        ["worker", "no-colon"],
        ["groups", "limits", "g", "--max-running", "-3"],
    ],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    result = await cli(*args)
    assert result.code == 2
    assert result.error_line.startswith("aioasync-tasks: usage error: ")
    assert result.out == ""


async def test_migrate_sql_makes_a_schema_nodes_accept(db: DbTarget, tmp_path: Path) -> None:
    script = expect_ok(await cli("migrate", "--sql", db=db, cwd=tmp_path))
    assert os.listdir(tmp_path) == []  # it connected to nothing
    assert f"the migrations after schema version 0 for {db.dialect}" in script
    assert "-- migration 1\n" in script
    assert f"VALUES ({db.shipped_versions[-1]}, " in script
    engine = raw_engine(db)
    try:
        async with engine.begin() as conn:  # as the user's migration tool would
            for statement in split_sql(script):
                await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()
    node = make_node(db, seed_registry, concurrency=0, auto_migrate=False)
    async with node:  # the schema is the library's, at its version
        await node.create_task("dot", _dot(2))
        assert await node.count_tasks() == 1
    assert "is up to date" in expect_ok(await cli("migrate", db=db))


async def test_migrate_sql_needs_only_the_dialect_of_the_url(tmp_path: Path) -> None:
    unreachable = "postgresql+asyncpg://nobody@127.0.0.1:1/nowhere"
    script = expect_ok(
        await cli("--db", unreachable, "--schema", "billing", "migrate", "--sql", "--since", "1")
    )
    assert 'CREATE SCHEMA IF NOT EXISTS "billing";\nSET search_path TO "billing";' in script
    assert "-- migration 1\n" not in script
    assert "-- migration 2\n" in script
    assert "VALUES (2, now());" in script
    newest = expect_ok(await cli("migrate", "--sql", "--since", str(SCHEMA_VERSION)))
    assert "nothing to do" in newest
    refused = await cli("--schema", "billing", "migrate", "--sql", cwd=tmp_path)
    assert refused.code == 1
    assert "--schema is for PostgreSQL" in refused.error_line
    mysql = expect_ok(await cli("--db", "mariadb://x@h/db", "migrate", "--sql"))
    assert "-- migration 1\n" in mysql
    assert "ENGINE=InnoDB" in mysql
    # MySQL commits at every DDL statement: its header must not promise one transaction.
    assert "-- Run them in one transaction." in script.split("\n\n", 1)[0]
    mysql_header = mysql.split("\n\n", 1)[0]
    assert "-- Run them in one transaction" not in mysql_header
    assert "MySQL commits at every DDL statement, so they cannot run in one" in mysql_header
    assert "VALUES (2, UTC_TIMESTAMP(6));" in mysql
    bad = await cli("--db", "oracle://x@h/db", "migrate", "--sql")
    assert "unsupported database URL scheme" in bad.error_line


async def test_help() -> None:
    out = expect_ok(await cli("--help"))
    for command in ("worker", "migrate", "tasks", "groups", "schedules", "nodes", "demo"):
        assert command in out
    assert "AIOASYNC_TASKS_DB" in out


async def test_database_from_environment(sqlite_db: DbTarget, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {**HERMETIC_ENV, "AIOASYNC_TASKS_DB": sqlite_db.url}
    assert "applied migration 1" in expect_ok(await cli("migrate", env=env, cwd=work))
    assert expect_ok(await cli("nodes", env=env, cwd=work)).strip() == "no live nodes"
    assert os.listdir(work) == []  # the default database was not used


async def test_default_database_is_sqlite_in_the_working_directory(tmp_path: Path) -> None:
    out = expect_ok(await cli("migrate", cwd=tmp_path))
    assert "aioasync_tasks.db" in out
    assert (tmp_path / "aioasync_tasks.db").exists()


# -- tasks ----------------------------------------------------------------------------------


def _dot(n: int) -> str:
    return json.dumps({"a": list(range(n)), "b": [1] * n, "i": 0, "sum": 0})


async def test_tasks_list_and_show(db: DbTarget, client: Node) -> None:
    first = await client.create_task("dot", _dot(3), user="alice", group="math")
    second = await client.create_task("dot", _dot(4), user="bob", group="math", auto_run=False)
    third = await client.create_task(
        "matmul", json.dumps({"a": [[1]], "b": [[2]]}), user="alice", group="matrix"
    )

    rows = table_rows(expect_ok(await cli("tasks", "list", db=db)))
    assert rows[0][:5] == ["ID", "TYPE", "USER", "GROUP", "STATE"]
    assert [r[0] for r in rows[1:]] == [str(third), str(second), str(first)]  # newest first
    assert rows[1][1:5] == ["matmul", "alice", "matrix", "pending"]
    assert rows[2][1:5] == ["dot", "bob", "math", "init"]

    rows = table_rows(expect_ok(await cli("tasks", "list", "--user", "alice", db=db)))
    assert [r[0] for r in rows[1:]] == [str(third), str(first)]
    rows = table_rows(expect_ok(await cli("tasks", "list", "--state", "INIT", db=db)))
    assert [r[0] for r in rows[1:]] == [str(second)]
    rows = table_rows(expect_ok(await cli("tasks", "list", "--type", "dot", db=db)))
    assert [r[0] for r in rows[1:]] == [str(second), str(first)]
    rows = table_rows(expect_ok(await cli("tasks", "list", "--group", "matrix", db=db)))
    assert [r[0] for r in rows[1:]] == [str(third)]
    out = expect_ok(await cli("tasks", "list", "--limit", "1", "--offset", "1", db=db))
    assert [r[0] for r in table_rows(out)[1:-1]] == [str(second)]
    assert "tasks 2 to 2 of 3; page on with --offset 2" in out
    out = expect_ok(await cli("tasks", "list", "--user", "nobody", db=db))
    assert out.strip() == "no tasks"

    shown = expect_ok(await cli("tasks", "show", str(first), db=db))
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in shown.strip().splitlines())
    assert list(fields) == [f.name for f in dataclasses.fields(Task)]
    assert fields["id"] == str(first)
    assert fields["type"] == "dot"
    assert fields["user"] == "alice"
    assert fields["state"] == "pending"
    assert fields["max_attempts"] == "3"
    assert json.loads(fields["context"])["a"] == [0, 1, 2]


async def test_task_operations(db: DbTarget, client: Node) -> None:
    task_id = await client.create_task("dot", _dot(3), user="alice", auto_run=False)
    tid = str(task_id)

    assert expect_ok(await cli("tasks", "run", tid, db=db)).strip() == (
        f"task {task_id}: pending, group default"
    )
    assert (await client.get_task(task_id)).state is State.PENDING
    assert "paused" in expect_ok(await cli("tasks", "pause", tid, db=db))
    assert (await client.get_task(task_id)).state is State.PAUSED
    assert "group express" in expect_ok(await cli("tasks", "move", tid, "express", db=db))
    assert (await client.get_task(task_id)).group == "express"
    assert expect_ok(await cli("tasks", "delete", tid, db=db)).strip() == f"task {task_id}: deleted"
    assert await client.count_tasks() == 0

    # A type with a cleanup handler goes through DELETING; --force removes it at once.
    product = await client.create_task("matmul", json.dumps({"a": [[1]], "b": [[1]]}))
    out = expect_ok(await cli("tasks", "delete", str(product), db=db))
    assert out.strip() == f"task {product}: deleting, group default"
    invalid = await cli("tasks", "run", str(product), db=db)
    assert invalid.code == 1
    assert invalid.error_line == f"aioasync-tasks: error: cannot run task {product}: it is deleting"
    forced = expect_ok(await cli("tasks", "delete", "--force", str(product), db=db))
    assert forced.strip() == f"task {product}: deleted"
    assert await client.count_tasks() == 0


@pytest.mark.parametrize("command", ["show", "run", "pause", "delete"])
async def test_unknown_task_is_one_line(db: DbTarget, client: Node, command: str) -> None:
    result = await cli("tasks", command, "424242", db=db)
    assert result.code == 1
    assert result.error_line == "aioasync-tasks: error: task 424242 not found"
    assert result.out == ""


async def test_move_unknown_task_is_one_line(db: DbTarget, client: Node) -> None:
    result = await cli("tasks", "move", "424242", "elsewhere", db=db)
    assert result.code == 1
    assert result.error_line == "aioasync-tasks: error: task 424242 not found"


TYPED_MODULE = textwrap.dedent(
    """
    import asyncio
    from dataclasses import dataclass

    from aioasync_tasks import Report, TaskRegistry

    registry = TaskRegistry()


    @dataclass
    class Order:
        reference: str
        lines: list[int]


    @registry.task("ship", max_attempts=4)
    async def ship(order: Order, stop):
        yield Report.finished(context=order)
    """
)


async def test_tasks_create(db: DbTarget, client: Node, tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(TYPED_MODULE)
    samples = ("--registry", "aioasync_tasks.samples:registry")
    out = expect_ok(await cli("tasks", "create", *samples, "dot", _dot(2), db=db, cwd=tmp_path))
    (plain,) = await client.get_tasks()
    assert out.strip() == f"task {plain.id}: pending, group default"
    assert (plain.type, plain.context, plain.user, plain.max_attempts) == ("dot", _dot(2), "", 3)

    before = datetime.now(UTC)
    created = await cli_json(
        "tasks", "create", *samples, "dot", "--user", "alice", "--group", "math",
        "--run-at", "+2h", db=db,
    )  # fmt: skip
    task = task_from_json(created)
    assert (task.user, task.group, task.state) == ("alice", "math", State.PENDING)
    assert task.run_at > before + timedelta(hours=1)
    created = await cli_json(
        "tasks", "create", *samples, "dot", "--run-at", "2030-01-02T03:04:05+00:00", db=db
    )
    assert created["run_at"] == "2030-01-02T03:04:05+00:00"

    typed = ("--registry", "shop:registry", "ship")
    document = await cli_json(
        "tasks", "create", *typed, '{"reference": "A-1", "lines": [1, 2]}', db=db, cwd=tmp_path
    )
    assert json.loads(document["context"]) == {"reference": "A-1", "lines": [1, 2]}
    assert document["max_attempts"] == 4
    assert await client.count_tasks() == 4


async def test_tasks_create_without_task_code_and_with_a_unique_key(
    db: DbTarget, tmp_path: Path
) -> None:
    """A worker stored its types' options: the command line creates tasks of them with no
    registry, and a unique key keeps one live task of the type."""
    async with make_node(db, seed_registry, concurrency=1, groups=["elsewhere"]) as worker:
        first = task_from_json(
            await cli_json("tasks", "create", "dot", _dot(2), "--unique-key", "k", db=db)
        )
        assert (first.type, first.max_attempts, first.state) == ("dot", 3, State.PENDING)
        again = await cli_json(
            "tasks", "create", "dot", _dot(3), "--unique-key", "k", "--on-conflict", "skip",
            db=db,
        )  # fmt: skip
        assert again["id"] == first.id
        duplicate = await cli("tasks", "create", "dot", _dot(3), "--unique-key", "k", db=db)
        assert duplicate.code == 1
        assert "a live 'dot' task has unique_key 'k' already: task" in duplicate.err
        unknown = await cli("tasks", "create", "nothing", db=db)
        assert unknown.code == 1
        assert "nothing" in unknown.err
        lone = await cli("tasks", "create", "dot", "--on-conflict", "skip", db=db)
        assert lone.code == 2
        assert "needs --unique-key" in lone.err
        assert await worker.count_tasks() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ship", '{"reference": "A-1"}'],
            "Invalid value for CONTEXT: context is not a valid Order",
        ),
        (["ship", "not json"], "Invalid value for CONTEXT: context is not a valid Order"),
        (["ship", "{}", "--run-at", "tomorrow"], "'tomorrow' is neither + and an age"),
        (["nothing"], "error: unknown task type 'nothing'"),
    ],
)
async def test_tasks_create_refuses_bad_input_before_writing(
    db: DbTarget, client: Node, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "shop.py").write_text(TYPED_MODULE)
    result = await cli("tasks", "create", "--registry", "shop:registry", *args, db=db, cwd=tmp_path)
    assert result.code in (1, 2)
    assert message in result.error_line
    assert await client.count_tasks() == 0


# -- groups and nodes -----------------------------------------------------------------------


async def test_groups(db: DbTarget, client: Node) -> None:
    assert expect_ok(await cli("groups", db=db)).strip() == "no groups"
    await client.create_task("dot", _dot(2), user="alice", group="math")
    await client.create_task("dot", _dot(2), user="bob", group="math")

    out = expect_ok(await cli("groups", "pause", "math", db=db))
    assert out.strip() == "group math: paused"
    rows = table_rows(expect_ok(await cli("groups", db=db)))
    assert rows[0] == [
        "GROUP",
        "PAUSED",
        "MAX_RUNNING",
        "MAX_PER_USER",
        "PENDING",
        "RUNNING",
        "TASKS",
    ]
    assert rows[1] == ["math", "yes", "-", "-", "2", "0", "2"]

    assert "resumed" in expect_ok(await cli("groups", "resume", "math", db=db))
    out = expect_ok(await cli("groups", "limits", "math", "--max-running", "3", db=db))
    assert out.strip() == "group math: max_running 3, max_running_per_user none"
    out = expect_ok(await cli("groups", "limits", "math", "--max-running-per-user", "1", db=db))
    assert out.strip() == "group math: max_running 3, max_running_per_user 1"
    (math,) = [g for g in await client.get_groups() if g.name == "math"]
    assert (math.paused, math.max_running, math.max_running_per_user) == (False, 3, 1)
    rows = table_rows(expect_ok(await cli("groups", db=db)))
    assert rows[1] == ["math", "no", "3", "1", "2", "0", "2"]

    out = expect_ok(await cli("groups", "limits", "math", db=db))  # shows, changes nothing
    assert out.strip() == "group math: max_running 3, max_running_per_user 1"
    out = expect_ok(await cli("groups", "limits", "math", "--max-running", "none", db=db))
    assert out.strip() == "group math: max_running none, max_running_per_user 1"
    (math,) = [g for g in await client.get_groups() if g.name == "math"]
    assert (math.max_running, math.max_running_per_user) == (None, 1)

    out = expect_ok(await cli("groups", "pause", "math", "--stop-running", db=db))
    assert out.strip() == "group math: paused, its running tasks told to pause"
    (math,) = [g for g in await client.get_groups() if g.name == "math"]
    assert math.paused


async def test_nodes(db: DbTarget, client: Node) -> None:
    assert expect_ok(await cli("nodes", db=db)).strip() == "no live nodes"
    node = make_node(db, seed_registry, concurrency=3, name="busy-bee")
    await node.start()
    try:
        rows = table_rows(expect_ok(await cli("nodes", db=db)))
        assert rows[0][:4] == ["ID", "NAME", "CONCURRENCY", "TYPES"]
        assert rows[1][:4] == [str(node.id), "busy-bee", "3", "dot,matmul"]
    finally:
        await node.stop()
    assert expect_ok(await cli("nodes", db=db)).strip() == "no live nodes"


async def test_schedules(db: DbTarget, client: Node) -> None:
    assert expect_ok(await cli("schedules", "list", db=db)).strip() == "no schedules"
    assert await cli_json("schedules", "list", db=db) == {"schedules": []}
    await client.schedule("hourly-dot", "dot", "0 * * * *", context=_dot(2), user="alice")
    await client.schedule("paris", "dot", "30 9 * * 1-5", timezone="Europe/Paris")
    await client.schedule("fast", "dot", every=30)
    rows = table_rows(expect_ok(await cli("schedules", "list", db=db)))
    assert rows[0] == [
        "NAME",
        "TYPE",
        "PERIOD",
        "NEXT TICK",
        "LAST TICK",
        "LAST TASK",
        "DECLARED",
        "CONTEXT",
    ]
    assert [r[:3] for r in rows[1:]] == [
        ["fast", "dot", "every 30s"],
        ["hourly-dot", "dot", "cron 0 * * * *"],
        ["paris", "dot", "cron 30 9 * * 1-5 (Europe/Paris)"],
    ]
    assert rows[1][4:7] == ["-", "-", "no"]

    document = await cli_json("schedules", "list", db=db)
    stored = await client.get_schedules()
    assert [s["name"] for s in document["schedules"]] == [s.name for s in stored]
    first = document["schedules"][1]
    assert list(first) == [f.name for f in dataclasses.fields(Schedule)]
    assert (first["cron"], first["every"], first["timezone"], first["user"]) == (
        "0 * * * *",
        None,
        "UTC",
        "alice",
    )
    assert datetime.fromisoformat(first["next_tick"]) == stored[1].next_tick

    assert expect_ok(await cli("schedules", "remove", "fast", db=db)).strip() == (
        "schedule fast: removed"
    )
    result = await cli("schedules", "remove", "fast", db=db)
    assert result.code == 1
    assert result.error_line == "aioasync-tasks: error: no schedule named 'fast'"
    assert [s.name for s in await client.get_schedules()] == ["hourly-dot", "paris"]


# -- --json ---------------------------------------------------------------------------------


async def cli_json(*args: str, db: DbTarget, cwd: Path | None = None) -> Any:
    """The JSON document a command prints with --json (and nothing else on stdout)."""
    return json.loads(expect_ok(await cli(*args, "--json", db=db, cwd=cwd)))


def task_from_json(document: dict[str, Any]) -> Task:
    """The task a `tasks show/list --json` object describes: every field, parsed back."""
    times = {"created_at", "updated_at", "started_at", "done_at", "run_at"}
    values: dict[str, Any] = {
        name: datetime.fromisoformat(value) if name in times and value is not None else value
        for name, value in document.items()
    }
    values["state"] = State(values["state"])
    values["requested"] = values["requested"] and StopRequest(values["requested"])
    return Task(**values)


async def test_tasks_list_json(db: DbTarget, client: Node) -> None:
    first = await client.create_task("dot", _dot(3), user="alice", group="math")
    second = await client.create_task("dot", _dot(4), user="bob", auto_run=False)

    document = await cli_json("tasks", "list", db=db)
    assert list(document) == ["tasks", "total", "offset", "limit"]
    assert (document["total"], document["offset"], document["limit"]) == (2, 0, 50)
    assert [task_from_json(t) for t in document["tasks"]] == [
        await client.get_task(second),
        await client.get_task(first),
    ]
    assert document["tasks"][0]["state"] == "init"
    assert document["tasks"][0]["run_at"].endswith("+00:00")  # ISO 8601, UTC

    page = await cli_json("tasks", "list", "--limit", "1", "--offset", "1", db=db)
    assert [t["id"] for t in page["tasks"]] == [first]
    assert (page["total"], page["offset"], page["limit"]) == (2, 1, 1)
    filtered = await cli_json("tasks", "list", "--user", "nobody", db=db)
    assert filtered == {"tasks": [], "total": 0, "offset": 0, "limit": 50}


async def test_tasks_show_json(db: DbTarget, client: Node) -> None:
    task_id = await client.create_task("dot", _dot(2), user="alice", group="math")
    await client.pause_task(task_id)
    document = await cli_json("tasks", "show", str(task_id), db=db)
    assert list(document) == [f.name for f in dataclasses.fields(Task)]
    assert task_from_json(document) == await client.get_task(task_id)
    assert document["state"] == "paused"
    assert document["node"] is None
    assert json.loads(document["context"])["a"] == [0, 1]


async def test_json_error_is_one_line_and_no_json(db: DbTarget, client: Node) -> None:
    result = await cli("tasks", "show", "424242", "--json", db=db)
    assert result.code == 1
    assert result.error_line == "aioasync-tasks: error: task 424242 not found"
    assert result.out == ""


async def test_groups_json(db: DbTarget, client: Node) -> None:
    assert await cli_json("groups", db=db) == {"groups": []}
    await client.create_task("dot", _dot(2), user="alice", group="math")
    await client.create_task("dot", _dot(2), user="bob", group="math", auto_run=False)
    await client.pause_group("math")
    await client.set_group_limits("math", max_running=3, max_running_per_user=None)
    assert await cli_json("groups", db=db) == {
        "groups": [
            {
                "name": "math",
                "paused": True,
                "max_running": 3,
                "max_running_per_user": None,
                "pending": 1,
                "running": 0,
                "tasks": 2,
            }
        ]
    }
    assert await cli_json("groups", "limits", "math", db=db) == {
        "name": "math",
        "max_running": 3,
        "max_running_per_user": None,
    }
    changed = await cli_json("groups", "limits", "math", "--max-running-per-user", "2", db=db)
    assert changed == {"name": "math", "max_running": 3, "max_running_per_user": 2}


async def test_nodes_json(db: DbTarget, client: Node) -> None:
    assert await cli_json("nodes", db=db) == {"nodes": []}
    node = make_node(db, seed_registry, concurrency=3, name="busy-bee")
    await node.start()
    try:
        (found,) = (await cli_json("nodes", db=db))["nodes"]
        (live,) = await client.get_nodes()
    finally:
        await node.stop()
    assert list(found) == [f.name for f in dataclasses.fields(NodeInfo)]
    found["types"] = tuple(found["types"])
    found["started_at"] = datetime.fromisoformat(found["started_at"])
    found["heartbeat_at"] = datetime.fromisoformat(found["heartbeat_at"])  # it moves on
    assert NodeInfo(**found) == dataclasses.replace(live, heartbeat_at=found["heartbeat_at"])
    assert (live.id, live.name, live.types) == (node.id, "busy-bee", ("dot", "matmul"))


# -- worker ---------------------------------------------------------------------------------

WORKER_MODULE = textwrap.dedent(
    """
    import asyncio

    from aioasync_tasks import Report, TaskRegistry

    registry = TaskRegistry()


    @registry.task("shout")
    async def shout(context, stop):
        yield Report.finished(context=context.upper())


    @registry.task("stubborn", max_attempts=2)
    async def stubborn(context, stop):
        yield Report(context="started")
        await asyncio.sleep(3600)  # ignores stop: only a forced stop ends it
        yield Report.finished()
    """
)


def _test_registry() -> TaskRegistry:
    """The worker module's types, for the test's own client (which runs nothing)."""
    return client_registry({"shout": {}, "stubborn": {"max_attempts": 2}})


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


StartWorker = Callable[..., Awaitable[WorkerProcess]]


@pytest.fixture
def worker_dir(tmp_path: Path) -> Path:
    (tmp_path / "mytasks.py").write_text(WORKER_MODULE)
    return tmp_path


@pytest.fixture
async def start_worker(db: DbTarget, worker_dir: Path) -> AsyncIterator[StartWorker]:
    started: list[WorkerProcess] = []

    async def start(*options: str) -> WorkerProcess:
        log = worker_dir / f"worker-{len(started)}.log"
        process = await spawn_cli(
            *db_args(db),
            "worker",
            "mytasks:registry",
            *WORKER_TIMINGS,
            *options,
            cwd=worker_dir,
            log=log,
        )
        started.append(WorkerProcess(process, log))
        return started[-1]

    try:
        yield start
    finally:
        for worker in started:
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()


async def _exit_code(worker: WorkerProcess, timeout: float = 60) -> int:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        return await worker.process.wait()


async def test_worker_runs_tasks_and_stops_on_sigterm(
    db: DbTarget, start_worker: StartWorker
) -> None:
    client = make_node(db, _test_registry(), concurrency=0)
    await client.start()
    try:
        worker = await start_worker("--name", "cli-worker", "--concurrency", "2")

        async def registered() -> bool:
            assert worker.process.returncode is None, worker.text()
            return [n.name for n in await client.get_nodes()] == ["cli-worker"]

        await wait_for(registered, timeout=60, what="the worker to register")
        task_id = await client.create_task("shout", "hello")

        async def finished() -> bool:
            return (await client.get_task(task_id)).state is State.FINISHED

        await wait_for(finished, timeout=60, what="the worker to run the task")
        assert (await client.get_task(task_id)).context == "HELLO"

        worker.process.send_signal(signal.SIGTERM)
        assert await _exit_code(worker) == 0, worker.text()
        assert await client.get_nodes() == []
        log = worker.text()
        assert "worker running as node" in log
        assert "stopping gracefully" in log
        assert "worker stopped" in log
        assert "Traceback" not in log
    finally:
        await client.stop()


async def test_worker_runs_only_its_groups(db: DbTarget, start_worker: StartWorker) -> None:
    client = make_node(db, _test_registry(), concurrency=0)
    await client.start()
    try:
        worker = await start_worker("--group", "mine", "--group", "ours")
        mine = await client.create_task("shout", "a", group="mine")
        ours = await client.create_task("shout", "b", group="ours")
        other = await client.create_task("shout", "c", group="theirs")

        async def finished() -> bool:
            assert worker.process.returncode is None, worker.text()
            states = [(await client.get_task(t)).state for t in (mine, ours)]
            return states == [State.FINISHED, State.FINISHED]

        await wait_for(finished, timeout=60, what="the worker to run its groups' tasks")
        worker.process.send_signal(signal.SIGTERM)
        assert await _exit_code(worker) == 0, worker.text()
        assert (await client.get_task(other)).state is State.PENDING
    finally:
        await client.stop()


async def test_worker_second_signal_forces_the_stop(
    db: DbTarget, start_worker: StartWorker
) -> None:
    client = make_node(db, _test_registry(), concurrency=0)
    await client.start()
    try:
        worker = await start_worker()
        task_id = await client.create_task("stubborn")

        async def checkpointed() -> bool:
            assert worker.process.returncode is None, worker.text()
            task = await client.get_task(task_id)
            return task.state is State.RUNNING and task.context == "started"

        await wait_for(checkpointed, timeout=60, what="the stubborn task to start")
        worker.process.send_signal(signal.SIGINT)
        await wait_for(
            lambda: "stopping gracefully" in worker.text(), timeout=60, what="the graceful stop"
        )
        # The task ignores stop (its grace period is 30 s): a second signal ends it now.
        worker.process.send_signal(signal.SIGINT)
        assert await _exit_code(worker) == 0, worker.text()
        assert "again: stopping now" in worker.text()
        task = await client.get_task(task_id)
        assert task.state is State.PENDING  # released, with its checkpoint, for another node
        assert task.context == "started"
        assert await client.get_nodes() == []
    finally:
        await client.stop()


async def test_worker_with_a_bad_registry_is_one_line(sqlite_db: DbTarget, tmp_path: Path) -> None:
    (tmp_path / "notasks.py").write_text(
        "import aioasync_tasks\nregistry = 42\nempty = aioasync_tasks.TaskRegistry()\n"
    )
    for spec, message in [
        ("missing_module:registry", "cannot import module 'missing_module'"),
        ("notasks:nothing", "has no attribute 'nothing'"),
        ("notasks:registry", "is a int, not a TaskRegistry"),
        ("notasks:empty", "has no task types"),
    ]:
        result = await cli("worker", spec, db=sqlite_db, cwd=tmp_path)
        assert result.code == 1, spec
        assert message in result.error_line


# -- demo -----------------------------------------------------------------------------------


def _demo_commands(out: str) -> list[list[str]]:
    """The commands the demo prints at its end to look at its database."""
    end = out[out.index("Look at the demo's database with the command line:") :]
    return [shlex.split(line) for line in end.splitlines()[1:] if line.startswith("  ")]


def _check_demo_output(out: str) -> None:
    assert "Summary" in out
    summary = out[out.index("Summary") :].splitlines()
    rows = table_rows("\n".join(summary[1:7]))
    assert rows[0] == ["TASK", "TYPE", "USER", "GROUP", "STATE", "ATTEMPTS", "RESULT"]
    assert [r[1] for r in rows[1:]] == ["dot", "dot", "dot", "matmul", "matmul"]
    assert all(r[4] == "finished" and r[6].endswith("(correct)") for r in rows[1:])
    assert {r[2] for r in rows[1:]} == {"alice", "bob"}
    assert ">> pausing #3" in out
    assert "is PAUSED" in out
    assert ">> resuming #3" in out
    assert "to group 'math'" in out
    assert "exited with code 0" in out
    assert "every result is correct" in out
    commands = _demo_commands(out)
    assert [c[0] for c in commands] == ["aioasync-tasks"] * 4
    assert [c[1] for c in commands] == ["--db"] * 4
    assert [c[-1] for c in commands] == ["list", "5", "groups", "--json"]


async def test_demo_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    result = await cli("demo", "--db", url, cwd=tmp_path, timeout=100)
    out = expect_ok(result)
    _check_demo_output(out)
    assert re.search(r"moved from worker \d to worker \d, resuming from its checkpoint", out), out
    # The commands it prints work, from anywhere.
    listed = expect_ok(await cli(*_demo_commands(out)[0][1:]))
    assert {"dot", "matmul"} <= {row[1] for row in table_rows(listed)[1:-1]}
    # Every worker process was stopped: no node is registered any more.
    client = Node(url, concurrency=0)
    await client.start()
    try:
        assert await client.get_nodes() == []
    finally:
        await client.stop()


async def test_demo_default_database_and_fresh_start(tmp_path: Path) -> None:
    # Leftovers of an earlier demo run: the demo starts afresh from task #1.
    url = f"sqlite+aiosqlite:///{tmp_path / 'aioasync_tasks_demo.db'}"
    earlier = Node(url, registry=seed_registry, concurrency=0)
    await earlier.start()
    try:
        for _ in range(7):
            await earlier.create_task("dot", _dot(2))
    finally:
        await earlier.stop()
    out = expect_ok(await cli("demo", cwd=tmp_path, timeout=100))
    _check_demo_output(out)
    assert "created #1: dot product" in out
    assert (tmp_path / "aioasync_tasks_demo.db").exists()


async def test_demo_refuses_a_database_with_other_tasks(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'precious.db'}"
    registry = _test_registry()
    node = Node(url, registry=registry, concurrency=0)
    await node.start()
    try:
        await node.create_task("shout", "keep me")
    finally:
        await node.stop()
    result = await cli("demo", "--db", url, cwd=tmp_path)
    assert result.code == 1
    assert "holds tasks that are not the demo's" in result.error_line
    node = Node(url, registry=registry, concurrency=0)
    await node.start()
    try:
        assert [t.context for t in await node.get_tasks()] == ["keep me"]
    finally:
        await node.stop()


async def test_demo_stops_its_workers_when_interrupted(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    output = tmp_path / "demo.out"
    process = await spawn_cli("demo", "--db", url, cwd=tmp_path, log=output)
    try:
        await wait_for(
            lambda: "created #5" in output.read_text(), timeout=60, what="the demo's tasks"
        )
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            assert await process.wait() == 130
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert output.read_text().strip().splitlines()[-1] == "aioasync-tasks: interrupted"
    client = Node(url, registry=seed_registry, concurrency=0)
    await client.start()
    try:
        assert await client.get_nodes() == []  # both workers stopped and deregistered
        states = {t.state for t in await client.get_tasks()}
        assert State.RUNNING not in states  # handed back, not stranded
    finally:
        await client.stop()


@pytest.mark.postgres_only
async def test_demo_on_postgres(db: DbTarget, tmp_path: Path) -> None:
    assert db.schema is not None
    out = expect_ok(await cli("demo", *db_args(db), cwd=tmp_path, timeout=100))
    _check_demo_output(out)
    assert f"schema '{db.schema}'" in out


@pytest.mark.parametrize("db", ["mysql"], indirect=True)
async def test_demo_on_mysql(db: DbTarget, tmp_path: Path) -> None:
    """The URL's database holds the demo's tables (no --schema there); a second run empties
    them first."""
    refused = await cli("demo", *db_args(db), "--schema", "elsewhere", cwd=tmp_path)
    assert refused.code == 1
    assert "--schema is for PostgreSQL" in refused.err
    for _ in range(2):
        out = expect_ok(await cli("demo", *db_args(db), cwd=tmp_path, timeout=100))
        _check_demo_output(out)
        assert f"on MySQL/MariaDB, database '{make_url(db.url).database}'" in out


def test_table_formatter() -> None:
    assert table(["A", "BB"], [["xyz", "1"], ["", "22"]]).splitlines() == [
        "A    BB",
        "xyz  1",
        "     22",
    ]
