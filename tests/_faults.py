"""Fault injection for PostgreSQL tests: :class:`PgProxy`, a TCP proxy that breaks the network
between clients and the server on request.

The proxy listens on ``127.0.0.1:<free port>`` and forwards every connection to the upstream
server.  It runs its own event loop in a background thread, so it serves connections from any
test's event loop and from node processes started as subprocesses alike; every public method
is thread-safe and returns once the change is in effect.  Usage::

    with PgProxy.for_url(pg_server.url) as proxy:
        engine = create_async_engine(proxy.url(pg_server.url))
        fault = proxy.drop_reply_to(rb"^COMMIT")    # the next COMMIT is applied, its reply lost
        ...                                         # the client sees a connection reset
        await fault.wait()                          # fault.fired == 1

Faults
------
``hold()`` / ``release()``
    A partition without reset: no byte moves in either direction on any connection (new
    connections are accepted but not forwarded) until ``release()``, which forwards what waited.
``drop_reply_to(pattern)``
    The matching statement is forwarded and runs; the server's reply to it is read and
    discarded, then both sides are reset: "applied, but the reply was lost".
``reset_on(pattern)``
    The connection is reset before the matching statement is forwarded: it never runs.
``reset_all()``
    Every open connection is reset now.

A reset closes the socket with ``SO_LINGER`` 0, so the peer gets an RST (``ECONNRESET``),
not an orderly end of stream.

How statements are seen
-----------------------
The proxy frames the frontend protocol: the first message of a connection has no type byte
(int32 length, int32 code); every later message, and every backend message, is one type byte
and an int32 big-endian length that counts itself.  Messages split over TCP reads are joined
first.  Patterns are matched (``re.search``, case-insensitive, leading whitespace stripped) on
the SQL of the messages that run a statement: a simple query (``Q``) and a ``Bind`` (``B``,
extended protocol), whose SQL is that of the ``Parse`` (``P``) that prepared the statement it
names on that connection.  Matching the Bind rather than the Parse matters for asyncpg (and so
SQLAlchemy): it prepares a statement in a round trip of its own (Parse/Describe/Flush), then
runs it with Bind/Execute/Sync, and a cached statement is run again with no Parse at all.  The
reply to a ``Q`` ends at the next ``ReadyForQuery`` (``Z``); the reply to a Bind ends at the
``Z`` answering the next ``Sync``, so a pipelined Bind/Execute/Sync is dropped whole.  asyncpg
runs ``BEGIN;``/``COMMIT;``/``ROLLBACK;`` (SQLAlchemy's transactions are asyncpg transactions)
as simple queries; :meth:`PgProxy.statements` lists what went by.

An ``SSLRequest`` (or ``GSSENCRequest``) is answered ``N`` by the proxy itself and not
forwarded, so clients with the default ``sslmode=prefer`` talk plaintext to the proxy (which
must see the statements) even when the server offers TLS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from _db import DbTarget
from sqlalchemy.engine import make_url

_T = TypeVar("_T")
Pattern = bytes | re.Pattern[bytes]
"""A fault's pattern: bytes are a regular expression searched case-insensitively; a compiled
pattern is used as it is."""

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
_QUERY, _PARSE, _BIND, _SYNC, _READY = b"QPBSZ"
_LINGER_RST = struct.pack("ii", 1, 0)
CALL_TIMEOUT = 10.0
"""Bound on waiting for the proxy's loop to apply a call from another thread."""


@dataclass(frozen=True)
class Statement:
    """A statement message the proxy saw: connection number (1, 2, … in accept order), kind
    (``"Q"`` simple query, ``"P"`` Parse, ``"B"`` Bind, with the SQL of its statement) and SQL."""

    conn: int
    kind: str
    sql: str


