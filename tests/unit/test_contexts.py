"""Typed contexts without a database: what a task type's context type is (given or read from
the handler's annotation), and the JSON that stores its values, both ways."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

import pydantic
import pytest

from aioasync_tasks import ConfigurationError, ContextError, Report, TaskRegistry, TaskType


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.0


@dataclasses.dataclass
class Shape:
    name: str
    points: list[Point]
    colour: Colour = Colour.RED
    kind: Literal["open", "closed"] = "open"
    label: str | None = None
    corners: tuple[int, ...] = ()
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent: Shape | None = None


class Order(TypedDict):
    reference: str
    lines: list[int]
    note: NotRequired[str]


class Invoice(pydantic.BaseModel):
    number: int
    customer: str


def _typed(context_type: type) -> TaskType:
    async def handler(context: Any, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    return TaskRegistry().register_task("typed", handler, context_type=context_type)


# -- round trips --------------------------------------------------------------------------------


def test_a_nested_dataclass_round_trips() -> None:
    task_type = _typed(Shape)
    inner = Shape("inner", [])
    value = Shape(
        "square",
        [Point(0), Point(1, 2.5)],
        Colour.BLUE,
        "closed",
        corners=(1, 2),
        tags={"a": [1]},
        parent=inner,
    )
    text = task_type.encode_context(value)
    assert json.loads(text)["colour"] == "blue"
    assert json.loads(text)["points"][1] == {"x": 1, "y": 2.5}
    assert task_type.decode_context(text) == value


def test_a_typeddict_round_trips_with_optional_keys() -> None:
    task_type = _typed(Order)
    assert task_type.decode_context(task_type.encode_context({"reference": "A", "lines": [1]})) == {
        "reference": "A",
        "lines": [1],
    }
    full: Order = {"reference": "B", "lines": [], "note": "urgent"}
    assert task_type.decode_context(task_type.encode_context(full)) == full


def test_a_pydantic_model_round_trips() -> None:
    task_type = _typed(Invoice)
    text = task_type.encode_context(Invoice(number=7, customer="Ada"))
    assert json.loads(text) == {"number": 7, "customer": "Ada"}
    assert task_type.decode_context(text) == Invoice(number=7, customer="Ada")


def test_an_int_is_a_float_but_a_bool_is_not_an_int() -> None:
    task_type = _typed(Point)
    assert task_type.decode_context('{"x": 1, "y": 2}') == Point(1, 2.0)
    with pytest.raises(ContextError, match=r"\$\.x: expected int, got bool"):
        task_type.decode_context('{"x": true}')


# -- what does not fit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "Expecting value"),
        ("[1]", r"\$: expected an object \(Shape\), got list"),
        ('{"points": []}', "missing field 'name' of Shape"),
        ('{"name": "a", "points": [], "sides": 3}', "unknown field 'sides' for Shape"),
        ('{"name": "a", "points": [{"x": "1"}]}', r"\$\.points\[0\]\.x: expected int, got str"),
        ('{"name": "a", "points": [], "colour": "green"}', r"expected one of \['red', 'blue'\]"),
        ('{"name": "a", "points": [], "kind": "half"}', r"expected one of \['open', 'closed'\]"),
        ('{"name": "a", "points": [], "label": 5}', "expected str, got int or expected null"),
        ('{"name": "a", "points": [], "parent": {"name": 1, "points": []}}', r"parent\.name"),
    ],
)
def test_a_stored_context_that_does_not_fit_names_the_type_and_the_problem(
    text: str, problem: str
) -> None:
    with pytest.raises(ContextError, match=problem) as raised:
        _typed(Shape).decode_context(text)
    assert "not a valid Shape (task type 'typed')" in str(raised.value)
    assert raised.value.context_type is Shape
    assert raised.value.task_type == "typed"


def test_a_pydantic_problem_is_one_line() -> None:
    with pytest.raises(ContextError) as raised:
        _typed(Invoice).decode_context('{"number": "seven"}')
    message = str(raised.value)
    assert "\n" not in message
    assert "$.number:" in message
    assert "$.customer: Field required" in message


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("{}", "takes a context of type Point, not str"),
        ({"x": 1}, "takes a context of type Point, not dict"),
        (Shape("a", []), "takes a context of type Point, not Shape"),
        (Point("1"), r"not a valid Point: \$\.x: expected int, got str"),  # type: ignore[arg-type]
        (Point(1, float("nan")), "cannot be stored as JSON: Out of range float"),
    ],
)
def test_a_value_that_does_not_fit_is_refused_when_encoded(value: object, problem: str) -> None:
    with pytest.raises(ContextError, match=problem):
        _typed(Point).encode_context(value)


def test_a_typeddict_value_is_checked_key_by_key() -> None:
    task_type = _typed(Order)
    with pytest.raises(ContextError, match="missing key 'lines' of Order"):
        task_type.encode_context({"reference": "A"})
    with pytest.raises(ContextError, match="unknown key 'extra' for Order"):
        task_type.encode_context({"reference": "A", "lines": [], "extra": 1})
    with pytest.raises(ContextError, match="not dict"):
        _typed(Point).encode_context({"x": 1})


def test_a_dataclass_post_init_check_is_a_context_error() -> None:
    @dataclasses.dataclass
    class Positive:
        n: int

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    with pytest.raises(ContextError, match="ValueError: n must be positive"):
        _typed(Positive).decode_context('{"n": 0}')


# -- declaring the type ----------------------------------------------------------------------------


def test_the_annotation_of_the_context_declares_the_type() -> None:
    registry = TaskRegistry()

    @registry.task("annotated")
    async def annotated(context: Point, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    @annotated.deleting
    async def cleanup(context: Point, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    @registry.task("plain")
    async def plain(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    class Job:
        async def running(self, context: Order, stop: asyncio.Event) -> AsyncIterator[Report]:
            yield Report.finished()

    job = registry.register_task("job", factory=Job)
    assert (annotated.context_type, plain.context_type, job.context_type) == (Point, None, Order)
    assert plain.encode_context("as it is") == "as it is"
    assert plain.decode_context("as it is") == "as it is"


def test_a_given_type_needs_no_annotation_and_must_agree_with_one() -> None:
    registry = TaskRegistry()

    async def bare(context, stop):  # type: ignore[no-untyped-def]
        yield Report.finished()

    async def other(context: Order, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    assert registry.register_task("bare", bare, context_type=Point).context_type is Point
    assert registry.register_task("str", bare, context_type=str).context_type is None
    with pytest.raises(ConfigurationError, match=r"annotations \(Order, Point\) disagree"):
        registry.register_task("mixed", other, context_type=Point)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"disagree with its context type \(str\)"):
        registry.register_task("mixed", other, context_type=str)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="disagree"):
        registry.register_task("mixed", bare, other, context_type=Point)  # type: ignore[arg-type]
    typed = registry.register_task("typed", bare, context_type=Point)
    with pytest.raises(ConfigurationError, match="cleanup of 'typed' takes Order"):
        typed.deleting(other)
    assert "mixed" not in registry


@pytest.mark.parametrize(
    ("context_type", "problem"),
    [
        (int, "must be str, a dataclass, a TypedDict or a pydantic model, not <class 'int'>"),
        (Point(1), "context_type must be a class"),
    ],
)
def test_a_context_type_that_cannot_be_one_is_refused(context_type: Any, problem: str) -> None:
    async def bare(context, stop):  # type: ignore[no-untyped-def]
        yield Report.finished()

    with pytest.raises(ConfigurationError, match=problem):
        TaskRegistry().register_task("t", bare, context_type=context_type)


def test_a_field_json_cannot_hold_is_refused_at_registration() -> None:
    @dataclasses.dataclass
    class When:
        at: datetime

    with pytest.raises(ConfigurationError, match=r"When\.at: datetime cannot be stored as JSON"):
        _typed(When)


def test_an_annotation_that_cannot_be_resolved_asks_for_context_type() -> None:
    async def handler(context: Undefined, stop: asyncio.Event) -> AsyncIterator[Report]:  # type: ignore[name-defined]  # noqa: F821
        yield Report.finished()

    with pytest.raises(ConfigurationError, match="cannot resolve the annotation 'Undefined'"):
        TaskRegistry().register_task("t", handler)
    assert TaskRegistry().register_task("t", handler, context_type=Point).context_type is Point


def test_a_report_takes_a_typed_value_but_not_any_value() -> None:
    assert Report(context=Point(1)).context == Point(1)
    assert Report.finished(context={"reference": "A"}).context == {"reference": "A"}
    assert Report.failed(context=Invoice(number=1, customer="x")).context is not None
    for value in (5, ["x"], b"x", Point):
        with pytest.raises(ConfigurationError, match="a str or a typed context"):
            Report(context=value)
