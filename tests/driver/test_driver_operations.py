"""Driver conformance: user operations (``operate``), one test per operation, each over every
cell of the state table (``_states`` module docstring): a task is brought into every starting
situation through driver operations, the operation is applied, and the driver's answer and row
are compared with what ``apply_operation`` says, including ``InvalidTransition``.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

import pytest

from aioasync_tasks import InvalidTransition, Operation, TaskNotFound
from aioasync_tasks._backends._driver import Driver, OperateParams, OperationResult
from aioasync_tasks._states import apply_operation
from driver._driverkit import (
    Problems,
    Start,
    describe,
    every_start,
    expected_view,
    make,
    make_many,
    register,
    run_at_problem,
    snapshot,
    view,
)

MOVED = "moved"
"""The group a change-group operation moves tasks to."""


@pytest.mark.parametrize(
    ("operation", "force"),
    [
        (Operation.RUN, False),
        (Operation.PAUSE, False),
        (Operation.DELETE, False),
        (Operation.DELETE, True),
        (Operation.CHANGE_GROUP, False),
    ],
    ids=["run", "pause", "delete", "delete-force", "change-group"],
)
async def test_operate_follows_the_state_table(
    driver: Driver, operation: Operation, force: bool
) -> None:
    node = await register(driver)
    group = MOVED if operation is Operation.CHANGE_GROUP else None
    made = await make_many(driver, node, every_start())
    before = await snapshot(driver)
    results: dict[int, OperationResult | InvalidTransition] = {}
    for m in made:
        try:
            results[m.id] = await driver.operate(
                OperateParams(m.id, operation, force=force, group=group)
            )
        except InvalidTransition as exc:
            results[m.id] = exc
    after = await snapshot(driver)

    problems = Problems()
    for m in made:
        cell = f"{operation.value}{' (force)' if force else ''} on {describe(m.want)}"
        result = results[m.id]
        try:
            expected = apply_operation(
                m.start.state,
                m.start.requested,
                operation,
                has_cleanup=m.want.has_cleanup,
                force=force,
                task_id=m.id,
            )
        except InvalidTransition:
            ok = isinstance(result, InvalidTransition)
            problems.check(ok, cell, f"gave {result}, not InvalidTransition")
            if isinstance(result, InvalidTransition):
                names = (result.task_id, result.state, result.operation)
                wanted = (m.id, m.start.state, operation)
                problems.check(names == wanted, cell, f"InvalidTransition names {names}")
            problems.check(after.get(m.id) == before[m.id], cell, "an invalid operation wrote")
            continue
        if isinstance(result, InvalidTransition):
            problems.check(False, cell, f"raised InvalidTransition, not {expected}")
            continue
        problems.check(result.outcome == expected, cell, f"outcome {result.outcome}")
        problems.check(result.owner == before[m.id].node, cell, f"owner {result.owner}")
        if not expected.changed and group is None:
            problems.check(after.get(m.id) == before[m.id], cell, "a no-op changed the row")
            continue
        wanted_row = expected_view(before[m.id], expected, owner=before[m.id].node, group=group)
        got = view(after.get(m.id))
        problems.check(got == wanted_row, cell, f"row {got}, not {wanted_row}")
        wrong_run_at = run_at_problem(before[m.id], after.get(m.id), expected)
        problems.check(wrong_run_at is None, cell, str(wrong_run_at))
    problems.assert_none()


async def test_operate_on_a_missing_task_raises_task_not_found(driver: Driver) -> None:
    made = await make(driver, await register(driver), Start.PENDING)
    for operation in Operation:
        with pytest.raises(TaskNotFound) as caught:
            await driver.operate(OperateParams(made.id + 1000, operation))
        assert caught.value.task_id == made.id + 1000
