"""The database schema as SQLAlchemy ``MetaData``, for applications' own Alembic history.

The migration files in ``_backends/<dialect>/migrations/`` create exactly these tables (a test
checks it).
Timestamps are ``timestamptz`` on PostgreSQL, seconds since the epoch (REAL) on SQLite, where
comparing numbers is what the database can do fast, and ``DATETIME(6)`` in UTC on MySQL and
MariaDB; all read back as aware ``datetime``. MySQL cannot index ``TEXT`` or make it a key: names
(at most 200 characters, ``_validation``) are ``VARCHAR(200)`` there, and long texts
``LONGTEXT``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

SCHEMA_VERSION = 6
"""The newest migration this library knows, of any database (versions need not be contiguous,
and a database may have versions the others lack: MySQL's 6 has no counterpart elsewhere;
``_backends/_migrations.py``)."""

TASKS = "aioasync_tasks"
NODES = "aioasync_nodes"
GROUPS = "aioasync_groups"
SCHEDULES = "aioasync_schedules"
VERSIONS = "aioasync_schema_version"
TASK_TYPES = "aioasync_task_types"

MYSQL = ("mysql", "mariadb")
"""SQLAlchemy's names of the MySQL dialect (a ``mariadb://`` URL gets the second)."""


class Timestamp(sa.types.TypeDecorator[datetime]):
    """An aware UTC datetime: ``timestamptz`` on PostgreSQL, epoch seconds on SQLite, a naive
    UTC ``DATETIME(6)`` on MySQL (whose ``UTC_TIMESTAMP(6)`` is the database clock, whatever
    the session's time zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.Double())
        if dialect.name in MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return value
        if dialect.name == "sqlite":
            return value.timestamp()
        if dialect.name in MYSQL:
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else time_from_db(value)


def time_from_db(value: Any) -> datetime:
    """An aware UTC datetime from a ``timestamptz`` (PostgreSQL), epoch seconds (SQLite) or a
    naive UTC ``DATETIME`` (MySQL)."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)


metadata = sa.MetaData()
"""All tables of aioasync_tasks. Include it in your Alembic ``target_metadata`` if you manage
the schema yourself (then call neither ``migrate()`` nor pass ``auto_migrate=True``)."""

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_NAME = sa.Text().with_variant(sa.String(200), *MYSQL)
"""A user, group or node name: indexed, or a key, which MySQL's TEXT cannot be."""
_LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL)
"""A context, an error, a list of types: MySQL's TEXT holds only 64 KiB."""
_PENDING = sa.text("state = 'pending'")
_ACTIVE = sa.text("state IN ('running', 'canceling')")
_DELETING = sa.text("state = 'deleting' AND node_id IS NULL")
_OWNED = sa.text("node_id IS NOT NULL")
LIVE_STATES_SQL = "'init', 'pending', 'running', 'canceling', 'paused'"
"""The states in which a task holds its unique key (docs/design.md §4.4): every state but the
final ones (FINISHED, FAILED) and DELETING, written as the unique index's predicate is."""
_UNIQUE = sa.text(f"unique_key IS NOT NULL AND state IN ({LIVE_STATES_SQL})")
_DONE = sa.text("done_at IS NOT NULL")
MYSQL_LIVE_KEY = "live_key"
"""MySQL and MariaDB have no partial indexes. Their migration adds to the tasks a generated
column of this name, ``CASE WHEN state IN (live states) THEN unique_key END``, and puts the
unique index ``aioasync_tasks_unique_idx`` on (type, live_key): NULLs never collide, so only
live tasks hold their key (docs/design.md §16.1). This metadata, which is the same for every
database, does not declare it: it is the partial index's stand-in, not a column of its own."""
MYSQL_STATE_LED = frozenset({"aioasync_tasks_queue_idx", "aioasync_tasks_active_idx"})
"""The indexes that are partial on the state elsewhere and, on MySQL and MariaDB (migration 6),
lead with ``state`` instead: the rows of one state are one range of the index, as the partial
index holds them (docs/design.md §16.1). This metadata declares them as the other databases
have them."""


_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
"""MySQL tables: InnoDB (row locks, transactions), 4-byte UTF-8, and names compared byte for
byte, as on the other databases (the server's default collation ignores case and accents)."""


def _partial(where: sa.TextClause) -> dict[str, Any]:
    return {"postgresql_where": where, "sqlite_where": where}


