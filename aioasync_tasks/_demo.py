"""``aioasync-tasks demo``, the main job of the README, which runs the sample tasks of
``aioasync_tasks.samples`` on worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from . import samples
from ._cli import table
from ._errors import AsyncTasksError, TaskNotFound
from ._models import State, Task
from ._node import MAX_PAGE_SIZE, Node
from ._schema import GROUPS, NODES, TASKS, VERSIONS
from ._urls import engine_from_url
from .samples import registry

DEMO_DB = "sqlite+aiosqlite:///aioasync_tasks_demo.db"
DEMO_SCHEMA = "aioasync_tasks_demo"
DEMO_TIMEOUT = 120.0
"""Seconds the demo may take in all before it gives up (it needs about 10)."""
WORKER_CONCURRENCY = 8
_OUR_TABLES = frozenset({TASKS, NODES, GROUPS, VERSIONS})
_SHORT_STATE = {
    State.INIT: "init",
    State.PENDING: "pend",
    State.RUNNING: "run",
    State.CANCELING: "canc",
    State.PAUSED: "PAUSED",
    State.FINISHED: "done",
    State.FAILED: "FAILED",
    State.DELETING: "del",
}


class DemoFailed(Exception):
    """The demo could not run, or went wrong; the message says why in one line."""


def demo_database(url: str | None, schema: str | None) -> tuple[str, str | None]:
    """The demo's URL (an absolute SQLite path, so that workers find the same file) and
    schema (PostgreSQL only, default ``aioasync_tasks_demo``)."""
    parsed = make_url(url or DEMO_DB)
    if parsed.get_backend_name() == "sqlite":
        if schema is not None:
            raise DemoFailed("--schema is for PostgreSQL; give SQLite another file instead")
        if not parsed.database or parsed.database == ":memory:":
            raise DemoFailed("the demo needs a SQLite file: sqlite+aiosqlite:///path/demo.db")
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
        return parsed.render_as_string(hide_password=False), None
    return parsed.render_as_string(hide_password=False), schema or DEMO_SCHEMA


async def _check_and_reset(url: str, schema: str | None) -> None:
    """Empty the demo database — but only if it holds nothing but an earlier demo's tasks."""
    engine: AsyncEngine = engine_from_url(url)
    where = f"schema {schema!r}" if schema else "this database"
    try:
        async with engine.connect() as conn:

            def tables(sync: sa.Connection) -> list[str]:
                return sa.inspect(sync).get_table_names(schema=schema)

            names = set(await conn.run_sync(tables))
            foreign = names - _OUR_TABLES
            if foreign and schema is None:
                raise DemoFailed(
                    f"{where} has other tables ({', '.join(sorted(foreign))}); the demo wipes "
                    "its database: give it another --db"
                )
            prefix = engine.dialect.identifier_preparer.quote_schema(schema) + "." if schema else ""

            def qualify(table: str) -> str:
                return prefix + table

            if TASKS in names:
                others = await conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM {qualify(TASKS)} WHERE type NOT IN ('dot', 'matmul')"
                    )
                )
                if others:
                    raise DemoFailed(
                        f"{where} holds tasks that are not the demo's; the demo wipes its "
                        "database: give it another --db or --schema"
                    )
            if schema is not None:
                for table in sorted(names & _OUR_TABLES):
                    await conn.execute(sa.text(f"DROP TABLE {qualify(table)} CASCADE"))
                await conn.commit()
    except sa.exc.DBAPIError as exc:
        raise DemoFailed(f"cannot use the demo database: {str(exc.orig).strip()}") from exc
    except OSError as exc:
        raise DemoFailed(f"cannot reach the demo database: {exc}") from exc
    finally:
        await engine.dispose()
    if schema is None:
        database = make_url(url).database
        assert database is not None
        await asyncio.to_thread(_remove_sqlite_files, database)


