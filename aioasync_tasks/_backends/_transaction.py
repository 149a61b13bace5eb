"""Transactions of the storage layer, safe to cancel, and the wrapping of driver errors.

Every public method of a backend runs as its own asyncio task (``cancel_safe``): a caller
cancelled at any ``await`` — ``asyncio.timeout``, ``wait_for``, ``Task.cancel`` or an anyio
cancel scope — stops waiting, but the statement in flight and its COMMIT or ROLLBACK still run
to the end. A statement cut off mid-flight can leave its connection stuck, and on SQLite keep
the database's write lock held by this process, so every writer of every process would wait
for the busy timeout (docs/explanation.md, "Cancellation").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy import URL
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import DatabaseError, NodeStopped

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_P = ParamSpec("_P")
_T = TypeVar("_T")

_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
"""PostgreSQL error classes a retry may cure: connection exception, transaction rollback
(serialization failure, deadlock), insufficient resources, operator intervention (shutdown,
statement timeout), system error."""
_TRANSIENT_SQLSTATES = frozenset({"55P03", "55006"})
"""Lock not available, object in use."""
_TRANSIENT_SQLITE = ("locked", "busy", "disk i/o", "unable to open")
_TRANSIENT_MYSQL = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout exceeded
        1213,  # deadlock found
        1317,  # query execution was interrupted
        1927,  # MariaDB: connection was killed
        2002,  # can't connect through the socket
        2003,  # can't connect to the server
        2006,  # server has gone away
        2013,  # lost connection during a query
        2014,  # commands out of sync (a connection left half-way)
        2055,  # lost connection (system error)
        3024,  # MySQL: maximum statement execution time exceeded
        1969,  # MariaDB: maximum statement time exceeded
        4031,  # MySQL: the server closed an idle connection
    }
)
"""MySQL and MariaDB error codes a retry may cure (the first argument of a PyMySQL error)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of connectivity or load, which a retry may cure, rather than
    one of the data, which no retry will."""
    if isinstance(exc, PoolTimeoutError | OSError | ConnectionError):
        return True
    orig: BaseException | None
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    elif type(exc).__module__.startswith("asyncpg"):
        orig = exc  # asyncpg's own, raised on its raw connection (PostgresDriver.fetch)
    else:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
    code = orig.args[0] if orig is not None and orig.args else None
    if type(orig).__module__.startswith("pymysql") and isinstance(code, int):
        return code in _TRANSIENT_MYSQL
    if isinstance(orig, sqlite3.Error) or type(orig).__module__.startswith("sqlalchemy"):
        message = str(orig).lower()
        if any(word in message for word in _TRANSIENT_SQLITE):
            return True
    # No SQLSTATE: the driver's own failure (connection closed, another operation in
    # progress) is transient; a refused value is a data error.
    name = type(orig).__name__
    return name in ("InterfaceError", "InternalClientError") or (
        name == "OperationalError" and sqlstate is None and not isinstance(orig, sqlite3.Error)
    )


def describe_database(url: URL) -> str:
    """Where a database is, without credentials: ``PostgreSQL at host:port/db``."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        return f"SQLite at {url.database}"
    if backend in ("mysql", "mariadb"):
        name = "MariaDB" if backend == "mariadb" else "MySQL"
        return f"{name} at {url.host or 'localhost'}:{url.port or 3306}/{url.database or ''}"
    host: object = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{url.port}" if url.port else ("" if "host" in url.query else ":5432")
    return f"PostgreSQL at {host}{port}/{url.database or ''}"


def describe_exception(exc: BaseException) -> str:
    """``TypeName: message``, from the driver's own exception where there is one, and the type
    name alone when the message is empty (a timeout)."""
    driver: BaseException = exc
    for _ in range(3):
        # SQLAlchemy's DBAPIError → the DB-API error → (asyncpg, emulated by SQLAlchemy) the
        # driver's own exception, whose type name says the most (UniqueViolationError …)
        original = getattr(driver, "orig", None)
        if not isinstance(original, BaseException):
            break
        driver = original
    text = str(driver).strip()
    name = type(driver).__name__
    return f"{name}: {text}" if text else name


