"""The web dashboard of aioasync_tasks: ``create_app(node_or_url, *, actions=False, auth=None)``
returns an ASGI application (Starlette) that shows the queue — counts by group and state, live
nodes, groups and their limits, every task with live progress — and, with ``actions=True``,
pauses, resumes, moves and deletes tasks and pauses, resumes and limits groups. It serves
Prometheus metrics at ``/metrics``. Needs the ``dashboard`` extra:
``pip install 'aioasync-tasks[dashboard]'``."""

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

from ._app import create_app
from ._metrics_app import create_metrics_app

__all__ = ["create_app", "create_metrics_app"]