class Fault:
    """An armed ``drop_reply_to`` or ``reset_on`` fault, returned by the method that armed it.

    It fires on the next ``count`` matching statements, on any connection.  ``fired`` counts
    the resets done, ``statements`` holds the SQL of each firing, ``dropped`` (for
    ``drop_reply``) the backend message types discarded in each firing, e.g. ``b"CZ"`` for
    CommandComplete + ReadyForQuery.  ``done`` is set once ``fired == count``.  Read these from
    any thread.  A match is taken when the statement is seen: if its connection ends before the
    reply to drop has come (``reset_all``, the client going away), that firing never happens.
    """

    def __init__(self, kind: Literal["drop_reply", "reset"], pattern: Pattern, count: int) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.kind = kind
        self.pattern = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.I)
        self.count = count
        self.fired = 0
        self.statements: list[bytes] = []
        self.dropped: list[bytes] = []
        self.done = threading.Event()
        self._claimed = 0  # matches taken (proxy loop only); firing follows a claim

    def __repr__(self) -> str:
        return f"<Fault {self.kind} {self.pattern.pattern!r} fired {self.fired}/{self.count}>"

    @property
    def armed(self) -> bool:
        """True while matching statements are still taken."""
        return self._claimed < self.count

    async def wait(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a bound, reported
        """Wait (polling, from any event loop) until the fault fired ``count`` times."""
        deadline = time.monotonic() + timeout
        while not self.done.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} did not fire within {timeout}s")
            await asyncio.sleep(0.01)

    def _match(self, sql: bytes) -> bool:
        if self.armed and self.pattern.search(sql.lstrip()):
            self._claimed += 1
            return True
        return False

    def _fire(self, sql: bytes, dropped: bytes = b"") -> None:
        self.statements.append(sql)
        if self.kind == "drop_reply":
            self.dropped.append(dropped)
        self.fired += 1
        if self.fired >= self.count:
            self.done.set()


def _cstrings(message: bytes, n: int) -> list[bytes]:
    """The first ``n`` NUL-terminated strings of a message's body."""
    return message[5:].split(b"\0", n)[:n]


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, unsent data is discarded."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection and its protocol state (proxy loop only)."""

    number: int
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    server_reader: asyncio.StreamReader | None = None
    server_writer: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    started: bool = False
    """The startup message (the one without a type byte) has gone through."""
    syncs_sent: int = 0
    """Startup, ``Q`` and ``Sync`` messages forwarded: each is answered by one ``Z``."""
    z_seen: int = 0
    drop_at: dict[int, tuple[Fault, bytes]] = field(default_factory=dict)
    """Reply number (a ``syncs_sent`` value) -> the fault dropping it and the statement."""
    drop_next_sync: tuple[Fault, bytes] | None = None
    """A drop matched on a Bind: it takes the reply that ends at the next Sync's ``Z``."""
    prepared: dict[bytes, bytes] = field(default_factory=dict)
    """Statement name -> SQL, from the Parse messages (a Bind names only the statement)."""
    dropped: bytearray = field(default_factory=bytearray)
    """Types of the backend messages discarded so far from the reply being dropped."""
    reset: bool = False

    def abort(self) -> None:
        """Reset both sides and stop the link's tasks (except the calling one)."""
        if self.reset:
            return
        self.reset = True
        _reset(self.client_writer)
        _reset(self.server_writer)
        current = asyncio.current_task()
        for task in [self.task, *self.pumps]:
            if task is not None and task is not current:
                task.cancel()