def database_error(exc: BaseException, url: URL, what: str) -> DatabaseError:
    """A ``DatabaseError`` saying what failed, where, and the driver's words:
    ``could not connect to PostgreSQL at 127.0.0.1:5999/test: ConnectionRefusedError: …``.
    Raise it ``from exc``."""
    return DatabaseError(
        f"{what} {describe_database(url)}: {describe_exception(exc)}",
        transient=is_transient(exc),
    )


WRAPPED = (SQLAlchemyError, OSError, UnicodeError)
"""What the storage layer turns into ``DatabaseError``: driver, pool and connection failures,
and a text the driver cannot encode."""


def session_key(name: str) -> str:
    """The key under which a pooled connection's ``info`` remembers the session value
    ``name`` (``set_session_value``; cleared by ``forget_session_values``)."""
    return f"aioasync_{name}"


def set_session_value(conn: Connection, name: str, value: object, statement: str) -> None:
    """Run ``statement`` (a ``SET`` or ``PRAGMA`` giving ``name`` the value ``value``) unless the
    driver connection has that value already. Called from a ``begin`` listener: the value is
    remembered per pooled connection, so a connection that keeps serving the same kind of
    transaction pays the round trip once, not at every transaction."""
    info = conn.connection.info
    key = session_key(name)
    if key in info and info[key] == value:
        return
    info.pop(key, None)  # unknown until the statement has run
    conn.exec_driver_sql(statement)
    info[key] = value


def forget_session_values(conn: Connection) -> None:
    """After a rollback: a ``SET`` in the transaction rolled back was undone (PostgreSQL)."""
    if not conn.invalidated:
        info = conn.connection.info
        for key in [k for k in info if k.startswith(session_key(""))]:
            del info[key]


class InFlight:
    """The operations of one backend still running. A node that stops closes it: it lets them
    end (within a bound) before it disposes of the engine, and refuses new ones, since a
    connection opened after the dispose would belong to no pool that anyone closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def start(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        if self.closed:
            coro.close()
            raise NodeStopped("the node was stopped")
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a cancel scope
        self.closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


class _Operations(Protocol):
    in_flight: InFlight


_S = TypeVar("_S", bound=_Operations)


def cancel_safe(
    method: Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]]:
    """Run ``method`` as a task of its own that a cancelled caller does not interrupt: the
    caller's cancellation is delivered once the transaction is over (committed or rolled
    back). Transactions are short, so the caller waits for at most one; a caller that must not
    wait even that long (a stop whose time is up) abandons the task that called."""

    @functools.wraps(method)
    async def run(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        task = self.in_flight.start(method(self, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():
                # Cancelled again (an anyio cancel scope cancels until its task leaves it): the
                # transaction still ends first, as inside a shielded scope.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # consumed: the caller's cancellation is what it gets
            raise

    return run


class Transaction:
    """``async with Transaction(engine, in_flight, write=…) as conn``: one transaction,
    committed when the block succeeds, rolled back otherwise; driver failures become
    ``DatabaseError``."""

    def __init__(
        self,
        engine: AsyncEngine,
        in_flight: InFlight,
        *,
        write: bool,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._engine = engine
        self._in_flight = in_flight
        self._write = write
        self._options = options or {}
        """More execution options, for the dialect's ``begin`` listener."""
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        url = self._engine.url
        try:
            conn = await self._engine.connect()
        except WRAPPED as exc:
            raise database_error(exc, url, "could not connect to") from exc
        self._conn = conn
        options: dict[str, Any] = {**self._options, "aioasync_write": self._write}
        try:
            conn = await conn.execution_options(**options)
            await conn.begin()
        except WRAPPED as exc:
            await self._close(conn)
            raise database_error(exc, url, "could not begin a transaction on") from exc
        return conn

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if exc_type is None:
                await conn.commit()
            else:
                await conn.rollback()
        except WRAPPED as error:
            await self._close(conn)
            if exc_type is None:
                raise database_error(error, self._engine.url, "could not commit on") from error
            return  # the block's own exception propagates
        await self._close(conn)

    async def _close(self, conn: AsyncConnection) -> None:
        try:
            if self._in_flight.closed:
                # The node has stopped and may have disposed of the engine already: the driver's
                # connection is closed, not returned to a pool that nobody will close.
                await conn.invalidate()
            await conn.close()
        except WRAPPED:
            try:
                await conn.invalidate()
            except WRAPPED:
                return  # the connection is gone either way
