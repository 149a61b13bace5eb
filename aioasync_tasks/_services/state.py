"""What the services of one node share (docs/design.md §8.2): its configuration, its id, its
executions, its lease, and the events by which one service tells another to act.

One explicit object, handed to every service. A service keeps its own state to itself and
reaches the others only through this one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

from .._backends._driver import Driver
from .._clock import Clock
from .._logging import ContextAdapter, node_logger
from .._registry import TaskRegistry
from .._runner import Backoff, Execution, StopReason
from .._scheduling import SchedulingPolicy
from .._telemetry import Telemetry
from .pruner import Retention

LEASE_FRACTION = 0.75
"""The lease: this part of ``node_timeout`` after the last successful heartbeat was sent
(docs/design.md §9.3)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The settings of a node that runs tasks, checked by ``Node``."""

    concurrency: int
    cleanup_concurrency: int
    heartbeat_interval: float
    node_timeout: float
    poll_interval: float
    cleanup_attempts: int
    backoff: Backoff
    name: str | None
    policy: SchedulingPolicy
    groups: tuple[str, ...] | None
    max_context_bytes: int
    clock: Clock = time.monotonic
    """The node's monotonic clock for leases and heartbeats (tests inject their own)."""
    retention: Retention | None = None
    """How long finished and failed tasks are kept (None: for ever; no pruner)."""


class NodeState:
    """The shared state of one node's services."""

    def __init__(
        self,
        driver: Driver,
        registry: TaskRegistry,
        config: NodeConfig,
        logger: logging.Logger,
        telemetry: Telemetry,
    ) -> None:
        self.driver = driver
        """Looked up anew on every call, so that a test may replace one of its methods
        (``Node.driver``)."""
        self.registry = registry
        self.config = config
        self.clock = config.clock
        self.logger = logger
        self.telemetry = telemetry
        """The node's observers (metrics, tracing)."""
        """The application's logger, for the records of tasks."""
        self.log: ContextAdapter = node_logger(logger, None)
        """The node's own records, with its id once registered."""
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.types = registry.names
        self.cleanup_types = [t.name for t in registry if t.has_cleanup]
        self.node_id = 0
        """The id of the node's row; a new one after fencing (docs/design.md §9.4)."""
        self.executions: dict[int, Execution] = {}
        """The executions running on this node, by task id."""
        self.running: set[asyncio.Task[None]] = set()
        """The asyncio tasks of the executions (plain tasks: an anyio task group's spawn
        costs several times more, and a node may start thousands per second)."""
        self.wakeup = asyncio.Event()
        """Set to make the claimer look at once (docs/design.md §14)."""
        self.stop_poll = asyncio.Event()
        """Set to make the stop poll read this node's tasks at once (a ``stop:`` message)."""
        self.stopping = asyncio.Event()
        """Set when the node begins its graceful stop (docs/design.md §12)."""
        self.lease_deadline = 0.0
        """When the lease ends, on ``clock`` (docs/design.md §9.3)."""
        self.lease_lost = False
        """The lease ran out and the executions were stopped; set back by a heartbeat."""
        self.claiming = False
        """A claim is in flight: it may have committed rows that no execution holds yet."""
        self.fencing = False
        """The node is registering anew after finding its row gone."""
        self.fenced = asyncio.Event()
        """Set each time the node found itself declared dead (for tests)."""
        self.failure: str | None = None
        """Why the node stopped on its own (a service that kept crashing), or None."""

    def wake(self) -> None:
        """Let the claimer look for work at once."""
        self.wakeup.set()

    def lease_valid(self) -> bool:
        return self.clock() < self.lease_deadline

    def start_lease(self, sent: float) -> None:
        """The lease of a registration sent at ``sent``."""
        self.lease_deadline = sent + self.config.node_timeout * LEASE_FRACTION

    def renew_lease(self, sent: float) -> None:
        """Extend the lease by a heartbeat sent at ``sent`` (never shorten it)."""
        self.lease_deadline = max(
            self.lease_deadline, sent + self.config.node_timeout * LEASE_FRACTION
        )

    def may_claim(self) -> bool:
        return not (self.lease_lost or self.stopping.is_set()) and self.lease_valid()

    def stop_all(self, reason: StopReason) -> None:
        """Ask every execution to stop; waits for none."""
        for execution in list(self.executions.values()):
            execution.request_stop(reason)

    def stop_local(self, task_id: int, *, lost: bool) -> None:
        """Deliver a stop request for a task this node runs (no round trip needed)."""
        execution = self.executions.get(task_id)
        if execution is not None:
            execution.request_stop(StopReason.LOST if lost else StopReason.USER)
