"""Where a claim's walk of the queues goes on (``ClaimWindow.advance``, docs/design.md §6.3):
after the last queue it took from when it took all it could, after everything it looked at
when it came back short; each group keeps its own place."""

from __future__ import annotations

from aioasync_tasks._backends._driver import ClaimCursor, Claimed
from aioasync_tasks._backends._sqldriver import MAX_CURSOR_GROUPS, ClaimWindow


def _claimed(group: str, user: str) -> Claimed:
    return Claimed(
        id=1,
        type="t",
        user=user,
        group=group,
        context="{}",
        attempts=1,
        max_attempts=1,
        token=1,
    )


WINDOW = ClaimWindow([("a", "u1"), ("a", "u2"), ("b", "u1"), ("b", "u2"), ("c", "u1")], True)


def test_a_full_claim_goes_on_after_the_last_queue_it_took_from() -> None:
    """Took a/u2 and b/u1: group a goes on after u2 (u1 was passed by), b after u1 (u2 is
    looked at again), c keeps its place, and the next walk starts after group b."""
    before = ClaimCursor("z", {"c": "u0"})
    after = WINDOW.advance(before, [_claimed("a", "u2"), _claimed("b", "u1")], limit=2)
    assert after == ClaimCursor("b", {"a": "u2", "b": "u1", "c": "u0"})


def test_a_short_claim_goes_on_after_everything_it_looked_at() -> None:
    after = WINDOW.advance(ClaimCursor(), [_claimed("a", "u1")], limit=10)
    assert after == ClaimCursor("c", {"a": "u2", "b": "u2", "c": "u1"})


def test_an_empty_window_keeps_the_cursor() -> None:
    before = ClaimCursor("a", {"a": "u1"})
    assert ClaimWindow([], full=False).advance(before, [], limit=10) is before


def test_the_cursor_keeps_a_bounded_number_of_groups() -> None:
    many = ClaimCursor("g", {f"g{i}": "u" for i in range(MAX_CURSOR_GROUPS)})
    after = WINDOW.advance(many, [], limit=10)
    assert after == ClaimCursor("c", {"a": "u2", "b": "u2", "c": "u1"})
