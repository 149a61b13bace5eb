"""Migrations: the SQL files shipped per dialect
(``_backends/<dialect>/migrations/NNNN_name.sql``), the splitting of a file into statements, and
the schema version checks.

A migration file is plain SQL for its dialect, run statement by statement in one transaction
(``SqlDriver.migrate``) and recorded in the versions table. The versions need not be
contiguous: a migration is applied when its version is not recorded yet, whatever the newest
version recorded (branches developed side by side number their migrations apart, and a
database migrated by one of them still gets the other's once they are merged).

``split_sql`` knows enough of SQL's lexical rules to cut only at a statement's own semicolon:
not inside a quoted string or identifier, a comment, a PostgreSQL dollar-quoted body
(functions, ``DO`` blocks), or the ``BEGIN … END`` body of an SQLite trigger.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from importlib import resources

from .._errors import SchemaError
from .._schema import SCHEMA_VERSION

_TOKEN = re.compile(
    r"""
      (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*.*?\*/)
    | (?P<string>'(?:[^']|'')*')
    | (?P<identifier>"(?:[^"]|"")*")
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$)
    | (?P<word>[A-Za-z_][A-Za-z_0-9]*)
    | (?P<semicolon>;)
    """,
    re.VERBOSE | re.DOTALL,
)
_OPENS_BLOCK = frozenset({"BEGIN", "CASE"})
"""Inside a trigger body, words that an ``END`` closes."""


def split_sql(sql: str) -> list[str]:
    """The statements of ``sql``, without their final semicolons, comments kept inside them.

    >>> split_sql("CREATE TABLE t (a text DEFAULT 'x;y'); -- done; really\\nSELECT 1;")
    ["CREATE TABLE t (a text DEFAULT 'x;y')", '-- done; really\\nSELECT 1']
    """
    statements: list[str] = []
    start = 0
    words: list[str] = []  # the statement's first words, to recognise CREATE TRIGGER
    depth = 0  # open BEGIN/CASE blocks of a trigger body
    position = 0
    while True:
        match = _TOKEN.search(sql, position)
        if match is None:
            break
        position = match.end()
        kind = match.lastgroup
        if kind == "dollar":
            # A dollar-quoted body runs to the same tag: $$ … $$ or $fn$ … $fn$.
            end = sql.find(match.group("dollar"), position)
            if end < 0:
                raise ValueError("unterminated dollar-quoted string in a migration")
            position = end + len(match.group("dollar"))
        elif kind == "word":
            word = match.group("word").upper()
            if len(words) < 3:
                words.append(word)
            if _is_trigger(words):
                if word in _OPENS_BLOCK:
                    depth += 1
                elif word == "END":
                    depth -= 1
        elif kind == "semicolon" and depth <= 0:
            _append(statements, sql[start : match.start()])
            start = position
            words = []
            depth = 0
    _append(statements, sql[start:])
    return statements


def _is_trigger(words: list[str]) -> bool:
    return words[:2] == ["CREATE", "TRIGGER"] or (
        words[:1] == ["CREATE"]
        and words[1:2] in (["TEMP"], ["TEMPORARY"])
        and words[2:3] == ["TRIGGER"]
    )


def _append(statements: list[str], text: str) -> None:
    """Add ``text`` unless it holds nothing but blanks and comments."""
    stripped = text.strip()
    if _TOKEN.sub(
        lambda m: "" if m.lastgroup in ("line_comment", "block_comment") else m.group(), stripped
    ).strip():
        statements.append(stripped)


def migration_files(dialect: str) -> list[tuple[int, str]]:
    """The migrations shipped for ``dialect``, as (version, SQL), in version order."""
    folder = resources.files(__package__) / dialect / "migrations"
    return sorted(
        (int(entry.name.split("_", 1)[0]), entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )


def missing_versions(shipped: Iterable[int], applied: Collection[int]) -> list[int]:
    """The shipped versions not applied yet, in order: gaps in either list are fine.

    >>> missing_versions([1, 2, 4], [1, 2])
    [4]
    >>> missing_versions([1, 2, 3, 4], [1, 2, 4])
    [3]
    """
    return sorted(set(shipped) - set(applied))


def refuse_newer(version: int) -> None:
    """Raise ``SchemaError`` for a schema newer than this library."""
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, newer than this library's "
            f"{SCHEMA_VERSION}: upgrade aioasync-tasks"
        )


def check_version(applied: Collection[int] | None, shipped: Iterable[int]) -> None:
    """Raise ``SchemaError`` unless every shipped migration is applied (``applied``: the
    versions recorded, None when the tables are missing) and none newer than this library."""
    if applied is None:
        raise SchemaError(
            "the aioasync_tasks tables are missing: run `aioasync-tasks migrate`, "
            "`await node.migrate()`, or start the node with auto_migrate=True"
        )
    version = max(applied, default=0)
    refuse_newer(version)
    missing = missing_versions(shipped, applied)
    if missing:
        raise SchemaError(
            f"the database schema is version {version}, older than this library's "
            f"{SCHEMA_VERSION} (migrations {', '.join(map(str, missing))} are not applied): "
            "run `aioasync-tasks migrate`"
        )
