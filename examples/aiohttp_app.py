"""An aiohttp application that creates, controls and lists background tasks.

A ``cleanup_ctx`` starts the node with the application and stops it gracefully (running tasks
are handed off) when the application shuts down. Run it::

    AIOASYNC_TASKS_DB=sqlite:///aioasync_tasks.db python examples/aiohttp_app.py

It serves the same endpoints as ``fastapi_app.py``: ``POST /tasks``, ``GET /tasks``,
``GET /tasks/{id}``, ``GET /tasks/{id}/wait``, ``POST /tasks/{id}/pause``,
``POST /tasks/{id}/run``, ``DELETE /tasks/{id}``, ``POST /tasks/{id}/move`` and the
transactional ``POST /orders``. The web dashboard is mounted beside them, at ``/tasks-admin/``
(``aiohttp_app``: the same node, actions enabled; needs the ``dashboard`` extra).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.exc import IntegrityError

from aioasync_tasks import (
    ConfigurationError,
    InvalidTransition,
    Node,
    Report,
    Task,
    TaskNotFound,
    TaskRegistry,
    UnknownTaskType,
    WaitTimeout,
)
from aioasync_tasks.dashboard import aiohttp_app

DEFAULT_URL = "sqlite:///aioasync_tasks.db"
NODE = web.AppKey("node", Node)
ORDERS = web.AppKey("orders", sa.Table)

# -- task types (the same as in fastapi_app.py) -------------------------------------------

tasks = TaskRegistry()


@tasks.task("count")
async def count(context: str, stop: asyncio.Event):
    """Count to ``n``, one checkpoint per step, ``delay`` seconds apart."""
    state = json.loads(context)
    state.setdefault("i", 0)
    while state["i"] < state["n"]:
        if stop.is_set():
            return
        await asyncio.sleep(state.get("delay", 0))
        state["i"] += 1
        yield Report(context=json.dumps(state))
    yield Report.finished(context=json.dumps(state))


@count.deleting
async def count_cleanup(context: str, stop: asyncio.Event):
    """Runs when a ``count`` task is deleted, with its last checkpoint."""
    yield Report.finished()


@tasks.task("ship_order", max_attempts=3)
async def ship_order(context: str, stop: asyncio.Event):
    order = json.loads(context)
    yield Report.finished(context=json.dumps({**order, "shipped": True}))


# -- helpers ------------------------------------------------------------------------------


def task_json(task: Task) -> dict[str, Any]:
    return {
        key: value.isoformat() if hasattr(value, "isoformat") else value
        for key, value in asdict(task).items()
    }


def task_id_of(request: web.Request) -> int:
    try:
        return int(request.match_info["task_id"])
    except ValueError:
        raise web.HTTPNotFound(text="task ids are integers") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPUnprocessableEntity(text="the body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPUnprocessableEntity(text="the body must be a JSON object")
    return body


ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (TaskNotFound, 404),
    (InvalidTransition, 409),
    (ConfigurationError, 422),
    (UnknownTaskType, 422),
]


@web.middleware
async def map_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn the library's errors into HTTP answers: 404, 409 and 422."""
    try:
        return await handler(request)
    except tuple(error for error, _ in ERROR_STATUS) as exc:
        code = next(code for error, code in ERROR_STATUS if isinstance(exc, error))
        return web.json_response({"detail": str(exc)}, status=code)


# -- handlers -----------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.post("/tasks")
async def create(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await json_body(request)
    allowed = {"type", "context", "user", "group", "auto_run", "priority"}
    if "type" not in body or set(body) - allowed:
        raise web.HTTPUnprocessableEntity(text=f"give 'type' and any of {sorted(allowed)}")
    task_id = await node.create_task(**body)
    return web.json_response(task_json(await node.get_task(task_id)), status=201)


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    node = request.app[NODE]
    query = request.query
    try:
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 100))
    except ValueError:
        raise web.HTTPUnprocessableEntity(text="offset and limit are integers") from None
    page = await node.get_tasks(
        user=query.get("user"),
        group=query.get("group"),
        types=query.getall("type", None),
        states=query.getall("state", None),
        offset=offset,
        limit=limit,
    )
    return web.json_response([task_json(task) for task in page])


@routes.get("/tasks/{task_id}")
async def get(request: web.Request) -> web.Response:
    task = await request.app[NODE].get_task(task_id_of(request))
    return web.json_response(task_json(task))


