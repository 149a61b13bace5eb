"""A pgqueuer worker in its own process, for ``peers.py`` (started like ``_node_proc.py``).

Same protocol as ``_node_proc.py``: ``READY <pid>`` once the worker listens (its listener has
answered a health check), end of stdin stops it, then ``RESULT {json}`` (jobs run, CPU
seconds, and the first-line ``time.time()`` of every ``stamp`` job by job id).

It uses pgqueuer's documented API only: ``PgQueuer(AsyncpgDriver(connection))``,
``@pgq.entrypoint(name)``, ``pgq.run(batch_size=…, max_concurrent_tasks=…)``. The tables live
in the benchmark's schema through the connection's ``search_path`` (pgqueuer's settings leave
the schema to it by default). Durability is pgqueuer's default (``durable``: logged tables).

Entrypoints: ``noop`` returns at once; ``stamp`` records ``time.time()`` of its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
from datetime import timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from pgqueuer import AsyncpgDriver, Job, PgQueuer

COUNTERS = {"executed": 0}
STAMPS: dict[int, float] = {}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(args: argparse.Namespace) -> None:
    connection = await asyncpg.connect(args.dsn, server_settings={"search_path": args.schema})
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        COUNTERS["executed"] += 1

    @pgq.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        STAMPS[int(job.id)] = time.time()
        COUNTERS["executed"] += 1

    running = asyncio.create_task(
        pgq.run(
            batch_size=args.batch_size,
            max_concurrent_tasks=args.concurrency,
            dequeue_timeout=timedelta(seconds=args.dequeue_timeout),
        )
    )
    # Ready once the listener answers a health check (a NOTIFY round trip through it).
    deadline = time.monotonic() + 30
    while True:
        if running.done():
            running.result()  # raises what stopped it
            raise RuntimeError("pgqueuer stopped before it was ready")
        try:
            await pgq.qm.listener_healthy(timeout=timedelta(seconds=0.2))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)

    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_stdin() -> None:
        if not sys.stdin.readline():
            loop.remove_reader(sys.stdin.fileno())
            done.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    ready_cpu = cpu_seconds()
    print(f"READY {os.getpid()}", flush=True)
    await done.wait()
    run_cpu = cpu_seconds() - ready_cpu
    pgq.shutdown.set()
    await asyncio.wait_for(running, 20)
    await connection.close()
    result: dict[str, Any] = {
        "pid": os.getpid(),
        "executed": COUNTERS["executed"],
        "cpu_seconds": round(run_cpu, 3),
        "stamps": STAMPS,
    }
    print("RESULT " + json.dumps(result), flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True, help="asyncpg DSN")
    parser.add_argument("--schema", required=True)
    parser.add_argument("--concurrency", type=int, default=10, help="max_concurrent_tasks")
    parser.add_argument("--batch-size", type=int, default=5, help="dequeue batch_size")
    parser.add_argument(
        "--dequeue-timeout", type=float, default=30.0, help="pgqueuer's poll (default its 30 s)"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - a dependency of pgqueuer

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    cli()
