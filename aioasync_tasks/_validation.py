"""Argument checks, run before any I/O, so that bad input gets a ``ConfigurationError`` naming
the argument — never a driver traceback, and never an error on one backend only.

Every text that is stored (context, user, group, task type, node name) or spliced into SQL
(schema) is checked here:

- it is a ``str`` without NUL characters (PostgreSQL ``text`` cannot hold them) and without
  lone surrogates (a ``str`` that cannot be encoded as UTF-8, which no driver can send);
- names — user, group, task type, node name — are at most ``MAX_NAME_LENGTH`` characters on
  every backend. PostgreSQL refuses btree index rows over about 2,700 bytes and SQLite takes
  anything; the limit keeps the two alike and well inside PostgreSQL's (the queue index holds a
  group and a user: at most 2 * 200 characters of at most 4 bytes);
- a schema is a plain identifier (``SCHEMA_PATTERN``).

Error texts are the exception: a task's failure text is whatever its code produced, and is
made storable with ``clean_error_text`` rather than refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Literal, get_args

from ._errors import ConfigurationError
from ._models import State
from ._scheduling import FairShare, SchedulingPolicy

INT32_MAX = 2**31 - 1
"""The largest value of an INTEGER column (priority, attempts, limits) on PostgreSQL."""
INT64_MAX = 2**63 - 1
"""The largest task id (BIGINT) and offset."""
MAX_NAME_LENGTH = 200
"""The longest user, group, task type and node name, in characters, on every backend."""
SCHEMA_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
"""A PostgreSQL schema name: a plain identifier of at most 63 characters (NAMEDATALEN - 1)."""
MAX_ERROR_LENGTH = 65_536
"""The longest stored error text, in characters (``clean_error_text``)."""
MAX_MESSAGE_LENGTH = 1_000
"""The longest progress message of a ``Report``, in characters."""
OnConflict = Literal["error", "skip", "replace"]
"""What ``create_task`` does when a live task of the type holds the unique key already."""
ON_CONFLICT: tuple[OnConflict, ...] = get_args(OnConflict)


def check_int(
    name: str, value: object, *, minimum: int = -INT32_MAX - 1, maximum: int = INT32_MAX
) -> int:
    """An int in ``[minimum, maximum]`` (the column's range by default), checked before any
    I/O: an out-of-range value would otherwise fail in the driver, or only on one backend."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, not {value}")
    if value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum}, not {value}")
    return value


def check_duration(name: str, value: object) -> float:
    """A positive duration: a ``timedelta`` or a number of seconds; returns seconds."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{name} must be a timedelta or a number of seconds, not {type(value).__name__}"
        )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{name} must be a positive duration, not {value!r}")
    return seconds


def check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
    if value <= 0:
        raise ConfigurationError(f"{name} must be positive, not {value}")
    return float(value)


def _check_storable(name: str, value: str) -> None:
    """No NUL and no lone surrogate: what every backend can store and every driver can send."""
    if "\x00" in value:
        raise ConfigurationError(f"{name} must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigurationError(
                f"{name} is not valid Unicode: a lone surrogate {value[exc.start]!r} at index "
                f"{exc.start} cannot be encoded as UTF-8"
            ) from None


def check_text(
    name: str, value: object, *, allow_empty: bool, max_length: int | None = None
) -> str:
    """A storable ``str`` (see the module docstring); blank refused unless ``allow_empty``."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a str, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ConfigurationError(f"{name} must not be empty")
    if max_length is not None and len(value) > max_length:
        raise ConfigurationError(
            f"{name} must be at most {max_length} characters, not {len(value)}"
        )
    _check_storable(name, value)
    return value


def check_name(name: str, value: object, *, allow_empty: bool = False) -> str:
    """A user, group, task type or node name: storable text of at most ``MAX_NAME_LENGTH``."""
    return check_text(name, value, allow_empty=allow_empty, max_length=MAX_NAME_LENGTH)


def check_type_name(name: object) -> str:
    """A task type name: 1 to ``MAX_NAME_LENGTH`` characters, not blank."""
    if not isinstance(name, str):
        raise ConfigurationError(f"task type must be a str, not {type(name).__name__}")
    return check_name("task type", name)


def check_user(user: object) -> str:
    return check_name("user", user, allow_empty=True)


def check_group(group: object) -> str:
    return check_name("group", group)


def check_context(context: object, max_bytes: int) -> str:
    """A task's context: storable text of at most ``max_bytes`` UTF-8 bytes."""
    context = check_text("context", context, allow_empty=True)
    size = len(context.encode("utf-8"))
    if size > max_bytes:
        raise ConfigurationError(
            f"context is {size} bytes, more than max_context_bytes={max_bytes}"
        )
    return context


