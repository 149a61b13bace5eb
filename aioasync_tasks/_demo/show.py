"""The demo from start to end: workers, tasks, the story with live progress, and a summary
that checks every result."""

from __future__ import annotations

import asyncio
import json
import random
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from .._cli.output import table
from .._errors import AsyncTasksError, TaskNotFound
from .._models import State, Task
from .._node import MAX_PAGE_SIZE, Node
from ..samples import registry
from . import database
from .errors import DemoFailed
from .story import Story, is_cell, progress, status
from .workers import Workers

DEMO_TIMEOUT = 120.0
"""Seconds the demo may take in all before it gives up (it needs about 10)."""


@dataclass
class _Tracked:
    """A top-level task of the demo and what it must come to."""

    id: int
    type: str
    user: str
    expected: Any


def _vector(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(n)]


def _matrix(rng: random.Random, rows: int, cols: int) -> list[list[int]]:
    return [_vector(rng, cols) for _ in range(rows)]


def _product(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> list[list[int]]:
    return [
        [sum(x * y for x, y in zip(row, col, strict=True)) for col in zip(*b, strict=True)]
        for row in a
    ]


class Demo:
    """Runs the demo: workers, tasks, the story, the summary."""

    def __init__(
        self, url: str, schema: str | None, workers: int, echo: Callable[[str], None]
    ) -> None:
        self.url = url
        self.schema = schema
        self.worker_count = workers
        self.echo = echo
        self.tracked: list[_Tracked] = []
        self.started = time.monotonic()
        sqlite_file = database.sqlite_file(url)
        log_path = Path(f"{sqlite_file}.log" if sqlite_file else "aioasync_tasks_demo.log")
        self.workers = Workers(url, schema, log_path)

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    async def run(self) -> None:
        where = database.describe(self.url, self.schema)
        self.echo(f"aioasync-tasks demo on {where}: {make_url(self.url).render_as_string()}")
        await database.reset(self.url, self.schema)
        client = Node(self.url, registry=registry, schema=self.schema, concurrency=0)
        handled = self._handle_signals()
        try:
            await client.start()
            await self._run(client)
        finally:
            try:
                await self.workers.stop_all()
            finally:
                await client.stop()
                loop = asyncio.get_running_loop()
                for signum in handled:
                    loop.remove_signal_handler(signum)

    def _handle_signals(self) -> list[signal.Signals]:
        """Ctrl-C or SIGTERM ends the demo and stops the workers gracefully; a second one
        tells the workers to stop at once."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        received = 0

        def on_signal() -> None:
            nonlocal received
            received += 1
            if received == 1 and main is not None:
                main.cancel()
            else:
                self.workers.hurry()

        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                continue
            handled.append(signum)
        return handled

    async def _run(self, client: Node) -> None:
        await self.workers.start(self.worker_count)
        self.say(
            f"started {self.worker_count} worker processes (their log: {self.workers.log_path}); "
            "waiting for them to register"
        )
        await self._until(lambda: self.workers.registered(client), "the workers to register")
        self.say(f"workers ready: {self.workers.nodes}")
        await self._create_tasks(client)
        await self._watch(client)
        await self.workers.stop_all()
        await self._summary(client)

    async def _until(self, condition: Callable[[], Awaitable[bool]], what: str) -> None:
        while not await condition():
            if time.monotonic() - self.started > DEMO_TIMEOUT:
                raise DemoFailed(f"gave up waiting for {what} after {DEMO_TIMEOUT:.0f}s")
            await asyncio.sleep(0.1)

    async def _create_tasks(self, client: Node) -> None:
        rng = random.Random(2024)
        await client.pause_group("batch")
        specs: list[tuple[str, str, str, dict[str, Any]]] = []
        for user, group, n in (("alice", "math", 24), ("alice", "batch", 16), ("bob", "math", 20)):
            u, v = _vector(rng, n), _vector(rng, n)
            specs.append(("dot", user, group, {"a": u, "b": v, "i": 0, "sum": 0}))
        for user, (m, k, n) in (("alice", (3, 4, 3)), ("bob", (2, 3, 2))):
            left, right = _matrix(rng, m, k), _matrix(rng, k, n)
            specs.append(("matmul", user, "matrix", {"a": left, "b": right, "fail_rate": 0.15}))
        for type_, user, group, ctx in specs:
            ctx["delay"] = 0.25 if type_ == "dot" else 0.5
            task_id = await client.create_task(type_, json.dumps(ctx), user=user, group=group)
            a, b = ctx["a"], ctx["b"]
            if type_ == "dot":
                expected: Any = sum(x * y for x, y in zip(a, b, strict=True))
                label = f"dot product of two {len(a)}-vectors"
            else:
                expected = _product(a, b)
                shape = f"{len(a)}x{len(b)} by {len(b)}x{len(b[0])}"
                label = f"matrix multiply {shape} (one dot task per cell)"
            self.tracked.append(_Tracked(task_id, type_, user, expected))
            self.say(f"created #{task_id}: {label}, user {user}, group {group}")
        self.say(f"group 'batch' is paused, so #{self.tracked[1].id} waits there")

    async def _watch(self, client: Node) -> None:
        story = Story(self.say, self.workers, moved=self.tracked[1].id, paused=self.tracked[2].id)
        last_print = 0.0
        while True:
            self.workers.check()
            if time.monotonic() - self.started > DEMO_TIMEOUT:
                raise DemoFailed(f"the tasks did not finish within {DEMO_TIMEOUT:.0f}s")
            tasks = {t.id: t for t in await client.get_tasks(limit=MAX_PAGE_SIZE)}
            printed = time.monotonic() - last_print >= 1.0
            if printed:
                last_print = time.monotonic()
                self._print_progress(tasks)
            await story.advance(client, tasks)
            top = [tasks.get(t.id) for t in self.tracked]
            if story.done and all(
                t is None or t.state in (State.FINISHED, State.FAILED) for t in top
            ):
                if not printed:
                    self._print_progress(tasks)
                return
            await asyncio.sleep(0.2)

    def _print_progress(self, tasks: dict[int, Task]) -> None:
        parts = []
        for tracked in self.tracked:
            task = tasks.get(tracked.id)
            if task is None:
                parts.append(f"#{tracked.id} gone")
                continue
            done, total = progress(task)
            parts.append(f"#{task.id} {done}/{total} {status(task, self.workers)}")
        cells = [t for t in tasks.values() if is_cell(t)]
        finished = sum(1 for t in cells if t.state is State.FINISHED)
        self.say("  ".join(parts) + f"  | cells {finished}/{len(cells)} done")

    async def _summary(self, client: Node) -> None:
        rows: list[list[str]] = []
        wrong = []
        for tracked in self.tracked:
            try:
                task = await client.get_task(tracked.id)
            except TaskNotFound:
                rows.append([f"#{tracked.id}", tracked.type, tracked.user, "", "deleted", "", ""])
                wrong.append(tracked.id)
                continue
            state = json.loads(task.context)
            result = state.get("sum") if task.type == "dot" else state.get("result")
            ok = task.state is State.FINISHED and result == tracked.expected
            if not ok:
                wrong.append(task.id)
            shown = json.dumps(result, separators=(",", ":")) if result is not None else "-"
            rows.append(
                [
                    f"#{task.id}",
                    task.type,
                    task.user,
                    task.group,
                    task.state.value,
                    str(task.attempts),
                    f"{shown} {'(correct)' if ok else '(WRONG)'}",
                ]
            )
        self.echo("")
        self.echo("Summary")
        self.echo(table(["TASK", "TYPE", "USER", "GROUP", "STATE", "ATTEMPTS", "RESULT"], rows))
        cells = [
            t for t in await client.get_tasks(types=["dot"], limit=MAX_PAGE_SIZE) if is_cell(t)
        ]
        retried = sum(1 for t in cells if json.loads(t.context).get("failures", 0))
        finished = sum(1 for t in cells if t.state is State.FINISHED)
        groups = ", ".join(sorted({t.group for t in cells}))
        self.echo(
            f"cells: {len(cells)} dot tasks in groups {groups}: {finished} finished, "
            f"{retried} failed at random on the way and were retried from their checkpoints"
        )
        elapsed = time.monotonic() - self.started
        if wrong:
            raise DemoFailed(f"tasks {', '.join(f'#{i}' for i in wrong)} did not end right")
        self.echo(f"demo finished in {elapsed:.1f}s: every result is correct")
        self._how_to_look(self.tracked[-1].id if self.tracked else 1)

    def _how_to_look(self, task_id: int) -> None:
        """The commands that show the demo's database, ready to copy."""
        url = make_url(self.url)
        options = ["--db", url.render_as_string(hide_password=True)]
        if self.schema:
            options += ["--schema", self.schema]
        prefix = shlex.join(["aioasync-tasks", *options])
        self.echo("")
        self.echo("Look at the demo's database with the command line:")
        for command in ("tasks list", f"tasks show {task_id}", "groups", "tasks list --json"):
            self.echo(f"  {prefix} {command}")
        if url.password:
            self.echo("(with your password in place of ***)")


async def run_demo(
    url: str | None,
    schema: str | None,
    *,
    workers: int = 2,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the demo (``aioasync-tasks demo``); raises ``DemoFailed`` with a one-line reason."""
    url, schema = database.demo_database(url, schema)
    demo = Demo(url, schema, workers, echo)
    try:
        await demo.run()
    except AsyncTasksError as exc:
        raise DemoFailed(str(exc).strip().splitlines()[0]) from exc
