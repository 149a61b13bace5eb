"""``create_metrics_app``: the dashboard's ``/metrics`` alone, an ASGI application to mount where
a Prometheus scraper looks, without the pages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .._logging import LOGGER_NAME
from .._node import Node
from . import _metrics
from ._app import UNREADABLE, _NodeSource
from ._security import Credentials, Guard

_log = logging.getLogger(f"{LOGGER_NAME}.dashboard")


def create_metrics_app(
    node_or_url: Node | str,
    *,
    auth: tuple[str, str] | None = None,
    schema: str | None = None,
) -> Starlette:
    """The metrics of the dashboard's ``/metrics`` — the database's gauges, then the registries
    of the node's ``PrometheusMetrics`` observers — served at the application's root:
    ``app.mount("/metrics", create_metrics_app(node))``. ``node_or_url``, ``auth`` and
    ``schema`` as for ``create_app``. A database that cannot be read gives a 503."""
    credentials = Credentials.of(auth)
    source = _NodeSource(node_or_url, schema)

    async def metrics(request: Request) -> Response:
        body = await _metrics.exposition(await source.get())
        return Response(body, media_type=_metrics.CONTENT_TYPE)

    async def unavailable(request: Request, exc: Exception) -> Response:
        _log.warning("metrics: %s %s failed: %s", request.method, request.url.path, exc)
        return PlainTextResponse(
            f"the database cannot be read now ({type(exc).__name__})\n", status_code=503
        )

    handlers: Mapping[Any, Any] = dict.fromkeys(UNREADABLE, unavailable)
    return Starlette(
        routes=[Route("/", metrics, name="metrics")],
        middleware=[Middleware(Guard, credentials=credentials)],
        exception_handlers=handlers,
        lifespan=source.lifespan,
    )
