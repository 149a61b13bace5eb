"""Named SQL queries: each driver's statements, read from the ``queries.sql`` file in its own
folder (``postgresql/queries.sql``, ``sqlite/queries.sql``).

A file is a list of blocks, each opened by a ``-- name: <name>`` line; the comment lines right
after it document the query, and the rest of the block, up to the next ``-- name:``, is its
SQL. In the SQL, ``{tasks}``, ``{nodes}``, ``{groups}``, ``{task_types}``, ``{schedules}``
and ``{versions}`` stand for the tables (qualified by the schema, where the database has
schemas), ``{<name>}`` for another block of the same file (a fragment, such as SQLite's clock),
and ``{order_by}`` for the scheduling policy's ``ORDER BY``, filled in when the statement is
used. So is ``{queues}``, in MySQL's ``claim`` and ``claim_window`` alone: one copy of the
block ``<name>_queue`` per queue the claim reads (per group its window reaches), joined by
``UNION ALL``, each with ``{n}`` its number (MariaDB has no ``LATERAL``, and a subquery of its
own per queue is how a claim reads no more than the first tasks of each queue:
docs/design.md §16.1).
Nothing else is assembled: each statement reads top to bottom in its file.
"""

from __future__ import annotations

import re
from importlib import resources

import sqlalchemy as sa

from .._schema import GROUPS, NODES, SCHEDULES, TASK_TYPES, TASKS, VERSIONS

_NAME = re.compile(r"^-- name: (\w+)[ \t]*$", re.MULTILINE)
_SLOT = re.compile(r"\{(\w+)\}")
RUNTIME_SLOTS = frozenset({"order_by", "queues", "n"})
"""Slots filled in when a statement is used, not when the file is read."""


def parse(text: str) -> dict[str, str]:
    """The blocks of a queries file: name → SQL, without comment lines or surrounding space."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


class Queries:
    """The named statements of one driver, with its tables filled in; ``statement(name)`` gives
    the SQLAlchemy ``text()`` to execute (built once and cached)."""

    def __init__(self, dialect: str, schema_prefix: str = "") -> None:
        text = resources.files(__package__).joinpath(dialect, "queries.sql").read_text("utf-8")
        raw = parse(text)
        tables = {
            "tasks": TASKS,
            "nodes": NODES,
            "groups": GROUPS,
            "task_types": TASK_TYPES,
            "schedules": SCHEDULES,
            "versions": VERSIONS,
        }
        tables = {key: schema_prefix + name for key, name in tables.items()}

        def expand(sql: str, seen: tuple[str, ...]) -> str:
            def slot(match: re.Match[str]) -> str:
                key = match.group(1)
                if key in tables:
                    return tables[key]
                if key in RUNTIME_SLOTS:
                    return match.group(0)
                if key in seen or key not in raw:
                    raise ValueError(f"{dialect}/queries.sql: unknown or circular {{{key}}}")
                return expand(raw[key], (*seen, key))

            return _SLOT.sub(slot, sql)

        self.dialect = dialect
        self.sql = {name: expand(sql, (name,)) for name, sql in raw.items()}
        self._statements: dict[tuple[str, str, int], sa.TextClause] = {}

    def statement(self, name: str, *, order_by: str = "", queues: int = 0) -> sa.TextClause:
        key = (name, order_by, queues)
        statement = self._statements.get(key)
        if statement is None:
            sql = self.sql[name]
            if "{queues}" in sql:
                if queues <= 0:
                    raise ValueError(f"query {name!r} needs its number of queues")
                branch = self.sql[f"{name}_queue"]
                copies = (branch.replace("{n}", str(n)) for n in range(queues))
                sql = sql.replace("{queues}", "\nUNION ALL\n".join(copies))
            if "{order_by}" in sql:
                if not order_by:
                    raise ValueError(f"query {name!r} needs an order_by")
                sql = sql.replace("{order_by}", order_by)
            statement = self._statements[key] = sa.text(sql)
        return statement
