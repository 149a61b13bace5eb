"""A worker node in its own process, for the benchmarks (started by ``_common.NodeProc``).

Protocol on stdin/stdout: it prints ``READY <pid>`` once the node runs; a line ``rss`` on stdin
answers ``RSS {json}``; end of stdin (or SIGTERM) stops the node gracefully, then it prints
``RESULT {json}`` (peak RSS, executions) and exits. With ``--profile-out`` the whole life of the
node is recorded by pyinstrument.

Task types (all registered, so one process serves every benchmark):

- ``noop``: finishes at once;
- ``stamp``: finishes with ``time.time()`` of its first line as its context (wake-up latency);
- ``checkpoints``: yields ``--checkpoints`` durable checkpoints, then finishes;
- ``sleep``: waits ``float(context)`` seconds (or until stopped), then finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from typing import Any

from aioasync_tasks import Node, Observer, Report, TaskRegistry

COUNTERS = {"executed": 0, "checkpoints": 1000}


def build_registry(*, cleanup_handler: bool = False) -> TaskRegistry:
    """The benchmarks' task types; with ``cleanup_handler``, also ``cleaned``, a type with a
    cleanup handler, so that the node makes a cleanup claim at every claim round (no task of
    it is created: the claims find nothing)."""
    tasks = TaskRegistry()

    @tasks.task("noop")
    async def noop(context: str, stop: asyncio.Event) -> Any:
        COUNTERS["executed"] += 1
        yield Report.finished()

    @tasks.task("stamp")
    async def stamp(context: str, stop: asyncio.Event) -> Any:
        first_line = time.time()
        COUNTERS["executed"] += 1
        yield Report.finished(context=repr(first_line))

    @tasks.task("checkpoints")
    async def checkpoints(context: str, stop: asyncio.Event) -> Any:
        COUNTERS["executed"] += 1
        for i in range(COUNTERS["checkpoints"]):
            if stop.is_set():
                return
            yield Report(context=str(i))
        yield Report.finished()

    @tasks.task("sleep")
    async def sleep(context: str, stop: asyncio.Event) -> Any:
        COUNTERS["executed"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), float(context or "1"))
        yield Report.finished()

    if cleanup_handler:

        async def cleaned(context: str, stop: asyncio.Event) -> Any:
            yield Report.finished()

        tasks.register_task("cleaned", cleaned, cleaned)
    return tasks


def observers(kind: str) -> list[Observer]:
    """The observers of ``--observers``."""
    if kind == "prometheus":
        from aioasync_tasks.metrics import PrometheusMetrics  # noqa: PLC0415 - only when asked

        return [PrometheusMetrics()]
    if kind == "opentelemetry":
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

        from aioasync_tasks.opentelemetry import OpenTelemetry  # noqa: PLC0415

        return [OpenTelemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())]
    return []


class Stats:
    """Counters for the report: how the node talked to the database and how often the garbage
    collector ran. The backend's methods are wrapped on this process's own node instance (a
    benchmark-only peek at a private attribute; skipped if the library changes shape)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.gc_collections = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self._gc_started = 0.0

    def wrap_backend(self, node: Node) -> None:
        backend = getattr(node, "driver", None)
        if backend is None:
            return

        def sized(name: str, result: Any, args: tuple[Any, ...]) -> int:
            if name in ("claim", "claim_cleanups"):
                claimed = getattr(result, "claimed", result)
                return len(claimed) if isinstance(claimed, list) else 0
            params = args[0] if args else None
            if name == "checkpoint":
                return len(getattr(params, "checkpoints", ()))
            if name == "complete":
                return len(getattr(params, "completions", ()))
            return 0

        for name in ("claim", "claim_cleanups", "checkpoint", "complete", "heartbeat"):
            method = getattr(backend, name, None)
            if method is None:
                continue

            def make(name: str, method: Any) -> Any:
                async def counted(*args: Any, **kwargs: Any) -> Any:
                    result = await method(*args, **kwargs)
                    self.calls[name] = self.calls.get(name, 0) + 1
                    size = sized(name, result, args)
                    self.rows[name] = self.rows.get(name, 0) + size
                    if name == "claim" and size == 0:
                        # Nothing claimed: the backlog is empty, or other nodes won the race.
                        self.calls["claim_empty"] = self.calls.get("claim_empty", 0) + 1
                    return result

                return counted

            setattr(backend, name, make(name, method))
        execute = getattr(backend, "_execute", None)
        if execute is not None:

            async def counted_exec(*args: Any, **kwargs: Any) -> Any:
                self.calls["statements"] = self.calls.get("statements", 0) + 1
                return await execute(*args, **kwargs)

            backend._execute = counted_exec
        for name in ("write", "read"):
            method = getattr(backend, name, None)
            if method is None:
                continue

            def make_tx(name: str, method: Any) -> Any:
                def counted(*args: Any, **kwargs: Any) -> Any:
                    self.calls["tx_" + name] = self.calls.get("tx_" + name, 0) + 1
                    return method(*args, **kwargs)

                return counted

            setattr(backend, name, make_tx(name, method))

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            generation = info["generation"]
            self.gc_collections[generation] += 1
            self.gc_seconds[generation] += time.perf_counter() - self._gc_started

    def reset_gc(self) -> None:
        self.gc_collections = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]

    def summary(self) -> dict[str, Any]:
        per_call = {
            name: round(self.rows[name] / self.calls[name], 2)
            for name in self.rows
            if self.calls.get(name) and name != "heartbeat"
        }
        return {
            "calls": self.calls,
            "rows_per_call": per_call,
            "gc_collections": self.gc_collections,
            "gc_seconds": [round(x, 3) for x in self.gc_seconds],
        }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_now() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class RssSampler:
    """Peak resident memory, sampled every 50 ms (``ru_maxrss`` also counts start-up)."""

    def __init__(self) -> None:
        self.peak = rss_now()

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_now())
            await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    COUNTERS["checkpoints"] = args.checkpoints
    options: dict[str, Any] = {}
    if args.schema:
        options["schema"] = args.schema
    if args.poll_interval is not None:
        options["poll_interval"] = args.poll_interval
    options["observers"] = observers(args.observers)
    registry = build_registry(cleanup_handler=args.cleanup_handler)
    node = Node(args.url, registry=registry, concurrency=args.concurrency, **options)
    stats = Stats()
    stats.wrap_backend(node)
    gc.callbacks.append(stats.on_gc)
    sampler = RssSampler()
    sampling = asyncio.create_task(sampler.run())
    start_rss = rss_now()
    await node.start()

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            loop.remove_reader(sys.stdin.fileno())
            done.set()
        elif line.strip() == "rss":
            sampler.peak = max(sampler.peak, rss_now())
            answer = {"rss": rss_now(), "peak_rss": sampler.peak, "executed": COUNTERS["executed"]}
            print("RSS " + json.dumps(answer), flush=True)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    if args.gc == "freeze":
        gc.freeze()  # start-up objects are never scanned again
    elif args.gc == "off":
        gc.disable()
    stats.reset_gc()  # count what happens after start-up only
    ready_cpu = cpu_seconds()
    print(f"READY {os.getpid()}", flush=True)
    ready_rss = rss_now()
    await done.wait()
    stopping = time.monotonic()
    run_cpu = cpu_seconds() - ready_cpu
    await node.stop(timeout=20)
    sampling.cancel()
    sampler.peak = max(sampler.peak, rss_now())
    result = {
        "pid": os.getpid(),
        "executed": COUNTERS["executed"],
        "start_rss": start_rss,
        "ready_rss": ready_rss,
        "peak_rss": sampler.peak,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stop_seconds": round(time.monotonic() - stopping, 3),
        "cpu_seconds": round(run_cpu, 3),
        **stats.summary(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--poll-interval", type=float)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument(
        "--gc",
        choices=("default", "freeze", "off"),
        default="default",
        help="garbage collector after start-up (an experiment: the library sets nothing)",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (uvloop: peers.py --loop uvloop; needs the bench extra)",
    )
    parser.add_argument(
        "--observers",
        choices=("none", "prometheus", "opentelemetry"),
        default="none",
        help="the node's observers: PrometheusMetrics, or OpenTelemetry with the SDK's providers "
        "(spans and metrics made, nothing exported)",
    )
    parser.add_argument(
        "--cleanup-handler",
        action="store_true",
        help="also register a type with a cleanup handler (a cleanup claim every claim round)",
    )
    parser.add_argument("--profile-out", help="write a pyinstrument profile here (.html/.txt)")
    parser.add_argument(
        "--profile-interval", type=float, default=0.001, help="pyinstrument sampling interval"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not args.profile_out:
        if args.loop == "uvloop":
            import uvloop  # noqa: PLC0415 - optional, a dependency of the bench extra

            uvloop.run(main(args))
        else:
            asyncio.run(main(args))
        return
    from pyinstrument import Profiler  # noqa: PLC0415 - optional, only when profiling

    profiler = Profiler(interval=args.profile_interval, async_mode="disabled")
    profiler.start()
    try:
        asyncio.run(main(args))
    finally:
        profiler.stop()
        if args.profile_out.endswith(".html"):
            output = profiler.output_html()
        else:
            output = profiler.output_text(unicode=False, color=False, show_all=False)
        with open(args.profile_out, "w", encoding="utf-8") as f:
            f.write(output)
        # The raw session too, to render again with other options (pyinstrument --load).
        session = profiler.last_session
        if session is not None:
            session.save(args.profile_out.rsplit(".", 1)[0] + ".pyisession")


if __name__ == "__main__":
    cli()
