"""Conformance: bad input (``docs/reference.md``, "Errors": ``ConfigurationError``), on both
backends.

Every public ``Node`` method is called with wrong types, empty strings, bools where ints are
wanted, negative or out-of-range numbers, oversized contexts, unknown states and task types,
naive datetimes and malformed ``create_tasks`` items. Each call raises the documented error
(``ConfigurationError``, ``UnknownTaskType`` or ``TaskNotFound``) and writes NOTHING: the
tables are read with raw SQL before and after. Validation errors are raised before any I/O: the
node's engine runs no statement at all for them.

Also: ``Node`` constructor validation, ``NodeNotStarted`` before start, ``NodeStopped`` after
stop, ``Report`` validation and ``TaskRegistry`` errors.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import make_node, raw_engine, statements, wait_for
from sqlalchemy import create_engine

from aioasync_tasks import (
    AsyncTasksError,
    ConfigurationError,
    DuplicateTaskType,
    Node,
    NodeNotStarted,
    NodeStopped,
    Phase,
    Report,
    State,
    TaskNotFound,
    TaskRegistry,
    UnknownTaskType,
)

CE = ConfigurationError
MAX_CONTEXT = 1024
"""The nodes of this module accept contexts up to this many UTF-8 bytes."""
EXISTING = object()
"""Stands for the id of a task that exists (an INIT task)."""
NAIVE = datetime(2030, 1, 1, 12, 0)  # naive on purpose
MISSING_ID = 10**12
LONE = "\ud800"
"""A lone surrogate: a str that cannot be encoded as UTF-8 (no driver can send it)."""
NAME_LIMIT = 200
"""``MAX_NAME_LENGTH``: the longest user, group, type and node name, on every backend."""
UNSTORABLE = {"nul": "a\x00b", "lone surrogate": f"a{LONE}b"}
"""Texts no backend can store: each text argument refuses them before any I/O."""


async def _running(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
    yield Report.finished()


def _registry() -> TaskRegistry:
    registry = TaskRegistry()
    registry.register_task("t", _running)
    registry.register_task("c", _running, _running)
    return registry


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Node, int], Awaitable[Any]]
    error: type[AsyncTasksError] = ConfigurationError

    @property
    def io(self) -> bool:
        """Whether the error can only be known from the database (a missing task; a type
        that is not in the registry is looked up in the task types table)."""
        return self.error in (TaskNotFound, UnknownTaskType)


def _args(existing: int, values: tuple[Any, ...]) -> list[Any]:
    return [existing if v is EXISTING else v for v in values]


def call(method: str, *args: Any, **kwargs: Any) -> Callable[[Node, int], Awaitable[Any]]:
    def invoke(node: Node, existing: int) -> Awaitable[Any]:
        values = {k: existing if v is EXISTING else v for k, v in kwargs.items()}
        return getattr(node, method)(*_args(existing, args), **values)  # type: ignore[no-any-return]

    return invoke


BAD_GROUPS = ["", "   ", None, 5, "g\x00", f"g{LONE}", "g" * (NAME_LIMIT + 1)]


def _cases() -> dict[str, list[Case]]:
    cases: dict[str, list[Case]] = {}
    value: Any  # bad values of every type, on purpose
    values: Any

    def add(
        method: str, name: str, *args: Any, error: type[AsyncTasksError] = CE, **kw: Any
    ) -> None:
        cases.setdefault(method, []).append(Case(name, call(method, *args, **kw), error))

    # create_task: every argument
    for name, value in [
        ("int", 123),
        ("none", None),
        ("bytes", b"t"),
        ("empty", ""),
        ("blank", "   "),
        ("too long", "t" * 201),
        ("too long in emoji", "\U0001f600" * 201),
        ("nul", "t\x00"),
        ("lone surrogate", f"t{LONE}"),
    ]:
        add("create_task", f"type {name}", value)
    add("create_task", "type unknown", "nope", error=UnknownTaskType)
    add("create_task", "type differs in case", "T", error=UnknownTaskType)
    for name, value in [
        ("int", 5),
        ("none", None),
        ("bytes", b"x"),
        ("list", ["x"]),
        ("nul", "a\x00b"),
        ("lone surrogate", f"a{LONE}b"),
        ("only a lone surrogate", LONE),
        ("oversized", "x" * (MAX_CONTEXT + 1)),
        ("oversized in bytes", "é" * (MAX_CONTEXT // 2 + 1)),  # fewer chars than the limit
    ]:
        add("create_task", f"context {name}", "t", value)
    for field, values in {
        "user": [5, None, b"u", "a\x00", LONE, "u" * (NAME_LIMIT + 1)],
        "group": ["", "   ", None, 5, "g\x00", f"g{LONE}", "g" * (NAME_LIMIT + 1)],
        "auto_run": ["yes", 1, None],
        "priority": ["1", True, 1.5, None, 2**31, -(2**31) - 1],
        "run_at": [NAIVE, "2030-01-01T00:00:00+00:00", 0, date(2030, 1, 1)],
        "max_attempts": [0, -1, True, "2", 1.5, 2**31],
        "connection": ["a connection"],
        "session": ["a session"],
        "unique_key": [5, b"k", "", "   ", "k\x00", LONE, "k" * (NAME_LIMIT + 1)],
    }.items():
        for value in values:
            add("create_task", f"{field} {value!r}"[:60], "t", **{field: value})
    for value in ["ignore", "SKIP", None, 1, ["skip"]]:
        add("create_task", f"on_conflict {value!r}", "t", unique_key="k", on_conflict=value)
    for value in ["skip", "replace", "error"]:
        add("create_task", f"on_conflict {value!r} without a key", "t", on_conflict=value)
    for value in ["yes", 1, 0]:
        add("create_task", f"has_cleanup {value!r}", "t", has_cleanup=value)
    add("create_task", "has_cleanup against the registry", "t", has_cleanup=True)
    add("create_task", "no cleanup against the registry", "c", has_cleanup=False)
    add(
        "create_task", "unknown type, cleanup only", "nope", has_cleanup=True, error=UnknownTaskType
    )
    add("create_task", "connection and session", "t", connection=object(), session=object())
    add("create_task", "an unknown option", "t", colour="red")

    # create_tasks: the list and its items
    good = {"type": "t"}
    for name, value in [
        ("a mapping", {"type": "t"}),
        ("a str", "t"),
        ("none", None),
        ("an int", 5),
        ("a set", {"t"}),
        ("an item not a mapping", [good, 1]),
        ("an item a str", ["t"]),
        ("an unknown key", [good, {"type": "t", "bogus": 1}]),
        ("no type", [good, {"context": "x"}]),
        ("a bad type", [good, {"type": ""}]),
        ("an oversized context", [good, {"type": "t", "context": "x" * (MAX_CONTEXT + 1)}]),
        ("a bool priority", [good, {"type": "t", "priority": True}]),
        ("a naive run_at", [good, {"type": "t", "run_at": NAIVE}]),
        ("a bad group", [good, {"type": "t", "group": ""}]),
        ("a bad unique_key", [good, {"type": "t", "unique_key": 7}]),
        ("a bad on_conflict", [good, {"type": "t", "unique_key": "k", "on_conflict": "x"}]),
        ("an on_conflict without a key", [good, {"type": "t", "on_conflict": "skip"}]),
    ]:
        add("create_tasks", name, value)
    for field in ("context", "user", "group", "type"):
        for what, text in UNSTORABLE.items():
            add("create_tasks", f"a {what} in {field}", [good, {"type": "t", field: text}])
    for field in ("user", "group", "type"):
        long = {"type": "t", field: "x" * (NAME_LIMIT + 1)}
        add("create_tasks", f"a {field} over {NAME_LIMIT} characters", [good, long])
    add("create_tasks", "an unknown type", [good, {"type": "nope"}], error=UnknownTaskType)
    add("create_tasks", "a bad connection", [good], connection="a connection")

    # cases.setdefault keeps the order above; a generator must be made per call
    cases["create_tasks"].append(
        Case("a generator", lambda node, _: node.create_tasks(g for g in [good]))  # type: ignore[arg-type]
    )

    # operations and get_task: ids
    bad_ids = [0, -1, -(2**63), 2**63, True, False, "1", 1.0, None]
    for method in ("run_task", "pause_task", "delete_task", "get_task"):
        for value in bad_ids:
            add(method, f"id {value!r}", value)
        add(method, "missing id", MISSING_ID, error=TaskNotFound)
    for value in ["yes", 1, None]:
        add("delete_task", f"force {value!r}", EXISTING, force=value)
    add("delete_task", "missing id, forced", MISSING_ID, force=True, error=TaskNotFound)
    for value in bad_ids:
        add("change_task_group", f"id {value!r}", value, "g")
    for value in BAD_GROUPS:
        add("change_task_group", f"group {value!r}"[:60], EXISTING, value)
    add("change_task_group", "missing id", MISSING_ID, "g", error=TaskNotFound)

    # queries: filters, paging
    filters: list[tuple[str, dict[str, Any]]] = [
        ("user int", {"user": 5}),
        ("user bytes", {"user": b"alice"}),
        ("group empty", {"group": ""}),
        ("group int", {"group": 5}),
        ("states a str", {"states": "pending"}),
        ("states a bare State", {"states": State.PENDING}),
        ("states unknown", {"states": ["bogus"]}),
        ("states unknown among known", {"states": [State.PENDING, "PENDING"]}),
        ("states none item", {"states": [None]}),
        ("states int", {"states": 5}),
        ("types a str", {"types": "t"}),
        ("types empty name", {"types": [""]}),
        ("types int item", {"types": [5]}),
        ("types int", {"types": 5}),
        ("user nul", {"user": "a\x00"}),
        ("user lone surrogate", {"user": LONE}),
        ("user too long", {"user": "u" * (NAME_LIMIT + 1)}),
        ("group nul", {"group": "g\x00"}),
        ("group lone surrogate", {"group": LONE}),
        ("group too long", {"group": "g" * (NAME_LIMIT + 1)}),
        ("types nul", {"types": ["t\x00"]}),
        ("types lone surrogate", {"types": [LONE]}),
    ]
    for name, kwargs in filters:
        add("get_tasks", name, **kwargs)
        add("count_tasks", name, **kwargs)
    paging: list[tuple[str, dict[str, Any]]] = [
        ("limit 0", {"limit": 0}),
        ("limit negative", {"limit": -1}),
        ("limit above the maximum", {"limit": 1001}),
        ("limit bool", {"limit": True}),
        ("limit str", {"limit": "10"}),
        ("limit float", {"limit": 10.0}),
        ("offset negative", {"offset": -1}),
        ("offset bool", {"offset": True}),
        ("offset str", {"offset": "0"}),
        ("offset none", {"offset": None}),
        ("offset huge", {"offset": 2**64}),
    ]
    for name, kwargs in paging:
        add("get_tasks", name, **kwargs)

    # delete_tasks: the filters of the queries, and its own
    add("delete_tasks", "no filter")
    add("delete_tasks", "no filter, forced", force=True)
    for name, kwargs in filters:
        add("delete_tasks", name, **kwargs)
    for value in [0, -1, "7d", True, math.nan, timedelta(0)]:
        add("delete_tasks", f"older_than {value!r}", states=["finished"], older_than=value)
    for value in ["yes", 1, None]:
        add("delete_tasks", f"force {value!r}", states=["finished"], force=value)

    # groups
    for method in ("pause_group", "resume_group", "set_group_limits"):
        for value in BAD_GROUPS:
            add(method, f"group {value!r}"[:60], value)
    for field in ("max_running", "max_running_per_user"):
        for value in [0, -1, True, "3", 1.5, 2**31]:
            add("set_group_limits", f"{field} {value!r}", "g", **{field: value})
    return cases


CASES = _cases()


async def _tables(db: DbTarget) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table that a call could write, read behind the library's back."""
    engine = raw_engine(db)
    try:
        async with engine.connect() as conn:
            rows = {}
            for table in ("aioasync_tasks", "aioasync_groups", "aioasync_nodes"):
                result = await conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1"))
                rows[table] = [tuple(r) for r in result]
            return rows
    finally:
        await engine.dispose()


