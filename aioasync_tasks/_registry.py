"""``TaskRegistry``: task types by name, with their generator functions and options — among them
the context type (``_contexts``) and the retry back-off of each type."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from ._contexts import ContextCodec, annotated_context_type
from ._errors import ConfigurationError, DuplicateTaskType, UnknownTaskType
from ._periodic import Period, check_period
from ._report import Report
from ._validation import INT32_MAX, MAX_NAME_LENGTH, check_type_name

TaskGenerator = AsyncIterator[Report]
TaskFunction = Callable[[Any, asyncio.Event], TaskGenerator]
"""A handler ``(context, stop)``: the context is a ``str``, or a value of the type's
``context_type``."""
_C = TypeVar("_C")
_F = TypeVar("_F", bound=Callable[..., AsyncIterator[Report]])


MAX_TYPE_NAME = MAX_NAME_LENGTH
MAX_ATTEMPTS = INT32_MAX
"""The largest ``max_attempts`` (an INTEGER column)."""


def _check_generator_function(fn: object, what: str) -> None:
    if not inspect.isasyncgenfunction(fn):
        kind = "a plain coroutine function" if inspect.iscoroutinefunction(fn) else repr(fn)
        raise ConfigurationError(
            f"{what} must be an async generator function (an 'async def' that yields Report "
            f"objects), not {kind}"
        )


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number, not {value!r}")


@dataclass(slots=True)
class TaskType:
    """A registered task type. Use ``@task_type.deleting`` to add its cleanup handler."""

    name: str
    running_fn: TaskFunction | None = None
    deleting_fn: TaskFunction | None = None
    factory: Callable[[], Any] | None = None
    max_attempts: int = 1
    """How many times the task runs before it is FAILED for good (1: no retry)."""
    stop_timeout: float = 30.0
    """Seconds a task may take to honour ``stop`` before it is cancelled."""
    timeout: float | None = None
    """Seconds one attempt may run in all; then it is stopped and counts as failed."""
    context_type: type | None = None
    """The class of the contexts its handlers take and yield (a dataclass, a TypedDict or a
    pydantic model), stored as JSON; None: ``str``, stored as it is. Given, or read from the
    annotation of the handler's context parameter."""
    retry_base: float | None = None
    """Back-off of this type's retries (seconds; None: the node's ``retry_base``)."""
    retry_cap: float | None = None
    """The longest back-off of this type's retries (seconds; None: the node's ``retry_cap``)."""
    cron: str | None = None
    """A schedule declared with the type: a task of it is enqueued at each tick of this cron
    expression (docs/how-to.md, "Run tasks periodically")."""
    every: float | timedelta | None = None
    """Or at each multiple of this interval, in seconds."""
    timezone: str | None = None
    """The time zone of ``cron`` (None: UTC)."""
    _codec: ContextCodec = field(init=False, repr=False)
    _frozen: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        check_type_name(self.name)
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError(f"max_attempts must be an int, not {self.max_attempts!r}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ConfigurationError(
                f"max_attempts must be from 1 to {MAX_ATTEMPTS}, not {self.max_attempts}"
            )
        _positive("stop_timeout", self.stop_timeout)
        _positive("timeout", self.timeout, allow_none=True)
        _positive("retry_base", self.retry_base, allow_none=True)
        _positive("retry_cap", self.retry_cap, allow_none=True)
        if self.cron is not None or self.every is not None or self.timezone is not None:
            period = check_period(self.cron, self.every, self.timezone)
            self.cron, self.every, self.timezone = period.cron, period.every, period.timezone
        if self.factory is not None:
            if self.running_fn is not None or self.deleting_fn is not None:
                raise ConfigurationError("give either a factory or running/deleting, not both")
            if not callable(self.factory):
                raise ConfigurationError("factory must be callable")
            _check_generator_function(getattr(self.factory, "running", None), "factory.running")
            cleanup = getattr(self.factory, "deleting", None)
            if cleanup is not None:
                _check_generator_function(cleanup, "factory.deleting")
        else:
            _check_generator_function(self.running_fn, f"task {self.name!r}")
            if self.deleting_fn is not None:
                _check_generator_function(self.deleting_fn, f"cleanup of {self.name!r}")
        self.context_type = self._declared_context_type()
        self._codec = ContextCodec(self.name, self.context_type)

    def _handlers(self) -> list[tuple[Callable[..., object], bool]]:
        """The handlers, each with whether it is a method (its first parameter ``self``)."""
        if self.factory is not None:
            method = inspect.isclass(self.factory)
            found = [
                getattr(self.factory, "running", None),
                getattr(self.factory, "deleting", None),
            ]
            return [(fn, method) for fn in found if fn is not None]
        return [(fn, False) for fn in (self.running_fn, self.deleting_fn) if fn is not None]

    def _declared_context_type(self) -> type | None:
        """``context_type`` as given, else as the handlers' annotations declare it; the two
        must agree."""
        given = None if self.context_type is str else self.context_type
        if given is not None and not isinstance(given, type):
            raise ConfigurationError(f"context_type must be a class, not {given!r}")
        annotated = {
            found
            for fn, method in self._handlers()
            if (
                found := annotated_context_type(fn, method=method, strict=self.context_type is None)
            )
            is not None
        }
        if self.context_type is None and len(annotated) <= 1:
            return next(iter(annotated), None)
        disagree = annotated - {given}
        if disagree:
            names = ", ".join(sorted(t.__qualname__ for t in disagree | {given} if t))
            declared = "str" if given is None else given.__qualname__
            raise ConfigurationError(
                f"task {self.name!r}: the handlers' context annotations ({names}) disagree with "
                f"its context type ({declared})"
            )
        return given

    def encode_context(self, value: object) -> str:
        """A context as stored: a ``str`` as it is, a typed value as JSON. Raises
        ``ContextError`` for a value that is not of ``context_type`` or does not fit it."""
        return self._codec.encode(value)

    def decode_context(self, text: str) -> object:
        """A stored context as the handlers receive it (``Task.context`` decoded). Raises
        ``ContextError`` naming the type and the problem when it does not decode."""
        return self._codec.decode(text)

    @property
    def period(self) -> Period | None:
        """The declared schedule's period, if the type has one."""
        if self.cron is None and self.every is None:
            return None
        return check_period(self.cron, self.every, self.timezone)

    @property
    def has_cleanup(self) -> bool:
        if self.factory is not None:
            return getattr(self.factory, "deleting", None) is not None
        return self.deleting_fn is not None

    def deleting(self, fn: _F) -> _F:
        """Decorator: register ``fn`` as this type's cleanup handler (run when deleted)."""
        if self.factory is not None:
            raise ConfigurationError("a class-based task defines its cleanup as a method")
        if self.deleting_fn is not None:
            raise ConfigurationError(f"task {self.name!r} already has a cleanup handler")
        _check_generator_function(fn, f"cleanup of {self.name!r}")
        annotated = annotated_context_type(fn)
        if annotated is not None and annotated is not self.context_type:
            declared = "str" if self.context_type is None else self.context_type.__qualname__
            raise ConfigurationError(
                f"the cleanup of {self.name!r} takes {annotated.__qualname__}, but the task's "
                f"context type is {declared}"
            )
        self.deleting_fn = fn
        return fn

    def start_running(self, context: object, stop: asyncio.Event) -> TaskGenerator:
        if self.factory is not None:
            return self.factory().running(context, stop)  # type: ignore[no-any-return]
        assert self.running_fn is not None
        return self.running_fn(context, stop)

    def start_deleting(self, context: object, stop: asyncio.Event) -> TaskGenerator:
        if self.factory is not None:
            return self.factory().deleting(context, stop)  # type: ignore[no-any-return]
        assert self.deleting_fn is not None
        return self.deleting_fn(context, stop)


