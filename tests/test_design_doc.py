"""docs/design.md is checked against the code it describes.

- The two state tables of §3 (user operations, system events) are rendered here from
  ``aioasync_tasks._states`` by asking ``apply_operation``/``apply_event`` about every cell, and
  must equal the tables in the doc. When the rules change, print the new tables with
  ``.venv/bin/python tests/test_design_doc.py`` and paste them under their markers.
- Every state and every event is described in the doc's hand-written tables of §3.
- Every ``docs/design.md §N`` that the code or the tests cite names a section that exists.
- Relative links in docs/design.md and CONTRIBUTING.md lead to files and headings that exist.

No database is needed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from aioasync_tasks import InvalidTransition, Operation, State, StopRequest
from aioasync_tasks._states import Event, Outcome, apply_event, apply_operation

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
OPERATIONS_MARKER = "<!-- generated: state table, user operations -->"
EVENTS_MARKER = "<!-- generated: state table, system events -->"

Row = list[str]


# -- rendering the tables from the rules --------------------------------------------------


def _rows() -> list[tuple[State, StopRequest | None]]:
    rows: list[tuple[State, StopRequest | None]] = []
    for state in State:
        if state is State.CANCELING:
            rows += [(state, requested) for requested in StopRequest]
        else:
            rows.append((state, None))
    return rows


def _state_name(state: State, requested: StopRequest | None) -> str:
    name = state.name
    return f"{name} ({requested.value})" if requested is not None else name


def _cell(source: tuple[State, StopRequest | None], outcome: Outcome | None) -> str:
    """One outcome in the doc's notation (legend in docs/design.md §3.2)."""
    if outcome is None:
        return "✗"
    if not outcome.changed:
        return "="
    if outcome.state is None:
        text = "removed"
    elif (outcome.state, outcome.requested) == source:
        text = "kept"
    else:
        text = "→ " + _state_name(outcome.state, outcome.requested)
    flags = [
        name
        for name, on in (
            ("owned", outcome.owned),
            ("stop", outcome.stop),
            ("back-off", outcome.retry),
            ("attempts reset", outcome.reset_attempts),
        )
        if on
    ]
    return ", ".join([text, *flags])


def _variants(base: str, others: list[tuple[str, str]]) -> str:
    """``base``, then each variant whose result differs: ``base; no handler: removed``."""
    parts = [base]
    parts += [f"{label}: {text}" for label, text in others if text != base]
    return "; ".join(parts)


def _operation_cell(
    state: State, requested: StopRequest | None, operation: Operation, *, force: bool = False
) -> str:
    results: list[str] = []
    for has_cleanup in (True, False):
        try:
            outcome = apply_operation(
                state, requested, operation, has_cleanup=has_cleanup, force=force
            )
        except InvalidTransition:
            results.append(_cell((state, requested), None))
        else:
            results.append(_cell((state, requested), outcome))
    return _variants(results[0], [("no handler", results[1])])


def operation_table() -> list[Row]:
    """Every state, and every user operation (and delete with ``force=True``) on it."""
    header = ["from", "run", "pause", "delete", "delete, force", "change group"]
    table = [header]
    for state, requested in _rows():
        table.append(
            [
                _state_name(state, requested),
                _operation_cell(state, requested, Operation.RUN),
                _operation_cell(state, requested, Operation.PAUSE),
                _operation_cell(state, requested, Operation.DELETE),
                _operation_cell(state, requested, Operation.DELETE, force=True),
                _operation_cell(state, requested, Operation.CHANGE_GROUP),
            ]
        )
    return table


def _event_result(
    state: State, requested: StopRequest | None, event: Event, *, has_cleanup: bool, can_retry: bool
) -> str:
    outcome = apply_event(state, requested, event, has_cleanup=has_cleanup, can_retry=can_retry)
    return "—" if outcome is None else _cell((state, requested), outcome)