def check_progress(progress: object) -> float:
    """A task's progress: a finite number from 0 to 1 (a fraction, not a percentage)."""
    if (
        isinstance(progress, bool)
        or not isinstance(progress, int | float)
        or not math.isfinite(progress)
    ):
        raise ConfigurationError(f"progress must be a number from 0 to 1, not {progress!r}")
    if not 0 <= progress <= 1:
        raise ConfigurationError(f"progress must be from 0 to 1 (a fraction), not {progress}")
    return float(progress)


def check_message(message: object) -> str:
    """A progress message: storable text of at most ``MAX_MESSAGE_LENGTH`` characters."""
    return check_text("message", message, allow_empty=True, max_length=MAX_MESSAGE_LENGTH)


def check_unique_key(key: object) -> str:
    """A unique key: a name (storable, not blank, at most ``MAX_NAME_LENGTH`` characters; it is
    indexed with the task type)."""
    if not isinstance(key, str):
        raise ConfigurationError(f"unique_key must be a str, not {type(key).__name__}")
    return check_name("unique_key", key)


def check_on_conflict(on_conflict: object) -> OnConflict:
    """One of ``ON_CONFLICT``."""
    for known in ON_CONFLICT:
        if isinstance(on_conflict, str) and on_conflict == known:
            return known
    choices = ", ".join(repr(c) for c in ON_CONFLICT)
    raise ConfigurationError(f"on_conflict must be one of {choices}, not {on_conflict!r}")


def check_schema(schema: object) -> str:
    """A PostgreSQL schema name: it is quoted into every statement, so only plain identifiers
    are accepted (``SCHEMA_PATTERN``), and not the ``pg_`` prefix PostgreSQL reserves."""
    if not isinstance(schema, str):
        raise ConfigurationError(f"schema must be a str, not {type(schema).__name__}")
    if not SCHEMA_PATTERN.fullmatch(schema):
        raise ConfigurationError(
            f"schema must be a plain identifier (a letter or _, then letters, digits or _, at "
            f"most 63 characters), not {schema!r}"
        )
    if schema.startswith("pg_"):
        raise ConfigurationError(f"schema {schema!r}: the pg_ prefix is reserved by PostgreSQL")
    return schema


def check_task_id(task_id: object) -> int:
    return check_int("task_id", task_id, minimum=1, maximum=INT64_MAX)


def check_states(states: object) -> tuple[State, ...] | None:
    if states is None:
        return None
    if isinstance(states, str | State) or not isinstance(states, Iterable):
        raise ConfigurationError("states must be a list of State values")
    result = []
    for state in states:
        try:
            result.append(State(state))
        except ValueError:
            known = ", ".join(s.value for s in State)
            raise ConfigurationError(f"unknown state {state!r}; known: {known}") from None
    return tuple(result)


def check_types(types: object) -> tuple[str, ...] | None:
    if types is None:
        return None
    if isinstance(types, str) or not isinstance(types, Iterable):
        raise ConfigurationError("types must be a list of task type names")
    try:
        return tuple(check_type_name(t) for t in types)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"bad types: {exc}") from exc


def check_groups(groups: object) -> tuple[str, ...] | None:
    if groups is None:
        return None
    if isinstance(groups, str) or not isinstance(groups, Iterable):
        raise ConfigurationError("groups must be a list of group names")
    names = tuple(check_group(g) for g in groups)
    if not names:
        raise ConfigurationError("groups must name at least one group (None: all groups)")
    return names


def check_policy(policy: object) -> SchedulingPolicy:
    if policy is None:
        return FairShare()
    if not isinstance(policy, SchedulingPolicy) or not isinstance(
        getattr(policy, "order_by", None), str
    ):
        raise ConfigurationError("policy must be a SchedulingPolicy with an order_by")
    return policy


def clean_error_text(text: str, limit: int = MAX_ERROR_LENGTH) -> str:
    """Any error text made storable on every backend, losing as little as possible:

    - lone surrogates (which cannot be encoded as UTF-8) become ``?``;
    - NUL characters become the four visible characters ``\\x00``, as ``repr`` shows them (a
      NUL in an error text is itself a clue worth keeping);
    - a text over ``limit`` characters keeps its head and its tail — where a traceback names
      the error — around a ``\\n… [N characters cut] …\\n`` marker, ``limit`` characters in all.

    A non-``str`` is turned into one with ``str()``. The result is at most ``limit`` characters.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be a positive int, not {limit!r}")
    if not isinstance(text, str):
        text = str(text)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\x00", "\\x00")
    if len(text) <= limit:
        return text
    # The marker's length depends on the count it shows: size it for the largest count, then
    # keep the characters that fewer digits leave room for (a few steps at most).
    keep = limit - len(_cut_marker(len(text)))
    if keep < 2:
        return text[:limit]
    while keep + 1 + len(_cut_marker(len(text) - keep - 1)) <= limit:
        keep += 1
    head = keep - keep // 2
    tail = keep // 2
    return text[:head] + _cut_marker(len(text) - keep) + text[len(text) - tail :]


def _cut_marker(count: int) -> str:
    return f"\n… [{count} characters cut] …\n"