class PgProxy:
    """A fault-injecting TCP proxy in front of PostgreSQL at ``upstream_host:upstream_port``.

    Use as a context manager (or call :meth:`start` and :meth:`close`).  ``port`` is the
    listening port once started; :meth:`url` rewrites a server URL to go through the proxy.
    ``chunk_size`` is the most read from a socket at once (small values exercise framing).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        chunk_size: int = 65536,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.chunk_size = chunk_size
        self.accepted = 0
        """Connections accepted so far."""
        self.resets = 0
        """Connections reset by faults or ``reset_all``."""
        self.ssl_requests = 0
        """SSLRequest/GSSENCRequest messages answered ``N``."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._gate: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._faults: list[Fault] = []
        self._seen: collections.deque[Statement] = collections.deque(maxlen=10_000)

    @classmethod
    def for_url(cls, url: str, **options: Any) -> PgProxy:
        """A proxy in front of the server of an SQLAlchemy/libpq URL (not started)."""
        parsed = make_url(url)
        return cls(parsed.host or "127.0.0.1", parsed.port or 5432, **options)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PgProxy:
        """Start the loop thread and listen; returns self."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="pg-proxy", daemon=True)
        self._thread.start()
        ready.wait(CALL_TIMEOUT)
        try:
            self._run(self._listen())
        except BaseException:
            self.close()
            raise
        return self

    async def _listen(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Reset every connection, stop listening and stop the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                self._run(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CALL_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        for link in links:
            link.abort()
        tasks = [link.task for link in links if link.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        for _ in range(3):  # let the transports' connection_lost callbacks run
            await asyncio.sleep(0)

    def __enter__(self) -> PgProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the proxy loop and return its result: in effect when this returns."""

        async def call() -> _T:
            return fn()

        return self._run(call())

    # -- addresses -------------------------------------------------------------------------

    def url(self, base_url: str) -> str:
        """``base_url`` (user, database, query kept) with host and port of the proxy."""
        if not self.port:
            raise RuntimeError("proxy not started")
        proxied = make_url(base_url).set(host=self.host, port=self.port)
        return proxied.render_as_string(hide_password=False)

    def target(self, db: DbTarget) -> DbTarget:
        """``db`` (same schema) with its URL through the proxy."""
        return replace(db, url=self.url(db.url))

    # -- faults ----------------------------------------------------------------------------

    def hold(self) -> None:
        """Stop forwarding in both directions on every connection, new ones included."""
        self._call(self._gate_event().clear)

    def release(self) -> None:
        """Resume forwarding, starting with whatever waited during ``hold``."""
        self._call(self._gate_event().set)

    @property
    def held(self) -> bool:
        return self._gate is not None and not self._gate.is_set()

    def drop_reply_to(self, pattern: Pattern, count: int = 1) -> Fault:
        """Forward the next ``count`` statements matching ``pattern``, discard the server's
        reply to each (through its ``ReadyForQuery``), then reset both sides."""
        return self._arm(Fault("drop_reply", pattern, count))

    def reset_on(self, pattern: Pattern, count: int = 1) -> Fault:
        """Reset the connection of each of the next ``count`` statements matching ``pattern``
        instead of forwarding it (messages before it in the same read may have gone through)."""
        return self._arm(Fault("reset", pattern, count))

    def _arm(self, fault: Fault) -> Fault:
        self._call(lambda: self._faults.append(fault))
        return fault

    def disarm(self, fault: Fault | None = None) -> None:
        """Stop ``fault`` (all armed faults if None) from matching; pending drops still fire."""

        def disarm() -> None:
            if fault is None:
                self._faults.clear()
            elif fault in self._faults:
                self._faults.remove(fault)

        self._call(disarm)

    def reset_all(self) -> int:
        """Reset every open connection now; returns how many."""

        def reset_all() -> int:
            links = list(self._links)
            for link in links:
                self._abort(link)
            return len(links)

        return self._call(reset_all)

    # -- inspection ------------------------------------------------------------------------

    def statements(self) -> list[Statement]:
        """The statements seen so far (the last 10,000), oldest first."""
        return self._call(lambda: list(self._seen))

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self._call(lambda: len(self._links))

    # -- the proxy loop --------------------------------------------------------------------

    def _gate_event(self) -> asyncio.Event:
        if self._gate is None:
            raise RuntimeError("proxy not started")
        return self._gate

    def _abort(self, link: _Link) -> None:
        if not link.reset:
            self.resets += 1
            link.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(self.accepted, reader, writer, task=asyncio.current_task())
        self._links.add(link)
        try:
            await self._gate_event().wait()
            try:
                link.server_reader, link.server_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                self._abort(link)
                return
            link.pumps = [
                asyncio.create_task(self._pump(link, upstream=True)),
                asyncio.create_task(self._pump(link, upstream=False)),
            ]
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not link.reset:
                raise
        finally:
            for task in link.pumps:
                task.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            if not link.reset:  # one side ended: end the other in order, output flushed
                for side in (link.client_writer, link.server_writer):
                    if side is not None:
                        side.close()
            self._links.discard(link)

    async def _pump(self, link: _Link, *, upstream: bool) -> None:
        """Move bytes one way until end of stream, an error or a fault."""
        reader = link.client_reader if upstream else link.server_reader
        writer = link.server_writer if upstream else link.client_writer
        assert reader is not None
        assert writer is not None
        scan = self._scan_client if upstream else self._scan_server
        buffer = bytearray()
        try:
            while True:
                data = await reader.read(self.chunk_size)
                if not data:
                    return
                await self._gate_event().wait()
                buffer += data
                out, fire = scan(link, buffer)
                if out:
                    writer.write(out)
                if fire is not None:
                    fire()
                    self._abort(link)
                    return
                await writer.drain()
        except OSError:  # a reset or broken pipe on either side ends the link
            return

    def _scan_client(
        self, link: _Link, buffer: bytearray
    ) -> tuple[bytes, Callable[[], None] | None]:
        """Take the complete frontend messages off ``buffer``: (bytes to forward, fault)."""
        out = bytearray()
        pos = 0
        fire: Callable[[], None] | None = None
        while fire is None:
            if not link.started:
                if len(buffer) - pos < 8:
                    break
                length, code = struct.unpack_from("!ii", buffer, pos)
                if len(buffer) - pos < length:
                    break
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    self.ssl_requests += 1
                    link.client_writer.write(b"N")  # plaintext: the proxy must read the SQL
                else:  # StartupMessage (answered, after authentication, by a first Z)
                    link.started = True  # or CancelRequest (answered by nothing)
                    link.syncs_sent += 1
                    out += buffer[pos : pos + length]
                pos += length
                continue
            if len(buffer) - pos < 5:
                break
            kind = buffer[pos]
            end = pos + 1 + struct.unpack_from("!i", buffer, pos + 1)[0]
            if len(buffer) < end:
                break
            message = bytes(buffer[pos:end])
            fire = self._on_client_message(link, kind, message)
            if fire is None:
                out += message
                pos = end
        del buffer[:pos]
        return bytes(out), fire

    def _on_client_message(
        self, link: _Link, kind: int, message: bytes
    ) -> Callable[[], None] | None:
        """Bookkeeping for one frontend message; a callable if it must not be forwarded."""
        sql: bytes | None = None  # set for the messages that run a statement: Q and Bind
        if kind == _QUERY:
            sql = _cstrings(message, 1)[0]
        elif kind == _PARSE:
            name, text = _cstrings(message, 2)
            link.prepared[name] = text
            self._log(link, kind, text)
        elif kind == _BIND:
            statement = _cstrings(message, 2)[1]
            sql = link.prepared.get(statement, b"")
        drop: tuple[Fault, bytes] | None = None
        if sql is not None:
            self._log(link, kind, sql)
            for fault in self._faults:
                if fault._match(sql):
                    if fault.kind == "reset":
                        return functools.partial(fault._fire, sql)
                    drop = (fault, sql)
                    break
        if drop is not None and kind == _BIND:
            link.drop_next_sync = drop
        if kind in (_QUERY, _SYNC):
            link.syncs_sent += 1
            if kind == _SYNC:
                drop, link.drop_next_sync = link.drop_next_sync, None
            if drop is not None:
                link.drop_at[link.syncs_sent] = drop
        return None

    def _log(self, link: _Link, kind: int, sql: bytes) -> None:
        self._seen.append(Statement(link.number, chr(kind), sql.decode(errors="replace")))

    def _scan_server(
        self, link: _Link, buffer: bytearray
    ) -> tuple[bytes, Callable[[], None] | None]:
        """Take the complete backend messages off ``buffer``: (bytes to forward, fault)."""
        out = bytearray()
        pos = 0
        while len(buffer) - pos >= 5:
            kind = buffer[pos]
            end = pos + 1 + struct.unpack_from("!i", buffer, pos + 1)[0]
            if len(buffer) < end:
                break
            reply = link.z_seen + 1
            dropping = link.drop_at.get(reply)
            if dropping is None:
                out += buffer[pos:end]
            else:
                link.dropped.append(kind)
            pos = end
            if kind == _READY:
                link.z_seen = reply
                if dropping is not None:
                    del link.drop_at[reply]
                    del buffer[:pos]
                    fault, sql = dropping
                    dropped, link.dropped = bytes(link.dropped), bytearray()
                    return bytes(out), functools.partial(fault._fire, sql, dropped)
        del buffer[:pos]
        return bytes(out), None