@routes.get("/tasks/{task_id}/wait")
async def wait(request: web.Request) -> web.Response:
    """The task once it is finished or failed, waiting up to ``?seconds=`` (10; a long poll);
    202 with the task as it is when it has not ended by then."""
    node, task_id = request.app[NODE], task_id_of(request)
    try:
        seconds = float(request.query.get("seconds", 10))
    except ValueError:
        raise web.HTTPUnprocessableEntity(text="seconds is a number") from None
    try:
        return web.json_response(task_json(await node.wait_task(task_id, timeout=seconds)))
    except WaitTimeout:
        return web.json_response(task_json(await node.get_task(task_id)), status=202)


@routes.post("/tasks/{task_id}/pause")
async def pause(request: web.Request) -> web.Response:
    node, task_id = request.app[NODE], task_id_of(request)
    await node.pause_task(task_id)
    return web.json_response(task_json(await node.get_task(task_id)))


@routes.post("/tasks/{task_id}/run")
async def run(request: web.Request) -> web.Response:
    node, task_id = request.app[NODE], task_id_of(request)
    await node.run_task(task_id)
    return web.json_response(task_json(await node.get_task(task_id)))


@routes.post("/tasks/{task_id}/move")
async def move(request: web.Request) -> web.Response:
    node, task_id = request.app[NODE], task_id_of(request)
    body = await json_body(request)
    await node.change_task_group(task_id, body.get("group"))  # type: ignore[arg-type]
    return web.json_response(task_json(await node.get_task(task_id)))


@routes.delete("/tasks/{task_id}")
async def delete(request: web.Request) -> web.Response:
    force = request.query.get("force", "false").lower() in {"1", "true", "yes"}
    await request.app[NODE].delete_task(task_id_of(request), force=force)
    return web.Response(status=204)


@routes.post("/orders")
async def create_order(request: web.Request) -> web.Response:
    """Create the shipping task and insert the order in ONE transaction: when the order
    cannot be stored (a duplicate reference) the task is rolled back with it."""
    node, orders = request.app[NODE], request.app[ORDERS]
    body = await json_body(request)
    if (
        set(body) != {"reference", "item", "quantity"}
        or not isinstance(body["reference"], str)
        or not isinstance(body["item"], str)
        or not isinstance(body["quantity"], int)
    ):
        raise web.HTTPUnprocessableEntity(text="give reference and item (text), quantity (int)")
    try:
        async with node.engine.begin() as conn:
            task_id = await node.create_task(
                "ship_order", json.dumps(body), user=str(body["reference"]), connection=conn
            )
            result = await conn.execute(
                orders.insert().values(**body, task_id=task_id).returning(orders.c.id)
            )
            order_id = result.scalar_one()
    except IntegrityError:
        raise web.HTTPConflict(text=f"order {body['reference']!r} exists already") from None
    return web.json_response({"order_id": order_id, "task_id": task_id}, status=201)


@routes.get("/orders")
async def list_orders(request: web.Request) -> web.Response:
    node, orders = request.app[NODE], request.app[ORDERS]
    async with node.engine.connect() as conn:
        rows = await conn.execute(sa.select(orders).order_by(orders.c.id))
        return web.json_response([dict(row._mapping) for row in rows])


# -- the application ----------------------------------------------------------------------


def create_app(
    url: str | None = None, *, schema: str | None = None, concurrency: int = 10, **node_options
) -> web.Application:
    """Build the app; ``url`` defaults to ``$AIOASYNC_TASKS_DB``, else a local SQLite file.

    ``schema`` (PostgreSQL) holds both the task tables and the example's ``orders`` table.
    """
    url = url or os.environ.get("AIOASYNC_TASKS_DB", DEFAULT_URL)
    app_metadata = sa.MetaData(schema=schema)
    orders = sa.Table(
        "orders",
        app_metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("reference", sa.String(100), nullable=False, unique=True),
        sa.Column("item", sa.String(200), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("task_id", sa.BigInteger, nullable=False),
    )

    node = Node(url, registry=tasks, schema=schema, concurrency=concurrency, **node_options)

    async def node_context(app: web.Application) -> AsyncIterator[None]:
        async with node:  # migrates, starts; on exit hands running tasks off and stops
            async with node.engine.begin() as conn:
                await conn.run_sync(app_metadata.create_all)
            app[NODE] = node
            app[ORDERS] = orders
            yield

    app = web.Application(middlewares=[map_errors])
    app.cleanup_ctx.append(node_context)
    app.add_routes(routes)
    # The dashboard of the same node; put it behind your authentication, or pass auth=.
    app.add_subapp("/tasks-admin", aiohttp_app(node, actions=True))
    return app


if __name__ == "__main__":
    web.run_app(create_app())
