"""The services of a node that runs tasks (docs/design.md §8.2), one module each:

- ``state`` — ``NodeConfig`` and ``NodeState``, the one object the services share: the node's
  id, its executions, its lease, the wake-up and stop events;
- ``claimer`` — claims due tasks and cleanups for the free slots and starts their executions;
- ``heartbeat`` — the node's row and lease, the lease watchdog, fencing, reconciliation, the
  delivery of stop requests and the stop poll;
- ``rescuer`` — releases the tasks of dead nodes;
- ``listener`` — LISTEN on PostgreSQL: wake-ups and stop requests;
- ``runtime`` — ``NodeRuntime``, which registers the node, runs the services (and the
  committer, ``_committer``) supervised, stops gracefully and deregisters; ``Services``, what
  ``Node.services`` shows of them.

Each service has ``run()``, its loop, and ``run_once()``, one round of it, for tests. This
package's ``__init__`` imports nothing.
"""
