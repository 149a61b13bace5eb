"""Database URLs: from the URL a user gives to an engine.

PostgreSQL URLs as managed services hand them out carry libpq parameters
(``postgresql://u:p@host/db?sslmode=require``), which asyncpg does not take as they are: each
query parameter is checked before any I/O and either translated (``sslmode``,
``connect_timeout``, ``application_name``), passed on as asyncpg or SQLAlchemy takes it
(converted to the type they want), or refused with a ``ConfigurationError`` naming it.
``pgbouncer=transaction`` (with ``listen_host`` and ``listen_port``) is ours: the URL goes through
a pooler in transaction mode (``TransactionPooler``).

MySQL and MariaDB URLs (``mysql://``, ``mariadb://``, with or without ``+aiomysql``) get the
aiomysql driver, which the ``mysql`` extra installs, and the utf8mb4 character set, always.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ._errors import ConfigurationError

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's ``sslmode`` values, which asyncpg's ``ssl`` takes by the same names."""
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "mysql": "mysql+aiomysql",
    "mysql+aiomysql": "mysql+aiomysql",
    "mariadb": "mariadb+aiomysql",
    "mariadb+aiomysql": "mariadb+aiomysql",
}
_MYSQL_DRIVERS = ("mysql+aiomysql", "mariadb+aiomysql")
MYSQL_CHARSET = "utf8mb4"
"""The only character set of our connections: 4-byte UTF-8, as the tables (MySQL's ``utf8`` is
3-byte)."""


# -- value conversions (a URL's query values are strings) ------------------------------------


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], Any]:
    def convert(name: str, value: str) -> str:
        if value not in choices:
            raise ConfigurationError(
                f"database URL parameter {name}={value!r}: use one of {', '.join(choices)}"
            )
        return value

    return convert


def _text(name: str, value: str) -> str:
    return value


