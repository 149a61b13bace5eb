"""The seed's examples: a dot product, and a matrix multiply made of dot-product tasks.

``dot`` checkpoints after every element, so a paused, failed or handed-off task resumes where
it stopped; it can fail at random (``fail_rate`` in its context) and is retried up to 3 times.
``matmul`` creates one ``dot`` task per cell in its own group ``matmul-<id>`` through
``aioasync_tasks.current_node()``, stores their ids in its checkpoint (so a restart never creates
them twice), runs failed cells again, and collects the sums into the result matrix.

The definitions live in the package, in the public module ``aioasync_tasks.samples``, so that
``aioasync-tasks demo`` can run them from an installed package; this file re-exports them.
Run it, or start workers for them::

    python examples/seed_tasks.py [--db sqlite+aiosqlite:///seed.db]
    aioasync-tasks worker aioasync_tasks.samples:registry
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from aioasync_tasks import Node
from aioasync_tasks.samples import dot, matmul, registry

__all__ = ["dot", "matmul", "registry"]


async def wait_until_done(node: Node, task_id: int) -> dict[str, object]:
    """Wait until the task has ended; returns its final context."""
    task = await node.wait_task(task_id)
    print(f"task {task_id} ({task.type}): {task.state.value}, {task.attempts} attempt(s)")
    context: dict[str, object] = json.loads(task.context)
    return context


async def main(url: str) -> None:
    async with Node(url, registry=registry, concurrency=8) as node:
        a, b = [[1, 2, 3], [4, 5, 6]], [[7, 8], [9, 10], [11, 12]]
        product = await node.create_task(
            "matmul", json.dumps({"a": a, "b": b, "fail_rate": 0.2}), user="alice", group="math"
        )
        vector = await node.create_task(
            "dot", json.dumps({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "i": 0, "sum": 0}), user="bob"
        )
        print("a·b =", (await wait_until_done(node, product))["result"])
        print("dot =", (await wait_until_done(node, vector))["sum"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="database URL (default: a SQLite file in a temp folder)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(arguments.db or f"sqlite+aiosqlite:///{Path(folder) / 'seed.db'}"))