def _event_cell(state: State, requested: StopRequest | None, event: Event) -> str | None:
    """The outcome of ``event`` in ``(state, requested)``; None where it never applies."""
    results = {
        (has_cleanup, can_retry): _event_result(
            state, requested, event, has_cleanup=has_cleanup, can_retry=can_retry
        )
        for has_cleanup in (True, False)
        for can_retry in (True, False)
    }
    if set(results.values()) == {"—"}:
        return None
    base = results[True, True]
    variants = [("no attempts left", results[True, False]), ("no handler", results[False, True])]
    both = results[False, False]
    if both not in {base, *(text for _, text in variants)}:
        variants.append(("no handler, no attempts left", both))
    return _variants(base, variants)


def event_table() -> list[Row]:
    """Every (event, state) pair where the event applies; every other pair is stale."""
    table = [["event", "from", "to"]]
    for event in Event:
        for state, requested in _rows():
            cell = _event_cell(state, requested, event)
            if cell is not None:
                table.append([event.value, _state_name(state, requested), cell])
    return table


def markdown(table: list[Row]) -> str:
    header, *body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# -- reading the doc ----------------------------------------------------------------------


def design_text() -> str:
    return DESIGN.read_text(encoding="utf-8")


def _split_row(line: str) -> Row:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_after(text: str, marker: str) -> list[Row]:
    """The markdown table that follows ``marker`` (blank lines allowed in between)."""
    lines = text.splitlines()
    assert marker in lines, f"docs/design.md lost its marker {marker!r}"
    index = lines.index(marker) + 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    table: list[Row] = []
    while index < len(lines) and lines[index].lstrip().startswith("|"):
        row = _split_row(lines[index])
        if not all(re.fullmatch(r":?-+:?", cell) for cell in row):  # the separator row
            table.append(row)
        index += 1
    return table


def first_column(text: str, header: str) -> set[str]:
    """The first cells of the table whose header row starts with ``| header |``."""
    cells: set[str] = set()
    inside = False
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            inside = False
            continue
        row = _split_row(line)
        if row[0] == header:
            inside = True
        elif inside and not re.fullmatch(r":?-+:?", row[0]):
            cells.add(row[0].strip("`*"))
    return cells


# -- the tests ----------------------------------------------------------------------------


def _compare(marker: str, expected: list[Row]) -> None:
    found = table_after(design_text(), marker)
    assert found == expected, (
        f"the table under {marker!r} in docs/design.md differs from aioasync_tasks/_states.py; "
        f"the table the rules give is:\n\n{markdown(expected)}\n"
    )


def test_operation_table_matches_the_state_rules() -> None:
    _compare(OPERATIONS_MARKER, operation_table())


def test_event_table_matches_the_state_rules() -> None:
    _compare(EVENTS_MARKER, event_table())


def test_every_state_and_event_is_described() -> None:
    text = design_text()
    states = first_column(text, "state")
    assert {s.name for s in State} <= states, f"states missing from §3.1: {states}"
    events = first_column(text, "event, operation")
    described = {e.value for e in Event} | {"user operations"}
    assert described <= events, f"events missing from §3.4: {described - events}"


SECTION = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", flags=re.MULTILINE)
CITATION = re.compile(r"docs/design\.md,? §(\d+(?:\.\d+)?)")


def test_cited_sections_exist() -> None:
    sections = set(SECTION.findall(design_text()))
    cited: dict[str, set[str]] = {}
    paths = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    for folder in ("aioasync_tasks", "tests", "benchmarks", "examples", "docs"):
        paths += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".sql"}]
    for path in paths:
        for number in CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    missing = {number: sorted(paths) for number, paths in cited.items() if number not in sections}
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"


def test_sections_are_numbered_in_order() -> None:
    numbers = [n for n in SECTION.findall(design_text()) if "." not in n]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_links_resolve() -> None:
    broken: list[str] = []
    for doc in (DESIGN, ROOT / "CONTRIBUTING.md"):
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


if __name__ == "__main__":
    sys.stdout.write(f"{OPERATIONS_MARKER}\n\n{markdown(operation_table())}\n\n")
    sys.stdout.write(f"{EVENTS_MARKER}\n\n{markdown(event_table())}\n")
