"""Quickstart: one task type with checkpoints, one node, on a SQLite file. No server needed.

Run it with ``python examples/quickstart.py``.
"""

import asyncio
import json
import tempfile
from pathlib import Path

from aioasync_tasks import Node, Report, TaskRegistry

tasks = TaskRegistry()


@tasks.task("sum_squares")
async def sum_squares(context: str, stop: asyncio.Event):
    state = json.loads(context)  # the last checkpoint (the creation context the first time)
    while state["i"] < state["n"]:
        if stop.is_set():  # paused, deleted or node shutting down: the checkpoint is stored
            return
        state["total"] += state["i"] ** 2
        state["i"] += 1
        yield Report(context=json.dumps(state))  # durable before the loop goes on
    yield Report.finished(context=json.dumps(state))


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'tasks.db'}"
        async with Node(url, registry=tasks) as node:
            start = json.dumps({"i": 0, "n": 10, "total": 0})
            task_id = await node.create_task("sum_squares", start, user="alice")
            task = await node.wait_task(task_id, timeout=60)  # FINISHED or FAILED
            print(f"task {task.id} is {task.state}: {task.context}")


if __name__ == "__main__":
    asyncio.run(main())