@pytest.mark.parametrize("method", list(CASES))
async def test_bad_arguments_raise_and_write_nothing(db: DbTarget, method: str) -> None:
    async with make_node(db, _registry(), concurrency=0, max_context_bytes=MAX_CONTEXT) as node:
        existing = await node.create_task("c", "kept", auto_run=False, group="g0")
        await node.set_group_limits("g0", max_running=2)
        before = await _tables(db)
        assert len(before["aioasync_tasks"]) == 1
        for case in CASES[method]:
            raised: BaseException | None = None
            with statements(node) as seen:
                try:
                    await case.call(node, existing)
                except Exception as exc:  # checked below, with the case's name in the message
                    raised = exc
            expected = case.error.__name__
            assert raised is not None, f"{method}({case.name}) raised nothing, not {expected}"
            assert type(raised) is case.error, f"{method}({case.name}): {raised!r}, not {expected}"
            if isinstance(raised, TaskNotFound):
                assert raised.task_id == MISSING_ID
            if case.io:
                assert seen, "the statement listener sees the node's statements"
            else:
                assert seen == [], f"{method}({case.name}) touched the database: {seen}"
            assert await _tables(db) == before, f"{method}({case.name}) wrote something"
        task = await node.get_task(existing)
        assert (task.state, task.context, task.group) == (State.INIT, "kept", "g0")


