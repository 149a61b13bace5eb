"""An observer that records what a node tells it, for tests of metrics, tracing and faults."""

from __future__ import annotations

from dataclasses import dataclass, field

from aioasync_tasks import Attempt, AttemptOutcome, Observer


@dataclass
class Recorder(Observer):
    """Every call, in order."""

    created_tasks: list[tuple[str, str, int]] = field(default_factory=list)
    started_attempts: list[Attempt] = field(default_factory=list)
    ended_attempts: list[tuple[Attempt, AttemptOutcome]] = field(default_factory=list)
    flushes: list[tuple[int, int]] = field(default_factory=list)
    lease_losses: int = 0
    fencings: int = 0

    def created(self, type: str, group: str, count: int) -> None:
        self.created_tasks.append((type, group, count))

    def started(self, attempt: Attempt) -> None:
        self.started_attempts.append(attempt)

    def ended(
        self, attempt: Attempt, outcome: AttemptOutcome, seconds: float, error: str | None
    ) -> None:
        self.ended_attempts.append((attempt, outcome))

    def flushed(self, checkpoints: int, completions: int, seconds: float) -> None:
        self.flushes.append((checkpoints, completions))

    def lease_lost(self) -> None:
        self.lease_losses += 1

    def fenced(self) -> None:
        self.fencings += 1

    def outcomes(self, node_id: int | None = None) -> list[AttemptOutcome]:
        """The outcomes of the attempts that ended (on ``node_id``, if given), in order."""
        return [o for a, o in self.ended_attempts if node_id is None or a.node_id == node_id]
