"""The demo's story: what it does to the tasks while they run, one ``Step`` after the other.

Each step waits for its moment (a task reaching a state, some time passing), acts through the
client node, tells what it did, and moves on; a step whose moment has passed — the task ended
already — is skipped. ``Story.advance`` is called at every look at the tasks.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import assert_never

from .._models import State, Task
from .._node import Node
from ..samples import CELL_GROUP_PREFIX
from .errors import DemoFailed
from .workers import Workers

RESUME_AFTER = 1.5
"""Seconds the paused task stays PAUSED before the story resumes it."""
PAUSE_AT = 3
"""The element of bob's dot product at which the story pauses it."""
MOVE_TO = "math"
"""The group the story moves alice's waiting dot product to."""

_SHORT_STATE = {
    State.INIT: "init",
    State.PENDING: "pend",
    State.RUNNING: "run",
    State.CANCELING: "canc",
    State.PAUSED: "PAUSED",
    State.FINISHED: "done",
    State.FAILED: "FAILED",
    State.DELETING: "del",
}
_ENDED = (State.FINISHED, State.FAILED)


class Step(enum.Enum):
    """The steps of the story, in order; each value says what the step waits for and does."""

    PAUSE = f"once bob's dot product runs at element {PAUSE_AT}, pause it"
    PAUSED = f"once it is PAUSED, move alice's waiting dot product to the group {MOVE_TO!r}"
    MOVED = "once a worker has claimed the moved task, say where it runs"
    RESUME = f"{RESUME_AFTER} s after the pause, resume bob's dot product"
    RESUMED = "once it runs again, say from which element (its checkpoint)"
    HAND_OFF = "stop the busiest worker with SIGTERM"
    HANDING_OFF = "say where each of its tasks resumed, once it has"
    DONE = "nothing more: the tasks finish"


def progress(task: Task) -> tuple[int, int]:
    """How far a sample task has got: elements (``dot``) or cells (``matmul``) done, of all."""
    state = json.loads(task.context)
    if task.type == "matmul":
        total = len(state["a"]) * len(state["b"][0])
        return (total if task.state is State.FINISHED else state.get("done", 0)), total
    return state.get("i", 0), len(state["a"])


def is_cell(task: Task) -> bool:
    """Whether the task is a cell (``dot`` task) of a matrix multiply."""
    return task.group.startswith(CELL_GROUP_PREFIX)


def status(task: Task, workers: Workers) -> str:
    """The task's state in short, with the worker that runs it: ``run@w2``."""
    short = _SHORT_STATE[task.state]
    if task.node is not None and task.state in (State.RUNNING, State.CANCELING):
        return f"{short}@w{_number(workers, task.node)}"
    return short


def _number(workers: Workers, node: int | None) -> str:
    number = workers.number(node)
    return "?" if number is None else str(number)


def _runs(task: Task) -> list[list[int]]:
    """The ``[node, step]`` pairs a sample task stores for each of its starts."""
    runs: list[list[int]] = json.loads(task.context).get("runs", [])
    return runs


