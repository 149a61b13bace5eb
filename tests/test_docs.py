"""The documentation is tested: every ```python block of README.md and docs/*.md runs, the state
diagram of docs/explanation.md is exactly the one the state table produces, and
docs/reference.md names every public name (with the signature of every callable).

Each python block is a complete program, run in a fresh interpreter in an empty temporary
directory (blocks use SQLite files there). Fragments that cannot run use a ```text fence.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import aioasync_tasks
from aioasync_tasks import (
    InvalidTransition,
    Node,
    Operation,
    Report,
    State,
    StopRequest,
    Task,
    TaskRegistry,
    TaskType,
    samples,
)
from aioasync_tasks._states import Event, Outcome, apply_event, apply_operation

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# -- code blocks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """The line of the opening fence (1-based)."""
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a markdown file, with their language (may be empty)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        fence, language = match.group(1), match.group(2)
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1  # the closing fence
        yield Block(path, start + 1, language.lower(), "\n".join(body) + "\n")


def python_blocks() -> list[Block]:
    return [
        block
        for path in DOC_FILES
        if path.exists()
        for block in code_blocks(path)
        if block.language in {"python", "py"}
    ]


def test_every_doc_exists_and_has_examples() -> None:
    names = {"README.md", "quickstart.md", "how-to.md", "explanation.md", "reference.md"}
    assert {path.name for path in DOC_FILES} >= names
    with_code = {block.path.name for block in python_blocks()}
    assert {"README.md", "quickstart.md", "how-to.md"} <= with_code


@pytest.mark.slow
@pytest.mark.parametrize("block", python_blocks(), ids=lambda block: block.name)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, (
        f"the example at {block.name} failed:\n{proc.stdout}\n{proc.stderr}"
    )


# -- the state diagram --------------------------------------------------------------------

REMOVED = "[*]"
CREATION_EDGES = {
    # Creation is not a transition of the state table: create_task inserts the row directly.
    (REMOVED, "PENDING", "create"),
    (REMOVED, "INIT", "create (auto_run=False)"),
}
OPERATION_VARIANTS: list[tuple[str, dict[str, bool]]] = [
    ("", {"has_cleanup": True}),
    ("no cleanup handler", {"has_cleanup": False}),
    ("force", {"has_cleanup": True, "force": True}),
]
EVENT_VARIANTS: list[tuple[str, dict[str, bool]]] = [
    ("", {"has_cleanup": True, "can_retry": True}),
    ("no attempts left", {"has_cleanup": True, "can_retry": False}),
    ("no cleanup handler", {"has_cleanup": False, "can_retry": True}),
]


def diagram_state(state: State | None, requested: StopRequest | None) -> str:
    """The mermaid id of a visible state (CANCELING is drawn once per stop request)."""
    if state is None:
        return REMOVED
    if state is State.CANCELING:
        assert requested is not None
        return f"CANCELING_{requested.name}"
    return state.name


def table_states() -> Iterator[tuple[State, StopRequest | None]]:
    for state in State:
        if state is State.CANCELING:
            yield from ((state, requested) for requested in StopRequest)
        else:
            yield state, None


def _label_edges(
    source: str, action: str, outcomes: list[tuple[str, Outcome | None]]
) -> Iterator[tuple[str, str, str]]:
    """Edges of one action from one state; the label names the variant when it matters."""
    targets: dict[str, list[str]] = {}
    for qualifier, outcome in outcomes:
        if outcome is None or not outcome.changed:
            continue
        target = diagram_state(outcome.state, outcome.requested)
        if target != source:  # self-loops (change group, cleanup retry …) are not drawn
            targets.setdefault(target, []).append(qualifier)
    for target, qualifiers in targets.items():
        if "" in qualifiers:
            yield source, target, action
        else:
            yield source, target, f"{action} ({' or '.join(qualifiers)})"


def state_table_edges() -> set[tuple[str, str, str]]:
    """Every edge of the state diagram, derived by asking the pure state table about every
    (state, operation or event) pair, with and without a cleanup handler, force, retries."""
    edges: set[tuple[str, str, str]] = set()
    for state, requested in table_states():
        source = diagram_state(state, requested)
        for operation in Operation:
            outcomes: list[tuple[str, Outcome | None]] = []
            for qualifier, options in OPERATION_VARIANTS:
                if "force" in options and operation is not Operation.DELETE:
                    continue
                try:
                    outcomes.append(
                        (qualifier, apply_operation(state, requested, operation, **options))
                    )
                except InvalidTransition:
                    outcomes.append((qualifier, None))
            edges.update(_label_edges(source, operation.value, outcomes))
        for event in Event:
            outcomes = [
                (qualifier, apply_event(state, requested, event, **options))
                for qualifier, options in EVENT_VARIANTS
            ]
            edges.update(_label_edges(source, event.value, outcomes))
    # One arrow per pair of states, its labels joined, as the diagram draws it.
    merged: dict[tuple[str, str], set[str]] = {}
    for source, target, label in edges:
        merged.setdefault((source, target), set()).add(label)
    drawn = {(s, t, ", ".join(sorted(labels))) for (s, t), labels in merged.items()}
    return drawn | CREATION_EDGES


def mermaid_diagram() -> str:
    """The state diagram as it should appear in docs/explanation.md."""
    lines = ["stateDiagram-v2"]
    lines += [
        f'    state "CANCELING ({requested.value})" as CANCELING_{requested.name}'
        for requested in StopRequest
    ]
    lines += [f"    {s} --> {t}: {label}" for s, t, label in sorted(state_table_edges())]
    return "\n".join(lines) + "\n"


EDGE = re.compile(r"^\s*(\S+)\s*-->\s*(\S+)\s*:\s*(.+?)\s*$")


def test_state_diagram_matches_the_state_table() -> None:
    diagrams = [b for b in code_blocks(DOCS / "explanation.md") if b.language == "mermaid"]
    state_diagrams = [b for b in diagrams if b.code.lstrip().startswith("stateDiagram")]
    assert len(state_diagrams) == 1, "docs/explanation.md needs one mermaid stateDiagram"
    drawn = {
        (m.group(1), m.group(2), m.group(3))
        for line in state_diagrams[0].code.splitlines()
        if (m := EDGE.match(line))
    }
    expected = state_table_edges()
    assert drawn == expected, (
        "the diagram in docs/explanation.md differs from the state table; "
        f"missing: {sorted(expected - drawn)}, extra: {sorted(drawn - expected)}; "
        f"the generated diagram is:\n{mermaid_diagram()}"
    )


def test_every_state_appears_in_the_diagram() -> None:
    states = {s for edge in state_table_edges() for s in edge[:2]}
    assert states == {diagram_state(s, r) for s, r in table_states()} | {REMOVED}


# -- the reference ------------------------------------------------------------------------


def plain_signature(name: str, obj: object) -> str:
    """``name(a, b='x', *, c=1)``: the signature without annotations, as reference.md shows it."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(target)  # type: ignore[arg-type]
    parameters = [
        p.replace(annotation=inspect.Parameter.empty)
        for p in signature.parameters.values()
        if p.name != "self"
    ]
    plain = signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)
    return f"{name}{plain}"


