"""``Clock``: the node's monotonic clock, injected through its configuration (``Node(clock=…)``,
docs/design.md §8.2). It times the lease and the heartbeats (docs/design.md §9.3); the
database's clock alone decides liveness. Tests pass their own to make a lease run out without
waiting."""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    """Seconds on a monotonic clock: ``time.monotonic``, or a test's fake clock. Only the
    differences between two readings mean anything."""

    def __call__(self) -> float: ...
