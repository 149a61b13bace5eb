"""Scheduling (``docs/how-to.md``, "Use groups, limits and priorities"): priority, delays,
retries with back-off, fair share across users, group limits, paused groups and pluggable
policies — in-process, on both backends.

The cluster-wide limits under concurrent claims from several processes are tested in
``test_limits_multiprocess.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from _db import DbTarget
from _helpers import make_node, raw_engine, wait_for
from sqlalchemy.ext.asyncio import AsyncConnection

from aioasync_tasks import (
    ConfigurationError,
    DatabaseError,
    FairShare,
    Fifo,
    Report,
    SchedulingPolicy,
    State,
    TaskRegistry,
    current_task,
)
from aioasync_tasks._backends import postgresql
from aioasync_tasks._backends._driver import ClaimParams, CleanupClaimParams, RegisterParams
from aioasync_tasks._backends._sqldriver import CLAIM, SqlDriver
from aioasync_tasks._backends.postgresql import PostgresDriver
from aioasync_tasks._runner import Backoff


class Recorder:
    """A task type that records the order tasks start in and waits until released."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release = asyncio.Event()
        self.registry = TaskRegistry()
        self.registry.register_task("job", self.job)

    async def job(self, context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        info = current_task()
        assert info is not None
        self.started.append(info.id)
        release = asyncio.ensure_future(self.release.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([release, stopped], return_when=asyncio.FIRST_COMPLETED)
        release.cancel()
        stopped.cancel()
        if not stop.is_set():
            yield Report.finished()


async def _create_all(
    db: DbTarget, recorder: Recorder, items: list[dict[str, object]]
) -> list[int]:
    async with make_node(db, recorder.registry, concurrency=0) as client:
        return await client.create_tasks(items)


async def test_fair_share_serves_a_small_user_before_a_big_backlog(db: DbTarget) -> None:
    """User A creates 1,000 tasks, then user B 10: all of B's start before A's 50th."""
    recorder = Recorder()
    recorder.release.set()  # tasks finish at once: the node keeps claiming
    a_ids = await _create_all(db, recorder, [{"type": "job", "user": "a"}] * 1000)
    b_ids = await _create_all(db, recorder, [{"type": "job", "user": "b"}] * 10)
    async with make_node(db, recorder.registry, concurrency=4) as node:
        await wait_for(lambda: set(b_ids) <= set(recorder.started), what="all of B's tasks started")
        last_b = max(recorder.started.index(i) for i in b_ids)
        a_first = [i for i in recorder.started[:last_b] if i in set(a_ids)]
        assert len(a_first) < 50, f"{len(a_first)} of A's tasks started before B's last"
        await node.pause_group("default")


@pytest.mark.slow
async def test_fifo_policy_serves_the_backlog_in_order(db: DbTarget) -> None:
    """The same workload under Fifo: A's older tasks go first (the policy is what decides)."""
    recorder = Recorder()
    recorder.release.set()
    a_ids = await _create_all(db, recorder, [{"type": "job", "user": "a"}] * 30)
    b_ids = await _create_all(db, recorder, [{"type": "job", "user": "b"}] * 3)
    async with make_node(db, recorder.registry, concurrency=1, policy=Fifo()):
        await wait_for(lambda: set(b_ids) <= set(recorder.started), what="B's tasks started")
    assert recorder.started[:30] == a_ids


async def test_priority_goes_first_then_oldest(db: DbTarget) -> None:
    recorder = Recorder()
    recorder.release.set()
    ids = await _create_all(
        db,
        recorder,
        [
            {"type": "job", "priority": 0},
            {"type": "job", "priority": 5},
            {"type": "job", "priority": -1},
            {"type": "job", "priority": 5},
            {"type": "job", "priority": 1},
        ],
    )
    async with make_node(db, recorder.registry, concurrency=1):
        await wait_for(lambda: len(recorder.started) == 5, what="all tasks started")
    assert recorder.started == [ids[1], ids[3], ids[4], ids[0], ids[2]]


class VipFirst(SchedulingPolicy):
    """The documented custom policy: users named vip-* before everyone, then fair share."""

    order_by = (
        "CASE WHEN user_name LIKE 'vip-%' THEN 0 ELSE 1 END,"
        " handoff DESC, priority DESC, user_running + user_rank, id"
    )


async def test_custom_policy_changes_the_claim_order(db: DbTarget) -> None:
    recorder = Recorder()
    recorder.release.set()
    plain = await _create_all(db, recorder, [{"type": "job", "user": "joe", "priority": 9}] * 3)
    vip = await _create_all(db, recorder, [{"type": "job", "user": "vip-ann"}] * 3)
    async with make_node(db, recorder.registry, concurrency=1, policy=VipFirst()):
        await wait_for(lambda: len(recorder.started) == 6, what="all tasks started")
    assert recorder.started == vip + plain


async def test_run_at_is_never_early_and_wakes_the_node_when_due(db: DbTarget) -> None:
    """A delayed task starts at its due time (database clock) even with a long poll interval:
    the claimer sleeps until the next due time, not until the next poll."""
    recorder = Recorder()
    recorder.release.set()
    async with make_node(db, recorder.registry, concurrency=2, poll_interval=600.0) as node:
        await node.create_task("job")  # the claimer runs once and goes idle
        await wait_for(lambda: len(recorder.started) == 1, what="the first task")
        run_at = datetime.now(UTC) + timedelta(seconds=0.5)
        delayed = await node.create_task("job", run_at=run_at)
        await wait_for(lambda: delayed in recorder.started, what="the delayed task")
        task = await node.get_task(delayed)
        assert task.started_at is not None
        assert task.started_at >= task.run_at


async def test_paused_group_is_not_claimed_until_resumed(db: DbTarget) -> None:
    recorder = Recorder()
    recorder.release.set()
    async with make_node(db, recorder.registry, concurrency=2) as node:
        await node.pause_group("batch")
        held = await node.create_task("job", group="batch")
        free = await node.create_task("job", group="other")
        await wait_for(lambda: free in recorder.started, what="the other group's task")
        assert await node.services.claimer.run_once() == 0
        assert (await node.get_task(held)).state is State.PENDING
        groups = {g.name: g for g in await node.get_groups()}
        assert groups["batch"].paused
        await node.resume_group("batch")
        await wait_for(lambda: held in recorder.started, what="the resumed group's task")


async def test_pause_group_with_stop_running_pauses_its_running_tasks(db: DbTarget) -> None:
    recorder = Recorder()
    async with make_node(db, recorder.registry, concurrency=3) as node:
        ids = [await node.create_task("job", group="g") for _ in range(2)]
        other = await node.create_task("job", group="h")
        await wait_for(lambda: len(recorder.started) == 3, what="three running tasks")
        await node.pause_group("g", stop_running=True)

        async def paused() -> bool:
            return all([(await node.get_task(i)).state is State.PAUSED for i in ids])

        await wait_for(paused, what="the group's tasks paused")
        assert (await node.get_task(other)).state is State.RUNNING
        recorder.release.set()


async def test_group_limits_cap_running_tasks_per_group_and_per_user(db: DbTarget) -> None:
    recorder = Recorder()
    async with make_node(db, recorder.registry, concurrency=0) as client:
        await client.set_group_limits("capped", max_running=3)
        await client.set_group_limits("per-user", max_running_per_user=2)
        capped = await client.create_tasks([{"type": "job", "group": "capped"}] * 6)
        per_user = await client.create_tasks(
            [{"type": "job", "group": "per-user", "user": u} for u in "xxxxyyy"]
        )
    async with make_node(db, recorder.registry, concurrency=20) as node:
        await wait_for(lambda: len(recorder.started) == 3 + 4, what="the limits to fill")
        assert await node.services.claimer.run_once() == 0  # nothing more fits
        running = set(recorder.started)
        assert len(running & set(capped)) == 3
        by_user = [i for i in per_user if i in running]
        assert len([i for i in by_user if i in per_user[:4]]) == 2
        assert len([i for i in by_user if i in per_user[4:]]) == 2
        groups = {g.name: g for g in await node.get_groups()}
        assert groups["capped"].max_running == 3
        assert groups["per-user"].max_running_per_user == 2
        # Lifting a limit lets the rest run.
        await node.set_group_limits("capped", max_running=None)
        await wait_for(lambda: set(capped) <= set(recorder.started), what="the capped rest")
        recorder.release.set()


async def test_moved_pending_task_obeys_its_new_groups_limit(db: DbTarget) -> None:
    recorder = Recorder()
    async with make_node(db, recorder.registry, concurrency=10) as node:
        await node.set_group_limits("narrow", max_running=1)
        first = await node.create_task("job", group="narrow")
        await wait_for(lambda: first in recorder.started, what="the first task")
        await node.pause_group("wide")
        moved = await node.create_task("job", group="wide")
        await node.change_task_group(moved, "narrow")
        assert await node.services.claimer.run_once() == 0
        assert (await node.get_task(moved)).group == "narrow"
        recorder.release.set()
        await wait_for(lambda: moved in recorder.started, what="the moved task, after the first")


def test_backoff_is_full_jitter_bounded_by_the_cap() -> None:
    backoff = Backoff(base=2.0, cap=10.0)
    assert backoff.delay(1, rng=lambda: 0.0) == 0.0
    assert backoff.delay(1, rng=lambda: 1.0) == 2.0
    assert backoff.delay(2, rng=lambda: 1.0) == 4.0
    assert backoff.delay(3, rng=lambda: 0.5) == 4.0
    assert backoff.delay(10, rng=lambda: 1.0) == 10.0


@pytest.mark.parametrize("attempts", [3])
async def test_retries_keep_the_error_and_back_off_within_bounds(
    db: DbTarget, attempts: int
) -> None:
    """Each failed attempt is delayed by at most the back-off ceiling (checked on the database
    clock: run_at against updated_at of the same write), and the last error is kept."""
    registry = TaskRegistry()
    seen: list[int] = []

    @registry.task("flaky", max_attempts=attempts)
    async def flaky(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        info = current_task()
        assert info is not None
        seen.append(info.attempt)
        yield Report.failed(f"attempt {info.attempt} failed")

    engine = raw_engine(db)
    base, cap = 0.2, 0.3
    try:
        async with make_node(db, registry, retry_base=base, retry_cap=cap) as node:
            task_id = await node.create_task("flaky")
            delays: list[float] = []

            async def sample() -> bool:
                async with engine.connect() as conn:
                    row = (
                        await conn.execute(
                            sa.text(
                                "SELECT state, attempts, run_at, updated_at FROM aioasync_tasks"
                                " WHERE id = :id"
                            ),
                            {"id": task_id},
                        )
                    ).one()
                if row[0] == "pending" and row[1] > 0:
                    delay = _seconds(row[2]) - _seconds(row[3])
                    if not delays or delays[-1] != delay:
                        delays.append(delay)
                return bool(row[0] == "failed")

            await wait_for(sample, interval=0.005, what="the task to fail for good")
            task = await node.get_task(task_id)
    finally:
        await engine.dispose()
    assert seen == [1, 2, 3]
    assert task.attempts == attempts
    assert task.error == f"attempt {attempts} failed"
    for delay in delays:
        assert -0.002 <= delay <= cap + 0.002, delays


def _seconds(value: object) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    assert isinstance(value, float | int)
    return float(value)


async def test_per_task_max_attempts_overrides_the_type(db: DbTarget) -> None:
    registry = TaskRegistry()

    @registry.task("fails", max_attempts=5)
    async def fails(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.failed("no")

    async with make_node(db, registry) as node:
        task_id = await node.create_task("fails", max_attempts=2)

        async def failed() -> bool:
            return (await node.get_task(task_id)).state is State.FAILED

        await wait_for(failed, what="FAILED")
        task = await node.get_task(task_id)
        assert (task.attempts, task.max_attempts) == (2, 2)
        await node.run_task(task_id)  # a fresh series
        await wait_for(failed, what="FAILED again")
        assert (await node.get_task(task_id)).attempts == 2


async def _prepare_claim(backend: SqlDriver, conn: AsyncConnection, p: ClaimParams) -> list[Any]:
    """Run the ``claim_prepare`` statement of the claim ``p`` in ``conn`` (its locks are held
    until ``conn``'s transaction ends); its rows."""
    size = backend.window_size(p.limit)
    params = backend.prepare_params(p, size, backend.group_params(p.groups))
    return list(await conn.execute(backend.queries.statement("claim_prepare"), params))


@pytest.mark.postgres_only
async def test_concurrent_claims_cannot_exceed_a_group_limit(db: DbTarget) -> None:
    """The limit is exact by construction: a claimer holds the group's row lock until it
    commits, so a second claimer waits and then counts the first one's claims. Here the first
    claim is held open on purpose while the second starts. The two nodes run different task
    types, so without the lock the second would see none of the first's claims (they are not
    committed) and take two more tasks of its own type."""
    recorder = Recorder()
    recorder.registry.register_task("other", recorder.job)
    async with make_node(db, recorder.registry, concurrency=0) as client:
        await client.set_group_limits("g", max_running=2)
        await client.create_tasks([{"type": t, "group": "g"} for t in ("job", "other") * 2])
        backend = client.driver
        assert isinstance(backend, SqlDriver)  # its SQL, beyond the driver protocol
        liveness = {"heartbeat_interval": 5.0, "node_timeout": 30.0}
        first_node = await backend.register_node(RegisterParams("first", 10, ["job"], **liveness))
        second_node = await backend.register_node(
            RegisterParams("second", 10, ["other"], **liveness)
        )
        policy = FairShare()
        async with backend.write() as conn:
            prepared = await _prepare_claim(
                backend, conn, ClaimParams(first_node, ["job"], 10, policy)
            )
            assert prepared[0].registered
            result = await conn.execute(
                backend.queries.statement("claim", order_by=policy.order_by),
                {
                    "node": first_node,
                    "types": ["job"],
                    "limit": 10,
                    "pool": 30,
                    "busy": [],
                    "all_groups": True,
                    "groups": [],
                    "window_groups": backend.bind_list(["g"]),  # its one queue: user ""
                    "window_users": backend.bind_list([""]),
                    **CLAIM,
                },
            )
            assert len(result.all()) == 2
            held = (await conn.exec_driver_sql(_SESSION["postgres"])).scalar_one()
            second = asyncio.ensure_future(
                backend.claim(ClaimParams(second_node, ["other"], 10, policy))
            )
            probe = raw_engine(db)

            async def second_waits_or_is_done() -> bool:
                if second.done():
                    return True
                async with probe.connect() as conn2:
                    waits = _WAITS_FOR["postgres"].format(session=int(held))
                    return bool((await conn2.exec_driver_sql(waits)).scalar())

            try:
                await wait_for(second_waits_or_is_done, what="the second claim to run or wait")
            finally:
                await probe.dispose()
        claimed = await second
        assert claimed.claimed == []
        running = await client.count_tasks(group="g", states=[State.RUNNING])
        assert running == 2


@pytest.mark.postgres_only
async def test_claims_lock_only_the_limited_groups_they_take_from(db: DbTarget) -> None:
    """A claim holds the row locks of the limited groups of its window of queues until it
    commits; a claim whose window holds other groups does not wait for it. Here a claim of
    group a is held open on purpose while a second node claims from group b (both groups have
    a limit): the second one takes its tasks at once. Before the window, every claim locked
    every limited group, so the second waited for the first to commit."""
    recorder = Recorder()
    async with make_node(db, recorder.registry, concurrency=0) as client:
        for group in ("a", "b"):
            await client.set_group_limits(group, max_running=2)
        await client.create_tasks([{"type": "job", "group": g} for g in ("a", "b") * 2])
        backend = client.driver
        assert isinstance(backend, SqlDriver)  # its SQL, beyond the driver protocol
        liveness = {"heartbeat_interval": 5.0, "node_timeout": 30.0}
        first_node = await backend.register_node(RegisterParams("first", 10, ["job"], **liveness))
        second_node = await backend.register_node(RegisterParams("second", 10, ["job"], **liveness))
        async with backend.write() as conn:
            first = ClaimParams(first_node, ["job"], 10, FairShare(), groups=["a"])
            held = await _prepare_claim(backend, conn, first)
            assert [(r.group_name, r.limited) for r in held] == [("a", 1)]
            second = await asyncio.wait_for(
                backend.claim(ClaimParams(second_node, ["job"], 10, FairShare(), groups=["b"])),
                timeout=30,
            )
        assert sorted(c.group for c in second.claimed) == ["b", "b"]


@pytest.mark.postgres_only
async def test_a_claim_is_one_statement_unless_its_window_has_a_limited_group(
    db: DbTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a claim of groups without limits is one statement on asyncpg's own
    connection, outside a transaction: no statement of it goes through SQLAlchemy. A window
    with a limited group is claimed in a transaction (``claim_prepare`` locks the group, then
    ``claim``), and so are the claims of the next ``LIMITED_PAUSE`` seconds (docs/design.md
    §6.9)."""
    recorder = Recorder()
    async with make_node(db, recorder.registry, concurrency=0) as client:
        backend = client.driver
        assert isinstance(backend, PostgresDriver)
        seen: list[str] = []

        def statement(*args: Any) -> None:
            seen.append(args[2])  # before_cursor_execute(conn, cursor, statement, …)

        sa.event.listen(backend.engine.sync_engine, "before_cursor_execute", statement)
        liveness = {"heartbeat_interval": 5.0, "node_timeout": 30.0}
        node = await backend.register_node(RegisterParams("claimer", 10, ["job"], **liveness))

        async def claim(group: str) -> tuple[list[str], bool]:
            """Claim a task of ``group``: its group, and whether a statement of the claim
            went through SQLAlchemy."""
            await client.create_tasks([{"type": "job", "group": group}])
            seen.clear()
            result = await backend.claim(ClaimParams(node, ["job"], 10, FairShare()))
            return [c.group for c in result.claimed], any("pending_groups" in s for s in seen)

        monkeypatch.setattr(postgresql, "LIMITED_PAUSE", 0.0)
        assert await claim("free") == (["free"], False)
        await client.set_group_limits("limited", max_running=5)
        assert await claim("limited") == (["limited"], True)
        assert await claim("free") == (["free"], False)  # no pause
        monkeypatch.setattr(postgresql, "LIMITED_PAUSE", 3600.0)
        assert await claim("limited") == (["limited"], True)
        assert await claim("free") == (["free"], True)  # within the pause


@pytest.mark.postgres_only
async def test_a_cleanup_claim_is_one_statement_fenced_by_the_node_row(db: DbTarget) -> None:
    """On PostgreSQL a cleanup claim is one statement on asyncpg's own connection, outside a
    transaction: nothing of it goes through SQLAlchemy. The statement itself checks the node's
    row: once the row is gone (the node declared dead), it takes nothing (docs/design.md
    §6.9)."""
    registry = TaskRegistry()

    async def finish(context: str, stop: asyncio.Event) -> AsyncIterator[Report]:
        yield Report.finished()

    registry.register_task("job", finish, finish)  # the task and its cleanup handler
    async with make_node(db, registry, concurrency=0) as client:
        backend = client.driver
        assert isinstance(backend, PostgresDriver)
        seen: list[str] = []
        sa.event.listen(
            backend.engine.sync_engine, "before_cursor_execute", lambda *a: seen.append(a[2])
        )
        liveness = {"heartbeat_interval": 5.0, "node_timeout": 30.0}
        node = await backend.register_node(RegisterParams("cleaner", 10, ["job"], **liveness))
        first, second = [await client.create_task("job", auto_run=False) for _ in range(2)]
        for task_id in (first, second):
            await client.delete_task(task_id)
        seen.clear()
        claimed = await backend.claim_cleanups(CleanupClaimParams(node, ["job"], 1))
        assert [c.id for c in claimed] == [first]
        assert not [s for s in seen if "deleting" in s]
        engine = raw_engine(db)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text("DELETE FROM aioasync_nodes WHERE id = :id"), {"id": node}
                )
        finally:
            await engine.dispose()
        assert await backend.claim_cleanups(CleanupClaimParams(node, ["job"], 10)) == []
        assert (await client.get_task(second)).state is State.DELETING


@pytest.mark.postgres_only
async def test_a_slot_is_free_while_the_end_of_its_task_is_written(db: DbTarget) -> None:
    """A node of one slot: the code of task a ends while a transaction of the test holds a's
    row, so a's end cannot be written yet; task b is claimed and started meanwhile, and a's
    end is written once the row is free (docs/design.md §6.8). Before, the slot stayed taken
    until a's end had been committed, and b waited for it."""
    recorder = Recorder()
    engine = raw_engine(db)
    try:
        async with make_node(db, recorder.registry, concurrency=1) as node:
            a = await node.create_task("job")
            await wait_for(lambda: recorder.started == [a], what="task a to start")
            async with engine.connect() as holder:
                await holder.execute(
                    sa.text("SELECT id FROM aioasync_tasks WHERE id = :id FOR UPDATE"), {"id": a}
                )
                b = await node.create_task("job")
                recorder.release.set()
                await wait_for(lambda: recorder.started == [a, b], what="task b to start")
                state = await holder.execute(
                    sa.text("SELECT state FROM aioasync_tasks WHERE id = :id"), {"id": a}
                )
                assert state.scalar_one() == State.RUNNING.value  # a's end not written yet
                await holder.rollback()
            for task_id in (a, b):
                assert (await node.wait_task(task_id, timeout=30)).state is State.FINISHED
    finally:
        await engine.dispose()


_WAITS_FOR = {
    # InnoDB refreshes these tables only when they were not read for 0.1 s: polled every 0.25 s.
    "mysql": "SELECT count(*) FROM information_schema.innodb_lock_waits w"
    " JOIN information_schema.innodb_trx t ON t.trx_id = w.blocking_trx_id"
    " WHERE t.trx_mysql_thread_id = {session}",
    "postgres": "SELECT count(*) FROM pg_stat_activity"
    " WHERE {session} = ANY(pg_blocking_pids(pid))",
}
"""How a test sees that a transaction waits for a lock that the session ``{session}`` holds,
per server (not one of another test that runs at the same time)."""
_SESSION = {"mysql": "SELECT CONNECTION_ID()", "postgres": "SELECT pg_backend_pid()"}


@pytest.mark.parametrize("db", ["mysql", "postgres"], indirect=True)
async def test_a_claim_chosen_as_a_deadlocks_victim_is_tried_again(db: DbTarget) -> None:
    """The database rolls back the whole transaction of a deadlock's victim: the lighter of
    the two on MySQL, the one that waited first on PostgreSQL (its deadlock check runs first,
    after ``deadlock_timeout``). Here a claim is made one on purpose: it holds its node row's
    share lock (fencing) and waits for a limited group's row, which another transaction —
    heavier: it has written rows — holds, and which then asks for the node row. The claim is
    tried again once the other commits, and takes its task; before, the claimer logged
    "claim failed" (MySQL: one CI run) or the error reached the caller."""
    recorder = Recorder()
    engine = raw_engine(db)
    async with make_node(db, recorder.registry, concurrency=0) as client:
        await client.set_group_limits("g", max_running=2)
        (task,) = await client.create_tasks([{"type": "job", "group": "g"}])
        backend = client.driver
        assert isinstance(backend, SqlDriver)
        liveness = {"heartbeat_interval": 5.0, "node_timeout": 30.0}
        node = await backend.register_node(RegisterParams("claimer", 10, ["job"], **liveness))
        retried: list[int] = []
        first_try = backend.rolled_back_retry

        def counted(exc: DatabaseError, attempt: int) -> float | None:
            delay = first_try(exc, attempt)
            if delay is not None:
                retried.append(attempt)
            return delay

        backend.rolled_back_retry = counted  # type: ignore[method-assign]
        try:
            async with engine.connect() as other:
                session = (await other.exec_driver_sql(_SESSION[db.backend])).scalar_one()
                if db.backend == "postgres":
                    # The claim, which waits first, is the victim: its deadlock check runs
                    # first (after deadlock_timeout), however busy the machine.
                    await other.exec_driver_sql("SET deadlock_timeout = '30s'")
                waits = _WAITS_FOR[db.backend].format(session=int(session))

                async def claim_waits(probe: AsyncConnection) -> bool:
                    return bool((await probe.exec_driver_sql(waits)).scalar())

                await other.exec_driver_sql("CREATE TABLE weight (n INT)")  # commits on MySQL
                await other.exec_driver_sql(
                    "INSERT INTO weight WITH RECURSIVE s (n) AS"
                    " (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 1000) SELECT n FROM s"
                )
                await other.exec_driver_sql(
                    "SELECT name FROM aioasync_groups WHERE name = 'g' FOR UPDATE"
                )
                claim = asyncio.create_task(
                    backend.claim(ClaimParams(node, ["job"], 10, FairShare()))
                )
                async with engine.connect() as probe:
                    await wait_for(
                        lambda: claim_waits(probe), interval=0.25, what="the claim to wait for g"
                    )
                await other.exec_driver_sql(
                    f"SELECT id FROM aioasync_nodes WHERE id = {int(node)} FOR UPDATE"
                )
                await other.commit()
            result = await asyncio.wait_for(claim, timeout=30)
        finally:
            await engine.dispose()
    assert retried == [0]
    assert [c.id for c in result.claimed] == [task]


async def test_a_node_can_be_dedicated_to_some_groups(db: DbTarget) -> None:
    recorder = Recorder()
    recorder.release.set()
    async with make_node(db, recorder.registry, concurrency=0) as client:
        other = await client.create_task("job", group="other")
        mine = await client.create_task("job", group="mine")
    async with make_node(db, recorder.registry, concurrency=4, groups=["mine"]) as node:
        await wait_for(lambda: mine in recorder.started, what="the dedicated group's task")
        assert await node.services.claimer.run_once() == 0
        assert (await node.get_task(other)).state is State.PENDING
    assert recorder.started == [mine]


@pytest.mark.parametrize("groups", [[], "mine", [""], [3]])
def test_groups_option_is_validated(sqlite_db: DbTarget, groups: object) -> None:
    with pytest.raises(ConfigurationError):
        make_node(sqlite_db, TaskRegistry(), groups=groups)
