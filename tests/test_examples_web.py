"""The examples, run for real: the FastAPI and aiohttp apps on both backends (tasks actually
run), and the quickstart and multi-node demos as subprocesses.

The two web apps serve the same endpoints with the same meaning, so every web test runs against
both frameworks through one small ``Api`` adapter: FastAPI through ``httpx.ASGITransport`` with
the app's lifespan entered by hand, aiohttp through pytest-aiohttp's ``aiohttp_client``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from _db import DbTarget
from _helpers import FAST, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

Params = list[tuple[str, str]] | None
Send = Callable[[str, str, Any, Params], Awaitable[tuple[int, Any]]]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` once (the examples folder is not a package)."""
    module_name = f"_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class Api:
    """The same HTTP calls on either framework's test client: ``(status, JSON or text)``."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def get(self, path: str, params: Params = None) -> tuple[int, Any]:
        return await self._send("GET", path, None, params)

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return await self._send("POST", path, body, None)

    async def delete(self, path: str, params: Params = None) -> tuple[int, Any]:
        return await self._send("DELETE", path, None, params)

    async def task(self, task_id: int) -> dict[str, Any]:
        status, body = await self.get(f"/tasks/{task_id}")
        assert status == 200, body
        assert isinstance(body, dict), body
        return body

    async def create(self, type: str, context: object, **fields: Any) -> dict[str, Any]:
        body = {"type": type, "context": json.dumps(context), **fields}
        status, task = await self.post("/tasks", body)
        assert status == 201, task
        assert isinstance(task, dict), task
        return task

    async def wait_state(self, task_id: int, *states: str) -> dict[str, Any]:
        """Poll ``GET /tasks/{id}`` until the task is in one of ``states``."""
        seen: dict[str, Any] = {}

        async def reached() -> bool:
            seen.update(await self.task(task_id))
            return seen["state"] in states

        await wait_for(reached, what=f"task {task_id} to be {' or '.join(states)}")
        return seen

    async def wait_gone(self, task_id: int) -> None:
        async def gone() -> bool:
            status, _ = await self.get(f"/tasks/{task_id}")
            return status == 404

        await wait_for(gone, what=f"task {task_id} to be removed")


async def fastapi_api(db: DbTarget) -> AsyncIterator[Api]:
    app = load_example("fastapi_app").create_app(db.url, schema=db.schema, **FAST)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:

            async def send(method: str, path: str, body: Any, params: Params) -> tuple[int, Any]:
                query = None if params is None else tuple(params)  # httpx wants a list or tuple
                response = await client.request(method, path, json=body, params=query)
                if response.headers.get("content-type", "").startswith("application/json"):
                    return response.status_code, response.json()
                return response.status_code, response.text

            yield Api(send)


async def aiohttp_api(db: DbTarget, aiohttp_client: Any) -> AsyncIterator[Api]:
    app = load_example("aiohttp_app").create_app(db.url, schema=db.schema, **FAST)
    client = await aiohttp_client(app)

    async def send(method: str, path: str, body: Any, params: Params) -> tuple[int, Any]:
        async with client.request(method, path, json=body, params=params) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    yield Api(send)


@pytest.fixture(params=["fastapi", "aiohttp"])
async def api(
    request: pytest.FixtureRequest, db: DbTarget, aiohttp_client: Any
) -> AsyncIterator[Api]:
    """The example app of one framework, started on the test database, as an ``Api``."""
    if request.param == "fastapi":
        async for client in fastapi_api(db):
            yield client
    else:
        async for client in aiohttp_api(db, aiohttp_client):
            yield client


async def test_created_task_runs_to_the_end_and_is_listed(api: Api) -> None:
    task = await api.create("count", {"n": 5}, user="alice", group="math")
    # The app's own node is woken by the create and may claim the task, or even finish it,
    # before the app reads it back for the response.
    assert task["state"] in ("pending", "running", "finished")
    assert (task["user"], task["group"], task["type"]) == ("alice", "math", "count")
    other = await api.create("count", {"n": 1}, user="bob", auto_run=False)
    assert other["state"] == "init"

    done = await api.wait_state(task["id"], "finished")
    assert json.loads(done["context"]) == {"n": 5, "i": 5}
    assert done["attempts"] == 1
    assert done["done_at"] is not None

    status, page = await api.get("/tasks", [("user", "alice"), ("state", "finished")])
    assert status == 200
    assert [t["id"] for t in page] == [task["id"]]
    status, page = await api.get("/tasks", [("state", "init"), ("state", "finished")])
    assert [t["id"] for t in page] == [other["id"], task["id"]]  # newest first
    status, page = await api.get("/tasks", [("type", "count"), ("group", "math")])
    assert [t["id"] for t in page] == [task["id"]]
    status, page = await api.get("/tasks", [("limit", "1"), ("offset", "1")])
    assert [t["id"] for t in page] == [task["id"]]
    status, page = await api.get("/tasks", [("group", "nowhere")])
    assert (status, page) == (200, [])


async def test_pause_move_resume_and_delete_a_running_task(api: Api) -> None:
    task = await api.create("count", {"n": 1_000_000, "delay": 0.005})
    task_id = task["id"]

    async def progressed(minimum: int) -> bool:
        current = await api.task(task_id)
        checkpoint = json.loads(current["context"]).get("i", 0)
        return bool(current["state"] == "running" and checkpoint >= minimum)

    await wait_for(lambda: progressed(3), what="the task to checkpoint")

    status, paused = await api.post(f"/tasks/{task_id}/pause")
    assert status == 200
    assert paused["state"] in {"canceling", "paused"}
    paused = await api.wait_state(task_id, "paused")
    assert paused["node"] is None
    checkpoint = json.loads(paused["context"])["i"]
    assert checkpoint >= 3

    status, moved = await api.post(f"/tasks/{task_id}/move", {"group": "slow"})
    assert (status, moved["group"], moved["state"]) == (200, "slow", "paused")

    status, resumed = await api.post(f"/tasks/{task_id}/run")
    assert status == 200
    assert resumed["state"] in {"pending", "running"}
    # It goes on from the stored checkpoint, not from the start.
    await wait_for(lambda: progressed(checkpoint + 1), what="the task to resume")

    status, _ = await api.delete(f"/tasks/{task_id}")
    assert status == 204
    # Running, with a cleanup handler: CANCELING(delete), then DELETING, then gone.
    await api.wait_gone(task_id)
    status, page = await api.get("/tasks")
    assert (status, page) == (200, [])


async def test_wait_answers_once_the_task_ended_or_202_when_it_has_not(api: Api) -> None:
    task = await api.create("count", {"n": 3})
    status, done = await api.get(f"/tasks/{task['id']}/wait", [("seconds", "30")])
    assert status == 200, done
    assert (done["state"], json.loads(done["context"])["i"]) == ("finished", 3)
    idle = await api.create("count", {"n": 1}, auto_run=False)
    status, body = await api.get(f"/tasks/{idle['id']}/wait", [("seconds", "0.1")])
    assert (status, body["state"]) == (202, "init")
    status, body = await api.get("/tasks/424242/wait", [("seconds", "1")])
    assert status == 404, body
    status, body = await api.get(f"/tasks/{idle['id']}/wait", [("seconds", "0")])
    assert status == 422, body


async def test_force_delete_removes_a_running_task_at_once(api: Api) -> None:
    task = await api.create("count", {"n": 1_000_000, "delay": 0.005})
    await api.wait_state(task["id"], "running")
    status, _ = await api.delete(f"/tasks/{task['id']}", [("force", "true")])
    assert status == 204
    status, body = await api.get(f"/tasks/{task['id']}")
    assert status == 404
    assert body["detail"] == f"task {task['id']} not found"


async def test_errors_map_to_404_409_and_422(api: Api) -> None:
    missing = 987_654
    assert (await api.get(f"/tasks/{missing}"))[0] == 404
    assert (await api.post(f"/tasks/{missing}/pause"))[0] == 404
    assert (await api.post(f"/tasks/{missing}/run"))[0] == 404
    assert (await api.post(f"/tasks/{missing}/move", {"group": "x"}))[0] == 404
    assert (await api.delete(f"/tasks/{missing}"))[0] == 404

    task = await api.create("count", {"n": 1})
    await api.wait_state(task["id"], "finished")
    status, body = await api.post(f"/tasks/{task['id']}/pause")
    assert status == 409
    assert body["detail"] == f"cannot pause task {task['id']}: it is finished"
    assert (await api.post(f"/tasks/{task['id']}/run"))[0] == 409

    status, body = await api.post("/tasks", {"type": "no-such-type"})
    assert status == 422
    assert "no-such-type" in body["detail"]
    assert (await api.post("/tasks", {"type": "count", "group": " "}))[0] == 422
    assert (await api.post(f"/tasks/{task['id']}/move", {"group": ""}))[0] == 422
    assert (await api.get("/tasks", [("limit", "0")]))[0] == 422
    assert (await api.get("/tasks", [("limit", "1001")]))[0] == 422
    status, body = await api.get("/tasks", [("state", "sleeping")])
    assert status == 422
    assert "sleeping" in body["detail"]
    # Nothing was written by the rejected calls.
    status, page = await api.get("/tasks")
    assert [t["id"] for t in page] == [task["id"]]


async def test_order_and_task_commit_together_or_not_at_all(api: Api) -> None:
    order = {"reference": "A-1", "item": "teapot", "quantity": 2}
    status, created = await api.post("/orders", order)
    assert status == 201, created
    shipped = await api.wait_state(created["task_id"], "finished")
    assert json.loads(shipped["context"]) == {**order, "shipped": True}
    assert shipped["user"] == "A-1"

    # The same reference again: the order insert fails after the task was inserted in the same
    # transaction, so the task is rolled back with it.
    status, _ = await api.post("/orders", {**order, "quantity": 5})
    assert status == 409
    status, _ = await api.post("/orders", {"reference": "A-2", "item": "cup", "quantity": "x"})
    assert status == 422

    status, orders = await api.get("/orders")
    assert status == 200
    assert orders == [{"id": created["order_id"], "task_id": created["task_id"], **order}]
    status, tasks = await api.get("/tasks", [("type", "ship_order")])
    assert [t["id"] for t in tasks] == [created["task_id"]]


async def test_the_dashboard_is_mounted_beside_the_routes(api: Api) -> None:
    task = await api.create("count", {"n": 1}, user="dora", auto_run=False)
    status, page = await api.get(f"/tasks-admin/tasks/{task['id']}")
    assert status == 200, page
    assert f'data-live="/tasks-admin/tasks/{task["id"]}/events"' in page
    assert 'action="/tasks-admin/tasks/' in page  # actions enabled
    status, listing = await api.get("/tasks-admin/tasks", [("user", "dora")])
    assert status == 200
    assert f'<tr data-task="{task["id"]}"' in listing
    assert 'href="/tasks-admin/static/dashboard.css"' in listing


# -- the script examples ------------------------------------------------------------------


def run_example(name: str, cwd: Path, timeout: float = 90) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path: Path) -> None:
    output = run_example("quickstart", tmp_path)
    assert output.strip() == 'task 1 is finished: {"i": 10, "n": 10, "total": 285}'
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.slow
def test_multi_node_example_hands_the_task_over(tmp_path: Path) -> None:
    output = run_example("multi_node", tmp_path)
    stopped = re.search(r"\[node-A\] asked to stop: the checkpoint at step (\d+) is stored", output)
    resumed = re.search(r"\[node-B\] running the task from step (\d+)", output)
    assert stopped is not None, output
    assert resumed is not None, output
    assert int(stopped.group(1)) == int(resumed.group(1)) > 0, output
    assert "[node-A] stopped" in output
    assert "[demo] task 1 is finished: total 820" in output
    assert output.rstrip().endswith("hand-off OK: node-B resumed from node-A's checkpoint")