def reference_text() -> str:
    return (DOCS / "reference.md").read_text(encoding="utf-8")


def documented_callables() -> dict[str, object]:
    """Public functions, the ``Node`` constructor and methods, and the methods users call on
    registries, task types and reports: each with its signature in reference.md."""
    found: dict[str, object] = {
        name: getattr(aioasync_tasks, name)
        for name in aioasync_tasks.__all__
        if inspect.isfunction(getattr(aioasync_tasks, name))
    }
    found["Node"] = Node
    for name, member in inspect.getmembers(Node):
        if not name.startswith("_") and inspect.isfunction(member):
            found[f"Node.{name}"] = member
    for cls, names in [
        (TaskRegistry, ["register_task", "task", "get"]),
        (TaskType, ["deleting"]),
        (Report, ["finished", "failed"]),
    ]:
        for name in names:
            found[f"{cls.__name__}.{name}"] = getattr(cls, name)
    return found


def reference_headings() -> set[str]:
    """The names of the ``### `name` `` headings of reference.md."""
    pattern = r"^#{2,4} `([\w.]+)`"
    return {m.group(1) for m in re.finditer(pattern, reference_text(), flags=re.MULTILINE)}


def test_reference_has_every_public_name() -> None:
    headings = reference_headings()
    missing = [name for name in aioasync_tasks.__all__ if name not in headings]
    assert not missing, f"docs/reference.md has no '### `name`' heading for {missing}"


def test_reference_has_every_sample() -> None:
    headings = reference_headings()
    missing = [name for name in samples.__all__ if f"samples.{name}" not in headings]
    assert not missing, f"docs/reference.md has no '### `samples.name`' heading for {missing}"
    assert plain_signature("cell_group", samples.cell_group) in reference_text()


def test_reference_json_example_is_a_task() -> None:
    (block,) = [b for b in code_blocks(DOCS / "reference.md") if b.language == "json"]
    assert list(json.loads(block.code)) == [f.name for f in dataclasses.fields(Task)]


def test_reference_has_every_node_method_and_property() -> None:
    text = reference_text()
    public = [name for name in dir(Node) if not name.startswith("_")]
    missing = [name for name in public if f"`Node.{name}" not in text]
    assert not missing, f"docs/reference.md does not describe Node.{missing}"


@pytest.mark.parametrize("name", sorted(documented_callables()))
def test_reference_signature_is_current(name: str) -> None:
    signature = plain_signature(name, documented_callables()[name])
    assert signature in reference_text(), (
        f"docs/reference.md should show the signature of {name} as `{signature}`"
    )