async def test_good_arguments_next_to_the_bad_ones_work(db: DbTarget) -> None:
    """The sweep above is not vacuous: the same calls with good values succeed."""
    async with make_node(db, _registry(), concurrency=0, max_context_bytes=MAX_CONTEXT) as node:
        edge = "é" * (MAX_CONTEXT // 2)  # exactly the limit, in bytes
        task_id = await node.create_task(
            "t",
            edge,
            user="u",
            group="g",
            priority=2**31 - 1,
            max_attempts=2**31 - 1,
            run_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
        assert (await node.get_task(task_id)).context == edge
        ids = await node.create_tasks([{"type": "t"}, {"type": "c", "priority": -(2**31)}])
        assert len(ids) == 2
        assert await node.count_tasks(states=[State.PENDING, "init"], types=["t", "c"]) == 3
        assert len(await node.get_tasks(offset=2**63 - 1, limit=1000)) == 0
        await node.set_group_limits("g", max_running=2**31 - 1, max_running_per_user=1)
        await node.change_task_group(task_id, "h")
        await node.pause_task(task_id)
        await node.run_task(task_id)
        await node.delete_task(task_id, force=True)
        await node.pause_group("h")
        await node.resume_group("h")


@pytest.mark.parametrize("char", ["n", "\U0001f600"], ids=["ascii", "4-byte"])
async def test_names_at_the_limit_round_trip(db: DbTarget, char: str) -> None:
    """200 characters is accepted for user, group, type and node name on both backends — even
    in 4-byte characters, which PostgreSQL's indexes (group and user in one row) must hold."""
    name = char * NAME_LIMIT
    registry = _registry()
    registry.register_task(name, _running)
    async with make_node(db, registry, concurrency=1, name=name, groups=["other"]) as node:
        task_id = await node.create_task(name, "ctx", user=name, group=name)
        [other] = await node.create_tasks([{"type": name, "user": name, "group": name}])
        task = await node.get_task(task_id)
        assert (task.type, task.user, task.group) == (name, name, name)
        assert await node.count_tasks(user=name, group=name, types=[name]) == 2
        assert [t.id for t in await node.get_tasks(user=name)] == [other, task_id]
        await node.set_group_limits(name, max_running=1, max_running_per_user=1)
        await node.pause_group(name)
        assert [g.name for g in await node.get_groups()] == [name]
        await node.resume_group(name)
        await node.change_task_group(task_id, name[:-1] + "x")
        assert [n.name for n in await node.get_nodes()] == [name]


async def test_unstorable_texts_are_refused_on_both_backends_alike(db: DbTarget) -> None:
    """A 201-character name, a NUL and a lone surrogate are refused with the argument named —
    the same on SQLite (which would store them) and PostgreSQL (whose driver would fail)."""
    async with make_node(db, _registry(), concurrency=0) as node:
        before = await _tables(db)
        for argument in ("user", "group"):
            too_long: dict[str, Any] = {argument: "x" * (NAME_LIMIT + 1)}
            with pytest.raises(ConfigurationError, match=f"^{argument} must be at most 200 "):
                await node.create_task("t", **too_long)
        calls: dict[str, Callable[[str], Awaitable[Any]]] = {
            "context": lambda text: node.create_task("t", text),
            "user": lambda text: node.create_task("t", user=text),
            "group": lambda text: node.create_tasks([{"type": "t", "group": text}]),
            "task type": lambda text: node.create_tasks([{"type": text}]),
        }
        for argument, create in calls.items():
            with pytest.raises(ConfigurationError, match=f"^{argument} must not contain NUL"):
                await create(UNSTORABLE["nul"])
            with pytest.raises(ConfigurationError, match=f"^{argument} is not valid Unicode"):
                await create(UNSTORABLE["lone surrogate"])
        assert await _tables(db) == before


# -- the Node constructor ---------------------------------------------------------------------


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'tasks.db'}"


CONSTRUCTOR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("registry not a registry", {"registry": {"t": _running}}),
    ("concurrency negative", {"concurrency": -1}),
    ("concurrency bool", {"concurrency": True}),
    ("concurrency float", {"concurrency": 2.0}),
    ("concurrency str", {"concurrency": "4"}),
    ("cleanup_concurrency negative", {"cleanup_concurrency": -1}),
    ("heartbeat_interval zero", {"heartbeat_interval": 0}),
    ("heartbeat_interval negative", {"heartbeat_interval": -1.0}),
    ("heartbeat_interval nan", {"heartbeat_interval": math.nan}),
    ("heartbeat_interval inf", {"heartbeat_interval": math.inf}),
    ("heartbeat_interval bool", {"heartbeat_interval": True}),
    ("heartbeat_interval str", {"heartbeat_interval": "5"}),
    ("node_timeout zero", {"node_timeout": 0}),
    ("node_timeout below twice the heartbeat", {"heartbeat_interval": 1.0, "node_timeout": 1.9}),
    ("node_timeout below the default heartbeat", {"node_timeout": 9.0}),
    ("poll_interval zero", {"poll_interval": 0}),
    ("retry_base negative", {"retry_base": -1}),
    ("retry_cap zero", {"retry_cap": 0}),
    ("cleanup_attempts zero", {"cleanup_attempts": 0}),
    ("max_context_bytes zero", {"max_context_bytes": 0}),
    ("max_context_bytes str", {"max_context_bytes": "1MiB"}),
    ("name empty", {"name": ""}),
    ("name int", {"name": 5}),
    ("name nul", {"name": "n\x00"}),
    ("name lone surrogate", {"name": f"n{LONE}"}),
    ("name too long", {"name": "n" * (NAME_LIMIT + 1)}),
    ("groups a str", {"groups": "g"}),
    ("groups empty", {"groups": []}),
    ("groups item nul", {"groups": ["g\x00"]}),
    ("groups item lone surrogate", {"groups": [LONE]}),
    ("groups item too long", {"groups": ["g" * (NAME_LIMIT + 1)]}),
    ("schema on SQLite", {"schema": "tenant"}),
    ("schema empty", {"schema": ""}),
    ("schema not an identifier", {"schema": "a :b"}),
    ("retention zero", {"retention": 0}),
    ("retention negative", {"retention": timedelta(seconds=-1)}),
    ("retention str", {"retention": "7d"}),
    ("retention bool", {"retention": True}),
    ("retention inf", {"retention": math.inf}),
    ("failed_retention nan", {"failed_retention": math.nan}),
    ("retention on a client-only node", {"retention": 60, "concurrency": 0}),
    ("failed_retention on a client-only node", {"failed_retention": 60, "concurrency": 0}),
]


