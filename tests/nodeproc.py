"""The node process of the multi-process tests (``_cluster``, ``test_multiprocess``,
``test_faults_processes``), and a bulk creator.

``python tests/nodeproc.py node --url URL [--schema S] [--concurrency N] [--heartbeat SECONDS]
[--node-timeout SECONDS] [--stop-timeout SECONDS] [--poll-interval SECONDS]
[--cleanup-attempts N]``
    Registers the test task types below, starts a ``Node``, prints ``READY <node id>`` on
    stdout, and runs until SIGTERM or SIGINT, then stops the node gracefully (hand-off), prints
    ``STOPPED`` and exits 0.

``python tests/nodeproc.py bulk --url URL [--schema S] --count N``
    Creates ``N`` INIT tasks of type ``bulk`` (never run: not ``auto_run``) in one
    ``create_tasks`` call, then prints ``CREATED <count> <seconds>``.

``python tests/nodeproc.py unique --url URL [--schema S] --keys K1,K2,… --seed N``
    A creator of unique tasks: starts a client-only node, prints ``READY``, waits for one line
    on stdin (so that every creator starts at once), then creates one ``keyed`` task per key
    at once — each ``create_task`` with a random ``on_conflict``, in a random order — and all
    of them again in one ``create_tasks`` with ``on_conflict="skip"``. Prints one JSON line:
    per key, the task ids it was given (a ``DuplicateTask``'s ``task_id`` for an error).

Run as a script, Python puts ``tests/`` first on ``sys.path``, so ``_ledger`` imports as it
does in the tests. The tests import this module too, for ``build_registry`` (a client-only
node needs the types to create tasks).

Task types, all writing to the ledger tables of ``_ledger`` in the same database:

``counter``
    Context ``{"i": k, "n": N, "delay": seconds, "gap": seconds}`` (``_helpers.counter_context``):
    steps ``k`` … ``N-1``, each taking ``delay`` seconds; a step appends its ledger row, waits
    ``gap`` seconds (a window in which a kill leaves a logged step without its checkpoint), then
    yields the checkpoint ``i = k + 1``. It checks ``stop`` between steps only, so a stop
    arriving mid-step lets that step finish and be checkpointed. Registered with
    ``max_attempts=3`` (a rescued task resumes).
``cleaned``
    ``counter`` with a cleanup handler that records its run in ``cleanups``.
``stubborn``
    Records one ledger step, checkpoints it, then ignores ``stop`` forever. When
    ``CancelledError`` is thrown in, it records ``stop seen`` (with the time it noticed) and
    ``cancelled`` in the events table.
``doomed``
    Its running handler finishes at once. Its cleanup handler records its run in the ledger's
    ``cleanups`` table (committed), then kills its own process with SIGKILL: a cleanup that can
    never succeed, the crash loop of a poison task.
``bulk``
    Created by the ``bulk`` command, never run.
``keyed``
    Context ``{"key": K}``: records ``unique K`` in the ledger's events table when it starts,
    then runs until it is stopped.
``ticker``
    The task of a periodic schedule (``test_periodic_processes``): records one ledger step
    (step 0) and finishes. Its tick is its task's ``run_at``. Registered with
    ``max_attempts=3`` (a task rescued from a killed node runs again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from _ledger import LedgerWriter, ledger_engine

from aioasync_tasks import DuplicateTask, Node, Report, TaskInfo, TaskRegistry, current_task

_writers: list[LedgerWriter] = []
"""The ledger writer of this node process (set by ``_serve``)."""


def _ledger() -> LedgerWriter:
    assert _writers, "the ledger is only available inside a node process"
    return _writers[0]


def _info() -> TaskInfo:
    info = current_task()
    assert info is not None
    return info


async def counter(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    state = json.loads(context)
    while state["i"] < state["n"]:
        if stop.is_set():
            return  # the last step's checkpoint is already stored
        step = state["i"]
        t_start = time.time()
        await asyncio.sleep(state["delay"])
        await _ledger().step(info.id, step, info.node, t_start)
        if state.get("gap"):  # work between logging a step and checkpointing it
            await asyncio.sleep(state["gap"])
        state["i"] = step + 1
        yield Report(context=json.dumps(state))
    yield Report.finished(context=json.dumps(state))


async def cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    await asyncio.sleep(0.05)  # a cleanup takes a moment: other nodes may try to claim it
    await _ledger().cleanup(info.id, info.node, context)
    yield Report.finished()


async def stubborn(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    state = json.loads(context)
    t_start = time.time()
    await _ledger().step(info.id, state["i"], info.node, t_start)
    state["i"] += 1
    yield Report(context=json.dumps(state))
    seen: list[tuple[str, float]] = []
    try:
        while True:  # ignores stop on purpose, until it is cancelled
            if stop.is_set() and not seen:
                seen.append(("stop seen", time.time()))
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        # Written only now, so that no write of ours is under way when the grace period ends.
        await _ledger().events(info.id, info.node, [*seen, ("cancelled", time.time())])
        raise


async def doomed(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    yield Report.finished(context="ran")


async def doomed_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    await _ledger().cleanup(info.id, info.node, context)
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(3600)  # never reached
    yield Report.finished()


async def keyed(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    await _ledger().events(info.id, info.node, [(f"unique {json.loads(context)['key']}", 0.0)])
    yield Report(progress=0.0)
    await stop.wait()


async def ticker(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = _info()
    await _ledger().step(info.id, 0, info.node, time.time())
    yield Report.finished()


async def bulk(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    raise AssertionError("bulk tasks are never run")
    yield Report()


def build_registry(*, stop_timeout: float = 30.0) -> TaskRegistry:
    registry = TaskRegistry()
    registry.register_task("counter", counter, max_attempts=3)
    registry.register_task("cleaned", counter, cleanup, max_attempts=3)
    registry.register_task("stubborn", stubborn, stop_timeout=stop_timeout)
    registry.register_task("doomed", doomed, doomed_cleanup)
    registry.register_task("bulk", bulk)
    registry.register_task("keyed", keyed)
    registry.register_task("ticker", ticker, max_attempts=3)
    return registry


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node")
    node.add_argument("--url", required=True)
    node.add_argument("--schema", default=None)
    node.add_argument("--name", default=None)
    node.add_argument("--concurrency", type=int, default=10)
    node.add_argument("--heartbeat", type=float, default=5.0)
    node.add_argument("--node-timeout", type=float, default=30.0)
    node.add_argument("--stop-timeout", type=float, default=30.0)
    node.add_argument("--poll-interval", type=float, default=1.0)
    node.add_argument("--cleanup-attempts", type=int, default=3)
    create = sub.add_parser("bulk")
    create.add_argument("--url", required=True)
    create.add_argument("--schema", default=None)
    create.add_argument("--count", type=int, required=True)
    unique = sub.add_parser("unique")
    unique.add_argument("--url", required=True)
    unique.add_argument("--schema", default=None)
    unique.add_argument("--keys", required=True)
    unique.add_argument("--seed", type=int, required=True)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    engine = ledger_engine(args.url, args.schema)
    _writers.append(LedgerWriter(engine))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = Node(
        args.url,
        registry=build_registry(stop_timeout=args.stop_timeout),
        schema=args.schema,
        concurrency=args.concurrency,
        heartbeat_interval=args.heartbeat,
        node_timeout=args.node_timeout,
        poll_interval=args.poll_interval,
        retry_base=0.01,
        retry_cap=0.05,
        cleanup_attempts=args.cleanup_attempts,
        name=args.name,
    )
    try:
        async with node:
            print(f"READY {node.id}", flush=True)
            await stop.wait()
            print("STOPPING", flush=True)
    finally:
        await engine.dispose()
    print("STOPPED", flush=True)
    return 0


async def _bulk(args: argparse.Namespace) -> int:
    node = Node(args.url, registry=build_registry(), schema=args.schema, concurrency=0)
    async with node:
        began = time.monotonic()
        ids = await node.create_tasks(
            [{"type": "bulk", "auto_run": False} for _ in range(args.count)]
        )
        elapsed = time.monotonic() - began
    print(f"CREATED {len(ids)} {elapsed:.2f}", flush=True)
    return 0


async def _unique(args: argparse.Namespace) -> int:
    keys = args.keys.split(",")
    rng = random.Random(args.seed)
    seen: dict[str, list[int | None]] = {key: [] for key in keys}
    node = Node(args.url, registry=build_registry(), schema=args.schema, concurrency=0)
    async with node:
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def create(key: str, on_conflict: Any) -> None:
            context = json.dumps({"key": key})
            try:
                task_id: int | None = await node.create_task(
                    "keyed", context, unique_key=key, on_conflict=on_conflict
                )
            except DuplicateTask as exc:
                task_id = exc.task_id
            seen[key].append(task_id)

        order = rng.sample(keys, len(keys))
        choices = ["skip", "replace", "error"]
        await asyncio.gather(*(create(key, rng.choice(choices)) for key in order))
        order = rng.sample(keys, len(keys))
        items = [
            {
                "type": "keyed",
                "context": json.dumps({"key": k}),
                "unique_key": k,
                "on_conflict": "skip",
            }
            for k in order
        ]
        for key, task_id in zip(order, await node.create_tasks(items), strict=True):
            seen[key].append(task_id)
    print(json.dumps(seen), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    args = _parse(argv)
    if args.command == "bulk":
        return asyncio.run(_bulk(args))
    if args.command == "unique":
        return asyncio.run(_unique(args))
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
