"""Conformance: typed contexts (docs/how-to.md, "Give a task a typed context") on both backends.

A task type with a context type receives and yields values of it, stored as JSON; a value of
another type is refused before any I/O; a stored context that does not decode fails the task at
once, without retries, with an error naming the type and the problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import TypedDict

import pydantic
import pytest
from _db import DbTarget
from _helpers import client_registry, make_node, statements, wait_event, wait_state

from aioasync_tasks import (
    ContextError,
    Report,
    State,
    TaskNotFound,
    TaskRegistry,
    current_task,
)


@dataclasses.dataclass
class Count:
    i: int
    n: int
    steps: list[int] = dataclasses.field(default_factory=list)


class Greeting(TypedDict):
    name: str


class Invoice(pydantic.BaseModel):
    number: int
    total: float = 0.0


def _registry(seen: list[object]) -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("count")
    async def count(context: Count, stop: asyncio.Event) -> AsyncIterator[Report]:
        seen.append(context)
        while context.i < context.n:
            context.i += 1
            context.steps.append(current_task().attempt)  # type: ignore[union-attr]
            yield Report(context=context)
        yield Report.finished(context=context)

    async def greet(context: Greeting, stop: asyncio.Event) -> AsyncIterator[Report]:
        seen.append(context)
        yield Report.finished(context={"name": context["name"].upper()})

    registry.register_task("greet", greet, context_type=Greeting)

    @registry.task("invoice")
    async def invoice(context: Invoice, stop: asyncio.Event) -> AsyncIterator[Report]:
        seen.append(context)
        yield Report.finished(context=Invoice(number=context.number, total=9.5))

    return registry


async def test_handlers_receive_and_yield_typed_values(db: DbTarget) -> None:
    seen: list[object] = []
    registry = _registry(seen)
    async with make_node(db, registry) as node:
        ids = await node.create_tasks(
            [
                {"type": "count", "context": Count(0, 3)},
                {"type": "greet", "context": {"name": "ada"}},
            ]
        )
        invoice = await node.create_task("invoice", Invoice(number=7), user="alice")
        tasks = [await wait_state(node, task_id, State.FINISHED) for task_id in [*ids, invoice]]
    counted, greeted, billed = tasks
    assert json.loads(counted.context) == {"i": 3, "n": 3, "steps": [1, 1, 1]}
    assert registry.get("count").decode_context(counted.context) == Count(3, 3, [1, 1, 1])
    assert json.loads(greeted.context) == {"name": "ADA"}
    assert registry.get("invoice").decode_context(billed.context) == Invoice(number=7, total=9.5)
    assert {"name": "ada"} in seen
    assert Invoice(number=7) in seen


async def test_a_resumed_task_receives_its_last_checkpoint_decoded(db: DbTarget) -> None:
    registry = TaskRegistry()
    checkpointed = asyncio.Event()
    received: list[Count] = []

    @registry.task("slow")
    async def slow(context: Count, stop: asyncio.Event) -> AsyncIterator[Report]:
        received.append(dataclasses.replace(context, steps=list(context.steps)))
        context.i += 1
        yield Report(context=context)
        checkpointed.set()
        await stop.wait()

    async with make_node(db, registry) as node:
        task_id = await node.create_task("slow", Count(0, 5))
        await wait_event(checkpointed, "the first checkpoint")
        await node.pause_task(task_id)
        await wait_state(node, task_id, State.PAUSED)
        checkpointed.clear()
        await node.run_task(task_id)
        await wait_event(checkpointed, "the checkpoint after the resume")
        await node.delete_task(task_id, force=True)
    assert received == [Count(0, 5), Count(1, 5)]


async def test_a_value_of_another_type_is_refused_before_any_io(db: DbTarget) -> None:
    node = make_node(db, _registry([]), concurrency=0)  # not started: no I/O is possible
    for type_name, value, problem in [
        ("count", {"i": 0, "n": 1}, "takes a context of type Count, not dict"),
        ("count", '{"i": 0, "n": 1}', "takes a context of type Count, not str"),
        ("count", Count("0", 1), r"\$\.i: expected int, got str"),  # type: ignore[arg-type]
        ("greet", {"name": 5}, r"\$\.name: expected str, got int"),
        ("invoice", Count(0, 1), "takes a context of type Invoice, not Count"),
    ]:
        with pytest.raises(ContextError, match=problem) as raised:
            await node.create_task(type_name, value)
        assert raised.value.task_type == type_name
    with pytest.raises(ContextError, match="not Count"):
        await node.create_tasks(
            [
                {"type": "greet", "context": {"name": "x"}},
                {"type": "invoice", "context": Count(0, 1)},
            ]
        )
    async with node:
        with statements(node) as seen:
            with pytest.raises(ContextError):
                await node.create_task("count")  # a typed type has no default context
            with pytest.raises(ContextError):
                await node.create_tasks(
                    [{"type": "count", "context": Count(0, 1)}, {"type": "count"}]
                )
        assert seen == []
        assert await node.count_tasks() == 0


async def test_a_context_that_does_not_decode_fails_the_task_without_retries(
    db: DbTarget,
) -> None:
    """A context written as plain text under a typed type (by another program, or before the
    type changed) is rejected by the node: FAILED on the first attempt, though two are left."""
    seen: list[object] = []
    writer = make_node(db, client_registry({"count": {}}), concurrency=0)
    async with writer:
        bad = await writer.create_task("count", '{"i": 0}')
        not_json = await writer.create_task("count", "three")
    async with make_node(db, _registry(seen), concurrency=2) as node:
        failed = [await wait_state(node, t, State.FAILED) for t in (bad, not_json)]
    assert seen == []  # the generator never started
    for task in failed:
        assert task.attempts == 1
        assert task.error is not None
        assert task.error.startswith("ContextError: context is not a valid Count")
        assert "Traceback" not in task.error
    assert failed[0].error is not None
    assert "missing field 'n' of Count" in failed[0].error
    assert failed[1].error is not None
    assert "Expecting value" in failed[1].error
    assert failed[0].context == '{"i": 0}'  # kept as it was, to be fixed


async def test_a_cleanup_that_cannot_decode_the_context_fails_the_task(db: DbTarget) -> None:
    registry = TaskRegistry()
    cleaned: list[Count] = []

    @registry.task("export")
    async def export(context: Count, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    @export.deleting
    async def remove(context: Count, stop: asyncio.Event) -> AsyncIterator[Report]:
        cleaned.append(context)
        yield Report.finished()

    async def plain(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    plain_registry = TaskRegistry()
    plain_registry.register_task("export", plain, plain)  # the same type, with str contexts
    writer = make_node(db, plain_registry, concurrency=0)
    async with writer:
        task_id = await writer.create_task("export", "{}", auto_run=False)
    async with make_node(db, registry) as node:
        good = await node.create_task("export", Count(1, 1), auto_run=False)
        await node.delete_task(task_id)
        await node.delete_task(good)
        task = await wait_state(node, task_id, State.FAILED)
        await wait_state(node, good, None)
        with pytest.raises(TaskNotFound):
            await node.get_task(good)
    assert cleaned == [Count(1, 1)]
    assert task.error is not None
    assert "missing field 'i' of Count" in task.error


async def test_yielding_a_value_of_another_type_fails_the_task(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("wrong", max_attempts=1)
    async def wrong(context: Count, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context={"i": 1, "n": 1})

    @registry.task("plain", max_attempts=1)
    async def plain(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context=Count(1, 1))

    async with make_node(db, registry) as node:
        wrong_id = await node.create_task("wrong", Count(0, 1))
        plain_id = await node.create_task("plain", "kept")
        wrong_task = await wait_state(node, wrong_id, State.FAILED)
        plain_task = await wait_state(node, plain_id, State.FAILED)
    assert wrong_task.error is not None
    assert "ContextError: task type 'wrong' takes a context of type Count, not dict" in (
        wrong_task.error
    )
    assert plain_task.error is not None
    assert "has no context_type: a Report context must be a str, not Count" in plain_task.error
    assert plain_task.context == "kept"


async def test_plain_string_contexts_are_unchanged(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("echo")
    async def echo(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished(context=context + "!")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("echo", '{"not": "decoded"}')
        task = await wait_state(node, task_id, State.FINISHED)
    assert task.context == '{"not": "decoded"}!'
