"""``aioasync-tasks demo``, the main job of the README: the sample tasks of
``aioasync_tasks.samples`` on worker processes, with live progress and a story played while they
run — a pause and resume, a move to another group, a hand-off between workers — then a summary
that checks every result.

``database`` finds and empties the demo's database, ``workers`` runs the worker processes,
``story`` is the sequence of steps, and ``show`` plays the whole demo.
"""

from .errors import DemoFailed
from .show import run_demo

__all__ = ["DemoFailed", "run_demo"]
