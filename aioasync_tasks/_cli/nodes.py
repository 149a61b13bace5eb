"""``nodes``: the live nodes."""

from __future__ import annotations

import click

from .._node import Node
from .client import Settings, with_client
from .output import emit, fields, json_option, local_time, table


@click.command()
@json_option
@click.pass_obj
def nodes(settings: Settings, as_json: bool) -> None:
    """List the live nodes (those not yet found dead).

    With --json: {"nodes": [{"id", "name", "concurrency", "types", "started_at", "heartbeat_at",
    "heartbeat_interval", "node_timeout"}, ...]}.
    """
    found = with_client(settings, Node.get_nodes)
    rows = [
        [
            str(n.id),
            n.name,
            str(n.concurrency),
            ",".join(n.types),
            local_time(n.started_at),
            local_time(n.heartbeat_at),
        ]
        for n in found
    ]
    headers = ["ID", "NAME", "CONCURRENCY", "TYPES", "STARTED", "HEARTBEAT"]
    text_form = table(headers, rows) if rows else "no live nodes"
    emit(as_json, {"nodes": [fields(n) for n in found]}, text_form)
