"""Processes for the fault tests (``test_faults_processes``): a node process with task types that
crash their own process, and a bulk creator.

``python tests/faultproc.py node --url URL [--schema S] [--cleanup-attempts N] …``
    Like ``nodeproc.py`` (same ``READY <node id>`` / ``STOPPED`` protocol, same ledger and the
    same ``counter`` type), with one more task type:

    ``doomed``
        Its running handler finishes at once. Its cleanup handler records its run in the
        ledger's ``cleanups`` table (committed), then kills its own process with SIGKILL: a
        cleanup that can never succeed, the crash loop of a poison task.

``python tests/faultproc.py bulk --url URL --count N``
    Creates ``N`` INIT tasks of type ``bulk`` (a type no node runs) in one ``create_tasks``
    call, then prints ``CREATED <count> <seconds>``.

Run as a script, Python puts ``tests/`` first on ``sys.path``, so ``_ledger`` and ``nodeproc``
import as they do in the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import nodeproc
from _ledger import LedgerWriter, ledger_engine

from aioasync_tasks import Node, Report, TaskRegistry, current_task


async def doomed(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    yield Report.finished(context="ran")


async def doomed_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = current_task()
    assert info is not None
    await nodeproc._ledger().cleanup(info.id, info.node, context)
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(3600)  # never reached
    yield Report.finished()


async def bulk(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    raise AssertionError("bulk tasks are never run")
    yield Report()


def build_registry() -> TaskRegistry:
    registry = nodeproc.build_registry()
    registry.register_task("doomed", doomed, doomed_cleanup)
    registry.register_task("bulk", bulk)
    return registry


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    engine = ledger_engine(args.url, args.schema)
    nodeproc._writers.append(LedgerWriter(engine))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    node = Node(
        args.url,
        registry=build_registry(),
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    args = _parse(argv)
    if args.command == "bulk":
        return asyncio.run(_bulk(args))
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
