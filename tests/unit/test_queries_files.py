"""The ``queries.sql`` files of the drivers: the same statements in each, every slot known, and
the state names written in them real states."""

from __future__ import annotations

import re

import pytest

from aioasync_tasks import State
from aioasync_tasks._backends._migrations import migration_files
from aioasync_tasks._backends._queries import Queries, parse
from aioasync_tasks._schema import LIVE_STATES_SQL, MYSQL_LIVE_KEY
from aioasync_tasks._states import LIVE_STATES

DIALECTS = ("postgresql", "sqlite", "mysql")
ONLY = {
    "postgresql": {
        "migration_lock",
        "notify",
        "insert_task_and_wake",
        "insert_tasks_and_wake",
        "update_tasks",
        "batch_row",
        "queue_order",
        "lock_unique_keys",
        "prune_lock",
        "watch_tasks",
        "claim_at_once",
        "claim_walk",
        "claim_take",
        "claim_update",
        "limited_groups",
        "watched_events",
        "complete_at_once",
        "checkpoint_at_once",
        "claim_cleanups_at_once",
    },
    "sqlite": {"now"},
    "mysql": {
        "now",
        "node_registered",
        "migration_lock",
        "migration_unlock",
        "lock_limited_groups",
        "claim_groups",
        "claim_window",
        "claim_window_queue",
        "next_due",
        "claim_queues",
        "claim_queue",
        "lock_claims",
        "take_claims",
        "take_cleanups",
        "claimed_rows",
        "lock_checkpoints",
        "unique_key_locks",
        "unique_key_unlocks",
        "prune_lock",
        "prune_unlock",
        "get_schedule",
    },
}
"""Statements one database has and the others do without (locks, notifications, fragments,
and the steps of MySQL's claims and checkpoints, which have no UPDATE … RETURNING, nor LATERAL
on MariaDB)."""
OWN_PARAMETERS = {
    "mysql": {"claim_prepare", "claim", "claim_cleanups", "migration_lock"},
}
"""Statements whose driver binds parameters of its own: ``MysqlDriver`` overrides the claims
(``claim_prepare`` only fences, ``claim`` only chooses, ``claim_cleanups`` only locks; the other
steps are statements of their own) and its migration lock waits with a timeout."""


def test_every_database_defines_the_same_statements() -> None:
    names = {d: set(Queries(d).sql) - ONLY[d] for d in DIALECTS}
    assert names["postgresql"] == names["sqlite"] == names["mysql"]
    assert {"claim", "claim_cleanups", "checkpoint", "update_task"} <= names["sqlite"]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("other", DIALECTS)
def test_statements_bind_the_same_parameters(dialect: str, other: str) -> None:
    """Each statement takes the parameters the driver binds for it, in every database."""
    mine, theirs = Queries(dialect).sql, Queries(other).sql
    own = OWN_PARAMETERS.get(dialect, set()) | OWN_PARAMETERS.get(other, set())
    for name in set(mine) & set(theirs) - own:
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


def test_the_queues_slot_repeats_the_queue_block() -> None:
    """MySQL's claim reads each queue with a subquery of its own (docs/design.md §16.1)."""
    queries = Queries("mysql")
    claim = str(queries.statement("claim", order_by="id", queues=3))
    assert claim.count("UNION ALL") == 2
    assert ":group_2" in claim
    assert "{" not in claim
    with pytest.raises(ValueError, match="number of queues"):
        queries.statement("claim", order_by="id")


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
    if dialect == "mysql":
        # No partial index: the generated live_key holds the predicate, the lookups use it,
        # and an insert is refused by the unique index itself (docs/design.md §16.1).
        (migration,) = [sql for version, sql in migration_files("mysql") if version == 3]
        generated = f"{MYSQL_LIVE_KEY} VARCHAR(200) GENERATED ALWAYS AS (CASE WHEN state IN"
        assert f"{generated} ({LIVE_STATES_SQL}) THEN unique_key END) STORED" in migration
        assert f"UNIQUE INDEX aioasync_tasks_unique_idx (type, {MYSQL_LIVE_KEY})" in migration
        for name in ("lock_unique_task", "unique_holder"):
            assert f"{MYSQL_LIVE_KEY} = " in sql[name], name
        return
    for name in ("insert_unique_task", "lock_unique_task", "unique_holder"):
        assert f"state IN ({LIVE_STATES_SQL})" in sql[name], name
