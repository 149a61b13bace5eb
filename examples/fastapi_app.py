"""A FastAPI application that creates, controls and lists background tasks.

The lifespan starts the node (it also runs the tasks, ``concurrency`` at a time; pass
``concurrency=0`` for a web process that only creates and controls tasks while separate
``aioasync-tasks worker`` processes run them) and stops it gracefully on shutdown.

Run it (``pip install uvicorn`` first)::

    AIOASYNC_TASKS_DB=sqlite:///aioasync_tasks.db uvicorn examples.fastapi_app:app

Endpoints: ``POST /tasks``, ``GET /tasks``, ``GET /tasks/{id}``, ``GET /tasks/{id}/wait`` (a
long poll: the task once it has ended), ``POST /tasks/{id}/pause``, ``POST /tasks/{id}/run``,
``DELETE /tasks/{id}``, ``POST /tasks/{id}/move`` and ``POST /orders``, which inserts an order
row and creates its shipping task in one transaction. The web dashboard is mounted beside them,
at ``/tasks-admin/`` (``create_app`` of ``aioasync_tasks.dashboard``: the same node, actions
enabled; needs the ``dashboard`` extra).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
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
from aioasync_tasks.dashboard import create_app as dashboard_app

DEFAULT_URL = "sqlite:///aioasync_tasks.db"

# -- task types ---------------------------------------------------------------------------

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


# -- API models ---------------------------------------------------------------------------


class NewTask(BaseModel):
    type: str
    context: str = ""
    user: str = ""
    group: str = "default"
    auto_run: bool = True
    priority: int = 0


class Move(BaseModel):
    group: str


class NewOrder(BaseModel):
    reference: str
    item: str
    quantity: int


# -- the application ----------------------------------------------------------------------


def get_node(request: Request) -> Node:
    """The node the lifespan started (a FastAPI dependency)."""
    return request.app.state.node


NodeDep = Annotated[Node, Depends(get_node)]


def create_app(
    url: str | None = None, *, schema: str | None = None, concurrency: int = 10, **node_options
) -> FastAPI:
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with node:  # migrates, starts; on exit hands running tasks off and stops
            async with node.engine.begin() as conn:
                await conn.run_sync(app_metadata.create_all)
            app.state.node = node
            app.state.orders = orders
            yield

    app = FastAPI(title="aioasync_tasks example", lifespan=lifespan)
    # The dashboard of the same node; put it behind your authentication, or pass auth=.
    app.mount("/tasks-admin", dashboard_app(node, actions=True))

    def error(status_code: int):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status_code)

        return handler

    for exception, status_code in [
        (TaskNotFound, status.HTTP_404_NOT_FOUND),
        (InvalidTransition, status.HTTP_409_CONFLICT),
        (ConfigurationError, 422),
        (UnknownTaskType, 422),
    ]:
        app.add_exception_handler(exception, error(status_code))

    @app.post("/tasks", status_code=status.HTTP_201_CREATED)
    async def create(body: NewTask, node: NodeDep) -> Task:
        task_id = await node.create_task(
            body.type,
            body.context,
            user=body.user,
            group=body.group,
            auto_run=body.auto_run,
            priority=body.priority,
        )
        return await node.get_task(task_id)

    @app.get("/tasks")
    async def list_tasks(
        *,
        node: NodeDep,
        user: str | None = None,
        group: str | None = None,
        types: Annotated[list[str] | None, Query(alias="type")] = None,
        states: Annotated[list[str] | None, Query(alias="state")] = None,
        offset: int = 0,
        limit: int = 100,
    ) -> list[Task]:
        return await node.get_tasks(
            user=user, group=group, types=types, states=states, offset=offset, limit=limit
        )

    @app.get("/tasks/{task_id}")
    async def get(task_id: int, node: NodeDep) -> Task:
        return await node.get_task(task_id)

    @app.get("/tasks/{task_id}/wait")
    async def wait(task_id: int, node: NodeDep, response: Response, seconds: float = 10) -> Task:
        """The task once it is finished or failed, waiting up to ``seconds`` (a long poll);
        202 with the task as it is when it has not ended by then."""
        try:
            task = await node.wait_task(task_id, timeout=seconds)
        except WaitTimeout:
            response.status_code = status.HTTP_202_ACCEPTED
            task = await node.get_task(task_id)
        return task

    @app.post("/tasks/{task_id}/pause")
    async def pause(task_id: int, node: NodeDep) -> Task:
        await node.pause_task(task_id)
        return await node.get_task(task_id)

    @app.post("/tasks/{task_id}/run")
    async def run(task_id: int, node: NodeDep) -> Task:
        await node.run_task(task_id)
        return await node.get_task(task_id)

    @app.post("/tasks/{task_id}/move")
    async def move(task_id: int, body: Move, node: NodeDep) -> Task:
        await node.change_task_group(task_id, body.group)
        return await node.get_task(task_id)

    @app.delete("/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete(task_id: int, node: NodeDep, force: bool = False) -> Response:
        await node.delete_task(task_id, force=force)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def create_order(body: NewOrder, node: NodeDep) -> dict[str, int]:
        """Create the shipping task and insert the order in ONE transaction: when the order
        cannot be stored (a duplicate reference) the task is rolled back with it."""
        try:
            async with node.engine.begin() as conn:
                task_id = await node.create_task(
                    "ship_order", body.model_dump_json(), user=body.reference, connection=conn
                )
                result = await conn.execute(
                    orders.insert()
                    .values(**body.model_dump(), task_id=task_id)
                    .returning(orders.c.id)
                )
                order_id = result.scalar_one()
        except IntegrityError:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"order {body.reference!r} exists already"
            ) from None
        return {"order_id": order_id, "task_id": task_id}

    @app.get("/orders")
    async def list_orders(node: NodeDep) -> list[dict[str, int | str]]:
        async with node.engine.connect() as conn:
            rows = await conn.execute(sa.select(orders).order_by(orders.c.id))
            return [dict(row._mapping) for row in rows]

    return app


app = create_app()
"""For ``uvicorn examples.fastapi_app:app``; tests build their own with ``create_app(url)``."""
