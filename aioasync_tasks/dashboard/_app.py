"""The dashboard as a Starlette application: the pages (server-rendered Jinja2 templates, with
autoescape), the live task stream (server-sent events fed by ``Node.watch``), the actions
(POST forms, only with ``actions=True``) and ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._errors import (
    AsyncTasksError,
    ConfigurationError,
    InvalidTransition,
    NodeNotStarted,
    TaskNotFound,
)
from .._logging import LOGGER_NAME
from .._models import State
from .._node import Node
from . import _metrics
from ._security import Credentials, Guard, form_token, post_refusal
from ._stats import read_overview

HERE = Path(__file__).parent
PAGE_SIZE = 50
"""Tasks per page of the list."""
TASK_ACTIONS = ("pause", "run", "delete", "move")
GROUP_ACTIONS = ("pause", "resume", "limits")

_log = logging.getLogger(f"{LOGGER_NAME}.dashboard")


class _NodeSource:
    """The node the dashboard reads: the application's own, or a client-only node made from a
    URL, started on first use and stopped with the dashboard."""

    def __init__(self, node_or_url: Node | str, schema: str | None) -> None:
        if isinstance(node_or_url, Node):
            if schema is not None:
                raise ConfigurationError("schema is the node's own: give it to Node, not here")
            self._node, self._owned = node_or_url, False
        elif isinstance(node_or_url, str):
            self._node = Node(node_or_url, schema=schema, concurrency=0, auto_migrate=False)
            self._owned = True
        else:
            raise ConfigurationError(
                f"create_app needs a Node or a database URL, not {type(node_or_url).__name__}"
            )
        self._lock = asyncio.Lock()
        self._started = False

    @property
    def started(self) -> bool:
        """Whether the dashboard's own node is started (False for the application's node)."""
        return self._started

    async def get(self) -> Node:
        if self._owned and not self._started:
            async with self._lock:
                if not self._started:
                    await self._node.start()
                    self._started = True
        return self._node

    async def close(self) -> None:
        """Stop the dashboard's own node — started, or not (its pool may hold the connection
        of a start that failed)."""
        if self._owned:
            await self._node.stop()
            self._started = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The lifespan of an application that reads through this source: ``close`` at its
        end."""
        try:
            yield
        finally:
            await self.close()


UNREADABLE: tuple[type[Exception], ...] = (AsyncTasksError, sa.exc.SQLAlchemyError, OSError)
"""What a request that cannot read the database now raises (answered with a 503)."""


@dataclass(frozen=True, slots=True)
class _Settings:
    actions: bool
    form_token: str
    title: str


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value is HTML-escaped, in every template
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["percent"] = lambda p: "-" if p is None else f"{p:.1%}"
    env.filters["when"] = lambda d: "-" if d is None else d.strftime("%Y-%m-%d %H:%M:%S UTC")
    env.filters["age"] = _age
    return env


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def create_app(
    node_or_url: Node | str,
    *,
    actions: bool = False,
    auth: tuple[str, str] | None = None,
    schema: str | None = None,
    title: str = "aioasync_tasks",
    secret: str | None = None,
) -> Starlette:
    """The dashboard, an ASGI application (Starlette) to run with any ASGI server or to mount
    in a FastAPI or Starlette application: ``app.mount("/tasks-admin", create_app(node))``.

    ``node_or_url``: a started ``Node`` of the application (a client-only one,
    ``concurrency=0``, will do), or a database URL, for which the dashboard makes a client-only
    node of its own (in ``schema``), started on the first request and stopped at the end of
    the dashboard's lifespan. Read-only unless ``actions=True``. ``auth=(user, password)``
    requires HTTP basic authentication for every request. ``secret``: where several processes
    serve one dashboard, the same text of at least 16 characters for each, from which they
    derive the same form token (else each makes a random one)."""
    if not isinstance(actions, bool):
        raise ConfigurationError("actions must be a bool")
    credentials = Credentials.of(auth)
    pages = _Dashboard(
        _NodeSource(node_or_url, schema),
        _Settings(actions=actions, form_token=form_token(secret), title=str(title)),
    )
    routes = [
        Route("/", pages.overview, name="overview"),
        Route("/tasks", pages.tasks, name="tasks"),
        Route("/tasks/rows", pages.task_rows, name="task_rows"),
        Route("/tasks/{task_id:int}", pages.task, name="task"),
        Route("/tasks/{task_id:int}/events", pages.task_events, name="task_events"),
        Route("/tasks/{task_id:int}/{action:str}", pages.task_action, methods=["POST"], name="act"),
        Route("/groups/{action:str}", pages.group_action, methods=["POST"], name="group_act"),
        Route("/metrics", pages.metrics, name="metrics"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers: Mapping[Any, Any] = dict.fromkeys(UNREADABLE, pages.on_error)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, credentials=credentials)],
        exception_handlers=handlers,
        lifespan=pages.source.lifespan,
    )
    app.state.node_source = pages.source
    return app


