"""A node process for the multi-process tests (SPEC §6, §10).

Run as ``python tests/nodeproc.py --url URL [--schema S] --concurrency N --heartbeat SECONDS
--node-timeout SECONDS --stop-timeout SECONDS [--poll-interval SECONDS]``: it registers the test
task types below, starts a ``Node``, prints ``READY <node id>`` on stdout, and runs until
SIGTERM or SIGINT, then stops the node gracefully (hand-off) and exits 0.

Run as a script, Python puts ``tests/`` first on ``sys.path``, so ``_ledger`` imports as it
does in the tests. The tests import this module too, for ``build_registry`` (a client-only
node needs the types to create tasks) and ``counter_context``.

Task types, all writing to the ledger tables of ``_ledger`` in the same database:

``counter``
    Context ``{"i": k, "n": N, "delay": seconds, "gap": seconds}``: steps ``k`` … ``N-1``, each
    taking ``delay`` seconds; a step appends its ledger row, waits ``gap`` seconds (a window in
    which a kill leaves a logged step without its checkpoint), then yields the checkpoint
    ``i = k + 1``. It checks
    ``stop`` between steps only, so a stop arriving mid-step lets that step finish and be
    checkpointed. Registered with ``max_attempts=3`` (a rescued task resumes).
``cleaned``
    ``counter`` with a cleanup handler that records its run in ``cleanups``.
``stubborn``
    Records one ledger step, checkpoints it, then ignores ``stop`` forever. When
    ``CancelledError`` is thrown in, it records ``stop seen`` (with the time it noticed) and
    ``cancelled`` in the events table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator

from _ledger import LedgerWriter, ledger_engine

from aioasync_tasks import Node, Report, TaskInfo, TaskRegistry, current_task

_writers: list[LedgerWriter] = []
"""The ledger writer of this node process (set by ``_serve``)."""


def _ledger() -> LedgerWriter:
    assert _writers, "the ledger is only available inside a node process"
    return _writers[0]


def _info() -> TaskInfo:
    info = current_task()
    assert info is not None
    return info


def counter_context(n: int, *, delay: float = 0.02, gap: float = 0.0, i: int = 0) -> str:
    return json.dumps({"i": i, "n": n, "delay": delay, "gap": gap})


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


def build_registry(*, stop_timeout: float = 30.0) -> TaskRegistry:
    registry = TaskRegistry()
    registry.register_task("counter", counter, max_attempts=3)
    registry.register_task("cleaned", counter, cleanup, max_attempts=3)
    registry.register_task("stubborn", stubborn, stop_timeout=stop_timeout)
    return registry


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--node-timeout", type=float, default=30.0)
    parser.add_argument("--stop-timeout", type=float, default=30.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_serve(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
