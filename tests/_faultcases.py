"""Shared pieces of the fault-injection tests (``test_faults_*.py``).

``FaultProxy``
    A :class:`_faults.PgProxy` with faults aimed at one transaction instead of at the next
    statement that matches, on whatever connection: ``drop_commit_after(trigger)`` drops the
    reply to the COMMIT of the transaction that ran a statement matching ``trigger`` (so the
    claim's, or the completion's, COMMIT is hit and never a heartbeat's that happens to come
    first); ``hold_after(trigger)`` holds all traffic right after such a statement reached the
    server (its reply waits); ``hold_when_idle()`` holds all traffic at a moment when no
    connection through the proxy is inside a transaction, so that no row or node lock stays held
    on the server by the partitioned side.  It relies on two private hooks of ``PgProxy``
    (``_on_client_message``, called on the proxy's loop for every frontend message, and
    ``Fault._match``); the proxy's own tests pin their behaviour.
``History``
    A trigger on the tasks table that copies every inserted, updated or deleted row into
    ``task_history`` (in the test's schema) inside the writing transaction: what is in the
    history was committed, in commit order per task.  It is the database's own ledger of
    states, attempts, tokens, owners and checkpoints.
``Witness``
    What the tasks saw, recorded from inside their generators (one process, one monotonic
    clock): one ``Run`` per execution (task, node, attempt, claim token, start, end, how it
    ended, the step it resumed from) and one ``Step`` per step (with the time its checkpoint's
    ``yield`` returned, if it did).  ``counter_registry`` builds the task types that write it
    (their context: ``_helpers.counter_context``).
``orphans``
    The RUNNING/CANCELING/DELETING rows not owned by a node that has an execution of them under
    the row's token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _faults import Fault, Pattern, PgProxy, _Link
from _helpers import node_ids
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import Node, Report, TaskRegistry, current_node, current_task

ACTIVE = ("running", "canceling", "deleting")
"""States in which a row must have a live owner running it."""

_BEGIN = re.compile(rb"^BEGIN\b", re.I)
_END = re.compile(rb"^(COMMIT|ROLLBACK|END)\b", re.I)
_COMMIT = re.compile(rb"^COMMIT\b", re.I)

CLAIM_SQL = rb"(?s)^WITH\s+pairs\b|^WITH RECURSIVE\s+pending_groups\b.*\bwritten AS \(\s*UPDATE\b"
"""The statement that takes a claim's tasks (PENDING → RUNNING): ``claim``, in the claim's
transaction when its window of queues is not empty, or PostgreSQL's ``claim_at_once``, a whole
claim outside a transaction (docs/design.md §6.9)."""
CLEANUP_CLAIM_SQL = rb"(?s)^WITH written AS \(WITH picked AS MATERIALIZED \(.*\bstate = 'deleting'"
"""PostgreSQL's ``claim_cleanups_at_once``: a cleanup claim in one statement outside a
transaction (docs/design.md §6.7)."""
CLAIM_PREPARE_SQL = rb"^WITH RECURSIVE\s+pending_groups\b"
"""The statement every claim begins with: its window of queues (``claim_prepare``, and
``claim_at_once``, which is a claim of its own)."""
WRITE_SQL = rb"^(?:WITH written AS \(\s*)?UPDATE \S+aioasync_tasks (?:t )?SET state = "
"""The batched UPDATE of decided outcomes: completions, releases, rescues, user operations
(PostgreSQL's ``update_tasks``, one statement for the batch, names the table ``t``), and
PostgreSQL's ``complete_at_once``, completions in one statement outside a transaction
(docs/design.md §15.1)."""
CHECKPOINT_SQL = rb"^(?:WITH written AS \(\s*)?UPDATE \S+aioasync_tasks t SET context = "
"""A checkpoint batch: in a transaction, or PostgreSQL's ``checkpoint_at_once``, one statement
outside one."""
HEARTBEAT_SQL = rb"^UPDATE \S+aioasync_nodes SET heartbeat_at = "


def _compile(pattern: Pattern) -> re.Pattern[bytes]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.I)


class CommitFault(Fault):
    """Drops the reply to the COMMIT of a transaction in which ``trigger`` ran, or to
    ``trigger`` itself when it ran outside a transaction (it commits on its own)."""

    def __init__(
        self, proxy: FaultProxy, trigger: Pattern, count: int, *, reset_all: bool = False
    ) -> None:
        super().__init__("drop_reply", _COMMIT, count)
        self.trigger = _compile(trigger)
        self.reset_all = reset_all
        self.resets: list[int] = []
        """With ``reset_all``: how many other connections each firing reset."""
        self._proxy = proxy
        self._marked: set[int] = set()
        """Connections whose open transaction ran the trigger statement."""

    def _fire(self, sql: bytes, dropped: bytes = b"") -> None:
        if self.reset_all:  # on the proxy's loop, as the reply is dropped
            others = [link for link in self._proxy._links if not link.reset]
            for link in others:
                self._proxy._abort(link)
            self.resets.append(len(others))
        super()._fire(sql, dropped)

    def _match(self, sql: bytes) -> bool:
        link = self._proxy._link_now
        if link is None or not self.armed:
            return False
        sql = sql.lstrip()
        if self.trigger.search(sql):
            if not self._proxy._in_tx.get(link, False):
                self._claimed += 1  # it commits on its own: its reply is the one dropped
                return True
            self._marked.add(link.number)
        elif _COMMIT.search(sql) and link.number in self._marked:
            self._marked.discard(link.number)
            self._claimed += 1
            return True
        elif _BEGIN.search(sql) or _END.search(sql):
            self._marked.discard(link.number)
        return False


class HoldTrigger:
    """A hold armed by :meth:`FaultProxy.hold_after` or :meth:`FaultProxy.hold_when_idle`."""

    def __init__(self, trigger: re.Pattern[bytes] | None) -> None:
        self.trigger = trigger
        self.fired = threading.Event()
        self.statement: bytes | None = None

    async def wait(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a bound, reported
        deadline = time.monotonic() + timeout
        while not self.fired.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the hold on {self.trigger!r} did not happen in {timeout}s")
            await asyncio.sleep(0.005)


class FaultProxy(PgProxy):
    """A ``PgProxy`` whose faults can aim at one transaction (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._link_now: _Link | None = None
        self._in_tx: dict[_Link, bool] = {}
        self._holds: list[HoldTrigger] = []

    def drop_commit_after(self, trigger: Pattern, count: int = 1) -> CommitFault:
        """Drop the reply to the COMMIT of the next ``count`` transactions that run a statement
        matching ``trigger`` (or to the statement, run outside a transaction): the transaction
        commits, its client sees a reset connection."""
        fault = CommitFault(self, trigger, count)
        self._call(lambda: self._faults.append(fault))
        return fault

    def reset_all_at_commit_after(self, trigger: Pattern) -> CommitFault:
        """Like ``drop_commit_after`` (one transaction), and as its reply is dropped reset
        every connection: ``reset_all()`` at the moment that transaction committed."""
        fault = CommitFault(self, trigger, 1, reset_all=True)
        self._call(lambda: self._faults.append(fault))
        return fault

    def hold_after(self, trigger: Pattern) -> HoldTrigger:
        """Hold all traffic (as ``hold()``) right after the next statement matching ``trigger``
        was forwarded: it runs on the server, its reply waits for ``release()``."""
        hold = HoldTrigger(_compile(trigger))
        self._call(lambda: self._holds.append(hold))
        return hold

    def hold_when_idle(self) -> HoldTrigger:
        """Hold all traffic now if no connection is inside a transaction, else at the first
        moment none is (just after the COMMIT or ROLLBACK that ends the last one is forwarded)."""
        hold = HoldTrigger(None)

        def arm() -> None:
            if self._idle():
                self._fire_hold(hold, None)
            else:
                self._holds.append(hold)

        self._call(arm)
        return hold

    def transactions(self, pattern: Pattern) -> tuple[int, int]:
        """(ended, open): transactions that ran a statement matching ``pattern``, by the
        statements seen so far, and how many of them have not yet sent COMMIT or ROLLBACK."""
        compiled = _compile(pattern)
        ended = 0
        open_: set[int] = set()
        for statement in self.statements():
            if statement.kind == "P":
                continue
            sql = statement.sql.encode().lstrip()
            if compiled.search(sql):
                open_.add(statement.conn)
            elif statement.conn in open_ and _END.search(sql):
                open_.discard(statement.conn)
                ended += 1
        return ended, len(open_)

    async def settled(self, pattern: Pattern, at_least: int = 1) -> None:
        """Wait until ``at_least`` transactions that ran ``pattern`` ended and none is open."""
        deadline = time.monotonic() + 20.0
        while True:
            ended, open_ = self.transactions(pattern)
            if ended >= at_least and open_ == 0:
                return
            assert time.monotonic() < deadline, f"{pattern!r}: {ended} ended, {open_} open"
            await asyncio.sleep(0.01)

    def _idle(self) -> bool:
        return not any(busy for link, busy in self._in_tx.items() if link in self._links)

    def _fire_hold(self, hold: HoldTrigger, sql: bytes | None) -> None:
        self._gate_event().clear()
        hold.statement = sql
        hold.fired.set()

    def _on_client_message(
        self, link: _Link, kind: int, message: bytes
    ) -> Callable[[], None] | None:
        self._link_now = link
        try:
            fire = super()._on_client_message(link, kind, message)
        finally:
            self._link_now = None
        if fire is not None or kind not in b"QB":
            return fire
        # The SQL of the statement this message runs (as the base class found it).
        if kind == ord("Q"):
            sql = message[5:].split(b"\0", 1)[0].lstrip()
        else:
            name = message[5:].split(b"\0", 2)[1]
            sql = link.prepared.get(name, b"").lstrip()
        if kind == ord("Q"):
            if _BEGIN.search(sql):
                self._in_tx[link] = True
            elif _END.search(sql):
                self._in_tx[link] = False
        for hold in list(self._holds):
            if hold.trigger is None:
                if self._idle():
                    self._holds.remove(hold)
                    self._fire_hold(hold, sql)
            elif hold.trigger.search(sql):
                self._holds.remove(hold)
                self._fire_hold(hold, sql)
        return None


# -- the database's ledger -----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One committed change of a task row (``op`` I, U or D; after the change, or before it
    for a delete)."""

    seq: int
    task_id: int
    op: str
    state: str
    attempts: int
    token: int
    node_id: int | None
    context: str
    error: str | None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.state, self.attempts, self.token)

    @property
    def step(self) -> int | None:
        try:
            value = json.loads(self.context)["i"]
        except (ValueError, KeyError, TypeError):
            return None
        return int(value)


class History:
    """``task_history``: every committed change of the tasks table, by a trigger."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self.engine = engine
        self.schema = schema

    async def install(self) -> None:
        """Create the table and the trigger (the tasks table must exist: migrate first)."""
        q = '"' + self.schema + '"'
        statements = [
            f"CREATE TABLE {q}.task_history (seq bigserial PRIMARY KEY, task_id bigint NOT NULL,"
            " op text NOT NULL, state text NOT NULL, attempts integer NOT NULL,"
            " token integer NOT NULL, node_id bigint, context text NOT NULL, error text,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())",
            f"CREATE FUNCTION {q}.log_task() RETURNS trigger LANGUAGE plpgsql AS $$"
            " DECLARE r record; BEGIN"
            " IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;"
            f" INSERT INTO {q}.task_history (task_id, op, state, attempts, token, node_id,"
            " context, error) VALUES (r.id, left(TG_OP, 1), r.state, r.attempts,"
            " COALESCE((to_jsonb(r) ->> 'token')::integer, 0), r.node_id, r.context, r.error);"
            " RETURN NULL; END $$",
            f"CREATE TRIGGER log_task AFTER INSERT OR UPDATE OR DELETE ON {q}.aioasync_tasks"
            f" FOR EACH ROW EXECUTE FUNCTION {q}.log_task()",
        ]
        async with self.engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))

    async def changes(self, task_id: int | None = None) -> list[Change]:
        sql = (
            "SELECT seq, task_id, op, state, attempts, token, node_id, context, error"
            f' FROM "{self.schema}".task_history'
        )
        params: dict[str, Any] = {}
        if task_id is not None:
            sql += " WHERE task_id = :id"
            params["id"] = task_id
        async with self.engine.connect() as conn:
            result = await conn.execute(text(sql + " ORDER BY seq"), params)
            return [Change(*row) for row in result]

    async def by_task(self) -> dict[int, list[Change]]:
        grouped: dict[int, list[Change]] = defaultdict(list)
        for change in await self.changes():
            grouped[change.task_id].append(change)
        return dict(grouped)

    async def path(self, task_id: int) -> list[tuple[str, int, int]]:
        """The task's (state, attempts, token) over time, repeats (checkpoints) collapsed."""
        keys: list[tuple[str, int, int]] = []
        for change in await self.changes(task_id):
            if not keys or keys[-1] != change.key:
                keys.append(change.key)
        return keys

    async def assert_path(self, task_id: int, expected: list[tuple[str, int, int]]) -> None:
        """The task's path is ``expected``: states and attempts first, then claim tokens."""
        path = await self.path(task_id)
        states = [(state, attempts) for state, attempts, _ in path]
        assert states == [(state, attempts) for state, attempts, _ in expected], (
            f"task {task_id} moved {path}"
        )
        assert path == expected, f"task {task_id} moved {path}"


