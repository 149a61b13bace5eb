"""Log records of the library: logger ``aioasync_tasks`` (or the application's), with the node
and, for task records, the task's id, type, user and group both in ``extra`` (for structured
handlers) and in the message (for plain ones)."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "aioasync_tasks"


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds fixed fields to every record and a short ``[key=value …]`` prefix to the message."""

    def __init__(self, logger: logging.Logger, fields: dict[str, object]) -> None:
        super().__init__(logger, fields)
        self._prefix: str | None = None
        """Made at the first record: most tasks log nothing."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        fields = self.extra or {}
        if self._prefix is None:
            self._prefix = "[" + " ".join(f"{k}={v}" for k, v in fields.items()) + "] "
        kwargs["extra"] = {**fields, **(kwargs.get("extra") or {})}
        return self._prefix + str(msg), kwargs


def node_logger(logger: logging.Logger, node_id: int | None) -> ContextAdapter:
    return ContextAdapter(logger, {"node": node_id})


def task_logger(
    logger: logging.Logger, *, node_id: int, task_id: int, type: str, user: str, group: str
) -> ContextAdapter:
    return ContextAdapter(
        logger, {"node": node_id, "task_id": task_id, "type": type, "user": user, "group": group}
    )