@pytest.mark.parametrize(
    "options", [c[1] for c in CONSTRUCTOR_CASES], ids=[c[0] for c in CONSTRUCTOR_CASES]
)
def test_node_rejects_bad_options(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Node(_sqlite_url(tmp_path), **options)
    assert not (tmp_path / "tasks.db").exists()  # no I/O


PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.mark.parametrize(
    "schema",
    ["a :b", "a-b", "a.b", 'a"b', "1abc", "", " a", "a\x00", f"a{LONE}", "a" * 64, "pg_x", 5, b"a"],
)
def test_schema_must_be_a_plain_identifier(schema: Any) -> None:
    """The schema is spliced (quoted) into every statement: only plain identifiers, refused
    before anything connects (a schema named ``a :b`` used to break every statement)."""
    with pytest.raises(ConfigurationError, match="schema"):
        Node(PG_URL, schema=schema)


@pytest.mark.parametrize("schema", ["a", "_", "Tenant_1", "a" * 63, "public"])
async def test_plain_identifier_schemas_are_accepted(schema: str) -> None:
    node = Node(PG_URL, schema=schema)
    await node.stop()  # it never connected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite://",
        "sqlite://",
        "mysql+asyncmy://user@localhost/db",  # MySQL, with a driver the library does not use
        "postgresql+psycopg2://postgres@localhost/test",
        "oracle://scott@localhost/xe",
        "not a url",
        "",
    ],
)
def test_node_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        Node(url)