# -- what the tasks saw --------------------------------------------------------------------


def now() -> float:
    return time.monotonic()


@dataclass
class Run:
    """One execution of a task's generator."""

    serial: int
    task_id: int
    node_id: int
    attempt: int
    token: int | None
    start_step: int
    start: float
    end: float | None = None
    outcome: str = "running"
    """finished, stopped, cancelled (CancelledError at an await), closed (GeneratorExit at a
    yield), failed, or running."""


@dataclass
class Step:
    run: Run
    step: int
    t_start: float
    t_yield: float
    t_resumed: float | None = None
    """When the checkpoint's ``yield`` returned: the checkpoint was durable by then."""


@dataclass
class Witness:
    runs: list[Run] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    live: Counter[int] = field(default_factory=Counter)
    overlaps: list[tuple[int, int]] = field(default_factory=list)
    """(task id, serial of the run that started while another was live)."""

    def begin(self, start_step: int) -> Run:
        info = current_task()
        assert info is not None
        token = None
        node = current_node()
        execution = node.services.state.executions.get(info.id) if node is not None else None
        if execution is not None:
            token = execution.token
        run = Run(len(self.runs) + 1, info.id, info.node, info.attempt, token, start_step, now())
        self.runs.append(run)
        self.live[info.id] += 1
        if self.live[info.id] > 1:
            self.overlaps.append((info.id, run.serial))
        return run

    def end(self, run: Run, outcome: str) -> None:
        run.end = now()
        run.outcome = outcome
        self.live[run.task_id] -= 1

    def runs_of(self, task_id: int) -> list[Run]:
        return [r for r in self.runs if r.task_id == task_id]

    def on_node(self, node_id: int) -> list[Run]:
        return [r for r in self.runs if r.node_id == node_id]

    def started(self, task_ids: Iterable[int], node_id: int | None = None) -> bool:
        """Whether every task in ``task_ids`` has a run (on ``node_id``, if given)."""
        seen = {r.task_id for r in self.runs if node_id is None or r.node_id == node_id}
        return set(task_ids) <= seen

    def assert_no_overlap(self) -> None:
        """No two executions of one task were live at the same time."""
        assert self.overlaps == [], f"executions overlapped: {self.overlaps}"
        by_task: dict[int, list[Run]] = defaultdict(list)
        for run in self.runs:
            by_task[run.task_id].append(run)
        for task_id, runs in by_task.items():
            runs.sort(key=lambda r: r.start)
            for a, b in itertools.pairwise(runs):
                assert a.end is not None, f"task {task_id} ran twice at once: {a} and {b}"
                assert a.end <= b.start, f"task {task_id} ran twice at once: {a} and {b}"

    def assert_checkpoints_kept(self, history: dict[int, list[Change]]) -> None:
        """No checkpoint that a ``yield`` returned from was lost.

        For every step whose ``yield`` returned, the history holds a committed checkpoint of
        that value under the run's claim token, no later change of the task stores a smaller
        step, and every later run of the task resumed at that step or beyond.
        """
        for step in self.steps:
            if step.t_resumed is None:
                continue
            run = step.run
            changes = history.get(run.task_id, [])
            written = [
                c
                for c in changes
                if c.step == step.step and c.state in ACTIVE and c.node_id == run.node_id
                if run.token is None or c.token == run.token
            ]
            assert written, f"checkpoint {step.step} of {run} was never committed"
            first = written[0].seq
            rewound = [c for c in changes if c.seq > first and (c.step or 0) < step.step]
            assert not rewound, f"checkpoint {step.step} of {run} was lost: {rewound}"
            later = [r for r in self.runs_of(run.task_id) if r.start > step.t_resumed]
            for other in later:
                assert other.start_step >= step.step, (
                    f"{other} resumed before checkpoint {step.step} of {run}"
                )


