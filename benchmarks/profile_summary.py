"""Summarise a py-spy profile recorded with ``--format raw`` (collapsed stacks), e.g. by
``drain.py --profile py-spy --profile-file drain.txt`` (``py-spy record --native``).

Prints where the node's CPU went while it ran tasks: by package of the innermost Python frame
(sqlalchemy, asyncpg, anyio, asyncio, aioasync_tasks, …), the share spent in the garbage
collector and in socket system calls, the top Python functions by self time, the top native
leaves, and the ``aioasync_tasks`` functions by inclusive time. Start-up (imports, migration,
``Node.start``) and shutdown (``Node.stop``) are left out.

    python benchmarks/profile_summary.py drain.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]+?)(?::(?P<line>\d+))?\)$")

PACKAGES = (
    "aioasync_tasks",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "anyio",
    "greenlet",
    "asyncio",
    "logging",
    "sqlite3",
    "contextvars",
    "dataclasses",
)
_EXCLUDE = ("Node.start", "Node.stop", "_find_and_load", "SqlDriver.migrate", "Heartbeat.register")


def package(file: str) -> str:
    for name in PACKAGES:
        if file.startswith((name + "/", name + ".")) or f"/{name}/" in file:
            return name
    if file.endswith("_node_proc.py"):
        return "benchmark (task code, counters)"
    if file == "<string>":
        return "dataclass __init__ (<string>)"
    return "other Python: " + file.rsplit("/", 1)[-1]


def _is_native(file: str) -> bool:
    return file.endswith((".c", ".h")) or ".so" in file or file.startswith("0x")


Frame = tuple[str, str, str]  # function, file, line


def parse(path: str) -> list[tuple[list[Frame], int]]:
    stacks = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text, _, count = line.rstrip("\n").rpartition(" ")
            if not text:
                continue
            frames: list[Frame] = []
            for raw in text.split(";"):
                m = _FRAME.match(raw)
                if m is None:
                    frames.append((raw, "?", ""))
                else:
                    frames.append((m.group("func"), m.group("file"), m.group("line") or ""))
            stacks.append((frames, int(count)))
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stacks = parse(args.path)
    total_all = sum(n for _, n in stacks)
    running = [
        (f, n)
        for f, n in stacks
        if any(func.endswith("_run_once") for func, _, _ in f)
        and not any(func in _EXCLUDE for func, _, _ in f)
    ]
    total = sum(n for _, n in running) or 1
    by_package: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    native: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    gc_samples = socket_samples = 0
    for frames, n in running:
        python = [fr for fr in frames if not _is_native(fr[1]) and fr[1] != "?"]
        if any(func == "gc_collect_main" or func.startswith("gc_collect") for func, _, _ in frames):
            gc_samples += n
        if any(func in ("sock_call_ex", "sock_send", "sock_sendall") for func, _, _ in frames):
            socket_samples += n
        if python:
            func, file, line = python[-1]
            by_package[package(file)] += n
            self_lines[f"{func} ({file}:{line})"] += n
        if frames and _is_native(frames[-1][1]):
            native[f"{frames[-1][0]} ({frames[-1][1]})"] += n
        seen = set()
        for func, file, _ in python:
            if package(file) == "aioasync_tasks":
                key = f"{func} ({file.split('aioasync_tasks/', 1)[-1]})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n

    def show(title: str, counter: Counter[str], top: int) -> None:
        print(f"\n{title}")
        for key, n in counter.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {key}")

    print(f"{total} of {total_all} samples are the running node (start-up and stop left out)")
    print(f"  {100 * gc_samples / total:5.1f}%  in the cyclic garbage collector (gc_collect_*)")
    print(f"  {100 * socket_samples / total:5.1f}%  in socket send system calls")
    show("by package of the innermost Python frame", by_package, 15)
    show("top Python lines by self time (innermost Python frame)", self_lines, args.top)
    show("top native leaves", native, 12)
    show("aioasync_tasks functions by inclusive time", inclusive, args.top)


if __name__ == "__main__":
    main()
