"""The demo's worker processes: ``aioasync-tasks worker aioasync_tasks.samples:registry``, each
in its own session (so that Ctrl-C reaches the demo, which stops them) and logging to one file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import samples
from .._node import Node
from .errors import DemoFailed

WORKER_CONCURRENCY = 8
NAME_PREFIX = "demo-worker-"
STOP_TIMEOUT = 60.0
"""Seconds a worker may take to stop gracefully before it is killed."""


@dataclass
class _Process:
    number: int
    process: asyncio.subprocess.Process
    stopped: bool = False
    """Asked to stop by the demo (so its exit is expected)."""


class Workers:
    """The worker processes, numbered from 1, and the node each of them registered."""

    def __init__(self, url: str, schema: str | None, log_path: Path) -> None:
        self.url = url
        self.schema = schema
        self.log_path = log_path
        self._processes: list[_Process] = []
        self._number_of_node: dict[int, int] = {}

    async def start(self, count: int) -> None:
        """Start ``count`` workers, with a fresh log."""
        self.log_path.write_text("")
        env = {**os.environ, "AIOASYNC_TASKS_DB": self.url}
        env.pop("AIOASYNC_TASKS_SCHEMA", None)
        if self.schema:
            env["AIOASYNC_TASKS_SCHEMA"] = self.schema
        for number in range(1, count + 1):
            with self.log_path.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "aioasync_tasks",
                    "worker",
                    f"{samples.__name__}:registry",
                    "--name",
                    f"{NAME_PREFIX}{number}",
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
            self._processes.append(_Process(number, process))

    async def registered(self, client: Node) -> bool:
        """Whether every worker has registered its node (learning which node is which)."""
        self.check()
        for node in await client.get_nodes():
            if node.name.startswith(NAME_PREFIX):
                self._number_of_node[node.id] = int(node.name.removeprefix(NAME_PREFIX))
        return len(self._number_of_node) >= len(self._processes)

    @property
    def nodes(self) -> str:
        """Which worker is which node, for the story."""
        return ", ".join(f"worker {w} = node {n}" for n, w in sorted(self._number_of_node.items()))

    def number(self, node: int | None) -> int | None:
        """The number of the worker that registered ``node``, if any."""
        return None if node is None else self._number_of_node.get(node)

    def alive(self) -> set[int]:
        """The numbers of the workers the demo has not stopped."""
        return {p.number for p in self._processes if not p.stopped}

    def check(self) -> None:
        """Raise ``DemoFailed`` if a worker has exited without being asked to."""
        for worker in self._processes:
            code = worker.process.returncode
            if code is not None and not worker.stopped:
                raise DemoFailed(
                    f"worker {worker.number} exited with code {code}: {self.log_tail()}"
                )

    def log_tail(self) -> str:
        """The last line of the workers' log."""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return "(no log)"

    async def stop(self, number: int) -> int:
        """Stop worker ``number`` gracefully (SIGTERM; killed after ``STOP_TIMEOUT``); returns
        its exit code."""
        return await self._stop(next(p for p in self._processes if p.number == number))

    async def stop_all(self) -> None:
        """Stop every worker still running; always, even when the demo is interrupted."""
        alive = [p for p in self._processes if p.process.returncode is None]
        if alive:
            try:
                await asyncio.shield(asyncio.gather(*(self._stop(p) for p in alive)))
            except asyncio.CancelledError:
                for worker in alive:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                raise

    def hurry(self) -> None:
        """Send SIGTERM again to the workers still running: they stop at once."""
        for worker in self._processes:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    async def _stop(self, worker: _Process) -> int:
        worker.stopped = True
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await worker.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        code = worker.process.returncode
        assert code is not None
        return code