tasks_table = sa.Table(
    TASKS,
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("user_name", _NAME, nullable=False),
    sa.Column("group_name", _NAME, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("requested", sa.String(16), nullable=True),
    sa.Column("context", _LONG_TEXT, nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("has_cleanup", sa.Boolean(), nullable=False),
    sa.Column("handoff", sa.Boolean(), nullable=False),
    sa.Column("error", _LONG_TEXT, nullable=True),
    sa.Column("node_id", _ID, nullable=True),
    sa.Column("created_at", Timestamp(), nullable=False),
    sa.Column("updated_at", Timestamp(), nullable=False),
    sa.Column("started_at", Timestamp(), nullable=True),
    sa.Column("done_at", Timestamp(), nullable=True),
    sa.Column("run_at", Timestamp(), nullable=False),
    sa.Column(
        # Raised by every claim; every later write of that execution must carry it
        # (docs/explanation.md, "Claim tokens").
        "token",
        sa.Integer(),
        nullable=False,
        server_default="0",
    ),
    # At most one live task per (type, unique_key) (docs/design.md §4.4).
    sa.Column("unique_key", _NAME, nullable=True),
    # What the task last reported with a checkpoint (docs/design.md §2.6).
    sa.Column("progress", sa.Double(), nullable=True),
    sa.Column("message", sa.Text(), nullable=True),
    # While someone waits for or watches the task (PostgreSQL), the writes of the task notify
    # them; NULL or past: nobody does (docs/design.md §18).
    sa.Column("watched_until", Timestamp(), nullable=True),
    # The W3C traceparent of the span that created the task, when traced (docs/reference.md,
    # "Metrics and tracing").
    sa.Column("trace_parent", sa.String(55), nullable=True),
    sa.CheckConstraint(
        "state IN ('init', 'pending', 'running', 'canceling', 'paused', 'finished', "
        "'failed', 'deleting')",
        name="aioasync_tasks_state_check",
    ),
    sa.CheckConstraint(
        "(state = 'canceling') = (requested IS NOT NULL)", name="aioasync_tasks_requested_check"
    ),
    sa.Index("aioasync_tasks_ready_at_idx", "run_at", **_partial(_PENDING)),
    sa.Index("aioasync_tasks_active_idx", "group_name", "user_name", **_partial(_ACTIVE)),
    sa.Index("aioasync_tasks_deleting_idx", "run_at", **_partial(_DELETING)),
    sa.Index("aioasync_tasks_owner_idx", "node_id", **_partial(_OWNED)),
    sa.Index("aioasync_tasks_user_idx", "user_name", "id"),
    sa.Index("aioasync_tasks_group_idx", "group_name", "id"),
    sa.Index("aioasync_tasks_state_idx", "state", "id"),
    sa.Index("aioasync_tasks_unique_idx", "type", "unique_key", unique=True, **_partial(_UNIQUE)),
    # Retention: the oldest FINISHED (or FAILED) tasks first (docs/design.md §4.5).
    sa.Index("aioasync_tasks_done_idx", "state", "done_at", **_partial(_DONE)),
    sqlite_autoincrement=True,  # ids are never reused: stale writes cannot hit a newer task
    **_TABLE_OPTIONS,
)
sa.Index(
    # The claim walks (group, user) queues of pending tasks in their queue order.
    "aioasync_tasks_queue_idx",
    tasks_table.c.group_name,
    tasks_table.c.user_name,
    tasks_table.c.handoff.desc(),
    tasks_table.c.priority.desc(),
    tasks_table.c.id,
    **_partial(_PENDING),
)

nodes_table = sa.Table(
    NODES,
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("name", _NAME, nullable=False),
    sa.Column("concurrency", sa.Integer(), nullable=False),
    sa.Column("types", _LONG_TEXT, nullable=False),
    sa.Column("started_at", Timestamp(), nullable=False),
    sa.Column("heartbeat_at", Timestamp(), nullable=False),
    # The node's own liveness settings: others judge it by these, never by their own.
    sa.Column("heartbeat_interval", sa.Double(), nullable=False, server_default="5.0"),
    sa.Column("node_timeout", sa.Double(), nullable=False, server_default="30.0"),
    sqlite_autoincrement=True,  # a fenced node's old id never comes back for another node
    **_TABLE_OPTIONS,
)

groups_table = sa.Table(
    GROUPS,
    metadata,
    sa.Column("name", _NAME, primary_key=True),
    sa.Column("paused", sa.Boolean(), nullable=False),
    sa.Column("max_running", sa.Integer(), nullable=True),
    sa.Column("max_running_per_user", sa.Integer(), nullable=True),
    sa.Column("updated_at", Timestamp(), nullable=False),
    **_TABLE_OPTIONS,
)

task_types_table = sa.Table(
    # The options of each task type, stored by the workers that run it: a node that has not
    # imported a type creates its tasks with them (docs/design.md §4.6).
    TASK_TYPES,
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("has_cleanup", sa.Boolean(), nullable=False),
    sa.Column("updated_at", Timestamp(), nullable=False),
    **_TABLE_OPTIONS,
)

schedules_table = sa.Table(
    # Periodic tasks: one row per schedule, its next tick advanced by compare-and-set in the
    # transaction that enqueues the tick's task (docs/design.md §17).
    SCHEDULES,
    metadata,
    sa.Column("name", _NAME, primary_key=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("cron", sa.Text(), nullable=True),
    sa.Column("every", sa.Double(), nullable=True),
    sa.Column("timezone", sa.Text(), nullable=False),
    sa.Column("context", _LONG_TEXT, nullable=False),
    sa.Column("user_name", _NAME, nullable=False),
    sa.Column("group_name", _NAME, nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=True),
    sa.Column("declared", sa.Boolean(), nullable=False),
    sa.Column("next_tick", Timestamp(), nullable=False),
    sa.Column("last_tick", Timestamp(), nullable=True),
    sa.Column("last_task_id", _ID, nullable=True),
    sa.Column("created_at", Timestamp(), nullable=False),
    sa.Column("updated_at", Timestamp(), nullable=False),
    sa.CheckConstraint("(cron IS NULL) <> (every IS NULL)", name="aioasync_schedules_spec_check"),
    sa.Index("aioasync_schedules_next_tick_idx", "next_tick"),
    **_TABLE_OPTIONS,
)

versions_table = sa.Table(
    VERSIONS,
    metadata,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("applied_at", Timestamp(), nullable=False),
    **_TABLE_OPTIONS,
)
