"""The dashboard as an aiohttp sub-application: ``app.add_subapp("/tasks-admin",
aiohttp_app(node))``. A small bridge serves the Starlette application inside aiohttp: each
request becomes an ASGI call (its path under the mount point as ``root_path``, so the pages'
links carry the prefix), each response is streamed as the application sends it (the task page's
server-sent events arrive as they happen) until it ends or its client leaves, and the
application's lifespan runs in the sub-application's ``cleanup_ctx`` (the dashboard's own node
is stopped at cleanup). aiohttp tells a handler of no disconnect: a failed write tells it, and
while a response streams the bridge looks at the connection every ``DISCONNECT_POLL`` seconds,
so that the stream of a task that does not change is not left watching it.

Written here rather than taken from ``aiohttp-asgi`` (0.7.1): its resource cannot be part of a
sub-application (``add_prefix`` is not implemented, so ``add_subapp`` fails), and its
``receive()`` answers an empty body forever instead of waiting for a disconnect, which makes
Starlette's streaming responses spin."""

from __future__ import annotations

import asyncio
import contextlib
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
DISCONNECT_POLL = 1.0
"""Seconds between looks, while a response streams, at whether its client has left."""
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
        self.ended = asyncio.Event()
        """Set when the response is sent, or the client has left."""

    def scope(self) -> Scope:
        request = self.request
        resource = request.match_info.route.resource
        # the route as mounted, "/tasks-admin/{tail}" (or the bare "/tasks-admin"): its prefix
        root_path = resource.canonical.removesuffix(f"/{{{_TAIL}}}") if resource else ""
        client = request.transport.get_extra_info("peername") if request.transport else None
        server = request.transport.get_extra_info("sockname") if request.transport else None
        return {
            "type": "http",
            # 2.3: the end of a request is told by http.disconnect (receive), not by send raising
            "asgi": {"version": "3.0", "spec_version": "2.3"},
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
        """The body, then, once the response is sent or the client has left, the disconnect
        (on which Starlette cancels a stream, which closes its ``Node.watch``)."""
        body, self.body = self.body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        while not self.ended.is_set():
            transport = self.request.transport
            if transport is None or transport.is_closing():  # aiohttp tells no one: look
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCONNECT_POLL):
                    await self.ended.wait()
        return {"type": "http.disconnect"}

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
            body: Any = message.get("body", b"")
            try:
                if not response.prepared:
                    await response.prepare(self.request)
                if message.get("more_body", False):
                    if body and not self.ended.is_set():
                        await response.write(body)
                    return
                await response.write_eof(body)
            except ConnectionResetError:  # the client left: told by receive(), not raised
                pass
            self.ended.set()
