"""Driver conformance: the task types table (docs/design.md §4.6) — ``register_task_types``
and ``get_task_types``.

The suite, and how a new driver uses it: ``conftest.py``.
"""

from __future__ import annotations

from aioasync_tasks._backends._driver import (
    Driver,
    RegisterTypesParams,
    StoredTaskType,
    TaskTypesQuery,
)


async def test_task_types_are_stored_and_updated_by_name(driver: Driver) -> None:
    assert await driver.get_task_types(TaskTypesQuery()) == []
    await driver.register_task_types(RegisterTypesParams(()))
    await driver.register_task_types(
        RegisterTypesParams((StoredTaskType("b", 3, True), StoredTaskType("a", 1, False)))
    )
    stored = await driver.get_task_types(TaskTypesQuery())
    assert [(t.name, t.max_attempts, t.has_cleanup) for t in stored] == [
        ("a", 1, False),
        ("b", 3, True),
    ]
    assert all(t.updated_at is not None for t in stored)
    first_b = stored[1]

    # Another worker, another version of "b": the last to register wins.
    await driver.register_task_types(RegisterTypesParams((StoredTaskType("b", 5, False),)))
    (b,) = await driver.get_task_types(TaskTypesQuery(names=("b", "missing")))
    assert (b.max_attempts, b.has_cleanup) == (5, False)
    assert b.updated_at is not None
    assert first_b.updated_at is not None
    assert b.updated_at >= first_b.updated_at
    assert await driver.get_task_types(TaskTypesQuery(names=())) == []
