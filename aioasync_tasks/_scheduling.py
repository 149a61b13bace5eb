"""Scheduling policies: the order in which a node claims due tasks (docs/explanation.md,
"Claims").

A claim considers the (group, user) queues of due PENDING tasks of its window (up to 64 queues,
every queue when there are no more; the next claim's window goes on from there:
docs/design.md §6.3) that their group's state allows — the group is not paused, and neither
``max_running`` of the group nor ``max_running_per_user`` of that user is reached — and orders
the candidates by the policy's ``order_by``. Limits are then applied to the ordered
candidates, so a batch never overshoots them.

``order_by`` is an SQL ``ORDER BY`` list over these candidate columns:

- ``handoff`` — true for a task handed back by a node's graceful shutdown;
- ``priority`` — higher first in the built-in policies;
- ``id`` — creation order;
- ``run_at`` — when the task became due;
- ``group_name``, ``user_name``;
- ``user_running`` — how many tasks this user runs in this group right now (all nodes);
- ``user_rank`` — the task's place in its own (group, user) queue: 1, 2, 3, … in the queue's
  order ``handoff DESC, priority DESC, id``.

The order must agree with each queue's own order (a queue's first task sorts before its
second, and so on): any key that, within one (group, user) queue, only grows along
``handoff DESC, priority DESC, id`` does. That is what lets a claim look at the first few tasks
of each queue instead of the whole backlog.

Policies are trusted code: ``order_by`` is put into SQL as written.
"""

from __future__ import annotations

from typing import ClassVar, LiteralString


class SchedulingPolicy:
    """Base of scheduling policies: subclass it and set ``order_by`` (see the module
    documentation for the columns and the one rule it must follow)."""

    order_by: ClassVar[LiteralString]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FairShare(SchedulingPolicy):
    """The default: hand-offs first, then higher priority; among equal priority the user with
    the fewest running tasks in that group goes first (counting what this claim gives it), so
    one user's backlog never starves another's; then oldest first."""

    order_by = "handoff DESC, priority DESC, user_running + user_rank, id"


class Fifo(SchedulingPolicy):
    """Hand-offs first, then higher priority, then oldest first, whoever the user."""

    order_by = "handoff DESC, priority DESC, id"
