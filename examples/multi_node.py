"""Two nodes in two processes on one SQLite file, and a graceful hand-off between them.

1. node-A starts (a separate process) and claims a long task that checkpoints every step;
2. node-B starts (another process) and waits for work;
3. node-A is stopped gracefully (SIGTERM): its task stops at its last checkpoint and is
   handed back to the queue;
4. node-B claims it and resumes from that checkpoint, not from the start.

Run it with ``python examples/multi_node.py``; it prints what happened and exits with status 0
when the hand-off went as described. ``python examples/multi_node.py node NAME URL`` runs one
node until SIGTERM or SIGINT (that is what the demo starts twice).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path

from aioasync_tasks import Node, Report, State, TaskRegistry

STEPS = 40
STEP_SECONDS = 0.1
HAND_OFF_AFTER = 3  # checkpoints stored on node-A before it is stopped
NODE_NAME = {"name": "?"}  # this process's node, for the task's own log lines

tasks = TaskRegistry()


@tasks.task("long_sum")
async def long_sum(context: str, stop: asyncio.Event):
    """Add 1..STEPS, one step per checkpoint; remember which node started where."""
    state = json.loads(context)
    name = NODE_NAME["name"]
    state["runs"].append({"node": name, "from_step": state["i"]})
    print(f"[{name}] running the task from step {state['i']}", flush=True)
    while state["i"] < STEPS:
        if stop.is_set():
            print(
                f"[{name}] asked to stop: the checkpoint at step {state['i']} is stored", flush=True
            )
            return
        await asyncio.sleep(STEP_SECONDS)  # the "work"
        state["i"] += 1
        state["total"] += state["i"]
        yield Report(context=json.dumps(state))
    yield Report.finished(context=json.dumps(state))


# -- one node process ---------------------------------------------------------------------


async def run_node(name: str, url: str) -> None:
    NODE_NAME["name"] = name
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Node(url, registry=tasks, name=name, poll_interval=0.2):
        print(f"[{name}] started", flush=True)
        await stop.wait()
        print(f"[{name}] stopping gracefully", flush=True)
    print(f"[{name}] stopped", flush=True)


# -- the demo -----------------------------------------------------------------------------


async def start_node(name: str, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, __file__, "node", name, url)


async def wait_until(condition, what: str) -> None:
    """Poll the database until ``condition()`` holds (a minute at most)."""
    async with asyncio.timeout(60):
        while not await condition():  # noqa: ASYNC110 - the state lives in the database
            await asyncio.sleep(0.05)
    print(f"[demo] {what}", flush=True)


async def demo(url: str) -> int:
    # A client-only node (concurrency=0) creates and watches the task; it runs nothing.
    async with Node(url, registry=tasks, concurrency=0) as client:
        node_ids: dict[str, int] = {}

        async def node_up(name: str) -> bool:
            for info in await client.get_nodes():
                if info.name == name:
                    node_ids[name] = info.id
                    return True
            return False

        first = await start_node("node-A", url)
        await wait_until(lambda: node_up("node-A"), "node-A is up")
        context = json.dumps({"i": 0, "total": 0, "runs": []})
        task_id = await client.create_task("long_sum", context)
        print(f"[demo] created task {task_id} ({STEPS} steps)", flush=True)

        async def progressed() -> bool:
            task = await client.get_task(task_id)
            return (
                task.node == node_ids["node-A"] and json.loads(task.context)["i"] >= HAND_OFF_AFTER
            )

        await wait_until(progressed, "node-A is running the task and has checkpoints")
        second = await start_node("node-B", url)
        await wait_until(lambda: node_up("node-B"), "node-B is up")

        first.send_signal(signal.SIGTERM)
        await first.wait()
        task = await client.get_task(task_id)
        print(f"[demo] node-A exited; task {task_id} is {task.state}", flush=True)

        async def finished() -> bool:
            return (await client.get_task(task_id)).state in (State.FINISHED, State.FAILED)

        await wait_until(finished, "the task has ended")
        second.send_signal(signal.SIGTERM)
        await second.wait()

        task = await client.get_task(task_id)
        result = json.loads(task.context)
        print(f"[demo] task {task_id} is {task.state}: total {result['total']}", flush=True)
        for run in result["runs"]:
            print(f"[demo]   ran on {run['node']} from step {run['from_step']}", flush=True)
        runs = [(run["node"], run["from_step"]) for run in result["runs"]]
        ok = (
            task.state is State.FINISHED
            and result["total"] == STEPS * (STEPS + 1) // 2
            and len(runs) == 2
            and runs[0] == ("node-A", 0)
            and runs[1][0] == "node-B"
            and runs[1][1] >= HAND_OFF_AFTER  # resumed from a checkpoint, not from the start
            and first.returncode == 0
            and second.returncode == 0
        )
        print(
            "[demo] hand-off OK: node-B resumed from node-A's checkpoint" if ok else "[demo] FAILED"
        )
        return 0 if ok else 1


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "node":
        asyncio.run(run_node(sys.argv[2], sys.argv[3]))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        return asyncio.run(demo(f"sqlite:///{Path(folder) / 'tasks.db'}"))


if __name__ == "__main__":
    sys.exit(main())
