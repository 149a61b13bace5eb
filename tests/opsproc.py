"""Random user operations on a set of tasks, fired by client-only nodes.

Imported by ``test_concurrency.py`` (which fires the same kind of calls in its own process) and
run by it as a separate OS process::

    python opsproc.py --url URL --schema SCHEMA --ids 1,2,3 --seed 7

The process starts its client nodes, prints ``ready``, waits for one line on stdin (so that
every caller starts at the same time), fires its calls and prints one JSON line: the calls that
succeeded and were refused per kind, the task ids it deleted (and force-deleted), and any
unexpected error. It exits with status 1 when there was an unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from aioasync_tasks import InvalidTransition, Node, TaskNotFound

GROUPS = ("default", "g1", "g2")
KINDS = ("run", "pause", "change_group", "delete", "force_delete")
WEIGHTS = (32, 32, 24, 10, 2)
NODES = 2
STREAMS_PER_NODE = 5
OPS_PER_STREAM = 10
CALLS = NODES * STREAMS_PER_NODE * OPS_PER_STREAM

Op = tuple[str, int, str | None]
"""(kind, task id, group for change_group)."""


@dataclass
class Tally:
    """The results of one caller's calls."""

    ok: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    deleted: set[int] = field(default_factory=set)
    forced: set[int] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "ok": dict(self.ok),
            "rejected": dict(self.rejected),
            "deleted": sorted(self.deleted),
            "forced": sorted(self.forced),
            "unexpected": self.unexpected,
        }

    def merge(self, summary: dict[str, Any]) -> None:
        self.ok.update(summary["ok"])
        self.rejected.update(summary["rejected"])
        self.deleted.update(summary["deleted"])
        self.forced.update(summary["forced"])
        self.unexpected.extend(summary["unexpected"])

    @property
    def calls(self) -> int:
        return sum(self.ok.values()) + sum(self.rejected.values()) + len(self.unexpected)


def random_ops(rng: random.Random, task_ids: list[int], count: int) -> list[Op]:
    """``count`` random calls: the same list for the same ``rng`` state (fixed seed)."""
    ops: list[Op] = []
    for _ in range(count):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        group = rng.choice(GROUPS) if kind == "change_group" else None
        ops.append((kind, rng.choice(task_ids), group))
    return ops


async def call(node: Node, op: Op, tally: Tally) -> None:
    """One call; it must succeed or be refused with InvalidTransition/TaskNotFound."""
    kind, task_id, group = op
    try:
        if kind == "run":
            await node.run_task(task_id)
        elif kind == "pause":
            await node.pause_task(task_id)
        elif kind == "change_group":
            assert group is not None
            await node.change_task_group(task_id, group)
        else:
            await node.delete_task(task_id, force=kind == "force_delete")
    except (InvalidTransition, TaskNotFound) as exc:
        tally.rejected[type(exc).__name__] += 1
    except Exception as exc:  # anything else is a failure, reported by the caller
        tally.unexpected.append(f"{kind} {task_id}: {type(exc).__name__}: {exc}")
    else:
        tally.ok[kind] += 1
        if kind in ("delete", "force_delete"):
            tally.deleted.add(task_id)
        if kind == "force_delete":
            tally.forced.add(task_id)


async def run_stream(node: Node, ops: list[Op], tally: Tally) -> None:
    """The calls of one stream, one after the other (streams run concurrently)."""
    for op in ops:
        await call(node, op, tally)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--ids", required=True, help="comma-separated task ids")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    ids = [int(i) for i in args.ids.split(",")]
    rng = random.Random(args.seed)
    tally = Tally()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                Node(args.url, concurrency=0, schema=args.schema, auto_migrate=False)
            )
            for _ in range(NODES)
        ]
        streams = [
            (nodes[s % NODES], random_ops(rng, ids, OPS_PER_STREAM))
            for s in range(NODES * STREAMS_PER_NODE)
        ]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(run_stream(node, ops, tally) for node, ops in streams))
    print(json.dumps(tally.summary()), flush=True)
    return 1 if tally.unexpected else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