def _count(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigurationError(
            f"database URL parameter {name}={value!r}: use a whole number, 0 or more"
        )
    return number


def _seconds(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(
            f"database URL parameter {name}={value!r}: use a positive number of seconds"
        )
    return number


def _connect_timeout(name: str, value: str) -> float | None:
    """libpq's ``connect_timeout``: seconds; 0 (or less) waits without a limit."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number) or number == math.inf:
        raise ConfigurationError(
            f"database URL parameter {name}={value!r}: use a number of seconds (0: no limit)"
        )
    return number if number > 0 else None


def _flag(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"database URL parameter {name}={value!r}: use true or false")


_PG_TRANSLATED: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    # libpq name: (asyncpg connect argument, conversion)
    "sslmode": ("ssl", _choice(SSL_MODES)),
    "connect_timeout": ("timeout", _connect_timeout),
    "application_name": ("server_settings", _text),  # {"application_name": value}
    "dbname": ("database", _text),
}
_PG_PASSED: dict[str, Callable[[str, str], Any]] = {
    # asyncpg.connect's keyword arguments that a string can express
    "ssl": _choice(SSL_MODES),
    "timeout": _seconds,
    "command_timeout": _seconds,
    "statement_cache_size": _count,
    "max_cached_statement_lifetime": _count,
    "max_cacheable_statement_size": _count,
    "target_session_attrs": _choice(TARGET_SESSION_ATTRS),
    "direct_tls": _flag,
    "passfile": _text,
    "service": _text,
    "servicefile": _text,
    "krbsrvname": _text,
    "gsslib": _choice(("gssapi", "sspi")),
    "user": _text,
    "password": _text,
    "database": _text,
    # SQLAlchemy's asyncpg dialect
    "prepared_statement_cache_size": _count,
}
_PG_KEPT = ("host", "port")
"""Left in the URL: SQLAlchemy reads them (a Unix socket directory, several hosts)."""
_PG_POOLER = ("pgbouncer", "listen_host", "listen_port")
"""Ours: a transaction pooler in front of the server (``_engine_options``)."""
POOLER_MODES = ("transaction",)
"""The pool modes ``pgbouncer=`` names; a pooler in session mode needs no parameter."""
POOLER_OPTION = "aioasync_pooler"
"""The execution option of an engine whose URL says ``pgbouncer=transaction``: its
``TransactionPooler``."""
DEFAULT_PG_PORT = 5432
"""The server's port when ``listen_port`` is not given (the URL's port is the pooler's)."""
_CACHES = ("statement_cache_size", "prepared_statement_cache_size")
"""The statement caches, which a transaction pooler rules out (``_engine_options``)."""


@dataclass(frozen=True, slots=True)
class TransactionPooler:
    """The engine's connections go through a pooler in transaction mode (PgBouncer's
    ``pool_mode = transaction``): each transaction may run on another server session, so the
    engine prepares no statement that outlives a transaction, and the driver keeps no setting
    in a session and listens only on ``listen`` (docs/design.md §14)."""

    listen: AsyncEngine | None
    """An engine of direct connections to the server, for ``LISTEN`` (``listen_host``); None:
    nodes poll."""


_PG_ENVIRONMENT = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "sslnegotiation": "PGSSLNEGOTIATION",
}
"""libpq parameters that asyncpg reads from the environment only (with an ``sslmode``)."""

_SQLITE_PASSED: dict[str, Callable[[str, str], Any]] = {"cached_statements": _count}
"""sqlite3.connect's arguments that make sense here. ``timeout`` and ``isolation_level`` are
overridden by the library (a 60 s busy timeout; transactions it begins itself), and ``uri``
options (``mode=ro``, ``cache=shared`` …) would change how the file is shared."""


_MYSQL_PASSED: dict[str, Callable[[str, str], Any]] = {
    # aiomysql.connect's keyword arguments that a string can express
    "unix_socket": _text,
    "connect_timeout": _seconds,
    "charset": _choice((MYSQL_CHARSET,)),
    "init_command": _text,
    "local_infile": _flag,
}


def _accepted(names: list[str]) -> str:
    return ", ".join(names)


def _asyncpg_arguments() -> frozenset[str]:
    """``asyncpg.connect``'s keyword arguments (older asyncpg versions take fewer)."""
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - for PostgreSQL URLs only

    return frozenset(inspect.signature(asyncpg.connect).parameters)


def _pg_connect_args(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    native = _asyncpg_arguments() | {"prepared_statement_cache_size"}
    passed = {name: convert for name, convert in _PG_PASSED.items() if name in native}
    accepted = sorted([*_PG_TRANSLATED, *passed, *_PG_KEPT, *_PG_POOLER])
    for name, value in query.items():
        if name in _PG_KEPT or name in _PG_POOLER:
            continue
        if not isinstance(value, str):
            raise ConfigurationError(f"database URL parameter {name!r} is given more than once")
        if name in _PG_TRANSLATED:
            target, convert = _PG_TRANSLATED[name]
            if target in query:
                raise ConfigurationError(
                    f"database URL parameters {name!r} and {target!r} say the same: give one"
                )
            converted = convert(name, value)
            args[target] = {name: converted} if target == "server_settings" else converted
        elif name in passed:
            args[name] = passed[name](name, value)
        elif name in _PG_ENVIRONMENT:
            raise ConfigurationError(
                f"database URL parameter {name!r} is not supported by asyncpg in a URL: set the "
                f"environment variable {_PG_ENVIRONMENT[name]} instead, or pass an AsyncEngine "
                f"with connect_args={{'ssl': ssl_context}}"
            )
        else:
            raise ConfigurationError(
                f"unsupported PostgreSQL URL parameter {name!r}; accepted: {_accepted(accepted)}"
            )
    return args


def _port(name: str, value: str) -> int:
    number = _count(name, value)
    if not 0 < number < 65536:
        raise ConfigurationError(f"database URL parameter {name}={value!r}: use a TCP port")
    return number


def _unnamed() -> str:
    """The name of every statement SQLAlchemy prepares through a transaction pooler: the
    unnamed one, which the server forgets at the next statement, so that no name is ever
    looked up on a server session that never saw it, nor taken on one that did."""
    return ""


def _engine_options(
    url: URL, query: Mapping[str, str | tuple[str, ...]], connect_args: dict[str, Any]
) -> dict[str, Any]:
    """``create_async_engine``'s arguments for a PostgreSQL URL: ``connect_args``, and for
    ``pgbouncer=transaction`` those of a transaction pooler (``TransactionPooler``)."""
    values: dict[str, str] = {}
    for name in _PG_POOLER:
        value = query.get(name)
        if isinstance(value, tuple):
            raise ConfigurationError(f"database URL parameter {name!r} is given more than once")
        if value is not None:
            values[name] = value
    if not values:
        return {"connect_args": connect_args}
    mode = values.get("pgbouncer")
    if mode is None:
        raise ConfigurationError(
            f"database URL parameter {next(iter(values))!r} is for pgbouncer=transaction: "
            "without a transaction pooler, nodes listen on connections of their own"
        )
    if mode not in POOLER_MODES:
        raise ConfigurationError(
            f"database URL parameter pgbouncer={mode!r}: use pgbouncer=transaction (a pooler "
            "in session mode needs no parameter)"
        )
    if "listen_port" in values and "listen_host" not in values:
        raise ConfigurationError("database URL parameter 'listen_port' needs a listen_host")
    for name in _CACHES:
        if name in connect_args:
            raise ConfigurationError(
                f"database URL parameter {name!r}: pgbouncer=transaction turns the statement "
                "caches off, give one or the other"
            )
    listen = None
    if "listen_host" in values:
        port = _port("listen_port", values.get("listen_port", str(DEFAULT_PG_PORT)))
        direct = url.set(host=values["listen_host"], port=port, query={})
        try:
            listen = create_async_engine(direct, connect_args=connect_args, poolclass=NullPool)
        except ArgumentError as exc:
            raise ConfigurationError(f"bad listen_host or listen_port: {exc}") from exc
    return {
        "connect_args": {
            **connect_args,
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unnamed,
        },
        "execution_options": {POOLER_OPTION: TransactionPooler(listen)},
    }


def _passed_args(
    database: str,
    query: Mapping[str, str | tuple[str, ...]],
    passed: Mapping[str, Callable[[str, str], Any]],
) -> dict[str, Any]:
    """The URL's parameters as the driver's connect arguments, each one of ``passed``."""
    args: dict[str, Any] = {}
    for name, value in query.items():
        if name not in passed:
            raise ConfigurationError(
                f"unsupported {database} URL parameter {name!r}; accepted: "
                f"{_accepted(sorted(passed))}"
            )
        if not isinstance(value, str):
            raise ConfigurationError(f"database URL parameter {name!r} is given more than once")
        args[name] = passed[name](name, value)
    return args


def _require_mysql_driver() -> None:
    if importlib.util.find_spec("aiomysql") is None:
        raise ConfigurationError(
            "MySQL and MariaDB need the aiomysql driver: pip install 'aioasync-tasks[mysql]'"
        )


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def engine_from_url(url: str) -> AsyncEngine:
    """The engine of a database URL, every part of it checked first (no I/O)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"not a database URL: {_hide_password(url)!r}") from exc
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: use postgresql+asyncpg://, "
            "sqlite+aiosqlite:///path or mysql+aiomysql://"
        )
    parsed = parsed.set(drivername=driver)
    if driver == "sqlite+aiosqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "SQLite needs a file (sqlite+aiosqlite:///path/to/tasks.db): an in-memory "
                "database cannot be shared between connections or nodes"
            )
        options = {"connect_args": _passed_args("SQLite", parsed.query, _SQLITE_PASSED)}
        parsed = parsed.set(query={})
    elif driver in _MYSQL_DRIVERS:
        _require_mysql_driver()
        connect_args = {
            "charset": MYSQL_CHARSET,
            **_passed_args("MySQL", parsed.query, _MYSQL_PASSED),
        }
        options = {"connect_args": connect_args}
        parsed = parsed.set(query={})
    else:
        query = parsed.query
        parsed = parsed.set(query={k: v for k, v in query.items() if k in _PG_KEPT})
        options = _engine_options(parsed, query, _pg_connect_args(query))
    try:
        return create_async_engine(parsed, **options)
    except ArgumentError as exc:
        raise ConfigurationError(f"bad database URL {_hide_password(url)!r}: {exc}") from exc
