"""The web dashboard of aioasync_tasks: ``create_app(node_or_url, *, actions=False, auth=None)``
returns an ASGI application (Starlette) that shows the queue — counts by group and state, live
nodes, groups and their limits, every task with live progress — and, with ``actions=True``,
pauses, resumes, moves and deletes tasks and pauses, resumes and limits groups. It serves
Prometheus metrics at ``/metrics``. ``aiohttp_app`` takes the same arguments and returns it as
an aiohttp application, to mount with ``add_subapp`` (it needs ``aiohttp`` too). Needs the
``dashboard`` extra: ``pip install 'aioasync-tasks[dashboard]'``."""

from __future__ import annotations

try:
    import jinja2  # noqa: F401 - checked here for the message below
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        f"aioasync_tasks.dashboard needs the 'dashboard' extra ({exc.name} is missing): "
        "pip install 'aioasync-tasks[dashboard]'",
        name=exc.name,
    ) from exc

from typing import TYPE_CHECKING, Any

from ._app import create_app
from ._metrics_app import create_metrics_app

if TYPE_CHECKING:
    from ._aiohttp import aiohttp_app

__all__ = ["aiohttp_app", "create_app", "create_metrics_app"]


def __getattr__(name: str) -> Any:
    """``aiohttp_app``, imported when asked for: only it needs aiohttp."""
    if name == "aiohttp_app":
        from ._aiohttp import aiohttp_app  # noqa: PLC0415 - only this name needs aiohttp

        return aiohttp_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
