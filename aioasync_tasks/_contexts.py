"""Typed contexts: the context type a task type declares, and the JSON that stores its values
(docs/how-to.md, "Give a task a typed context").

A context is stored as text. A task type may declare a *context type* — a dataclass, a
``TypedDict`` or a pydantic model — and then its handlers receive and yield values of that
type: ``ContextCodec`` encodes them as JSON on the way to the database and decodes them on the
way back, checking every field against its annotation both ways. Without one (or with ``str``)
the context is the text itself, as it always was.

The shape of a dataclass or ``TypedDict`` is read once, when the type is registered, so that an
annotation JSON cannot hold (a ``datetime``, a set …) is refused there and then. Fields may be
``str``, ``int``, ``float``, ``bool``, ``None``, ``Any``/``object``, ``Literal``, enums, unions
(``X | None``), ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, and nested dataclasses and
``TypedDict``s. Pydantic models validate themselves.

pydantic is optional (the ``typed`` extra) and never imported here: a pydantic model class
cannot exist unless pydantic is imported already, so ``sys.modules`` tells.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from ._errors import ConfigurationError, ContextError

JsonValue = object
"""A value ``json.dumps`` takes: dicts, lists, str, int, float, bool, None."""


def _pydantic_model_base() -> type | None:
    """``pydantic.BaseModel`` if pydantic is imported (a model can exist only then), else None."""
    module = sys.modules.get("pydantic")
    base = getattr(module, "BaseModel", None)
    return base if isinstance(base, type) else None


def is_pydantic_model(cls: object) -> bool:
    base = _pydantic_model_base()
    return base is not None and isinstance(cls, type) and issubclass(cls, base)


def is_typed_context_class(cls: object) -> typing.TypeGuard[type]:
    """Whether ``cls`` is a class a context can be: a dataclass, a TypedDict, a pydantic model."""
    return isinstance(cls, type) and (
        dataclasses.is_dataclass(cls) or typing.is_typeddict(cls) or is_pydantic_model(cls)
    )


def is_typed_context_value(value: object) -> bool:
    """Whether ``value`` may be a typed context (checked against the type when it is stored):
    a dataclass instance, a dict (a TypedDict's value) or a pydantic model instance."""
    return (
        isinstance(value, dict)
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
        or is_pydantic_model(type(value))
    )


# -- shapes: how a JSON value becomes a field's value and back ------------------------------


class _Invalid(Exception):
    """A value does not fit its shape; ``path`` is where, in JSON path notation."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class _Shape:
    def load(self, value: JsonValue, path: str) -> object:
        raise NotImplementedError

    def dump(self, value: object, path: str) -> JsonValue:
        raise NotImplementedError


class _AnyShape(_Shape):
    def load(self, value: JsonValue, path: str) -> object:
        return value

    def dump(self, value: object, path: str) -> JsonValue:
        return value  # json.dumps refuses what is not JSON


class _Scalar(_Shape):
    def __init__(self, cls: type) -> None:
        self.cls = cls

    def _check(self, value: object, path: str) -> object:
        if self.cls is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and self.cls is not bool:
            raise _Invalid(path, f"expected {self.cls.__name__}, got bool")
        if not isinstance(value, self.cls):
            raise _Invalid(path, f"expected {self.cls.__name__}, got {_kind(value)}")
        return value

    def load(self, value: JsonValue, path: str) -> object:
        return self._check(value, path)

    def dump(self, value: object, path: str) -> JsonValue:
        return self._check(value, path)


class _NoneShape(_Shape):
    def load(self, value: JsonValue, path: str) -> object:
        if value is not None:
            raise _Invalid(path, f"expected null, got {_kind(value)}")
        return None

    def dump(self, value: object, path: str) -> JsonValue:
        return self.load(value, path)


class _LiteralShape(_Shape):
    def __init__(self, values: tuple[object, ...]) -> None:
        self.values = values

    def load(self, value: JsonValue, path: str) -> object:
        if not any(value == v and type(value) is type(v) for v in self.values):
            raise _Invalid(path, f"expected one of {list(self.values)!r}, got {value!r}")
        return value

    def dump(self, value: object, path: str) -> JsonValue:
        return self.load(value, path)


class _EnumShape(_Shape):
    def __init__(self, cls: type[enum.Enum]) -> None:
        self.cls = cls

    def load(self, value: JsonValue, path: str) -> object:
        try:
            return self.cls(value)
        except ValueError:
            known = [m.value for m in self.cls]
            raise _Invalid(path, f"expected one of {known!r}, got {value!r}") from None

    def dump(self, value: object, path: str) -> JsonValue:
        if not isinstance(value, self.cls):
            raise _Invalid(path, f"expected {self.cls.__name__}, got {_kind(value)}")
        return value.value


class _UnionShape(_Shape):
    def __init__(self, options: list[_Shape]) -> None:
        self.options = options

    def _first(self, method: str, value: object, path: str) -> object:
        problems = []
        for option in self.options:
            try:
                return getattr(option, method)(value, path)
            except _Invalid as exc:
                problems.append(str(exc).removeprefix(f"{path}: "))
        raise _Invalid(path, " or ".join(problems))

    def load(self, value: JsonValue, path: str) -> object:
        return self._first("load", value, path)

    def dump(self, value: object, path: str) -> JsonValue:
        return self._first("dump", value, path)


class _ListShape(_Shape):
    def __init__(self, item: _Shape, *, as_tuple: bool) -> None:
        self.item = item
        self.as_tuple = as_tuple

    def load(self, value: JsonValue, path: str) -> object:
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {_kind(value)}")
        items = [self.item.load(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if self.as_tuple else items

    def dump(self, value: object, path: str) -> JsonValue:
        if not isinstance(value, tuple if self.as_tuple else list):
            expected = "a tuple" if self.as_tuple else "a list"
            raise _Invalid(path, f"expected {expected}, got {_kind(value)}")
        return [self.item.dump(v, f"{path}[{i}]") for i, v in enumerate(value)]


class _DictShape(_Shape):
    def __init__(self, item: _Shape) -> None:
        self.item = item

    def _map(self, method: str, value: object, path: str) -> dict[str, object]:
        if not isinstance(value, dict):
            raise _Invalid(path, f"expected an object, got {_kind(value)}")
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Invalid(path, f"keys must be str, not {_kind(key)}")
            result[key] = getattr(self.item, method)(item, f"{path}.{key}")
        return result

    def load(self, value: JsonValue, path: str) -> object:
        return self._map("load", value, path)

    def dump(self, value: object, path: str) -> JsonValue:
        return self._map("dump", value, path)


class _RecordShape(_Shape):
    """A dataclass or a TypedDict: an object with named fields, each of its own shape."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.is_dataclass = dataclasses.is_dataclass(cls)
        self.fields: dict[str, _Shape] = {}
        self.required: frozenset[str] = frozenset()

    def _check_keys(self, value: object, path: str, *, kind: str, key: str) -> dict[str, object]:
        """``value`` as a dict with no unknown key and every required one."""
        if not isinstance(value, dict):
            raise _Invalid(path, f"expected {kind} ({self.cls.__name__}), got {_kind(value)}")
        unknown = sorted(set(value) - set(self.fields))
        if unknown:
            raise _Invalid(path, f"unknown {key} {unknown[0]!r} for {self.cls.__name__}")
        missing = sorted(self.required - set(value))
        if missing:
            raise _Invalid(path, f"missing {key} {missing[0]!r} of {self.cls.__name__}")
        return value

    def load(self, value: JsonValue, path: str) -> object:
        value = self._check_keys(value, path, kind="an object", key="field")
        loaded = {
            name: self.fields[name].load(item, f"{path}.{name}") for name, item in value.items()
        }
        if not self.is_dataclass:
            return loaded
        try:
            return self.cls(**loaded)
        except Exception as exc:  # the dataclass's own __post_init__ checks
            raise _Invalid(path, f"{self.cls.__name__}: {type(exc).__name__}: {exc}") from exc

    def dump(self, value: object, path: str) -> JsonValue:
        if self.is_dataclass:
            if not isinstance(value, self.cls):
                raise _Invalid(path, f"expected {self.cls.__name__}, got {_kind(value)}")
            items = {name: getattr(value, name) for name in self.fields}
        else:
            items = dict(self._check_keys(value, path, kind="a dict", key="key"))
        return {
            name: self.fields[name].dump(item, f"{path}.{name}") for name, item in items.items()
        }


_SCALARS = (str, int, float, bool)


class _ShapeBuilder:
    """Reads the shape of a dataclass or TypedDict from its annotations, once."""

    def __init__(self) -> None:
        self._records: dict[type, _RecordShape] = {}  # also ends recursive types

    def record(self, cls: type) -> _RecordShape:
        if cls in self._records:
            return self._records[cls]
        shape = self._records[cls] = _RecordShape(cls)
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot read the annotations of {cls.__qualname__}: {type(exc).__name__}: {exc}"
            ) from exc
        if shape.is_dataclass:
            names = [f.name for f in dataclasses.fields(cls) if f.init]
            required = {
                f.name
                for f in dataclasses.fields(cls)
                if f.init
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            }
        else:
            names = list(hints)
            # Python 3.11 takes a NotRequired[...] written as a string (``from __future__ import
            # annotations``) for a required key: the evaluated hint tells.
            required = {
                name
                for name in names
                if typing.get_origin(hints[name]) is typing.Required
                or (
                    typing.get_origin(hints[name]) is not typing.NotRequired
                    and name in getattr(cls, "__required_keys__", names)
                )
            }
        shape.fields = {
            name: self.shape(hints[name], f"{cls.__qualname__}.{name}") for name in names
        }
        shape.required = frozenset(required)
        return shape

    def shape(self, hint: object, where: str) -> _Shape:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Required, typing.NotRequired, typing.Annotated):
            return self.shape(args[0], where)
        if hint is Any or hint is object:
            return _AnyShape()
        if hint is None or hint is type(None):
            return _NoneShape()
        if hint in _SCALARS:
            assert isinstance(hint, type)
            return _Scalar(hint)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _EnumShape(hint)
        if isinstance(hint, type) and (dataclasses.is_dataclass(hint) or typing.is_typeddict(hint)):
            return self.record(hint)
        if origin is Literal:
            return _LiteralShape(args)
        if origin is Union or origin is types.UnionType:
            return _UnionShape([self.shape(a, where) for a in args])
        if hint is list or origin is list:
            return _ListShape(self.shape(args[0] if args else Any, where), as_tuple=False)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return _ListShape(self.shape(args[0], where), as_tuple=True)
        if hint is dict or (origin is dict and (not args or args[0] is str)):
            return _DictShape(self.shape(args[1] if args else Any, where))
        raise ConfigurationError(
            f"{where}: {getattr(hint, '__name__', hint)!s} cannot be stored as JSON; use str, "
            "int, float, bool, None, Literal, an enum, a union, list[X], tuple[X, ...], "
            "dict[str, X], a dataclass or a TypedDict (or make the context a pydantic model)"
        )


