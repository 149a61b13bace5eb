"""The dashboard as an aiohttp sub-application: ``app.add_subapp("/tasks-admin",
aiohttp_app(node))``. A small bridge serves the Starlette application inside aiohttp: each
request becomes an ASGI call (its path under the mount point as ``root_path``, so the pages'
links carry the prefix), each response is streamed as the application sends it (the task page's
server-sent events arrive as they happen), and the application's lifespan runs in the
sub-application's ``cleanup_ctx`` (the dashboard's own node is stopped at cleanup).

Written here rather than taken from ``aiohttp-asgi`` (0.7.1): its resource cannot be part of a
sub-application (``add_prefix`` is not implemented, so ``add_subapp`` fails), and its
``receive()`` answers an empty body forever instead of waiting for a disconnect, which makes
Starlette's streaming responses spin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

try:
    from aiohttp import web
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        f"aioasync_tasks.dashboard.aiohttp_app needs aiohttp ({exc.name} is missing): "
        "pip install aiohttp",
        name=exc.name,
    ) from exc
from multidict import CIMultiDict
from starlette.applications import Starlette
from starlette.types import Message, Scope

from .._node import Node
from ._app import create_app

_TAIL = "tail"
"""The match-info name of the path under the mount point."""
DASHBOARD = web.AppKey("dashboard", Starlette)
"""The key, in the aiohttp application, of the dashboard it serves (``create_app``'s)."""


def aiohttp_app(
    node_or_url: Node | str,
    *,
    actions: bool = False,
    auth: tuple[str, str] | None = None,
    schema: str | None = None,
    title: str = "aioasync_tasks",
    secret: str | None = None,
) -> web.Application:
    """The dashboard as an aiohttp application, to mount in one:
    ``app.add_subapp("/tasks-admin", aiohttp_app(node, actions=True))``. Takes the arguments
    of ``create_app``, which it serves. Made from a URL, its own node is started on the first
    request and stopped at the application's cleanup. Needs ``aiohttp``."""
    bridge = _Bridge(
        create_app(
            node_or_url, actions=actions, auth=auth, schema=schema, title=title, secret=secret
        )
    )
    app = web.Application()
    app[DASHBOARD] = bridge.asgi
    app.router.add_route("*", "", bridge.handle)  # the mount point itself: redirected to ".../"
    app.router.add_route("*", f"/{{{_TAIL}:.*}}", bridge.handle)
    app.cleanup_ctx.append(bridge.lifespan)
    return app


class _Bridge:
    """Serves one Starlette application to aiohttp requests."""

    def __init__(self, asgi: Starlette) -> None:
        self.asgi = asgi

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        async with self.asgi.router.lifespan_context(self.asgi):
            yield

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = _Exchange(request, await request.read())
        await self.asgi(exchange.scope(), exchange.receive, exchange.send)
        if exchange.response is None:
            raise RuntimeError("the dashboard sent no response")
        return exchange.response


class _Exchange:
    """One request and its response, as ASGI messages."""

    def __init__(self, request: web.Request, body: bytes) -> None:
        self.request = request
        self.body: bytes | None = body
        self.response: web.StreamResponse | None = None
        self.sent = asyncio.Event()

    def scope(self) -> Scope:
        request = self.request
        resource = request.match_info.route.resource
        # the route as mounted, "/tasks-admin/{tail}" (or the bare "/tasks-admin"): its prefix
        root_path = resource.canonical.removesuffix(f"/{{{_TAIL}}}") if resource else ""
        client = request.transport.get_extra_info("peername") if request.transport else None
        server = request.transport.get_extra_info("sockname") if request.transport else None
        return {
            "type": "http",
            # 2.4: send() raises OSError once the client is gone, and no http.disconnect comes
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": request.scheme,
            "root_path": root_path,
            "path": request.path,
            "raw_path": request.raw_path.partition("?")[0].encode("latin-1"),
            "query_string": request.query_string.encode("latin-1"),
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
            "client": tuple(client[:2]) if isinstance(client, tuple) else None,
            "server": tuple(server[:2]) if isinstance(server, tuple) else None,
            "state": {},
        }

    async def receive(self) -> Message:
        body, self.body = self.body, None
        if body is None:  # asked again: nothing more comes until the response is sent
            await self.sent.wait()
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers: CIMultiDict[str] = CIMultiDict()
            for name, value in message.get("headers", ()):
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
            self.response = web.StreamResponse(status=message["status"], headers=headers)
        elif message["type"] == "http.response.body":
            response = self.response
            if response is None:
                raise RuntimeError("a response body before its start")
            if not response.prepared:
                await response.prepare(self.request)
            body: Any = message.get("body", b"")
            if message.get("more_body", False):
                if body:
                    await response.write(body)
            else:
                await response.write_eof(body)
                self.sent.set()
