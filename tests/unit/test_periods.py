"""``_periodic``: the ticks of a cron expression (in a time zone) or of a fixed interval, and
the checks of a period's arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioasync_tasks import ConfigurationError
from aioasync_tasks._periodic import EPOCH, Period, Plan, check_period, plan

T = datetime(2026, 11, 30, 10, 0, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def test_cron_latest_includes_a_tick_at_now_and_after_excludes_it() -> None:
    hourly = check_period("0 * * * *", None)
    assert hourly.latest(T) == T
    assert hourly.latest(T + US) == T
    assert hourly.latest(T - US) == T - timedelta(hours=1)
    assert hourly.after(T) == T + timedelta(hours=1)
    assert hourly.after(T - US) == T
    assert hourly.describe() == "cron 0 * * * *"


def test_six_fields_have_seconds_first() -> None:
    every_5s = check_period("*/5 * * * * *", None)
    assert every_5s.after(T) == T + timedelta(seconds=5)
    assert every_5s.latest(T + timedelta(seconds=7)) == T + timedelta(seconds=5)


def test_cron_in_a_time_zone_follows_its_daylight_saving_changes() -> None:
    berlin = check_period("0 9 * * *", None, "Europe/Berlin")
    # 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert berlin.after(datetime(2026, 1, 10, tzinfo=UTC)) == datetime(2026, 1, 10, 8, tzinfo=UTC)
    assert berlin.after(datetime(2026, 7, 10, tzinfo=UTC)) == datetime(2026, 7, 10, 7, tzinfo=UTC)
    # 02:30 does not exist on 29 March 2026 in Berlin: Debian cron runs it at 03:00 CEST.
    night = check_period("30 2 * * *", None, "Europe/Berlin")
    assert night.after(datetime(2026, 3, 28, 12, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, tzinfo=UTC
    )
    assert night.describe() == "cron 30 2 * * * (Europe/Berlin)"


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    half = check_period(None, 0.5)
    assert half.latest(T + timedelta(seconds=0.7)) == T + timedelta(seconds=0.5)
    assert half.after(T + timedelta(seconds=0.5)) == T + timedelta(seconds=1)
    minute = check_period(None, timedelta(minutes=1))
    assert minute == Period(every=60.0)
    assert minute.after(T + timedelta(seconds=1)) == T + timedelta(minutes=1)
    assert minute.describe() == "every 60s"


@given(
    st.floats(min_value=0.001, max_value=86_400.0),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
)
def test_every_latest_and_after_bracket_the_moment(every: float, naive: datetime) -> None:
    moment = naive.replace(tzinfo=UTC)
    period = check_period(None, every)
    latest, following = period.latest(moment), period.after(moment)
    assert latest <= moment < following
    step = round(every * 1_000_000)
    assert (following - latest) // US == step
    assert ((latest - EPOCH) // US) % step == 0
    assert period.after(latest) == following


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_cron_latest_and_after_bracket_the_moment(naive: datetime) -> None:
    moment = naive.replace(tzinfo=UTC)
    period = check_period("*/7 3-20 * * 1-5", None, "America/New_York")
    latest, following = period.latest(moment), period.after(moment)
    assert latest <= moment < following
    assert period.after(latest) == following
    assert period.latest(following - US) == latest


@pytest.mark.parametrize(
    ("cron", "every", "timezone", "message"),
    [
        (None, None, None, "either cron= or every="),
        ("* * * * *", 5, None, "either cron= or every="),
        ("* * * *", None, None, "not valid: Wrong number of fields"),
        ("0 0 31 2 *", None, None, "not valid"),
        ("61 * * * *", None, None, "not valid"),
        ("", None, None, "cron must not be empty"),
        (5, None, None, "cron must be a str"),
        ("* * * * *", None, "Mars/Olympus", "unknown timezone"),
        ("* * * * *", None, "../etc/passwd", "unknown timezone"),
        (None, 0, None, "at least 0.001"),
        (None, -1.0, None, "at least 0.001"),
        (None, float("nan"), None, "at least 0.001"),
        (None, True, None, "at least 0.001"),
        (None, "5", None, "at least 0.001"),
        (None, 5, "Europe/Berlin", "applies to cron= only"),
    ],
)
def test_bad_periods_are_refused(
    cron: object, every: object, timezone: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_period(cron, every, timezone)


def test_cron_is_kept_with_its_blanks_normalised() -> None:
    assert check_period("  0   *  * * *\t", None).cron == "0 * * * *"
    assert check_period(None, 5, "UTC") == Period(every=5.0)


def test_plan_enqueues_the_due_tick_or_only_the_latest_missed_one() -> None:
    minute = check_period("* * * * *", None)
    on_time = plan(minute, T, T + timedelta(seconds=2))
    assert on_time == Plan(T, T + timedelta(minutes=1), skipped=False)
    # No node ran for an hour and a half: one task, for the latest tick; the next is ahead.
    late = plan(minute, T, T + timedelta(minutes=90, seconds=30))
    assert late == Plan(T + timedelta(minutes=90), T + timedelta(minutes=91), skipped=True)
    # A next tick off the period's grid (the period changed meanwhile) is still enqueued.
    odd = T + timedelta(seconds=30)
    assert plan(minute, odd, odd) == Plan(odd, T + timedelta(minutes=1), skipped=False)
