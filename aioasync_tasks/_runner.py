"""Running one task's generator (or its cleanup handler) by the task protocol
(docs/how-to.md, "Write a task and its checkpoints").

An ``Execution`` owns the ``stop`` event handed to the generator and a deadline: the first stop
request sets ``stop`` and arms the grace period (``stop_timeout``); when it runs out the
generator is cancelled at its current ``await``. Each checkpoint goes through the committer and
the generator resumes only once it is durable. The runner's last word is one ``Completion``,
which the state rules turn into the next state. Every write carries the claim's token, so a
write of an execution that lost its task (rescued, force-deleted, fenced, its lease run out)
changes nothing; a lost execution's last word is NODE_LOST, which releases the row if it is
still the execution's own (docs/explanation.md, "Claim tokens").
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ._backends._driver import Claimed, Completion
from ._clock import Clock
from ._committer import Committer
from ._errors import ConfigurationError, ContextError, DatabaseError
from ._models import TaskInfo
from ._registry import TaskGenerator, TaskType
from ._report import Phase, Report
from ._states import Event
from ._task import _current
from ._telemetry import Attempt, AttemptOutcome, Telemetry
from ._validation import clean_error_text


class StopReason(enum.Enum):
    USER = "stop requested"
    SHUTDOWN = "node shutting down"
    TIMEOUT = "timed out"
    LOST = "ownership lost"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base·2^(attempt-1))]."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        return float(ceiling * rng())


class Execution:
    """One run of a claimed task on this node."""

    def __init__(
        self,
        claimed: Claimed,
        task_type: TaskType,
        *,
        node_id: int,
        cleanup: bool,
        committer: Committer,
        backoff: Backoff,
        lease_valid: Callable[[], bool],
        max_context_bytes: int,
        logger: logging.LoggerAdapter[logging.Logger],
        attempt: Attempt | None,
        telemetry: Telemetry,
        ended: Callable[[], None],
        clock: Clock = time.monotonic,
    ) -> None:
        self.claimed = claimed
        self.task_type = task_type
        self.node_id = node_id
        self.cleanup = cleanup
        self.stop = asyncio.Event()
        self.reason: StopReason | None = None
        self.claimed_at = clock()
        self.ending = False
        """The task's code is over and its end is being written: its slot is free, and
        ``ended`` was called to say so (docs/design.md §6.8)."""
        self._ended = ended
        self._committer = committer
        self._backoff = Backoff(
            backoff.base if task_type.retry_base is None else task_type.retry_base,
            backoff.cap if task_type.retry_cap is None else task_type.retry_cap,
        )
        self._exception: BaseException | None = None
        """What the generator raised, for the log record of its failure (with its traceback)."""
        self._lease_valid = lease_valid
        self._max_context_bytes = max_context_bytes
        self._log = logger
        self.attempt = attempt
        self._telemetry = telemetry
        self._clock = clock
        self._deadline: asyncio.Timeout | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def task_id(self) -> int:
        return self.claimed.id

    @property
    def token(self) -> int:
        return self.claimed.token

    @property
    def lost(self) -> bool:
        return self.reason is StopReason.LOST

    def request_stop(self, reason: StopReason) -> None:
        """Set ``stop`` (once) and arm the grace period; LOST cancels the generator at once.

        A later LOST overrides an earlier reason: nothing may be written for a lost task.
        """
        if reason is StopReason.LOST:
            self.reason = reason
            self.stop.set()
            self._arm(0.0)
            return
        if self.stop.is_set():
            return
        self.reason = reason
        self.stop.set()
        self._log.info("stopping task (%s)", reason.value)
        self._arm(self.task_type.stop_timeout)

    def _arm(self, grace: float) -> None:
        if self._deadline is not None and not self._deadline.expired():
            when = asyncio.get_running_loop().time() + grace
            current = self._deadline.when()
            if current is None or when < current:
                self._deadline.reschedule(when)

    async def run(self) -> None:
        info = TaskInfo(
            id=self.claimed.id,
            type=self.claimed.type,
            user=self.claimed.user,
            group=self.claimed.group,
            attempt=self.claimed.attempts,
            node=self.node_id,
        )
        token = _current.set(info)
        attempt = self.attempt  # None when the node has no observers
        telemetry = self._telemetry
        if attempt is not None:
            telemetry.started(attempt)
        # Until its end is written, an attempt cut short (its node abandoned it) is LOST.
        outcome = AttemptOutcome.LOST
        error: str | None = None
        try:
            completion = await self._execute()
            self.ending = True
            self._ended()
            accepted = await self._committer.complete(self.node_id, completion)
            if accepted:
                if attempt is not None:
                    outcome, error = self._outcome(attempt, completion.event), completion.error
                self._log.info("task %s", completion.event.value)
            elif not self.lost:
                self._log.warning(
                    "task's final write (%s) rejected: it is no longer owned by this node",
                    completion.event.value,
                )
        finally:
            if attempt is not None:
                telemetry.ended(attempt, outcome, self._clock() - self.claimed_at, error)
            _current.reset(token)
            if self._timer is not None:
                self._timer.cancel()

    async def _execute(self) -> Completion:
        start = self.task_type.start_deleting if self.cleanup else self.task_type.start_running
        final: tuple[Report, str | None] | None = None
        error: str | None = None
        cancelled = False
        generator: TaskGenerator | None = None
        loop = asyncio.get_running_loop()
        deadline: asyncio.Timeout | None = None
        try:
            context = self.task_type.decode_context(self.claimed.context)
        except ContextError as exc:
            return self._reject(exc)
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                try:
                    if self.reason is not None:  # stopped before it started
                        self._arm(0.0 if self.lost else self.task_type.stop_timeout)
                    if self.task_type.timeout is not None and not self.cleanup:
                        self._timer = loop.call_later(
                            self.task_type.timeout, self.request_stop, StopReason.TIMEOUT
                        )
                    generator = start(context, self.stop)
                    final = await self._drive(generator)
                finally:
                    # A stop request arriving later (while the completion is written) must
                    # not reschedule a finished Timeout: that raises RuntimeError.
                    self._deadline = None
        except TimeoutError as exc:
            if deadline is not None and deadline.expired():
                cancelled = True
                if not self.lost:
                    self._log.warning("task ignored stop for its grace period: cancelled")
            else:  # the task's own TimeoutError
                error = "".join(traceback.format_exception(exc))
                self._exception = exc
        except Exception as exc:
            error = "".join(traceback.format_exception(exc))
            self._exception = exc
        finally:
            if generator is not None:
                await self._close(generator)
        if self.lost:
            # Releases the row only if it is still this execution's (its lease ran out while
            # its node's row survived); a row rescued or claimed again is left alone.
            return Completion(self.claimed.id, self.token, Event.NODE_LOST)
        return self._completion(final, error, cancelled)

    async def _drive(self, generator: TaskGenerator) -> tuple[Report, str | None] | None:
        """Iterate the generator; return its terminal report with its context as stored, or
        None when it returned."""
        async for report in generator:
            if self.lost:  # e.g. it caught the cancellation of a fenced node and yielded again
                return None  # nothing may be written for a lost task: the row is not ours
            if not isinstance(report, Report):
                raise TypeError(f"a task must yield Report objects, not {type(report).__name__}")
            context = self._encode(report.context)
            if report.terminal:
                # Not dataclasses.replace: it costs a few microseconds for every task.
                return report, context
            if report.stores:
                try:
                    accepted = await self._committer.checkpoint(
                        self.node_id,
                        self.claimed.id,
                        self.token,
                        context,
                        progress=report.progress,
                        message=report.message,
                    )
                except DatabaseError as exc:  # the database refused this value: fail the task
                    raise DatabaseError(f"the checkpoint could not be stored: {exc}") from exc
                if not accepted:
                    self._log.warning("checkpoint rejected: task no longer owned; stopping it")
                    self.request_stop(StopReason.LOST)
                    return None
            if not self._lease_valid():
                self.request_stop(StopReason.LOST)
                return None
            if self.lost:
                return None
        return None

    def _outcome(self, attempt: Attempt, event: Event) -> AttemptOutcome:
        """How the attempt ended, by the event of its accepted completion."""
        if event in (Event.FAILED, Event.CLEANUP_FAILED):
            attempts_left = attempt.number < attempt.max_attempts
            # A user's stop request (pause, delete) meanwhile turns a failure into FAILED.
            if attempts_left and self.reason is not StopReason.USER:
                return AttemptOutcome.RETRIED
            return AttemptOutcome.FAILED
        if event is Event.REJECTED:
            return AttemptOutcome.FAILED
        if event in (Event.STOPPED, Event.NODE_LOST):
            return AttemptOutcome.LOST if self.lost else AttemptOutcome.STOPPED
        return AttemptOutcome.FINISHED  # FINISHED, DISCARD, CLEANUP_FINISHED

    def _encode(self, context: object) -> str | None:
        """A yielded context as stored (None: keep the stored one); its size checked."""
        if context is None:
            return None
        if not isinstance(context, str) and self.task_type.context_type is None:
            raise ConfigurationError(
                f"task type {self.task_type.name!r} has no context_type: a Report context must "
                f"be a str, not {type(context).__name__}"
            )
        text = self.task_type.encode_context(context)
        size = len(text.encode("utf-8"))
        if size > self._max_context_bytes:
            raise ConfigurationError(
                f"the task yielded a context of {size} bytes, more than "
                f"max_context_bytes={self._max_context_bytes}"
            )
        return text

    def _reject(self, error: ContextError) -> Completion:
        """The end of an execution whose stored context does not decode: FAILED for good."""
        self._log.error(
            "%s of attempt %d not started: %s; the task is FAILED, without retries (fix the "
            "context type or the context, then run the task again)",
            "cleanup" if self.cleanup else "task",
            self.claimed.attempts,
            error,
        )
        text = f"{type(error).__name__}: {error}"
        return Completion(self.claimed.id, self.token, Event.REJECTED, error=clean_error_text(text))

    async def _close(self, generator: TaskGenerator) -> None:
        aclose = getattr(generator, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except RuntimeError as exc:
            # The generator yielded again after a terminal report or a stop: never applied.
            self._log.error("task misbehaved while being closed: %s", exc)
        except Exception as exc:
            self._log.error("task raised while being closed: %r", exc)

    def _completion(
        self, final: tuple[Report, str | None] | None, error: str | None, cancelled: bool
    ) -> Completion:
        timed_out = self.reason is StopReason.TIMEOUT
        if final is not None:
            report, context = final  # the context as _drive encoded it
            # The final report's progress and message are stored with its completion.
            if report.phase is Phase.FINISHED:
                event = Event.DISCARD if report.delete else Event.FINISHED
                return self._finish(event, context, None, report.progress, report.message)
            event = Event.DISCARD if report.delete else Event.FAILED  # Phase.FAILED
            return self._finish(event, context, report.error, report.progress, report.message)
        if error is not None:
            return self._finish(Event.FAILED, None, error)
        if timed_out:
            message = f"timed out after {self.task_type.timeout}s"
            return self._finish(Event.FAILED, None, message)
        if cancelled or self.stop.is_set():
            return self._finish(Event.STOPPED, None, None)
        return self._finish(Event.FINISHED, None, None)

    def _finish(
        self,
        event: Event,
        context: str | None,
        error: str | None,
        progress: float | None = None,
        message: str | None = None,
    ) -> Completion:
        if self.cleanup:
            event = {
                Event.FINISHED: Event.CLEANUP_FINISHED,
                Event.DISCARD: Event.CLEANUP_FINISHED,
                Event.FAILED: Event.CLEANUP_FAILED,
                Event.STOPPED: Event.NODE_LOST,  # shutdown: release the cleanup to any node
            }[event]
        delay = 0.0
        if event in (Event.FAILED, Event.CLEANUP_FAILED):
            delay = self._backoff.delay(self.claimed.attempts)
            self._log_failure(error, delay)
        return Completion(
            self.claimed.id,
            self.token,
            event,
            context=context,
            error=None if error is None else clean_error_text(error),
            delay=delay,
            progress=progress,
            message=message,
        )

    def _log_failure(self, error: str | None, delay: float) -> None:
        """One record per failed attempt: the attempt, what failed (with the traceback of an
        exception, as ``exc_info``) and when the task runs again, if it does."""
        attempt = self.claimed.attempts
        if self.cleanup:
            what = f"cleanup failed on attempt {attempt}"
            then = f"retried in {delay:.2f}s (at {_at(delay)}) while cleanup attempts are left"
        else:
            what = f"task failed on attempt {attempt} of {self.claimed.max_attempts}"
            if attempt < self.claimed.max_attempts:
                then = f"retry in {delay:.2f}s, at {_at(delay)}"
            else:
                then = "no attempts left: FAILED"
        exception = self._exception
        if exception is not None:
            summary = f"{type(exception).__name__}: {exception}"
        else:
            summary = error.strip().splitlines()[-1] if error and error.strip() else "failed"
        self._log.warning(
            "%s (%s); %s",
            what,
            summary,
            then,
            exc_info=(type(exception), exception, exception.__traceback__) if exception else None,
        )


def _at(delay: float) -> str:
    """The wall-clock time ``delay`` seconds from now, in UTC, for a log record."""
    return (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(timespec="milliseconds")