@pytest.mark.parametrize("target", [42, None, b"sqlite:///x.db", Path("tasks.db")])
def test_node_rejects_what_is_neither_url_nor_engine(target: object) -> None:
    with pytest.raises(ConfigurationError):
        Node(target)  # type: ignore[arg-type]


def test_node_rejects_a_synchronous_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    try:
        with pytest.raises(ConfigurationError):
            Node(engine)  # type: ignore[arg-type]
    finally:
        engine.dispose()


async def test_node_accepts_plain_scheme_names(tmp_path: Path) -> None:
    """``sqlite:///`` and ``postgresql://`` pick the async drivers."""
    for url in (f"sqlite:///{tmp_path / 'a.db'}", "postgresql://postgres@127.0.0.1/test"):
        node = Node(url)
        try:
            assert node.engine.dialect.driver in ("aiosqlite", "asyncpg")
        finally:
            await node.stop()  # disposes the engine it made; it never connected


# -- lifecycle errors -------------------------------------------------------------------------

LIFECYCLE_CALLS: dict[str, Callable[[Node], Awaitable[Any]]] = {
    "create_task": lambda n: n.create_task("t"),
    "create_tasks": lambda n: n.create_tasks([{"type": "t"}]),
    "run_task": lambda n: n.run_task(1),
    "pause_task": lambda n: n.pause_task(1),
    "delete_task": lambda n: n.delete_task(1),
    "change_task_group": lambda n: n.change_task_group(1, "g"),
    "get_task": lambda n: n.get_task(1),
    "get_tasks": lambda n: n.get_tasks(),
    "count_tasks": lambda n: n.count_tasks(),
    "pause_group": lambda n: n.pause_group("g"),
    "resume_group": lambda n: n.resume_group("g"),
    "set_group_limits": lambda n: n.set_group_limits("g", max_running=1),
    "get_groups": lambda n: n.get_groups(),
    "get_nodes": lambda n: n.get_nodes(),
}


