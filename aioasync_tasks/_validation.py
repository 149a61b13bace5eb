"""Checks of values before they reach the database."""

from __future__ import annotations

MAX_ERROR_CHARS = 65_536
"""The longest error text stored with a task; longer ones keep their head and tail."""


def clean_error_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` made storable on every backend: NUL characters and lone surrogates replaced,
    and at most ``limit`` characters (the head and the tail, with a marker between)."""
    text = text.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit:
        return text
    marker = f"\n… [{len(text) - limit} characters cut] …\n"
    keep = max(limit - len(marker), 0)
    return text[: keep // 2] + marker + text[len(text) - (keep - keep // 2) :]
