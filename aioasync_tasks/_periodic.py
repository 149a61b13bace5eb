"""The period of a periodic task and the ticks it gives (docs/design.md §17): a cron expression
in a time zone, or a fixed interval.

- ``cron``: five fields (minute, hour, day of month, month, day of week), or six with the
  seconds first, read by ``cronsim`` (Debian cron's rules: the day-of-month and day-of-week
  fields are OR-ed unless one is ``*``; its handling of daylight-saving changes for the
  fixed times of five-field expressions). Ticks fall in the schedule's ``timezone`` (UTC by
  default).
- ``every``: a fixed interval, at least ``MIN_EVERY`` seconds. Its ticks are whole multiples
  of the interval since the Unix epoch, so every node computes the same ticks with no shared
  starting point (``every=60`` ticks at each full minute, ``every=0.5`` at each half second).

Pure functions of times, used by the scheduler service to validate and by the driver to plan
a tick under its write lock; all times are aware UTC ``datetime`` values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._errors import ConfigurationError
from ._validation import MAX_NAME_LENGTH, check_text

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_EVERY = 0.001
"""The shortest interval of ``every=``, in seconds (the ticks are computed in microseconds)."""
_MICROSECOND = timedelta(microseconds=1)
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class Period:
    """When a schedule ticks: ``cron`` in ``timezone``, or ``every`` seconds (exactly one)."""

    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"

    def _zone(self) -> tzinfo:
        # cronsim treats datetime's own UTC as "no daylight-saving changes" (the fast path).
        return UTC if self.timezone == "UTC" else ZoneInfo(self.timezone)

    def _every_us(self) -> int:
        assert self.every is not None
        return max(round(self.every * 1_000_000), 1)

    def latest(self, now: datetime) -> datetime:
        """The last tick at or before ``now``."""
        if self.cron is None:
            step = self._every_us()
            return EPOCH + _MICROSECOND * ((now - EPOCH) // _MICROSECOND // step * step)
        # Ticks fall on whole seconds. cronsim, going backwards from a whole second, starts
        # strictly before it: one second past floor(now) includes a tick at floor(now).
        start = (now.replace(microsecond=0) + _SECOND).astimezone(self._zone())
        return next(CronSim(self.cron, start, reverse=True)).astimezone(UTC)

    def after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""
        if self.cron is None:
            step = self._every_us()
            return EPOCH + _MICROSECOND * ((now_us(moment) // step + 1) * step)
        return next(CronSim(self.cron, moment.astimezone(self._zone()))).astimezone(UTC)

    def describe(self) -> str:
        """``cron 0 * * * *``, ``cron 0 9 * * * (Europe/Paris)`` or ``every 30s``, for people."""
        if self.cron is None:
            assert self.every is not None
            return f"every {self.every:g}s"
        zone = "" if self.timezone == "UTC" else f" ({self.timezone})"
        return f"cron {self.cron}{zone}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a due schedule does now: enqueue ``tick``, and be due next at ``following``."""

    tick: datetime
    following: datetime
    skipped: bool
    """Ticks after the one that was due were missed too; they are not enqueued."""


def plan(period: Period, due: datetime, now: datetime) -> Plan:
    """The tick to enqueue for a schedule due since ``due`` (at or before ``now``): the latest
    tick that is due, never a burst of the missed ones (docs/design.md §17.3)."""
    tick = max(period.latest(now), due)
    return Plan(tick, period.after(now), skipped=tick != due)


def now_us(moment: datetime) -> int:
    """Microseconds since the epoch."""
    return (moment - EPOCH) // _MICROSECOND


def check_period(cron: object, every: object, timezone: object = None) -> Period:
    """A valid ``Period`` from the arguments of ``schedule()`` or a task type's options, or
    ``ConfigurationError`` naming the bad one."""
    if (cron is None) == (every is None):
        raise ConfigurationError("give a schedule either cron= or every=, not both or neither")
    if every is not None:
        if timezone is not None and timezone != "UTC":
            raise ConfigurationError(
                "timezone= applies to cron= only: every= ticks at multiples of its interval "
                "since the Unix epoch, the same in every zone"
            )
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < MIN_EVERY
        ):
            raise ConfigurationError(
                f"every must be a number of seconds (or a timedelta) of at least {MIN_EVERY}, "
                f"not {every!r}"
            )
        return Period(every=float(seconds))
    expression = " ".join(
        check_text("cron", cron, allow_empty=False, max_length=MAX_NAME_LENGTH).split()
    )
    zone = "UTC" if timezone is None else check_text("timezone", timezone, allow_empty=False)
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"unknown timezone {zone!r}") from None
    period = Period(cron=expression, timezone=zone)
    try:
        period.after(datetime.now(UTC))
    except CronSimError as exc:
        raise ConfigurationError(f"cron {expression!r} is not valid: {exc}") from None
    return period