async def test_node_not_started_then_stopped(db: DbTarget) -> None:
    node = make_node(db, _registry(), concurrency=1)
    try:
        assert not node.running
        assert node.id is None
        for name, method in LIFECYCLE_CALLS.items():
            with pytest.raises(NodeNotStarted):
                await method(node)
            assert name
        await node.start()
        assert node.running
        await node.create_task("t", auto_run=False)
    finally:
        await node.stop()
    assert not node.running
    for method in LIFECYCLE_CALLS.values():
        with pytest.raises(NodeStopped):
            await method(node)
    with pytest.raises(NodeStopped):
        await node.start()
    with pytest.raises(NodeStopped):
        await node.migrate()
    await node.stop()  # idempotent


async def test_a_node_stopped_before_it_started_cannot_start(db: DbTarget) -> None:
    node = make_node(db, _registry(), concurrency=0)
    await node.stop()
    with pytest.raises(NodeStopped):
        await node.start()
    with pytest.raises(NodeStopped):
        await node.get_tasks()


async def test_register_task_after_start_is_refused(db: DbTarget) -> None:
    async with make_node(db, _registry(), concurrency=0) as node:
        with pytest.raises(ConfigurationError):
            node.register_task("late", _running)
        assert "late" not in node.registry


# -- Report -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Report(context=5),
        lambda: Report(context=b"bytes"),
        lambda: Report(phase="finished"),  # type: ignore[arg-type]
        lambda: Report(phase=None),  # type: ignore[arg-type]
        lambda: Report(delete=True),
        lambda: Report(error="not failed"),
        lambda: Report(phase=Phase.FINISHED, error="finished with an error"),
        lambda: Report.finished(context=1),
        lambda: Report.failed(context=["x"]),
        lambda: Report(context="a\x00b"),
        lambda: Report(context=f"a{LONE}b"),
        lambda: Report.finished(context="\x00"),
        lambda: Report.failed("boom", context=LONE),
        lambda: Report.failed(5),  # type: ignore[arg-type]
        lambda: Report.failed(b"boom"),  # type: ignore[arg-type]
    ],
    ids=[
        "context int",
        "context bytes",
        "phase str",
        "phase none",
        "delete on a checkpoint",
        "error on a checkpoint",
        "error on finished",
        "finished context int",
        "failed context list",
        "context nul",
        "context lone surrogate",
        "finished context nul",
        "failed context lone surrogate",
        "failed error int",
        "failed error bytes",
    ],
)
def test_report_validation(make: Callable[[], Report]) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_good_reports() -> None:
    assert Report().phase is Phase.NORMAL
    assert Report(context="c").context == "c"
    done = Report.finished("c", delete=True)
    assert (done.phase, done.context, done.delete, done.terminal) == (
        Phase.FINISHED,
        "c",
        True,
        True,
    )
    failed = Report.failed("boom", context="c")
    assert (failed.phase, failed.error, failed.context) == (Phase.FAILED, "boom", "c")
    assert Report.failed().error  # a failure always has a text
    assert not Report(context="c").terminal
    anything = f"a\x00b{LONE}" + "x" * 100_000  # any str: cleaned when it is stored
    assert Report.failed(anything).error == anything


