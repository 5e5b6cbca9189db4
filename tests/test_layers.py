"""The package's imports run one way: math <- encoder, automatic <- surgery <- models and memory <- inputs,
outputs, tiles <- engines, segment, interactive <- demo, cli; and nowhere in a circle.

Every `import` in every module counts, those inside functions too (a circle hidden behind a
function-level import is still a circle). An import names the module it loads: `from
sam_blocked.inputs import geo` is an edge to sam_blocked.inputs.geo, `from sam_blocked.inputs.images
import read_image` to sam_blocked.inputs.images.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sam_blocked"

# Lowest first. A module may import from its own layer or a lower one, never a higher one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("math", ("attention", "errors")),
    ("encoder blocks, mask decoder", ("encoder", "automatic")),
    ("surgery", ("adapters", "patch", "switch", "resolution")),
    ("models and memory", ("models", "memory", "verify")),
    ("inputs, outputs, tiles", ("inputs", "outputs", "tiles", "masks", "summary")),
    ("engines, segment, interactive", ("engines", "segment", "interactive")),
    ("edges", ("demo", "cli", "__main__")),
]
TIER = {concept: tier for tier, (_, concepts) in enumerate(LAYERS) for concept in concepts}
# Folders: a concept of several files. Everything else at the top is a single-file concept.
FOLDERS = {"attention", "encoder", "automatic", "adapters", "resolution", "models", "memory", "inputs", "outputs", "tiles", "engines", "interactive", "demo", "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The sam_blocked modules `name` imports, at any depth of its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sam_blocked")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "sam_blocked":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {m for m in found if m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def concept(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_every_module_belongs_to_a_layer():
    unplaced = sorted({concept(m) for m in MODULES if concept(m) and concept(m) not in TIER})
    assert not unplaced, f"modules outside every layer: {unplaced}; add them to LAYERS in {__file__}"


def test_no_import_goes_up_a_layer():
    upward = [
        f"{name} ({LAYERS[TIER[concept(name)]][0]}) imports {dep} ({LAYERS[TIER[concept(dep)]][0]})"
        for name, deps in GRAPH.items()
        if concept(name)  # the package's own __init__ is the public face: it may gather from any layer below the edges
        for dep in sorted(deps)
        if concept(dep) and TIER[concept(dep)] > TIER[concept(name)]
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_public_face_imports_no_edge():
    edges = sorted(d for d in GRAPH["sam_blocked"] if TIER.get(concept(d)) == len(LAYERS) - 1)
    assert not edges, f"sam_blocked/__init__.py imports the edges {edges}: the library never imports the CLI or the demo"


def test_no_module_import_circle():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import circle between modules: " + " -> ".join(cycle)


def test_no_circle_between_concepts():
    concepts: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        if concept(name):
            concepts.setdefault(concept(name), set()).update(concept(d) for d in deps if concept(d) and concept(d) != concept(name))
    cycle = find_cycle(concepts)
    assert not cycle, "import circle between concepts (folders or single-file modules): " + " -> ".join(cycle)


def test_no_top_level_module_belongs_to_a_folder():
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    clash = [f for f in flat if f in FOLDERS or any(f.startswith(folder + "_") for folder in FOLDERS)]
    assert not clash, f"top-level modules that belong to a concept folder: {clash}"


def test_gradio_is_imported_only_in_the_demo():
    outside = [
        name
        for name, path in MODULES.items()
        if concept(name) != "demo"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any((getattr(node, "module", None) or a.name).split(".")[0] == "gradio" for a in node.names)
    ]
    assert not outside, f"gradio imported outside sam_blocked/demo: {outside}"


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_cycle_finds_what_is_there(graph, cycle):
    assert find_cycle(graph) == cycle
