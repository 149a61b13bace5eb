"""The execution engine's task protocol (``docs/how-to.md``, "Write a task and its checkpoints")
on every backend, in one process.

Each test runs a real node against a fresh database and watches the task table through an
engine of its own (``raw_engine``), so what is checked is what another node would see: a
checkpoint is durable before the generator resumes, terminal reports and exceptions lead to the
states of ``docs/explanation.md`` ("States and transitions"), stop requests are delivered once
and enforced by the grace period, and a cleanup handler runs when a task with one is deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _db import DbTarget
from _helpers import (
    BOUND,
    make_node,
    read_row,
    state_of,
    wait_event,
    wait_for,
    wait_state,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import (
    Node,
    Report,
    State,
    StopRequest,
    TaskInfo,
    TaskRegistry,
    current_task,
)

# -- checkpoints --------------------------------------------------------------------------


async def test_checkpoint_is_durable_when_yield_returns(db: DbTarget, raw: AsyncEngine) -> None:
    registry = TaskRegistry()
    seen: list[str | None] = []

    @registry.task("steps")
    async def steps(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        for i in range(5):
            yield Report(context=f"{context}:{i}")
            row = await read_row(raw, task.id)  # another connection: only committed data
            seen.append(None if row is None else row["context"])
        yield Report.finished()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("steps", "ctx")
        await wait_state(node, task_id, State.FINISHED)
        task = await node.get_task(task_id)

    assert seen == [f"ctx:{i}" for i in range(5)]
    assert task.context == "ctx:4"  # a terminal report without context keeps the stored one
    assert task.done_at is not None
    assert task.error is None


async def test_checkpoints_of_concurrent_tasks_are_group_committed(db: DbTarget) -> None:
    tasks_count, reports = 30, 20
    registry = TaskRegistry()
    all_running = asyncio.Event()
    started: list[int] = []

    @registry.task("chatty")
    async def chatty(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        started.append(1)
        if len(started) == tasks_count:
            all_running.set()
        await all_running.wait()  # every task checkpoints while the others do
        for i in range(reports):
            yield Report(context=f"{context}:{i}")
        yield Report.finished()

    async with make_node(db, registry, concurrency=tasks_count) as node:
        committer = node.services.committer
        flushes_before = committer.flushes
        ids = await node.create_tasks([{"type": "chatty", "context": f"t{n}"} for n in range(30)])

        async def all_finished() -> bool:
            return await node.count_tasks(states=[State.FINISHED]) == tasks_count

        await wait_for(all_finished, timeout=60, what="all chatty tasks to finish")
        flushes = committer.flushes - flushes_before
        finished = await node.get_tasks(limit=100)

    assert {t.id: t.context for t in finished} == {
        task_id: f"t{n}:{reports - 1}" for n, task_id in enumerate(ids)
    }
    # One flush per write would be 600 checkpoints + 30 completions; batching must do better.
    assert flushes < tasks_count * reports


# -- terminal reports, returns and exceptions ---------------------------------------------


async def test_finished_report_stores_context(db: DbTarget, raw: AsyncEngine) -> None:
    registry = TaskRegistry()

    @registry.task("done")
    async def done(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="half")
        yield Report.finished(context="all")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("done")
        await wait_state(node, task_id, State.FINISHED)
        row = await read_row(raw, task_id)
    assert row is not None
    assert row["context"] == "all"
    assert row["node_id"] is None
    assert row["attempts"] == 1


@pytest.mark.parametrize("phase", ["finished", "failed"])
async def test_terminal_report_with_delete_removes_row(db: DbTarget, phase: str) -> None:
    registry = TaskRegistry()
    ran: list[int] = []

    @registry.task("gone", max_attempts=3)
    async def gone(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        ran.append(1)
        yield Report(context="some")
        if phase == "finished":
            yield Report.finished(delete=True)
        else:
            yield Report.failed("bad", delete=True)

    async with make_node(db, registry) as node:
        task_id = await node.create_task("gone")
        await wait_state(node, task_id, None, what="the row to be removed")
        assert await node.count_tasks() == 0
    assert ran == [1]  # delete=True wins over retries


async def test_failed_report_retries_then_fails(db: DbTarget, raw: AsyncEngine) -> None:
    registry = TaskRegistry()
    attempts_seen: list[tuple[int, str]] = []
    group = "retry"
    node_ref: list[Node] = []
    broken = [True]

    @registry.task("flaky", max_attempts=3)
    async def flaky(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        task = current_task()
        assert task is not None
        attempts_seen.append((task.attempt, context))
        if not broken[0]:
            yield Report.finished(context="ok")
            return
        # Keep the retry visible as PENDING: nothing is claimed from a paused group.
        await node_ref[0].pause_group(group)
        yield Report.failed(f"boom {task.attempt}", context=f"after {task.attempt}")

    async with make_node(db, registry) as node:
        node_ref.append(node)
        task_id = await node.create_task("flaky", "start", group=group)
        for attempt in (1, 2):

            async def retry_pending(a: int = attempt) -> bool:
                task = await node.get_task(task_id)
                return task.state is State.PENDING and task.attempts == a

            await wait_for(retry_pending, timeout=BOUND, what=f"the retry after attempt {attempt}")
            row = await read_row(raw, task_id)
            assert row is not None
            assert row["attempts"] == attempt
            assert row["error"] == f"boom {attempt}"
            assert row["context"] == f"after {attempt}"
            assert row["node_id"] is None
            await node.resume_group(group)
            await wait_for(
                lambda a=attempt: len(attempts_seen) > a, timeout=BOUND, what="the retry to run"
            )
        await wait_state(node, task_id, State.FAILED)
        task = await node.get_task(task_id)
        assert task.attempts == 3
        assert task.error == "boom 3"
        assert task.context == "after 3"
        assert task.done_at is not None
        assert attempts_seen == [(1, "start"), (2, "after 1"), (3, "after 2")]

        # run_task on FAILED: a fresh series of attempts, from the last stored context.
        broken[0] = False
        await node.resume_group(group)
        await node.run_task(task_id)
        await wait_state(node, task_id, State.FINISHED)
        task = await node.get_task(task_id)
    assert attempts_seen[3:] == [(1, "after 3")]
    assert task.attempts == 1
    assert task.context == "ok"


async def test_return_without_terminal_report_finishes(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("quiet")
    async def quiet(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="last")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("quiet", "first")
        await wait_state(node, task_id, State.FINISHED)
        task = await node.get_task(task_id)
    assert task.context == "last"
    assert task.error is None


async def test_exception_fails_with_traceback(db: DbTarget) -> None:
    registry = TaskRegistry()

    def helper_that_raises() -> None:
        raise ValueError("the input was wrong")

    @registry.task("crash")
    async def crash(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="before")
        helper_that_raises()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("crash")
        await wait_state(node, task_id, State.FAILED)
        task = await node.get_task(task_id)
    assert task.context == "before"
    assert task.error is not None
    assert "ValueError" in task.error
    assert "the input was wrong" in task.error
    assert "Traceback" in task.error
    assert "helper_that_raises" in task.error


async def test_yielding_a_non_report_fails(db: DbTarget) -> None:
    registry = TaskRegistry()
    resumed: list[int] = []

    @registry.task("wrong")
    async def wrong(context: str, stop: asyncio.Event) -> AsyncIterator[Any]:
        yield Report(context="good")
        yield {"context": "not a report"}
        resumed.append(1)
        yield Report.finished(context="never")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("wrong")
        await wait_state(node, task_id, State.FAILED)
        task = await node.get_task(task_id)
    assert task.context == "good"
    assert task.error is not None
    assert "TypeError" in task.error
    assert "Report" in task.error
    assert resumed == []


# -- stop requests --------------------------------------------------------------------------


async def test_pause_sets_stop_once_and_keeps_last_checkpoint(
    db: DbTarget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioasync_tasks")
    registry = TaskRegistry()
    waiting = asyncio.Event()
    release = asyncio.Event()
    after_stop: list[str] = []

    @registry.task("pausable")
    async def pausable(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        n = int(context)
        while not stop.is_set():
            n += 1
            yield Report(context=str(n))
            if n == 3:
                waiting.set()
                await stop.wait()
        after_stop.append(str(n))
        await release.wait()  # stay CANCELING while the stop is delivered again and again

    async with make_node(db, registry) as node:
        heartbeat = node.services.heartbeat
        task_id = await node.create_task("pausable", "0")
        await wait_event(waiting, "the task's third checkpoint")
        await node.pause_task(task_id)
        task = await node.get_task(task_id)
        assert (task.state, task.requested) == (State.CANCELING, StopRequest.PAUSE)
        await node.pause_task(task_id)  # idempotent
        for _ in range(3):  # each delivers the pending stop request again
            await heartbeat.run_once()
            await heartbeat.poll_stops_once()
        await wait_for(lambda: after_stop == ["3"], timeout=BOUND, what="the task to see stop")
        release.set()
        await wait_state(node, task_id, State.PAUSED)
        task = await node.get_task(task_id)

    assert task.context == "3"
    assert task.requested is None
    assert task.node is None
    stops = [
        r
        for r in caplog.records
        if "stopping task" in r.getMessage() and getattr(r, "task_id", None) == task_id
    ]
    assert len(stops) == 1, [r.getMessage() for r in stops]


async def test_task_ignoring_stop_is_cancelled_after_grace(db: DbTarget) -> None:
    registry = TaskRegistry()
    waiting = asyncio.Event()
    cancelled: list[str] = []

    @registry.task("stubborn", stop_timeout=0.2)
    async def stubborn(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="checkpoint")
        waiting.set()
        try:
            await asyncio.Event().wait()  # ignores stop
        except asyncio.CancelledError:
            cancelled.append(f"stop={stop.is_set()}")
            raise

    async with make_node(db, registry) as node:
        task_id = await node.create_task("stubborn", "initial")
        await wait_event(waiting, "the checkpoint")
        await node.pause_task(task_id)
        await wait_state(node, task_id, State.PAUSED)
        task = await node.get_task(task_id)
    assert cancelled == ["stop=True"]
    assert task.context == "checkpoint"
    assert task.error is None


async def test_timeout_fails_the_attempt(db: DbTarget) -> None:
    registry = TaskRegistry()
    stopped: list[bool] = []

    @registry.task("slow", timeout=0.2)
    async def slow(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="started")
        await stop.wait()
        stopped.append(True)

    async with make_node(db, registry) as node:
        task_id = await node.create_task("slow")
        await wait_state(node, task_id, State.FAILED)
        task = await node.get_task(task_id)
    assert stopped == [True]
    assert task.error is not None
    assert "timed out" in task.error
    assert task.context == "started"


# -- what the task sees ---------------------------------------------------------------------


async def test_current_task_inside_and_outside(db: DbTarget) -> None:
    registry = TaskRegistry()
    infos: list[TaskInfo | None] = []

    @registry.task("whoami")
    async def whoami(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        infos.append(current_task())
        yield Report(context="x")
        infos.append(current_task())  # unchanged across a checkpoint

    assert current_task() is None
    async with make_node(db, registry) as node:
        task_id = await node.create_task("whoami", user="alice", group="reports")
        await wait_state(node, task_id, State.FINISHED)
        node_id = node.id
    assert current_task() is None
    assert node_id is not None
    expected = TaskInfo(
        id=task_id, type="whoami", user="alice", group="reports", attempt=1, node=node_id
    )
    assert infos == [expected, expected]


async def test_class_based_task_gets_a_fresh_object_per_execution(db: DbTarget) -> None:
    registry = TaskRegistry()
    instances: list[Any] = []

    class Worked:
        def __init__(self) -> None:
            self.runs = 0
            instances.append(self)

        async def running(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
            self.runs += 1
            task = current_task()
            assert task is not None
            if task.attempt == 1 and context == "retry me":
                yield Report.failed("first attempt fails")
            yield Report.finished(context=f"{context} runs={self.runs}")

        async def deleting(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
            self.runs += 1
            yield Report.finished()

    registry.register_task("worked", factory=Worked, max_attempts=2)

    async with make_node(db, registry) as node:
        first = await node.create_task("worked", "retry me")
        second = await node.create_task("worked", "plain")
        await wait_state(node, first, State.FINISHED)
        await wait_state(node, second, State.FINISHED)
        assert (await node.get_task(first)).context == "retry me runs=1"
        assert (await node.get_task(second)).context == "plain runs=1"
        assert len(instances) == 3  # two attempts of the first task, one of the second
        await node.delete_task(first)  # the cleanup method of a fresh object
        await wait_state(node, first, None, what="the cleanup to remove the row")

    assert len(instances) == 4
    assert len({id(i) for i in instances}) == 4
    assert [i.runs for i in instances] == [1, 1, 1, 1]


@pytest.mark.parametrize("misbehave", [False, True], ids=["closes", "yields-on-close"])
async def test_nothing_after_a_terminal_report_is_applied(
    db: DbTarget, misbehave: bool, caplog: pytest.LogCaptureFixture
) -> None:
    registry = TaskRegistry()
    events: list[str] = []

    @registry.task("chatterbox")
    async def chatterbox(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        try:
            yield Report.finished(context="done")
        except GeneratorExit:
            events.append("closed")
            if misbehave:
                yield Report(context="after the end")
            raise
        events.append("resumed")
        yield Report(context="after the end")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("chatterbox")
        await wait_state(node, task_id, State.FINISHED)
        task = await node.get_task(task_id)
    assert events == ["closed"]
    assert task.context == "done"
    assert task.error is None
    if misbehave:
        assert any("misbehaved" in r.getMessage() for r in caplog.records)


# -- cleanup handlers -----------------------------------------------------------------------


async def test_delete_finished_task_runs_cleanup_with_last_context(db: DbTarget) -> None:
    registry = TaskRegistry()
    started = asyncio.Event()
    release = asyncio.Event()
    cleanups: list[tuple[str, TaskInfo | None]] = []

    @registry.task("tidy")
    async def tidy(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="final")

    @tidy.deleting
    async def tidy_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        cleanups.append((context, current_task()))
        started.set()
        await release.wait()
        yield Report.finished()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("tidy")
        await wait_state(node, task_id, State.FINISHED)
        await node.delete_task(task_id)
        await wait_event(started, "the cleanup handler")
        task = await node.get_task(task_id)
        assert task.state is State.DELETING
        assert task.node == node.id
        release.set()
        await wait_state(node, task_id, None, what="the cleanup to remove the row")
    assert [c[0] for c in cleanups] == ["final"]
    info = cleanups[0][1]
    assert info is not None
    assert (info.id, info.type) == (task_id, "tidy")


async def test_failing_cleanup_is_retried_then_failed(db: DbTarget) -> None:
    registry = TaskRegistry()
    calls: list[int] = []

    @registry.task("messy")
    async def messy(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="kept")

    @messy.deleting
    async def messy_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        calls.append(len(calls) + 1)
        yield Report(context="cleaning")
        raise RuntimeError(f"cleanup boom {len(calls)}")

    async with make_node(db, registry, cleanup_attempts=3) as node:
        task_id = await node.create_task("messy")
        await wait_state(node, task_id, State.FINISHED)
        await node.delete_task(task_id)
        await wait_state(node, task_id, State.FAILED)
        task = await node.get_task(task_id)
        assert calls == [1, 2, 3]
        assert task.error is not None
        assert "RuntimeError" in task.error
        assert "cleanup boom 3" in task.error
        assert task.node is None

        await node.delete_task(task_id, force=True)  # removes it at once, no cleanup
        assert await state_of(node, task_id) is None
        await node.services.claimer.run_once()
    assert calls == [1, 2, 3]


async def test_force_delete_skips_cleanup(db: DbTarget) -> None:
    registry = TaskRegistry()
    calls: list[str] = []

    @registry.task("forced")
    async def forced(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context="x")

    @forced.deleting
    async def forced_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        calls.append(context)
        yield Report.finished()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("forced")
        await wait_state(node, task_id, State.FINISHED)
        await node.delete_task(task_id, force=True)
        assert await state_of(node, task_id) is None
        await node.services.claimer.run_once()
    assert calls == []


async def test_delete_running_task_stops_it_then_cleans_up_once(db: DbTarget) -> None:
    registry = TaskRegistry()
    stopping = asyncio.Event()
    release = asyncio.Event()
    cleanups: list[str] = []
    runs: list[int] = []

    @registry.task("busy")
    async def busy(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        runs.append(1)
        yield Report(context="c1")
        await stop.wait()
        stopping.set()
        await release.wait()  # stay CANCELING(delete) until the test has looked

    @busy.deleting
    async def busy_cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        cleanups.append(context)
        yield Report.finished()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("busy")

        async def checkpointed() -> bool:
            return (await node.get_task(task_id)).context == "c1"

        await wait_for(checkpointed, timeout=BOUND, what="the first checkpoint")
        await node.delete_task(task_id)
        await wait_event(stopping, "the task to see stop")
        task = await node.get_task(task_id)
        assert (task.state, task.requested) == (State.CANCELING, StopRequest.DELETE)
        await node.delete_task(task_id)  # idempotent while CANCELING(delete)
        release.set()
        await wait_state(node, task_id, None, what="the cleanup to remove the row")
    assert cleanups == ["c1"]
    assert runs == [1]


# -- retries: back-off per type, and their log records ------------------------------------


async def test_a_task_type_sets_its_own_back_off(
    db: DbTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's back-off is a million seconds; the type's is a millisecond: its three
    attempts run at once, and the log records show the type's delays."""
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    registry = TaskRegistry()

    @registry.task("quick", max_attempts=3, retry_base=0.001, retry_cap=0.001)
    async def quick(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.failed("again")

    async with make_node(db, registry, retry_base=1e6, retry_cap=1e6) as node:
        task_id = await node.create_task("quick")
        task = await wait_state(node, task_id, State.FAILED)
    assert task.attempts == 3
    failures = [
        r.getMessage() for r in caplog.records if "task failed on attempt" in r.getMessage()
    ]
    assert len(failures) == 3
    assert "attempt 1 of 3 (again); retry in 0.00s, at " in failures[0]
    assert "attempt 3 of 3 (again); no attempts left: FAILED" in failures[2]


async def test_a_failed_attempt_is_logged_with_its_traceback_and_next_retry(
    db: DbTarget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioasync_tasks")
    registry = TaskRegistry()

    @registry.task("crash", max_attempts=2)
    async def crash(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="before")
        raise ValueError("the input was wrong")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("crash")
        await wait_state(node, task_id, State.FAILED)
    records = [r for r in caplog.records if "task failed on attempt" in r.getMessage()]
    assert len(records) == 2
    first, last = records
    assert f"task_id={task_id}" in first.getMessage()
    assert "attempt 1 of 2 (ValueError: the input was wrong); retry in " in first.getMessage()
    assert "attempt 2 of 2 (ValueError: the input was wrong); no attempts left: FAILED" in (
        last.getMessage()
    )
    for record in records:
        assert record.levelno == logging.WARNING
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], ValueError)
        assert getattr(record, "task_id", None) == task_id