def _remove_sqlite_files(database: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(database + suffix).unlink(missing_ok=True)


@dataclass
class _WorkerProcess:
    number: int
    process: asyncio.subprocess.Process
    stopped: bool = False
    """Asked to stop by the demo (so its exit is expected)."""


@dataclass
class _Tracked:
    """A top-level task of the demo and what it must come to."""

    id: int
    type: str
    user: str
    expected: Any


@dataclass
class _Script:
    """Where the demo's story has got to."""

    step: str = "pause"
    paused_since: float = 0.0
    handoff: dict[int, int] = field(default_factory=dict)
    """Task id → number of runs it had when its worker was told to stop."""
    reported: set[int] = field(default_factory=set)
    old_worker: int = 0


def _vector(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(n)]


def _matrix(rng: random.Random, rows: int, cols: int) -> list[list[int]]:
    return [_vector(rng, cols) for _ in range(rows)]


def _product(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> list[list[int]]:
    return [
        [sum(x * y for x, y in zip(row, col, strict=True)) for col in zip(*b, strict=True)]
        for row in a
    ]


def _progress(task: Task) -> tuple[int, int]:
    state = json.loads(task.context)
    if task.type == "matmul":
        total = len(state["a"]) * len(state["b"][0])
        return (total if task.state is State.FINISHED else state.get("done", 0)), total
    return state.get("i", 0), len(state["a"])


class Demo:
    """Runs the story: workers, tasks, pause/resume, move, hand-off, summary."""

    def __init__(
        self, url: str, schema: str | None, workers: int, echo: Callable[[str], None]
    ) -> None:
        self.url = url
        self.schema = schema
        self.worker_count = workers
        self.echo = echo
        self.workers: list[_WorkerProcess] = []
        self.worker_of_node: dict[int, int] = {}
        self.tracked: list[_Tracked] = []
        self.started = time.monotonic()
        database = make_url(url).database if schema is None else None
        self.log_path = Path(f"{database}.log" if database else "aioasync_tasks_demo.log")

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    async def run(self) -> None:
        backend = "PostgreSQL, schema " + repr(self.schema) if self.schema else "SQLite"
        self.echo(f"aioasync-tasks demo on {backend}: {make_url(self.url).render_as_string()}")
        await _check_and_reset(self.url, self.schema)
        client = Node(self.url, registry=registry, schema=self.schema, concurrency=0)
        handled = self._handle_signals()
        try:
            await client.start()
            await self._run(client)
        finally:
            try:
                await self._stop_workers()
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
                return
            for worker in self.workers:
                if worker.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGTERM)

        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                continue
            handled.append(signum)
        return handled

    async def _run(self, client: Node) -> None:
        self.log_path.write_text("")
        for number in range(1, self.worker_count + 1):
            await self._start_worker(number)
        self.say(
            f"started {self.worker_count} worker processes (their log: {self.log_path}); "
            "waiting for them to register"
        )
        await self._until(lambda: self._workers_registered(client), "the workers to register")
        nodes = ", ".join(f"worker {w} = node {n}" for n, w in sorted(self.worker_of_node.items()))
        self.say(f"workers ready: {nodes}")
        await self._create_tasks(client)
        await self._watch(client)
        await self._stop_workers()
        await self._summary(client)

    # -- workers ----------------------------------------------------------------------------

    async def _start_worker(self, number: int) -> None:
        env = {**os.environ, "AIOASYNC_TASKS_DB": self.url}
        env.pop("AIOASYNC_TASKS_SCHEMA", None)
        if self.schema:
            env["AIOASYNC_TASKS_SCHEMA"] = self.schema
        with self.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aioasync_tasks",
                "worker",
                f"{samples.__name__}:registry",
                "--name",
                f"demo-worker-{number}",
                "--concurrency",
                str(WORKER_CONCURRENCY),
                "--heartbeat-interval",
                "0.5",
                "--node-timeout",
                "5",
                "--poll-interval",
                "0.2",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops its workers
            )
        self.workers.append(_WorkerProcess(number, process))

    def _check_workers(self) -> None:
        for worker in self.workers:
            code = worker.process.returncode
            if code is not None and not worker.stopped:
                raise DemoFailed(
                    f"worker {worker.number} exited with code {code}: {self._log_tail()}"
                )

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return "(no log)"

    async def _stop_worker(self, worker: _WorkerProcess) -> int:
        worker.stopped = True
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await worker.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        code = worker.process.returncode
        assert code is not None
        return code

    async def _stop_workers(self) -> None:
        """Stop every worker still running; always, even when the demo is interrupted."""
        alive = [w for w in self.workers if w.process.returncode is None]
        if alive:
            try:
                await asyncio.shield(asyncio.gather(*(self._stop_worker(w) for w in alive)))
            except asyncio.CancelledError:
                for worker in alive:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                raise

    async def _workers_registered(self, client: Node) -> bool:
        self._check_workers()
        for node in await client.get_nodes():
            if node.name.startswith("demo-worker-"):
                self.worker_of_node[node.id] = int(node.name.rsplit("-", 1)[1])
        return len(self.worker_of_node) >= self.worker_count

    async def _until(self, condition: Callable[[], Any], what: str) -> None:
        while not await condition():
            if time.monotonic() - self.started > DEMO_TIMEOUT:
                raise DemoFailed(f"gave up waiting for {what} after {DEMO_TIMEOUT:.0f}s")
            await asyncio.sleep(0.1)

    # -- tasks ------------------------------------------------------------------------------

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
        script = _Script()
        last_print = 0.0
        while True:
            self._check_workers()
            if time.monotonic() - self.started > DEMO_TIMEOUT:
                raise DemoFailed(f"the tasks did not finish within {DEMO_TIMEOUT:.0f}s")
            tasks = {t.id: t for t in await client.get_tasks(limit=MAX_PAGE_SIZE)}
            printed = time.monotonic() - last_print >= 1.0
            if printed:
                last_print = time.monotonic()
                self._print_progress(tasks)
            await self._advance(client, script, tasks)
            top = [tasks.get(t.id) for t in self.tracked]
            if script.step == "done" and all(
                t is None or t.state in (State.FINISHED, State.FAILED) for t in top
            ):
                if not printed:
                    self._print_progress(tasks)
                return
            await asyncio.sleep(0.2)

    def _where(self, task: Task) -> str:
        short = _SHORT_STATE[task.state]
        if task.node is not None and task.state in (State.RUNNING, State.CANCELING):
            return f"{short}@w{self.worker_of_node.get(task.node, '?')}"
        return short

    def _print_progress(self, tasks: dict[int, Task]) -> None:
        parts = []
        for tracked in self.tracked:
            task = tasks.get(tracked.id)
            if task is None:
                parts.append(f"#{tracked.id} gone")
                continue
            done, total = _progress(task)
            parts.append(f"#{task.id} {done}/{total} {self._where(task)}")
        cells = [t for t in tasks.values() if t.group.startswith("matmul-")]
        finished = sum(1 for t in cells if t.state is State.FINISHED)
        self.say("  ".join(parts) + f"  | cells {finished}/{len(cells)} done")

    async def _advance(self, client: Node, script: _Script, tasks: dict[int, Task]) -> None:
        """One step of the story, when its moment has come."""
        _, dot_b, dot_c = (tasks.get(t.id) for t in self.tracked[:3])
        if dot_b is None or dot_c is None:
            raise DemoFailed("a task of the demo disappeared")
        c_ended = dot_c.state in (State.FINISHED, State.FAILED)
        if script.step == "pause":
            if dot_c.state is State.RUNNING and _progress(dot_c)[0] >= 3:
                self.say(
                    f">> pausing #{dot_c.id} (bob's dot product), now at step {_progress(dot_c)[0]}"
                )
                await client.pause_task(dot_c.id)
                script.step = "paused"
            elif c_ended:
                script.step = "paused"  # past the moment: skip this part of the story
        elif script.step == "paused" and (dot_c.state is State.PAUSED or c_ended):
            if not c_ended:
                script.paused_since = time.monotonic()
                self.say(f">> #{dot_c.id} is PAUSED, its checkpoint at step {_progress(dot_c)[0]}")
            self.say(f">> moving #{dot_b.id} from the paused group 'batch' to group 'math'")
            await client.change_task_group(dot_b.id, "math")
            script.step = "moved"
        elif script.step == "moved" and dot_b.state is not State.PENDING:
            self.say(f">> #{dot_b.id} was claimed in group 'math': {self._where(dot_b)}")
            script.step = "resume"
        elif script.step == "resume" and time.monotonic() - script.paused_since > 1.5:
            if dot_c.state is State.PAUSED:
                self.say(f">> resuming #{dot_c.id}")
                await client.run_task(dot_c.id)
            script.step = "resumed"
        elif script.step == "resumed" and (dot_c.state is State.RUNNING or c_ended):
            if not c_ended:
                runs = json.loads(dot_c.context).get("runs", [])
                self.say(
                    f">> #{dot_c.id} runs again on worker "
                    f"{self.worker_of_node.get(dot_c.node or 0, '?')} from step "
                    f"{runs[-1][1] if runs else '?'}, not from the start"
                )
            script.step = "handoff"
        elif script.step == "handoff":
            await self._hand_off(script, tasks)
        elif script.step == "handing-off":
            self._report_moves(script, tasks)

    async def _hand_off(self, script: _Script, tasks: dict[int, Task]) -> None:
        running: dict[int, list[Task]] = {}
        for task in tasks.values():
            if task.state is State.RUNNING and task.node is not None:
                running.setdefault(task.node, []).append(task)
        alive = {w.number for w in self.workers if not w.stopped}
        candidates = [n for n in running if self.worker_of_node.get(n) in alive]
        if not candidates or len(alive) < 2:
            self.say(">> no worker is running tasks: skipping the hand-off")
            script.step = "done"
            return
        node_id = max(candidates, key=lambda n: len(running[n]))
        number = self.worker_of_node[node_id]
        script.old_worker = number
        script.handoff = {
            t.id: len(json.loads(t.context).get("runs", [])) for t in running[node_id]
        }
        ids = " ".join(f"#{t}" for t in sorted(script.handoff))
        self.say(f">> SIGTERM to worker {number} (node {node_id}), which runs {ids}")
        worker = next(w for w in self.workers if w.number == number)
        code = await self._stop_worker(worker)
        self.say(
            f">> worker {number} exited with code {code} after handing its tasks back from their "
            "checkpoints"
        )
        if code != 0:
            raise DemoFailed(f"worker {number} exited with code {code}: {self._log_tail()}")
        script.step = "handing-off"

    def _report_moves(self, script: _Script, tasks: dict[int, Task]) -> None:
        for task_id, runs_before in script.handoff.items():
            if task_id in script.reported:
                continue
            task = tasks.get(task_id)
            if task is None:
                script.reported.add(task_id)
                continue
            state = json.loads(task.context)
            runs = state.get("runs", [])
            name = self._name(task)
            if len(runs) > runs_before:
                node, step = runs[runs_before]
                total = _progress(task)[1]
                what = "cells done" if task.type == "matmul" else "elements done"
                self.say(
                    f">> {name} moved from worker {script.old_worker} to worker "
                    f"{self.worker_of_node.get(node, '?')}, resuming from its checkpoint: "
                    f"{step}/{total} {what}"
                )
                script.reported.add(task_id)
            elif task.state in (State.FINISHED, State.FAILED):
                self.say(f">> {name} finished on worker {script.old_worker} before it stopped")
                script.reported.add(task_id)
        if len(script.reported) == len(script.handoff):
            script.step = "done"

    def _name(self, task: Task) -> str:
        if task.group.startswith("matmul-"):
            cell = json.loads(task.context).get("cell", "?")
            return f"cell {tuple(cell)} of #{task.group.removeprefix('matmul-')} (task #{task.id})"
        return f"#{task.id} ({task.type}, {task.user})"

    # -- summary ----------------------------------------------------------------------------

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
        cells = [t for t in await client.get_tasks(limit=MAX_PAGE_SIZE) if t.type == "dot"]
        cells = [t for t in cells if t.group.startswith("matmul-")]
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


async def run_demo(
    url: str | None,
    schema: str | None,
    *,
    workers: int = 2,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the demo (``aioasync-tasks demo``); raises ``DemoFailed`` with a one-line reason."""
    url, schema = demo_database(url, schema)
    demo = Demo(url, schema, workers, echo)
    try:
        await demo.run()
    except AsyncTasksError as exc:
        raise DemoFailed(str(exc).strip().splitlines()[0]) from exc