@dataclass
class Story:
    """Where the story has got to, with alice's dot product that waits in the paused group
    ``batch`` (``moved``) and bob's dot product (``paused``)."""

    say: Callable[[str], None]
    workers: Workers
    moved: int
    paused: int
    step: Step = Step.PAUSE
    paused_since: float = 0.0
    handed_off: dict[int, int] = field(default_factory=dict)
    """Task id → its number of runs when its worker was told to stop."""
    reported: set[int] = field(default_factory=set)
    old_worker: int = 0

    @property
    def done(self) -> bool:
        return self.step is Step.DONE

    async def advance(self, client: Node, tasks: dict[int, Task]) -> None:
        """Play the current step if its moment has come (``tasks``: every task, by id)."""
        moved, paused = tasks.get(self.moved), tasks.get(self.paused)
        if moved is None or paused is None:
            raise DemoFailed("a task of the demo disappeared")
        match self.step:
            case Step.PAUSE:
                self.step = await self._pause(client, paused)
            case Step.PAUSED:
                self.step = await self._move(client, moved, paused)
            case Step.MOVED:
                self.step = self._claimed(moved)
            case Step.RESUME:
                self.step = await self._resume(client, paused)
            case Step.RESUMED:
                self.step = self._resumed(paused)
            case Step.HAND_OFF:
                self.step = await self._hand_off(tasks)
            case Step.HANDING_OFF:
                self.step = self._report_moves(tasks)
            case Step.DONE:
                pass
            case unreachable:
                assert_never(unreachable)

    async def _pause(self, client: Node, paused: Task) -> Step:
        if paused.state in _ENDED:
            return Step.PAUSED  # past the moment: skip this part of the story
        if paused.state is not State.RUNNING or progress(paused)[0] < PAUSE_AT:
            return Step.PAUSE
        self.say(f">> pausing #{paused.id} (bob's dot product), now at step {progress(paused)[0]}")
        await client.pause_task(paused.id)
        return Step.PAUSED

    async def _move(self, client: Node, moved: Task, paused: Task) -> Step:
        ended = paused.state in _ENDED
        if paused.state is not State.PAUSED and not ended:
            return Step.PAUSED
        if not ended:
            self.paused_since = time.monotonic()
            self.say(f">> #{paused.id} is PAUSED, its checkpoint at step {progress(paused)[0]}")
        self.say(f">> moving #{moved.id} from the paused group 'batch' to group '{MOVE_TO}'")
        await client.change_task_group(moved.id, MOVE_TO)
        return Step.MOVED

    def _claimed(self, moved: Task) -> Step:
        if moved.state is State.PENDING:
            return Step.MOVED
        self.say(f">> #{moved.id} was claimed in group '{MOVE_TO}': {status(moved, self.workers)}")
        return Step.RESUME

    async def _resume(self, client: Node, paused: Task) -> Step:
        if time.monotonic() - self.paused_since <= RESUME_AFTER:
            return Step.RESUME
        if paused.state is State.PAUSED:
            self.say(f">> resuming #{paused.id}")
            await client.run_task(paused.id)
        return Step.RESUMED

    def _resumed(self, paused: Task) -> Step:
        if paused.state in _ENDED:
            return Step.HAND_OFF
        if paused.state is not State.RUNNING:
            return Step.RESUMED
        runs = _runs(paused)
        self.say(
            f">> #{paused.id} runs again on worker {_number(self.workers, paused.node)} from step "
            f"{runs[-1][1] if runs else '?'}, not from the start"
        )
        return Step.HAND_OFF

    async def _hand_off(self, tasks: dict[int, Task]) -> Step:
        running: dict[int, list[Task]] = {}
        for task in tasks.values():
            if task.state is State.RUNNING and task.node is not None:
                running.setdefault(task.node, []).append(task)
        alive = self.workers.alive()
        candidates = [n for n in running if self.workers.number(n) in alive]
        if not candidates or len(alive) < 2:
            self.say(">> no worker is running tasks: skipping the hand-off")
            return Step.DONE
        node = max(candidates, key=lambda n: len(running[n]))
        number = self.workers.number(node)
        assert number is not None
        self.old_worker = number
        self.handed_off = {t.id: len(_runs(t)) for t in running[node]}
        ids = " ".join(f"#{t}" for t in sorted(self.handed_off))
        self.say(f">> SIGTERM to worker {number} (node {node}), which runs {ids}")
        code = await self.workers.stop(number)
        self.say(
            f">> worker {number} exited with code {code} after handing its tasks back from their "
            "checkpoints"
        )
        if code != 0:
            raise DemoFailed(f"worker {number} exited with code {code}: {self.workers.log_tail()}")
        return Step.HANDING_OFF

    def _report_moves(self, tasks: dict[int, Task]) -> Step:
        for task_id, runs_before in self.handed_off.items():
            if task_id in self.reported:
                continue
            task = tasks.get(task_id)
            if task is None:
                self.reported.add(task_id)
                continue
            runs = _runs(task)
            if len(runs) > runs_before:
                node, step = runs[runs_before]
                what = "cells done" if task.type == "matmul" else "elements done"
                self.say(
                    f">> {_name(task)} moved from worker {self.old_worker} to worker "
                    f"{_number(self.workers, node)}, resuming from its checkpoint: "
                    f"{step}/{progress(task)[1]} {what}"
                )
                self.reported.add(task_id)
            elif task.state in _ENDED:
                self.say(f">> {_name(task)} finished on worker {self.old_worker} before it stopped")
                self.reported.add(task_id)
        return Step.DONE if len(self.reported) == len(self.handed_off) else Step.HANDING_OFF


def _name(task: Task) -> str:
    if is_cell(task):
        cell = tuple(json.loads(task.context).get("cell", "?"))
        return f"cell {cell} of #{task.group.removeprefix(CELL_GROUP_PREFIX)} (task #{task.id})"
    return f"#{task.id} ({task.type}, {task.user})"
