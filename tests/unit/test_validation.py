"""Unit tests of ``aioasync_tasks._validation`` and ``aioasync_tasks._urls`` (no database).

``clean_error_text`` must turn ANY text into one every backend stores: no NUL, UTF-8 encodable,
at most ``limit`` characters, keeping the head and the tail. URL query parameters are checked,
converted and translated for asyncpg before any I/O; ``DatabaseError`` messages name what
failed and where, never the password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import make_url
from sqlalchemy.exc import DBAPIError

from aioasync_tasks import ConfigurationError, DatabaseError
from aioasync_tasks._backends._transaction import (
    database_error,
    describe_database,
    describe_exception,
)
from aioasync_tasks._urls import (
    POOLER_OPTION,
    TransactionPooler,
    _pg_connect_args,
    engine_from_url,
)
from aioasync_tasks._validation import (
    MAX_ERROR_LENGTH,
    MAX_NAME_LENGTH,
    check_context,
    check_name,
    check_schema,
    check_text,
    check_type_name,
    clean_error_text,
)

LONE = "\ud800"


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# -- text checks ------------------------------------------------------------------------------


def test_the_name_limit_is_200_characters() -> None:
    assert MAX_NAME_LENGTH == 200
    assert check_name("user", "u" * 200) == "u" * 200
    assert check_name("user", "\U0001f600" * 200)  # characters, not bytes
    with pytest.raises(ConfigurationError, match=r"^user must be at most 200 characters, not 201"):
        check_name("user", "u" * 201)
    with pytest.raises(ConfigurationError, match=r"^task type must be at most 200"):
        check_type_name("t" * 201)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a\x00b", "^group must not contain NUL characters$"),
        (f"a{LONE}b", r"^group is not valid Unicode: a lone surrogate '\\ud800' at index 1"),
        ("\udfff", "^group is not valid Unicode"),
        (5, "^group must be a str, not int$"),
        ("  ", "^group must not be empty$"),
    ],
)
def test_text_checks_name_the_argument(value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_text("group", value, allow_empty=False)


def test_valid_texts_pass_unchanged() -> None:
    for text in [
        "",
        "plain",
        "é",
        "\U0001f600",
        "\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16"),
        "tab\tnewline\n",
    ]:
        assert check_text("context", text, allow_empty=True) == text


def test_context_size_is_counted_in_utf8_bytes() -> None:
    assert check_context("é" * 5, 10) == "é" * 5
    with pytest.raises(ConfigurationError, match="context is 12 bytes"):
        check_context("é" * 6, 10)
    with pytest.raises(ConfigurationError, match=r"^context is not valid Unicode"):
        check_context(LONE, 10)


@pytest.mark.parametrize("schema", ["a", "_x", "Tenant_1", "a" * 63])
def test_plain_schemas(schema: str) -> None:
    assert check_schema(schema) == schema


@pytest.mark.parametrize(
    "schema", ["a :b", "a-b", "a.b", "1a", "", "a" * 64, "pg_temp", "ä", "a\x00", None]
)
def test_schemas_that_are_not_plain_identifiers(schema: Any) -> None:
    with pytest.raises(ConfigurationError, match="schema"):
        check_schema(schema)


# -- clean_error_text -------------------------------------------------------------------------


def test_clean_error_text_keeps_a_storable_text() -> None:
    text = "Traceback (most recent call last):\n  ValueError: é \U0001f600"
    assert clean_error_text(text) == text


def test_clean_error_text_shows_nul_as_an_escape() -> None:
    assert clean_error_text("a\x00b\x00") == "a\\x00b\\x00"


def test_clean_error_text_replaces_lone_surrogates() -> None:
    assert clean_error_text(f"a{LONE}b\udfff") == "a?b?"
    assert clean_error_text("\U0001f600") == "\U0001f600"  # a real pair stays


def test_clean_error_text_keeps_head_and_tail_of_a_long_text() -> None:
    text = "HEAD" + "x" * 1_000 + "TAIL"
    cleaned = clean_error_text(text, limit=100)
    assert len(cleaned) == 100
    assert cleaned.startswith("HEAD")
    assert cleaned.endswith("TAIL")
    head, marker, tail = cleaned.partition("\n… [")
    assert marker
    count = int(tail.split(" characters cut] …\n")[0])
    kept = len(head) + len(tail.split(" characters cut] …\n")[1])
    assert count + kept == len(text)


def test_clean_error_text_limit_edges() -> None:
    assert clean_error_text("x" * 100, limit=100) == "x" * 100
    assert clean_error_text("abcdefghij", limit=4) == "abcd"  # no room for a marker
    assert len(clean_error_text("x" * (MAX_ERROR_LENGTH * 3))) == MAX_ERROR_LENGTH
    assert len(clean_error_text("\x00" * 1000, limit=100)) == 100  # escapes count too
    for limit in (0, -1, True, 1.5):
        with pytest.raises(ConfigurationError):
            clean_error_text("x", limit=limit)  # type: ignore[arg-type]


def test_clean_error_text_takes_any_object() -> None:
    assert clean_error_text(ValueError("boom")) == "boom"  # type: ignore[arg-type]


@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0)), st.integers(1, 300))
def test_clean_error_text_always_stores(text: str, limit: int) -> None:
    cleaned = clean_error_text(text, limit=limit)
    assert _storable(cleaned)
    assert len(cleaned) <= limit
    if _storable(text) and len(text) <= limit:
        assert cleaned == text


# -- URL parameters ---------------------------------------------------------------------------


def test_libpq_parameters_are_translated_for_asyncpg() -> None:
    args = _pg_connect_args(
        {"sslmode": "verify-full", "connect_timeout": "2", "application_name": "billing"}
    )
    assert args == {
        "ssl": "verify-full",
        "timeout": 2.0,
        "server_settings": {"application_name": "billing"},
    }
    assert _pg_connect_args({"connect_timeout": "0"}) == {"timeout": None}  # libpq: no limit
    assert _pg_connect_args({"dbname": "db"}) == {"database": "db"}


def test_asyncpg_parameters_pass_converted() -> None:
    args = _pg_connect_args(
        {
            "ssl": "disable",
            "timeout": "1.5",
            "command_timeout": "30",
            "statement_cache_size": "0",
            "prepared_statement_cache_size": "0",
            "target_session_attrs": "read-write",
            "direct_tls": "false",
            "host": "ignored: SQLAlchemy reads it from the URL",
        }
    )
    assert args == {
        "ssl": "disable",
        "timeout": 1.5,
        "command_timeout": 30.0,
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "target_session_attrs": "read-write",
        "direct_tls": False,
    }


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmod=require", "unsupported PostgreSQL URL parameter 'sslmod'; accepted: "),
        ("options=-csearch_path%3Dx", "'options'"),
        ("sslrootcert=/ca.pem", "PGSSLROOTCERT"),
        ("sslcert=/c.pem", "PGSSLCERT"),
        ("sslmode=required", "sslmode='required': use one of disable, allow, prefer, require"),
        ("ssl=true", "ssl='true'"),
        ("connect_timeout=soon", "connect_timeout='soon'"),
        ("connect_timeout=inf", "connect_timeout='inf'"),
        ("timeout=0", "timeout='0': use a positive number"),
        ("command_timeout=nan", "command_timeout"),
        ("statement_cache_size=-1", "statement_cache_size='-1'"),
        ("prepared_statement_cache_size=many", "prepared_statement_cache_size"),
        ("target_session_attrs=master", "target_session_attrs"),
        ("direct_tls=maybe", "direct_tls"),
        ("sslmode=require&ssl=require", "'sslmode' and 'ssl' say the same"),
        ("connect_timeout=1&timeout=2", "'connect_timeout' and 'timeout'"),
        ("sslmode=require&sslmode=disable", "'sslmode' is given more than once"),
        ("server_settings=x", "'server_settings'"),
    ],
)
def test_bad_postgresql_url_parameters_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        engine_from_url(f"postgresql://u:secret@127.0.0.1:1/db?{query}")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pgbouncer=session", "pgbouncer='session': use pgbouncer=transaction"),
        ("pgbouncer=statement", "pgbouncer='statement': use pgbouncer=transaction"),
        ("listen_host=db", "'listen_host' is for pgbouncer=transaction"),
        ("listen_port=5432", "'listen_port' is for pgbouncer=transaction"),
        ("pgbouncer=transaction&listen_port=5432", "'listen_port' needs a listen_host"),
        ("pgbouncer=transaction&listen_host=db&listen_port=0", "listen_port='0': use a TCP"),
        ("pgbouncer=transaction&listen_host=db&listen_port=x", "listen_port='x'"),
        ("pgbouncer=transaction&pgbouncer=transaction", "'pgbouncer' is given more than once"),
        ("pgbouncer=transaction&statement_cache_size=100", "'statement_cache_size': pgbouncer"),
        (
            "pgbouncer=transaction&prepared_statement_cache_size=0",
            "'prepared_statement_cache_size': pgbouncer",
        ),
    ],
)
def test_bad_pooler_parameters_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        engine_from_url(f"postgresql://u:secret@127.0.0.1:1/db?{query}")


async def test_a_pooled_engine_names_its_pooler_and_the_direct_listen_address() -> None:
    engine = engine_from_url(
        "postgresql://u@pooler:6432/db?pgbouncer=transaction&listen_host=db&sslmode=require"
    )
    try:
        pooler = engine.get_execution_options()[POOLER_OPTION]
        assert isinstance(pooler, TransactionPooler)
        assert pooler.listen is not None
        assert (pooler.listen.url.host, pooler.listen.url.port) == ("db", 5432)
        assert pooler.listen.url.database == "db"
        _, connect_args = engine.dialect.create_connect_args(engine.url)
        assert connect_args["port"] == 6432
        polled = engine_from_url("postgresql://u@pooler:6432/db?pgbouncer=transaction")
        assert polled.get_execution_options()[POOLER_OPTION] == TransactionPooler(None)
        await polled.dispose()
        direct = engine_from_url("postgresql://u@db/db")
        assert POOLER_OPTION not in direct.get_execution_options()
        await direct.dispose()
    finally:
        await engine.dispose()


def test_an_unknown_parameter_is_named_with_the_accepted_ones() -> None:
    with pytest.raises(ConfigurationError) as raised:
        engine_from_url("postgresql://u@h/db?bogus=1")
    message = str(raised.value)
    assert "'bogus'" in message
    for name in ("sslmode", "connect_timeout", "application_name", "ssl", "timeout"):
        assert name in message


@pytest.mark.parametrize(
    "query", ["mode=ro", "uri=true", "timeout=5", "isolation_level=SERIALIZABLE", "bogus=1"]
)
def test_sqlite_url_parameters_are_refused(tmp_path: Path, query: str) -> None:
    name = query.split("=", maxsplit=1)[0]
    with pytest.raises(ConfigurationError, match=f"unsupported SQLite URL parameter '{name}'"):
        engine_from_url(f"sqlite:///{tmp_path / 'tasks.db'}?{query}")
    assert not list(tmp_path.iterdir())  # no I/O


async def test_sqlite_cached_statements_is_passed(tmp_path: Path) -> None:
    engine = engine_from_url(f"sqlite:///{tmp_path / 'tasks.db'}?cached_statements=10")
    await engine.dispose()
    with pytest.raises(ConfigurationError, match="cached_statements='x'"):
        engine_from_url(f"sqlite:///{tmp_path / 'tasks.db'}?cached_statements=x")


@pytest.mark.parametrize(
    "url", ["postgresql://u:s3cret@host:notaport/db", "postgresql://u:s3cret@[::1/db"]
)
def test_unparsable_urls_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        engine_from_url(url)
    assert "s3cret" not in str(raised.value)
    assert "***" in str(raised.value)


# -- DatabaseError messages -------------------------------------------------------------------


def test_database_error_says_what_where_and_why() -> None:
    url = make_url("postgresql+asyncpg://user:s3cret@db.example:6543/prod")
    refused = ConnectionRefusedError(111, "Connect call failed ('db.example', 6543)")
    error = database_error(refused, url, "could not connect to")
    assert isinstance(error, DatabaseError)
    assert str(error) == (
        "could not connect to PostgreSQL at db.example:6543/prod: ConnectionRefusedError: "
        "[Errno 111] Connect call failed ('db.example', 6543)"
    )
    assert "s3cret" not in str(error)


def test_an_empty_driver_message_gives_the_type_name() -> None:
    url = make_url("postgresql+asyncpg://u@h/db")
    assert str(database_error(TimeoutError(), url, "could not connect to")) == (
        "could not connect to PostgreSQL at h:5432/db: TimeoutError"
    )


def test_the_driver_exception_is_found_under_sqlalchemy_wrappers() -> None:
    class UniqueViolationError(Exception):
        pass

    class Emulated(Exception):
        def __init__(self, message: str, orig: Exception) -> None:
            super().__init__(message)
            self.orig = orig

    driver = UniqueViolationError("duplicate key value")
    wrapped = DBAPIError("INSERT …", None, Emulated("duplicate key value", driver))
    assert describe_exception(wrapped) == "UniqueViolationError: duplicate key value"


def test_where_a_database_is() -> None:
    assert describe_database(make_url("sqlite+aiosqlite:////data/tasks.db")) == (
        "SQLite at /data/tasks.db"
    )
    socket = make_url("postgresql+asyncpg://u@/db?host=/var/run/postgresql")
    assert describe_database(socket) == "PostgreSQL at /var/run/postgresql/db"
    several = make_url("postgresql+asyncpg://u@/db?host=a:1&host=b:2")
    assert describe_database(several) == "PostgreSQL at a:1,b:2/db"
