"""Real faults across processes: a bulk insert competing with node processes for SQLite's write
lock, a cleanup handler that kills its own node process every time it runs, and a ``worker``
(CLI) process whose node cannot keep one of its services up.

Node processes run ``tests/nodeproc.py`` (through the ``cluster`` fixture) and write the ledger
of ``_ledger`` into the test's database; the tests read it back. Each test's docstring says why
it fails on the engine before claim tokens and supervised services (commit 2086912).
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _cluster import NODEPROC, Cluster
from _db import DbTarget
from _helpers import (
    LONG_BOUND,
    WORKER_TIMINGS,
    client_registry,
    db_args,
    make_node,
    spawn_cli,
    wait_for,
    wait_state,
)
from _ledger import duplicates
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from aioasync_tasks import State

pytestmark = pytest.mark.slow

# -- 6. a bulk create on SQLite does not starve the heartbeats -------------------------------

BULK = 300_000


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_bulk_create_does_not_cost_a_node_its_lease(cluster: Cluster) -> None:
    """Three node processes (heartbeat 0.5 s, node timeout 3 s) run long counter tasks (four
    each, a step every 0.05 s) while another process creates 300,000 tasks in one
    ``create_tasks`` call. The nodes keep their leases throughout: the same three node rows all
    along (none rescued, none fenced and registered anew), every task still RUNNING on its first
    attempt and still checkpointing during the insert, and the ledger shows each task's steps
    done once, in order, on one node.

    Fails on 2086912: ``create_tasks`` inserted every row in one transaction, holding SQLite's
    write lock for many seconds; no heartbeat could be written, the nodes' leases ran out (their
    tasks stopped as lost) and the other node rescued them.

    Failed on 2059b25 too, whose chunks paused 0.11 s between 5,000-row transactions: SQLite's
    busy handler makes a writer that has waited long retry only every 100 ms, behind every
    newcomer, so heartbeats missed window after window; in every run the nodes logged "lost
    contact with the database for too long" and their tasks were stopped as lost and retried.
    The nodes' write transactions now retry their ``BEGIN`` every 2 ms themselves.
    The same nodes and tasks for 30 s without the insert never lose their lease."""
    # Four tasks a node, a step (a ledger row and a checkpoint) every 0.05 s: busy nodes.
    nodes = await cluster.start_many(3, heartbeat=0.5, node_timeout=3.0, concurrency=4)
    node_ids = sorted(n.node_id for n in nodes)
    ids = await cluster.client.create_tasks(
        [
            {"type": "counter", "context": json.dumps({"i": 0, "n": 100_000, "delay": 0.05})}
            for _ in range(12)
        ]
    )
    await wait_for(cluster.steps_at_least(ids, 3), timeout=LONG_BOUND, what="every task under way")

    creator = await asyncio.create_subprocess_exec(
        sys.executable,
        str(NODEPROC),
        "bulk",
        "--url",
        cluster.db.url,
        "--count",
        str(BULK),
        stdout=asyncio.subprocess.PIPE,
    )
    began = time.time()
    seen: list[list[int]] = []
    try:
        while creator.returncode is None:
            seen.append(sorted(n.id for n in await cluster.client.get_nodes()))
            await asyncio.sleep(0.25)
            assert time.time() - began < 120, "the bulk insert did not end"
        out, _ = await creator.communicate()
    finally:
        if creator.returncode is None:
            creator.kill()
            await creator.wait()
    ended = time.time()
    assert creator.returncode == 0
    assert out.startswith(b"CREATED 300000"), out
    assert await cluster.client.count_tasks(types=["bulk"]) == BULK

    await asyncio.sleep(1.5)  # a lease lost at the end of the insert shows by now
    seen.append(sorted(n.id for n in await cluster.client.get_nodes()))
    assert all(ids_seen == node_ids for ids_seen in seen), seen
    for t in ids:
        task = await cluster.task(t)
        assert task.state is State.RUNNING, task
        assert task.attempts == 1, task
        assert task.error is None
    # Every task kept checkpointing while the rows went in.
    steps = await cluster.ledger.steps()
    during = {s.task_id for s in steps if began + 1.0 < s.t_end < ended - 1.0}
    assert during == set(ids), f"tasks stalled during the insert: {set(ids) - during}"

    for t in ids:
        await cluster.client.pause_task(t)
    await wait_for(cluster.all_in(ids, State.PAUSED), timeout=LONG_BOUND, what="tasks paused")
    for t in ids:
        task = await cluster.task(t)
        task_steps = await cluster.ledger.steps(t)
        assert duplicates(task_steps) == {}, task_steps
        assert sorted(s.step for s in task_steps) == list(range(json.loads(task.context)["i"]))
        assert len({s.node_id for s in task_steps}) == 1, "the task moved: it was rescued"
        assert task.attempts == 0  # a pause refunds the attempt it interrupted
    await cluster.ledger.assert_no_overlap()
    for node in nodes:
        await node.stop()


# -- 7. a cleanup handler that kills its node every time -------------------------------------


async def test_a_cleanup_that_kills_its_node_fails_after_its_attempts(cluster: Cluster) -> None:
    """A deleted task's cleanup handler SIGKILLs the node process running it, every time. Two
    node processes (node timeout 3 s, ``cleanup_attempts=2``), restarted like a process
    manager would whenever one dies: the first node dies, the second rescues the cleanup and
    dies too, a restarted node rescues it again — and the task ends FAILED ("cleanup: node
    lost") after exactly 2 cleanup runs. With both nodes alive for several more node timeouts
    it is not run again.

    Fails on 2086912: a lost cleanup went back to DELETING with no count of its attempts, so
    the poison task killed one node after the other forever."""
    options = {"cleanup_attempts": 2, "concurrency": 2}
    processes = [await cluster.start(**options) for _ in range(2)]
    client = cluster.client
    task_id = await client.create_task("doomed")

    await wait_state(client, task_id, State.FINISHED, what="the task to run", timeout=LONG_BOUND)
    await client.delete_task(task_id)

    deaths = 0

    async def restart_the_dead() -> None:  # the process manager
        nonlocal deaths
        for index, process in enumerate(processes):
            if process.proc.returncode is not None:
                assert await process.wait() == -9
                deaths += 1
                processes[index] = await cluster.start(**options)

    deadline = time.monotonic() + 45.0
    while (await client.get_task(task_id)).state is not State.FAILED:
        assert time.monotonic() < deadline, (
            f"the cleanup is still retried after {deaths} node deaths: "
            f"{await client.get_task(task_id)}"
        )
        await restart_the_dead()
        await asyncio.sleep(0.1)
    await restart_the_dead()
    assert deaths == 2

    task = await client.get_task(task_id)
    assert task.error is not None
    assert "node lost" in task.error, task
    assert task.node is None
    runs = await cluster.ledger.cleanups(task_id)
    assert len(runs) == 2, runs
    assert len({node for node, _ in runs}) == 2, runs  # two different nodes died of it

    await asyncio.sleep(2 * 3.0 + 1.0)  # live nodes, several rescues later
    assert len(await cluster.ledger.cleanups(task_id)) == 2
    assert (await client.get_task(task_id)).state is State.FAILED
    assert all(p.proc.returncode is None for p in processes)
    for process in processes:
        await process.stop()


# -- 3 (CLI). a worker whose node stops on its own exits non-zero ----------------------------

WORKER_MODULE = textwrap.dedent(
    """
    import asyncio

    from aioasync_tasks import Report, TaskRegistry

    registry = TaskRegistry()


    @registry.task("steady")
    async def steady(context, stop):
        n = int(context or "0")
        while not stop.is_set():
            await asyncio.sleep(0.02)
            n += 1
            yield Report(context=str(n))
    """
)


async def test_worker_exits_non_zero_when_its_node_stops_on_its_own(
    db: DbTarget, raw: AsyncEngine, tmp_path: Path
) -> None:
    """A row the engine cannot read — a task of a node that no longer exists, CANCELING with
    a stop request this version does not know (as a newer version might write) — makes the
    rescuer service of an ``aioasync-tasks worker`` crash each time it looks: after 5 crashes
    in a row (each logged with its traceback) the node stops on its own, hands its running
    task back (PENDING, at its checkpoint), deregisters, and the worker process exits with
    status 1. No internals are patched: the fault is in the data.

    Fails on 2086912: the crash took the node's services down while the worker went on waiting
    for a signal, its process alive and its node row left behind."""
    (tmp_path / "steadytasks.py").write_text(WORKER_MODULE)
    client = make_node(db, client_registry({"steady": {}}), concurrency=0)
    log = tmp_path / "worker.log"
    process: asyncio.subprocess.Process | None = None
    try:
        await client.start()
        task_id = await client.create_task("steady", "0")
        poison = await client.create_task("steady", "0", auto_run=False)
        async with raw.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE aioasync_tasks SET state = 'canceling', requested = 'reshard',"
                    " node_id = 999999 WHERE id = :id"
                ),
                {"id": poison},
            )
        process = await spawn_cli(
            *db_args(db), "worker", "steadytasks:registry", *WORKER_TIMINGS, cwd=tmp_path, log=log
        )

        async def running() -> bool:
            task = await client.get_task(task_id)
            return task.state is State.RUNNING and int(task.context) >= 3

        await wait_for(running, timeout=LONG_BOUND, what="the worker to run the task")
        async with asyncio.timeout(LONG_BOUND):  # a bound on the test, not a timing assertion
            code = await process.wait()
        output = log.read_text(errors="replace")
        assert code == 1, output
        assert output.count("the rescuer service crashed (") == 5, output
        assert "Traceback" in output
        assert "stopped on its own" in output, output

        task = await client.get_task(task_id)
        assert task.state is State.PENDING, task
        assert task.node is None
        assert int(task.context) >= 3
        assert task.attempts == 0
        assert await client.get_nodes() == []
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await client.stop()
