"""Metrics and tracing of one process (``observers=``): ``PrometheusMetrics`` scraped from the
dashboard's ``/metrics`` and compared with the database, ``OpenTelemetry``'s spans (one per
attempt, linked to the span that created the task, current while the task runs) and metrics,
and an observer that raises. Lease losses and fencing are counted in the fault tests that cause
them (``test_faults_network.py``, ``test_fencing.py``)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import HERMETIC_ENV, make_node, wait_for, wait_state
from _observers import Recorder
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from aioasync_tasks import (
    AttemptOutcome,
    ConfigurationError,
    Node,
    Observer,
    Report,
    State,
    TaskRegistry,
    current_task,
)
from aioasync_tasks.dashboard import create_app, create_metrics_app
from aioasync_tasks.metrics import PrometheusMetrics
from aioasync_tasks.opentelemetry import OpenTelemetry

BOUND = 30.0

registry = TaskRegistry()


@registry.task("ok")
async def ok(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    yield Report(context=context + "+1", progress=0.5)  # one checkpoint
    yield Report.finished()


@registry.task("flaky", max_attempts=2)
async def flaky(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    info = current_task()
    assert info is not None
    if info.attempt == 1:
        raise RuntimeError("first attempt fails")
    yield Report.finished()


@registry.task("broken", max_attempts=2)
async def broken(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    raise RuntimeError("always fails")
    yield Report.finished()  # pragma: no cover - makes this a generator


@registry.task("held")
async def held(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    await stop.wait()
    return
    yield Report.finished()  # pragma: no cover - makes this a generator


def worker(db: DbTarget, observer: Observer) -> Node:
    return make_node(db, registry, concurrency=4, retry_base=0.01, observers=[observer])


async def run_the_mix(node: Node) -> dict[str, list[int]]:
    """Three tasks that finish with a checkpoint, one that fails once then finishes, one that
    fails both its attempts, one paused while it runs; returns their ids by type."""
    ids = {
        "ok": await node.create_tasks([{"type": "ok", "group": "a"} for _ in range(3)]),
        "flaky": [await node.create_task("flaky", group="a")],
        "broken": [await node.create_task("broken", group="b")],
        "held": [await node.create_task("held", group="b")],
    }
    for task_id in ids["ok"] + ids["flaky"]:
        await wait_state(node, task_id, State.FINISHED, timeout=BOUND)
    await wait_state(node, ids["broken"][0], State.FAILED, timeout=BOUND)
    await wait_state(node, ids["held"][0], State.RUNNING, timeout=BOUND)
    await node.pause_task(ids["held"][0])
    await wait_state(node, ids["held"][0], State.PAUSED, timeout=BOUND)
    return ids


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def task_labels(type: str, group: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"type": type, "group": group, "kind": "task", **more}.items()))


async def test_prometheus_metrics_match_the_database(db: DbTarget, raw: AsyncEngine) -> None:
    """Scraped from the dashboard's ``/metrics`` after the mix ran: the process's counters
    beside the database's gauges, and each counter equal to what the rows say."""
    metrics = PrometheusMetrics(CollectorRegistry())
    async with worker(db, metrics) as node:
        ids = await run_the_mix(node)
        app = create_app(node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    samples = samples_of(scraped.text)
    async with raw.connect() as conn:
        rows = (
            await conn.execute(
                sa.text("SELECT type, group_name, state, attempts FROM aioasync_tasks")
            )
        ).all()
    # The database's gauges are there too (one scrape, both sources).
    assert samples[("aioasync_tasks_tasks_by_state", (("state", "finished"),))] == 4
    created = Counter((t, g) for t, g, _, _ in rows)
    for (type_name, group), count in created.items():
        assert samples[
            ("aioasync_tasks_created_total", (("group", group), ("type", type_name)))
        ] == (count)
    # Each claim counts an attempt in the row; a stopped attempt (held, paused) gives its
    # attempt back.
    claims = Counter[tuple[str, str]]({("held", "b"): 1})
    for type_name, group, _, attempts in rows:
        claims[type_name, group] += attempts
    assert [s for t, _, s, _ in rows if t == "held"] == ["paused"]
    for (type_name, group), count in claims.items():
        assert samples[("aioasync_tasks_claimed_total", task_labels(type_name, group))] == count
        latency = ("aioasync_tasks_claim_latency_seconds_count", task_labels(type_name, group))
        assert samples[latency] == count
        duration = ("aioasync_tasks_run_duration_seconds_count", task_labels(type_name, group))
        assert samples[duration] == count  # every attempt has ended

    def ended(type_name: str, group: str, outcome: str) -> float:
        key = ("aioasync_tasks_attempts_total", task_labels(type_name, group, outcome=outcome))
        return samples.get(key, 0.0)

    finished = Counter((t, g) for t, g, s, _ in rows if s == "finished")
    assert ended("ok", "a", "finished") == finished["ok", "a"] == 3
    assert ended("flaky", "a", "retried") == 1
    assert ended("flaky", "a", "finished") == finished["flaky", "a"] == 1
    assert ended("broken", "b", "retried") == 1
    assert ended("broken", "b", "failed") == 1
    assert ended("held", "b", "stopped") == 1
    assert sum(v for k, v in samples.items() if k[0] == "aioasync_tasks_attempts_total") == 8
    # Three checkpoints (the ok tasks') and eight completions went through the flushes.
    assert samples[("aioasync_tasks_flush_writes_sum", ())] == 3 + 8
    assert samples[("aioasync_tasks_flush_seconds_count", ())] >= 1
    assert samples[("aioasync_tasks_lease_losses_total", ())] == 0
    assert samples[("aioasync_tasks_fencings_total", ())] == 0
    assert len(ids["ok"]) == 3


async def test_opentelemetry_spans_link_to_their_creator(db: DbTarget) -> None:
    """A span per attempt, in a trace of its own linked to the span that created the task
    (through the task's row), current while the task runs, ERROR when the attempt failed; and
    the same counts as metrics."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    observer = OpenTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    tracer = tracer_provider.get_tracer("test")
    inner = TaskRegistry()

    @inner.task("traced", max_attempts=2)
    async def traced(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        with tracer.start_as_current_span("inside the task"):
            info = current_task()
            assert info is not None
            if info.attempt == 1:
                raise RuntimeError("first attempt fails")
        yield Report.finished()

    async with make_node(db, inner, retry_base=0.01, observers=[observer]) as node:
        with tracer.start_as_current_span("request") as request:
            task_id = await node.create_task("traced")
        untraced = await node.create_task("traced")  # no span current: no link
        for each in (task_id, untraced):
            await wait_state(node, each, State.FINISHED, timeout=BOUND)
    finished = spans.get_finished_spans()
    runs = [s for s in finished if s.name == "run traced"]
    assert len(runs) == 4  # two attempts of each task

    def of_task(wanted: int) -> list[ReadableSpan]:
        found = [
            s for s in runs if s.attributes and s.attributes["aioasync_tasks.task_id"] == wanted
        ]
        return sorted(
            found, key=lambda s: str(s.attributes and s.attributes["aioasync_tasks.attempt"])
        )

    creator = request.get_span_context()
    first, second = of_task(task_id)
    for span in (first, second):
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.parent is None  # a trace of its own ...
        # ... linked to its creator, as read back from the task's row.
        linked = [(k.context.trace_id, k.context.span_id) for k in span.links]
        assert linked == [(creator.trace_id, creator.span_id)]
        assert span.context is not None
        assert span.context.trace_id != creator.trace_id
    assert first.status.status_code is trace.StatusCode.ERROR
    assert first.status.description == "RuntimeError: first attempt fails"
    assert first.attributes is not None
    assert first.attributes["aioasync_tasks.outcome"] == "retried"
    assert second.status.status_code is trace.StatusCode.UNSET
    assert second.attributes is not None
    assert second.attributes["aioasync_tasks.outcome"] == "finished"
    assert all(not s.links for s in of_task(untraced))
    # The task's own spans are children of its attempt's span.
    inside = [s for s in finished if s.name == "inside the task"]
    assert len(inside) == 4
    run_ids = {s.context.span_id for s in runs if s.context is not None}
    assert {s.parent.span_id for s in inside if s.parent is not None} == run_ids

    points = metric_points(reader)
    assert points["aioasync_tasks.tasks.created"] == {(): 2}
    assert points["aioasync_tasks.tasks.claimed"] == {(): 4}
    assert points["aioasync_tasks.attempts"] == {("finished",): 2, ("retried",): 2}
    assert points["aioasync_tasks.claim.latency"] == {(): 4}  # histogram: its count
    assert points["aioasync_tasks.run.duration"] == {(): 4}


def metric_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[str, ...], float]]:
    """Metric name → outcome (if any) → sum of the counter, or count of the histogram."""
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    key = tuple(
                        str(attributes[k]) for k in ("aioasync_tasks.outcome",) if k in attributes
                    )
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # type: ignore[union-attr]  # a histogram point
                    by_key = found.setdefault(metric.name, {})
                    by_key[key] = by_key.get(key, 0) + value
    return found


class Broken(Observer):
    def started(self, attempt: Any) -> None:
        raise ValueError("a bug in the observer")


async def test_an_observer_that_raises_never_stops_a_task(
    db: DbTarget, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    async with make_node(db, registry, observers=[Broken(), recorder]) as node:
        with caplog.at_level(logging.ERROR):
            task_id = await node.create_task("ok")
            await wait_state(node, task_id, State.FINISHED, timeout=BOUND)
    assert recorder.outcomes() == [AttemptOutcome.FINISHED]  # the next observer still heard
    assert any("observer Broken failed in started" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "observers", [Recorder(), [object()], "prometheus", 3], ids=["one", "object", "str", "int"]
)
def test_observers_are_checked_before_any_io(observers: Any) -> None:
    with pytest.raises(ConfigurationError, match="observers must be"):
        Node("sqlite+aiosqlite:///never-created.db", observers=observers)


async def test_the_metrics_alone_mounted_with_a_login(db: DbTarget, tmp_path: Path) -> None:
    """``create_metrics_app`` from a URL (its own lifespan run: a mount's is not) — its own
    client-only node, the database's gauges at the mount point, basic authentication, and a
    503 when the database cannot be read (here: a database without the tables)."""
    async with make_node(db, registry, concurrency=0) as node:
        await node.create_task("ok", group="scraped", auto_run=False)
    outer = Starlette()
    scraper = create_metrics_app(db.url, schema=db.schema, auth=("prom", "s3cret"))
    outer.mount("/metrics", scraper)
    broken = Starlette()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    unreadable = create_metrics_app(f"sqlite+aiosqlite:///{empty}")
    broken.mount("/metrics", unreadable)
    async with (
        scraper.router.lifespan_context(scraper),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as client,
    ):
        refused = await client.get("/metrics/")
        scraped = await client.get("/metrics/", auth=("prom", "s3cret"))
    async with (
        unreadable.router.lifespan_context(unreadable),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=broken), base_url="http://t") as client,
    ):
        unavailable = await client.get("/metrics/")
    assert refused.status_code == 401
    assert scraped.status_code == 200
    samples = samples_of(scraped.text)
    assert samples[("aioasync_tasks_tasks", (("group", "scraped"), ("state", "init")))] == 1
    assert unavailable.status_code == 503
    assert "cannot be read" in unavailable.text


CREATOR = """
import asyncio, sys
from opentelemetry.sdk.trace import TracerProvider
from aioasync_tasks import Node
from aioasync_tasks.opentelemetry import OpenTelemetry

async def main(url, schema):
    provider = TracerProvider()
    observers = [OpenTelemetry(tracer_provider=provider)]
    async with Node(url, schema=schema or None, concurrency=0, observers=observers) as node:
        with provider.get_tracer("web").start_as_current_span("POST /jobs") as span:
            task_id = await node.create_task("ok", max_attempts=1)
    context = span.get_span_context()
    print(task_id, context.trace_id, context.span_id)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_the_link_crosses_processes(db: DbTarget) -> None:
    """Created under a span in another process, the task's attempt span here links to it."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    observer = OpenTelemetry(tracer_provider=tracer_provider)
    async with make_node(db, registry, observers=[observer]) as node:  # creates the tables
        creator = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CREATOR, db.url, db.schema or "",
            stdout=asyncio.subprocess.PIPE, env=HERMETIC_ENV,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(creator.communicate(), BOUND)
        assert creator.returncode == 0
        task_id, trace_id, span_id = (int(part) for part in out.split())
        await wait_state(node, task_id, State.FINISHED, timeout=BOUND)
    (run,) = [s for s in spans.get_finished_spans() if s.name == "run ok"]
    assert [(k.context.trace_id, k.context.span_id) for k in run.links] == [(trace_id, span_id)]


async def test_opentelemetry_queue_gauges_are_the_database_counts(
    db: DbTarget, raw: AsyncEngine
) -> None:
    """``queue_gauges``: tasks by group and state, PENDING by group and live nodes, as the
    database has them; a state that empties reads 0; nothing once the block has ended."""
    reader = InMemoryMetricReader()
    observer = OpenTelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    async with make_node(db, registry, concurrency=0) as client:
        for _ in range(3):
            await client.create_task("ok", group="waiting", auto_run=False)
        first = await client.create_task("held", group="queued")
        await client.create_task("held", group="queued")
        async with observer.queue_gauges(client, every=0.05):
            seen = gauge_points(reader)
            await client.delete_task(first)  # PENDING, no cleanup: gone at once
            await wait_for(
                lambda: gauge_points(reader)["aioasync_tasks.queue.depth"][("queued",)] == 1,
                timeout=BOUND,
                what="the next reading",
            )
            later = gauge_points(reader)
        after = gauge_points(reader)
    async with raw.connect() as conn:
        stored = (await conn.execute(sa.text("SELECT count(*) FROM aioasync_nodes"))).scalar()
    assert seen["aioasync_tasks.queue.tasks"] == {("waiting", "init"): 3, ("queued", "pending"): 2}
    assert seen["aioasync_tasks.queue.depth"] == {("waiting",): 0, ("queued",): 2}
    assert seen["aioasync_tasks.nodes"] == {(): stored} == {(): 0}  # a client-only node
    assert later["aioasync_tasks.queue.tasks"][("queued", "pending")] == 1
    assert after == {}


def gauge_points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[str, ...], float]]:
    """Gauge name → its attributes' values (group, state) → the value now."""
    data = reader.get_metrics_data()
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = {
                    tuple(str(v) for v in (p.attributes or {}).values()): p.value  # type: ignore[union-attr]  # gauges
                    for p in metric.data.data_points
                }
                if points:
                    found[metric.name] = points
    return found