class _Dashboard:
    """The endpoints, sharing the node, the settings and the templates."""

    def __init__(self, source: _NodeSource, settings: _Settings) -> None:
        self.source = source
        self.settings = settings
        self.env = _environment()

    def _values(self, request: Request) -> dict[str, Any]:
        return {
            "request": request,
            "url": lambda name, **params: _url(request, name, **params),
            "settings": self.settings,
            "State": State,
        }

    def render(
        self, request: Request, template: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(**self._values(request), **values)
        return HTMLResponse(html, status_code=status)

    def problem(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status, message=message)

    async def overview(self, request: Request) -> Response:
        node = await self.source.get()
        data = await read_overview(node)
        return self.render(request, "overview.html", data=data, states=list(State))

    async def tasks(self, request: Request) -> Response:
        wanted = request.query_params.get("id", "").strip()
        if wanted:
            if not wanted.isdigit():
                return self.problem(request, 400, f"{wanted!r} is not a task id")
            return RedirectResponse(_url(request, "task", task_id=int(wanted)), 303)
        return await self._task_list(request, "tasks.html")

    async def task_rows(self, request: Request) -> Response:
        """The live part of the list (summary, rows, page links), which the list page fetches
        again every few seconds, with its filters and offset."""
        return await self._task_list(request, "_task_list.html")

    async def _task_list(self, request: Request, template: str) -> Response:
        """One page of the tasks that match the filters of the query string, rendered."""
        node = await self.source.get()
        query = request.query_params
        filters = {name: query.get(name, "").strip() for name in ("state", "type", "user", "group")}
        try:
            offset = max(0, int(query.get("offset", "0")))
        except ValueError:
            offset = 0
        options: dict[str, Any] = {
            "user": filters["user"] or None,
            "group": filters["group"] or None,
            "types": [filters["type"]] if filters["type"] else None,
            "states": [filters["state"]] if filters["state"] else None,
        }
        kept = {k: v for k, v in filters.items() if v}
        pages = {"previous": None, "next": None, "first": 0, "last": 0}
        values: dict[str, Any] = {
            "filters": filters,
            "tasks": [],
            "total": 0,
            "pages": pages,
            "live": _url(request, "task_rows", **kept, offset=offset),
        }
        try:
            found = await node.get_tasks(**options, offset=offset, limit=PAGE_SIZE)
            total = await node.count_tasks(**options)
        except ConfigurationError as exc:
            return self.render(request, template, 400, **values, error=str(exc))
        values["pages"] = {
            "previous": _url(request, "tasks", **kept, offset=max(0, offset - PAGE_SIZE))
            if offset
            else None,
            "next": _url(request, "tasks", **kept, offset=offset + PAGE_SIZE)
            if offset + PAGE_SIZE < total
            else None,
            "first": offset + 1 if found else 0,
            "last": offset + len(found),
        }
        values.update(tasks=found, total=total)
        return self.render(request, template, **values, error=None)

    async def task(self, request: Request) -> Response:
        node = await self.source.get()
        task_id = int(request.path_params["task_id"])
        try:
            found = await node.get_task(task_id)
        except TaskNotFound:
            return self.problem(request, 404, f"There is no task {task_id}.")
        return self.render(request, "task.html", task=found)

    async def task_events(self, request: Request) -> Response:
        """Server-sent events: the task's live part, rendered, after each change that
        ``Node.watch`` sees; then an ``end`` event when it is FINISHED, FAILED or gone."""
        node = await self.source.get()
        task_id = int(request.path_params["task_id"])
        template = self.env.get_template("_task_live.html")
        values = self._values(request)

        def event(html: str, name: str | None = None) -> str:
            head = f"event: {name}\n" if name else ""
            return head + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"

        async def stream() -> AsyncIterator[str]:
            try:
                # Closed here when the client leaves (the stream is closed), not when collected.
                async with contextlib.aclosing(node.watch(task_id)) as snapshots:
                    async for snapshot in snapshots:
                        yield event(template.render(**values, task=snapshot))
            except TaskNotFound:
                yield event(template.render(**values, task=None))
            except (AsyncTasksError, sa.exc.SQLAlchemyError) as exc:
                _log.warning("dashboard: watching task %s failed: %s", task_id, type(exc).__name__)
            yield event("-", "end")

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def form_of(self, request: Request) -> dict[str, str] | Response:
        """The POSTed form, or the refusal of the request."""
        if not self.settings.actions:
            return self.problem(
                request, 403, "This dashboard is read-only (started without actions)."
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/x-www-form-urlencoded":
            return self.problem(request, 415, "Actions take an HTML form (urlencoded).")
        body = await request.body()
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = {k: v[-1] for k, v in parsed.items()}
        refusal = post_refusal(request, self.settings.form_token, form.get("csrf_token"))
        if refusal is not None:
            _log.warning("dashboard: refused %s %s: %s", request.method, request.url.path, refusal)
            return self.problem(request, 403, f"Refused: {refusal}.")
        return form

    async def task_action(self, request: Request) -> Response:
        form = await self.form_of(request)
        if isinstance(form, Response):
            return form
        node = await self.source.get()
        task_id = int(request.path_params["task_id"])
        action = request.path_params["action"]
        back = _url(request, "task", task_id=task_id)
        try:
            if action == "pause":
                await node.pause_task(task_id)
            elif action == "run":
                await node.run_task(task_id)
            elif action == "delete":
                await node.delete_task(task_id, force=form.get("force") == "1")
                back = _url(request, "tasks")
            elif action == "move":
                await node.change_task_group(task_id, form.get("group", "").strip())
            else:
                return self.problem(request, 404, f"There is no task action {action!r}.")
        except TaskNotFound:
            return self.problem(request, 404, f"There is no task {task_id}.")
        except (InvalidTransition, ConfigurationError) as exc:
            return self.problem(request, 409, f"Cannot {action} task {task_id}: {exc}")
        _log.info("dashboard: %s task %s", action, task_id)
        return RedirectResponse(back, 303)

    async def group_action(self, request: Request) -> Response:
        form = await self.form_of(request)
        if isinstance(form, Response):
            return form
        node = await self.source.get()
        action = request.path_params["action"]
        group = form.get("group", "").strip()
        try:
            if action == "pause":
                await node.pause_group(group, stop_running=form.get("stop_running") == "1")
            elif action == "resume":
                await node.resume_group(group)
            elif action == "limits":
                await node.set_group_limits(
                    group,
                    max_running=_limit(form.get("max_running", "")),
                    max_running_per_user=_limit(form.get("max_running_per_user", "")),
                )
            else:
                return self.problem(request, 404, f"There is no group action {action!r}.")
        except (ConfigurationError, ValueError) as exc:
            return self.problem(request, 400, f"Cannot {action} group {group!r}: {exc}")
        _log.info("dashboard: %s group %r", action, group)
        return RedirectResponse(_url(request, "overview"), 303)

    async def metrics(self, request: Request) -> Response:
        body = await _metrics.exposition(await self.source.get())
        return Response(body, media_type=_metrics.CONTENT_TYPE)

    async def on_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, ConfigurationError):  # a bad value in the request, e.g. a huge id
            return self.problem(request, 400, str(exc))
        if isinstance(exc, NodeNotStarted):
            message = "The dashboard's node is not started."
        else:
            message = f"The database cannot be read now ({type(exc).__name__}); try again."
        _log.warning("dashboard: %s %s failed: %s", request.method, request.url.path, exc)
        return self.problem(request, 503, message)


def _limit(value: str) -> int | None:
    """A limit from a form field: empty is no limit."""
    value = value.strip()
    return int(value) if value else None


def _url(request: Request, name: str, **params: Any) -> str:
    """The path of route ``name`` (under the mount point, if mounted) with ``params`` that are
    not path parameters as the query string."""
    path_names = {"task_id", "action", "path"}
    path_params = {k: v for k, v in params.items() if k in path_names}
    query = {k: v for k, v in params.items() if k not in path_names}
    path = request.url_for(name, **path_params).path
    return f"{path}?{urlencode(query)}" if query else path
