"""``split_sql``: migration files are cut into statements only at a statement's own semicolon,
and every shipped migration splits into statements the database accepts (the schema tests run
them)."""

from __future__ import annotations

import re

import pytest

from aioasync_tasks._backends._migrations import migration_files, split_sql
from aioasync_tasks._schema import SCHEMA_VERSION


def test_plain_statements() -> None:
    assert split_sql("CREATE TABLE a (x int);\nCREATE INDEX i ON a (x);\n") == [
        "CREATE TABLE a (x int)",
        "CREATE INDEX i ON a (x)",
    ]


def test_semicolons_inside_strings_identifiers_and_comments() -> None:
    sql = (
        "INSERT INTO t VALUES ('a;b', 'it''s; fine');\n"
        'CREATE TABLE "odd;name" (x int); -- a comment; with a semicolon\n'
        "/* block; comment */ SELECT 1;"
    )
    assert split_sql(sql) == [
        "INSERT INTO t VALUES ('a;b', 'it''s; fine')",
        'CREATE TABLE "odd;name" (x int)',
        "-- a comment; with a semicolon\n/* block; comment */ SELECT 1",
    ]


def test_postgresql_dollar_quoted_bodies() -> None:
    sql = (
        "CREATE FUNCTION f() RETURNS trigger AS $$ BEGIN NEW.x := 1; RETURN NEW; END; $$"
        " LANGUAGE plpgsql;\n"
        "DO $body$ BEGIN PERFORM 1; END $body$;\n"
        "SELECT 2;"
    )
    assert split_sql(sql) == [
        "CREATE FUNCTION f() RETURNS trigger AS $$ BEGIN NEW.x := 1; RETURN NEW; END; $$"
        " LANGUAGE plpgsql",
        "DO $body$ BEGIN PERFORM 1; END $body$",
        "SELECT 2",
    ]


def test_sqlite_trigger_bodies() -> None:
    sql = (
        "CREATE TRIGGER t AFTER UPDATE ON a BEGIN\n"
        "  UPDATE b SET y = CASE WHEN NEW.x > 0 THEN 1 ELSE 0 END;\n"
        "  DELETE FROM c;\n"
        "END;\n"
        "CREATE TEMP TRIGGER u AFTER INSERT ON a BEGIN SELECT 1; END;\n"
        "SELECT 3"
    )
    assert split_sql(sql) == [
        "CREATE TRIGGER t AFTER UPDATE ON a BEGIN\n"
        "  UPDATE b SET y = CASE WHEN NEW.x > 0 THEN 1 ELSE 0 END;\n"
        "  DELETE FROM c;\n"
        "END",
        "CREATE TEMP TRIGGER u AFTER INSERT ON a BEGIN SELECT 1; END",
        "SELECT 3",
    ]


def test_blank_and_comment_only_pieces_are_dropped() -> None:
    assert split_sql("-- header\n\n;;  ; /* nothing */ ;\n") == []


def test_an_unterminated_dollar_quote_is_refused() -> None:
    with pytest.raises(ValueError, match="dollar-quoted"):
        split_sql("SELECT $$ never closed;")


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_every_shipped_migration_splits_into_whole_statements(dialect: str) -> None:
    files = migration_files(dialect)
    versions = [version for version, _ in files]
    # Increasing, not necessarily contiguous (_migrations.missing_versions), up to the
    # library's version (which may be another database's: _schema.SCHEMA_VERSION).
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    assert versions[-1] <= SCHEMA_VERSION
    for _, sql in files:
        statements = split_sql(sql)
        assert statements
        for statement in statements:
            code = re.sub(r"^(\s*(--[^\n]*|/\*.*?\*/))*\s*", "", statement, flags=re.DOTALL)
            verbs = {"CREATE", "ALTER", "DROP", "UPDATE", "INSERT", "DELETE"}
            assert code.split()[0].upper() in verbs