# -- the codec ---------------------------------------------------------------------------------


def _problem_of(exc: Exception) -> str:
    """The problem a pydantic ValidationError (or any error) describes, on one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            found = errors()
        except Exception:  # not pydantic's: fall back on the message
            found = None
        if isinstance(found, list) and found:
            return "; ".join(
                "$"
                + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
                + f": {e['msg']}"
                for e in found
            )
    return " ".join(str(exc).split()) or type(exc).__name__


class ContextCodec:
    """How one task type's contexts are stored: ``encode`` a value to text, ``decode`` text to
    a value. ``context_type`` None stores ``str`` contexts as they are."""

    def __init__(self, task_type: str, context_type: type | None) -> None:
        self.task_type = task_type
        self.context_type = context_type
        self._record: _RecordShape | None = None
        self._pydantic = False
        if context_type is None:
            return
        if is_pydantic_model(context_type):
            self._pydantic = True
        elif dataclasses.is_dataclass(context_type) or typing.is_typeddict(context_type):
            self._record = _ShapeBuilder().record(context_type)
        else:
            raise ConfigurationError(
                f"context_type of task type {task_type!r} must be str, a dataclass, a TypedDict "
                f"or a pydantic model, not {context_type!r}"
            )

    @property
    def typed(self) -> bool:
        return self.context_type is not None

    def _error(self, message: str) -> ContextError:
        assert self.context_type is not None
        return ContextError(message, task_type=self.task_type, context_type=self.context_type)

    def _name(self) -> str:
        assert self.context_type is not None
        return self.context_type.__qualname__

    def encode(self, value: object) -> str:
        """``value`` as stored: the text itself for a ``str`` type, JSON for a typed one.
        Raises ``ContextError`` for a value that is not of the context type or does not fit it."""
        if self.context_type is None:
            return value  # type: ignore[return-value]  # checked as text by the caller
        if self._record is not None and not self._record.is_dataclass:
            fits = isinstance(value, dict)  # a TypedDict's values are dicts
        else:
            fits = isinstance(value, self.context_type)
        if not fits:
            raise self._error(
                f"task type {self.task_type!r} takes a context of type {self._name()}, not "
                f"{type(value).__name__}"
            )
        try:
            if self._pydantic:
                text: str = value.model_dump_json()  # type: ignore[attr-defined]
            else:
                assert self._record is not None
                text = json.dumps(self._record.dump(value, "$"), allow_nan=False)
        except _Invalid as exc:
            raise self._error(
                f"the context for task type {self.task_type!r} is not a valid {self._name()}: {exc}"
            ) from None
        except (TypeError, ValueError) as exc:
            raise self._error(
                f"the context for task type {self.task_type!r} cannot be stored as JSON: "
                f"{_problem_of(exc)}"
            ) from exc
        self.decode(text)  # what is stored must come back: the same checks as a node's
        return text

    def decode(self, text: str) -> object:
        """The value ``text`` stores. Raises ``ContextError`` naming the type and the problem
        when it does not decode."""
        if self.context_type is None:
            return text
        try:
            if self._pydantic:
                return self.context_type.model_validate_json(text)  # type: ignore[attr-defined]
            assert self._record is not None
            return self._record.load(json.loads(text), "$")
        except _Invalid as exc:
            problem = str(exc)
        except ValueError as exc:  # not JSON, or pydantic's ValidationError
            problem = _problem_of(exc)
        raise self._error(
            f"context is not a valid {self._name()} (task type {self.task_type!r}): {problem}"
        )


# -- declaring: from a handler's annotation ------------------------------------------------------


_PLAIN_ANNOTATIONS = frozenset({"str", "object", "Any", "typing.Any"})


def annotated_context_type(
    fn: Callable[..., object], *, method: bool = False, strict: bool = True
) -> type | None:
    """The context type a handler's first parameter (after ``self`` for a ``method``) is
    annotated with, when it is a dataclass, a TypedDict or a pydantic model; None for ``str``,
    no annotation, or any other annotation (which the library ignores, as it always has). An
    annotation that cannot be resolved raises ``ConfigurationError`` if ``strict``, else counts
    as none (the type was given)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if method and parameters:
        parameters = parameters[1:]
    if not parameters or parameters[0].annotation is inspect.Parameter.empty:
        return None
    annotation: object = parameters[0].annotation
    if isinstance(annotation, str):
        if annotation in _PLAIN_ANNOTATIONS:
            return None
        namespace: Mapping[str, object] = getattr(fn, "__globals__", {})
        try:
            # What typing.get_type_hints does, for this one annotation only.
            annotation = eval(annotation, dict(namespace))
        except Exception as exc:
            if not strict:
                return None
            name = getattr(fn, "__qualname__", repr(fn))
            raise ConfigurationError(
                f"cannot resolve the annotation {parameters[0].annotation!r} of the context of "
                f"{name} ({type(exc).__name__}: {exc}); declare the type with context_type="
            ) from None
    return annotation if is_typed_context_class(annotation) else None
