"""The ``queries.sql`` files of the drivers: the same statements in each, every slot known, and
the state names written in them real states."""

from __future__ import annotations

import re

import pytest

from aioasync_tasks import State
from aioasync_tasks._backends._queries import Queries, parse
from aioasync_tasks._schema import LIVE_STATES_SQL
from aioasync_tasks._states import LIVE_STATES

DIALECTS = ("postgresql", "sqlite")
ONLY = {
    "postgresql": {
        "migration_lock",
        "notify",
        "insert_task_and_wake",
        "lock_unique_keys",
        "prune_lock",
        "watch_tasks",
    },
    "sqlite": {"now"},
}
"""Statements one database has and the others do without (locks, notifications, fragments)."""


def test_every_database_defines_the_same_statements() -> None:
    names = {d: set(Queries(d).sql) - ONLY[d] for d in DIALECTS}
    assert names["postgresql"] == names["sqlite"]
    assert {"claim", "claim_cleanups", "checkpoint", "update_task"} <= names["sqlite"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_statements_bind_the_same_parameters(dialect: str) -> None:
    """Each statement takes the parameters the driver binds for it, in every database."""
    other = next(d for d in DIALECTS if d != dialect)
    mine, theirs = Queries(dialect).sql, Queries(other).sql
    for name in set(mine) & set(theirs):
        params = set(re.findall(r"(?<!:):(\w+)", mine[name]))
        other_params = set(re.findall(r"(?<!:):(\w+)", theirs[name]))
        if name in ("insert_tasks", "checkpoint", "register_task_types"):  # batches
            continue
        assert params == other_params, name


@pytest.mark.parametrize("dialect", DIALECTS)
def test_states_named_in_the_sql_are_states(dialect: str) -> None:
    text = " ".join(Queries(dialect).sql.values())
    named = set(re.findall(r"state (?:=|IN \() ?'(\w+)'", text))
    named |= set(re.findall(r"'(\w+)'\)", text)) & {s.value for s in State}
    assert named
    assert named <= {s.value for s in State}


def test_the_schema_and_order_by_slots_are_filled() -> None:
    queries = Queries("postgresql", '"s".')
    assert '"s".aioasync_tasks' in queries.sql["get_task"]
    claim = queries.statement("claim", order_by="id")
    assert "{" not in str(claim)
    with pytest.raises(ValueError, match="order_by"):
        queries.statement("claim")


def test_parse_reads_names_and_drops_comments() -> None:
    text = "-- header\n-- name: a\n-- doc\nSELECT 1\n\n-- name: b\nSELECT {a}\n"
    assert parse(text) == {"a": "SELECT 1", "b": "SELECT {a}"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_live_states_of_unique_keys_are_written_as_the_index_predicate(dialect: str) -> None:
    """docs/design.md §4.4: the statements that find a unique key's holder select exactly the
    states of ``LIVE_STATES``, with the unique index's own predicate (so that it is used)."""
    assert {State(s.strip(" '")) for s in LIVE_STATES_SQL.split(",")} == LIVE_STATES
    sql = Queries(dialect).sql
    for name in ("insert_unique_task", "lock_unique_task", "unique_holder"):
        assert f"state IN ({LIVE_STATES_SQL})" in sql[name], name