async def test_a_task_yielding_an_unstorable_context_fails_alone(db: DbTarget) -> None:
    """``Report(context=...)`` with a NUL raises in the task's own code, so that task fails with
    a clear error and the node and its other tasks carry on."""
    registry = _registry()

    @registry.task("nul")
    async def _nul(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report(context="a\x00b")

    async with make_node(db, registry, concurrency=2) as node:
        bad = await node.create_task("nul", "kept")
        good = await node.create_task("t")
        done = {bad: State.FAILED, good: State.FINISHED}
        await wait_for(lambda: _states_are(node, done), what=f"states {done}")
        task = await node.get_task(bad)
        assert task.context == "kept"
        assert task.error is not None
        assert "ConfigurationError: Report context must not contain NUL characters" in task.error


async def _states_are(node: Node, states: dict[int, State]) -> bool:
    return {i: (await node.get_task(i)).state for i in states} == states


# -- TaskRegistry -----------------------------------------------------------------------------


def test_registering_a_type_twice_is_refused() -> None:
    registry = TaskRegistry()
    registry.register_task("t", _running)
    with pytest.raises(DuplicateTaskType) as raised:
        registry.register_task("t", _running)
    assert raised.value.type == "t"
    with pytest.raises(DuplicateTaskType):

        @registry.task("t")
        async def _again(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
            yield Report.finished()

    assert len(registry) == 1


def test_a_plain_coroutine_function_is_not_a_task() -> None:
    registry = TaskRegistry()

    async def plain(context: str, stop: asyncio.Event) -> None:
        return None

    def sync(context: str, stop: asyncio.Event) -> None:
        return None

    for function in (plain, sync, None, "plain", 5):
        with pytest.raises(ConfigurationError):
            registry.register_task("t", function)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        registry.task("t")(plain)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        registry.register_task("t", _running, plain)  # type: ignore[arg-type]
    task_type = registry.register_task("ok", _running)
    with pytest.raises(ConfigurationError):
        task_type.deleting(plain)  # type: ignore[type-var]
    assert not task_type.has_cleanup
    assert registry.names == ["ok"]


def test_a_cleanup_handler_cannot_be_set_twice() -> None:
    registry = TaskRegistry()

    @registry.task("t")
    async def _task(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    @_task.deleting
    async def _cleanup(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    with pytest.raises(ConfigurationError):
        _task.deleting(_cleanup)
    assert _task.has_cleanup
    with_handler = registry.register_task("u", _running, _running)
    with pytest.raises(ConfigurationError):
        with_handler.deleting(_running)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("", {}),
        ("   ", {}),
        ("x" * 201, {}),
        (5, {}),
        (None, {}),
        ("t", {"max_attempts": 0}),
        ("t", {"max_attempts": True}),
        ("t", {"max_attempts": 1.5}),
        ("t", {"stop_timeout": 0}),
        ("t", {"stop_timeout": -1}),
        ("t", {"stop_timeout": math.nan}),
        ("t", {"timeout": 0}),
        ("t", {"timeout": "1"}),
    ],
)
def test_registry_rejects_bad_names_and_options(name: Any, options: dict[str, Any]) -> None:
    registry = TaskRegistry()
    with pytest.raises(ConfigurationError):
        registry.register_task(name, _running, **options)
    assert len(registry) == 0


def test_registry_without_a_function_or_factory_and_unknown_lookups() -> None:
    registry = TaskRegistry()
    with pytest.raises(ConfigurationError):
        registry.register_task("t")
    with pytest.raises(UnknownTaskType) as raised:
        registry.get("missing")
    assert raised.value.type == "missing"
    assert "missing" not in registry


@pytest.mark.parametrize("option", ["retry_base", "retry_cap"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1"])
def test_a_type_back_off_must_be_positive_seconds(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"{option} must be a positive number"):
        TaskRegistry().register_task("t", _running, **{option: value})  # type: ignore[arg-type]