class TaskRegistry:
    """Task types by name. Share one registry between the nodes of an application."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def register_task(
        self,
        type: str,
        running: Callable[[_C, asyncio.Event], TaskGenerator] | None = None,
        deleting: Callable[[_C, asyncio.Event], TaskGenerator] | None = None,
        *,
        factory: Callable[[], Any] | None = None,
        max_attempts: int = 1,
        stop_timeout: float = 30.0,
        timeout: float | None = None,
        context_type: type[_C] | None = None,
        retry_base: float | None = None,
        retry_cap: float | None = None,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str | None = None,
    ) -> TaskType:
        """Register a task type: ``running`` (and optional ``deleting``) async generator
        functions, or a ``factory`` building an object with ``running``/``deleting`` methods.
        ``context_type`` (default: the handler's annotation, else ``str``) makes the contexts
        typed values stored as JSON; ``retry_base``/``retry_cap`` override the node's back-off.
        ``cron=`` or ``every=`` (with ``timezone=`` for cron) declares a schedule named after
        the type: every worker node with the type enqueues its ticks."""
        check_type_name(type)
        if type in self._types:
            raise DuplicateTaskType(type)
        if factory is None and running is None:
            raise ConfigurationError("register_task needs running= or factory=")
        task_type = TaskType(
            name=type,
            running_fn=running,
            deleting_fn=deleting,
            factory=factory,
            max_attempts=max_attempts,
            stop_timeout=stop_timeout,
            timeout=timeout,
            context_type=context_type,
            retry_base=retry_base,
            retry_cap=retry_cap,
            cron=cron,
            every=every,
            timezone=timezone,
        )
        self._types[type] = task_type
        return task_type

    def task(
        self,
        type: str,
        *,
        max_attempts: int = 1,
        stop_timeout: float = 30.0,
        timeout: float | None = None,
        context_type: type[_C] | None = None,
        retry_base: float | None = None,
        retry_cap: float | None = None,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str | None = None,
    ) -> Callable[[Callable[[_C, asyncio.Event], TaskGenerator]], TaskType]:
        """Decorator form of ``register_task``; the result has a ``.deleting`` decorator."""
        check_type_name(type)

        def decorate(fn: Callable[[_C, asyncio.Event], TaskGenerator]) -> TaskType:
            return self.register_task(
                type,
                fn,
                max_attempts=max_attempts,
                stop_timeout=stop_timeout,
                timeout=timeout,
                context_type=context_type,
                retry_base=retry_base,
                retry_cap=retry_cap,
                cron=cron,
                every=every,
                timezone=timezone,
            )

        return decorate

    def get(self, type: str) -> TaskType:
        try:
            return self._types[type]
        except KeyError:
            raise UnknownTaskType(type) from None

    def __contains__(self, type: object) -> bool:
        return type in self._types

    def __iter__(self) -> Iterator[TaskType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    @property
    def names(self) -> list[str]:
        return sorted(self._types)