def counter_registry(witness: Witness, **options: Any) -> TaskRegistry:
    """Task type ``counter`` (and ``counter2``, the same in another registration): count from
    the context's ``i`` to ``n``, sleeping ``delay`` then checkpointing ``i + 1`` at each step;
    it ends FINISHED with ``i == n`` and returns early when asked to stop."""
    registry = TaskRegistry()

    async def counter(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        state = json.loads(context)
        run = witness.begin(state["i"])
        outcome = "failed"
        try:
            for i in range(state["i"], state["n"]):
                if stop.is_set():
                    outcome = "stopped"
                    return
                t_start = now()
                await asyncio.sleep(state["delay"])
                step = Step(run, i + 1, t_start, now())
                witness.steps.append(step)
                yield Report(context=json.dumps({**state, "i": i + 1}))
                step.t_resumed = now()
            outcome = "finished"
            yield Report.finished(context=json.dumps({**state, "i": state["n"]}))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except GeneratorExit:
            if outcome != "finished":
                outcome = "closed"
            raise
        finally:
            witness.end(run, outcome)

    registry.register_task("counter", counter, **{"max_attempts": 3, **options})
    return registry


# -- database checks -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRow:
    id: int
    state: str
    attempts: int
    token: int
    node_id: int | None
    context: str
    error: str | None

    @property
    def step(self) -> int:
        value: int = json.loads(self.context)["i"]
        return value


async def task_rows(engine: AsyncEngine, ids: Sequence[int] | None = None) -> dict[int, TaskRow]:
    sql = (
        "SELECT id, state, attempts, COALESCE((to_jsonb(t) ->> 'token')::integer, 0),"
        " node_id, context, error FROM aioasync_tasks t"
    )
    params: dict[str, Any] = {}
    if ids is not None:
        sql += " WHERE id = ANY(:ids)"
        params["ids"] = list(ids)
    async with engine.connect() as conn:
        result = await conn.execute(text(sql + " ORDER BY id"), params)
        return {row[0]: TaskRow(*row) for row in result}


async def orphans(engine: AsyncEngine, nodes: Sequence[Node]) -> list[TaskRow]:
    """RUNNING/CANCELING/DELETING rows without a live owner: their node row is gone, or none
    of ``nodes`` (the test's nodes, all in this process) runs them under the row's token."""
    registered = set(await node_ids(engine))
    running: dict[tuple[int, int], int | None] = {}
    for node in nodes:
        if node.concurrency == 0 or not node.running:
            continue
        for task_id, execution in list(node.services.state.executions.items()):
            if not execution.lost:
                running[(execution.node_id, task_id)] = execution.token
    bad = []
    for row in (await task_rows(engine)).values():
        if row.state not in ACTIVE:
            continue
        key = (row.node_id or 0, row.id)
        token = running.get(key, -1)
        if row.node_id not in registered or token not in (None, row.token):
            bad.append(row)
    return bad
