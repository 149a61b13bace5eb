"""Node processes for the multi-process tests: ``NodeProcess`` runs ``tests/nodeproc.py``,
``Cluster`` bundles the test's database, a client-only node, the ledger and the processes.
The ``cluster`` fixture (in ``conftest.py``) builds one per test."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _db import DbTarget
from _helpers import all_in, make_node, state_of
from _ledger import LedgerReader, create_tables, ledger_engine
from nodeproc import build_registry

from aioasync_tasks import Node, State, Task

NODEPROC = Path(__file__).with_name("nodeproc.py")
FAST_PROCESS = {
    "heartbeat": 0.3,
    "node_timeout": 3.0,
    "poll_interval": 0.05,
    "stop_timeout": 30.0,
}
"""Timings of the node processes: quick heartbeats and rescues."""
READY_TIMEOUT = 60.0
"""Bound on a node process starting (imports and migrations on a busy 2-core machine)."""
EXIT_TIMEOUT = 60.0


class NodeProcess:
    """One ``nodeproc.py node`` process. Its stderr (the node's log) goes to the test's
    output."""

    def __init__(self, db: DbTarget, name: str, options: dict[str, Any]) -> None:
        self.db = db
        self.name = name
        self.options = options
        self.node_id = 0
        self.output = b""
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None
        return self._proc

    async def start(self) -> int:
        """Start the process and wait until its node runs; returns the node id."""
        args = [sys.executable, str(NODEPROC), "node", "--url", self.db.url, "--name", self.name]
        if self.db.schema is not None:
            args += ["--schema", self.db.schema]
        for key, value in self.options.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        self._proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT):
            line = await self.proc.stdout.readline()
        if not line.startswith(b"READY "):
            await self.close()
            raise AssertionError(f"node process {self.name} did not start: {line!r}")
        self.node_id = int(line.split()[1])
        return self.node_id

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to release anything."""
        self.proc.kill()

    def terminate(self) -> None:
        """SIGTERM: the node stops gracefully and hands its tasks off."""
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Wait for the process to exit; returns its exit code."""
        async with asyncio.timeout(EXIT_TIMEOUT):
            out, _ = await self.proc.communicate()
        self.output += out
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self) -> None:
        """Stop gracefully and check that the process exited 0 after a clean stop."""
        self.terminate()
        code = await self.wait()
        assert code == 0, f"node process {self.name} exited with {code}: {self.output!r}"
        assert self.output.splitlines()[-1] == b"STOPPED", self.output

    async def close(self) -> None:
        """Kill the process if it still runs and reap it."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.communicate()


@dataclass
class Cluster:
    """The test's database, a client-only node on it, the ledger, and the node processes."""

    db: DbTarget
    client: Node
    ledger: LedgerReader
    processes: list[NodeProcess]

    async def start(self, **options: Any) -> NodeProcess:
        process = NodeProcess(self.db, f"proc{len(self.processes)}", {**FAST_PROCESS, **options})
        self.processes.append(process)
        await process.start()
        return process

    async def start_many(self, count: int, **options: Any) -> list[NodeProcess]:
        return list(await asyncio.gather(*(self.start(**options) for _ in range(count))))

    async def close(self) -> None:
        for process in self.processes:
            await process.close()

    async def task(self, task_id: int) -> Task:
        return await self.client.get_task(task_id)

    def all_in(self, task_ids: list[int], *states: State) -> Callable[[], Awaitable[bool]]:
        return all_in(self.client, task_ids, *states)

    def steps_at_least(self, task_ids: list[int], count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            counts = await self.ledger.step_counts()
            return all(counts.get(t, 0) >= count for t in task_ids)

        return check

    def gone(self, task_id: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await state_of(self.client, task_id) is None

        return check


@asynccontextmanager
async def open_cluster(db: DbTarget) -> AsyncIterator[Cluster]:
    """A cluster on ``db``: migrated, ledger tables created, processes killed at the end."""
    engine = ledger_engine(db.url, db.schema)
    try:
        async with make_node(db, build_registry(), concurrency=0) as client:  # migrates
            await create_tables(engine)
            result = Cluster(db, client, LedgerReader(engine), [])
            try:
                yield result
            finally:
                await result.close()
    finally:
        await engine.dispose()
