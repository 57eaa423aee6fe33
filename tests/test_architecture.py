"""The dependency direction of docs/architecture.md, checked on every import in the package.

Every ``import``/``from … import`` in ``medseg/`` is read (also those inside functions). Each
module belongs to a layer; a module may import its own layer and the layers below it, never
one above. On top of that: no import cycle between modules, none between parts (first-level
packages), and no private name (``_name``) imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "medseg"

#: bottom to top; a module may import from its own layer or a lower one
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["medseg.core"]),
    ("io", ["medseg.io"]),
    ("preprocessing", ["medseg.preprocessing"]),
    ("models", ["medseg.models"]),
    ("inference", ["medseg.inference"]),
    ("evaluation", ["medseg.evaluation"]),
    ("planning", ["medseg.planning"]),
    ("training", ["medseg.training"]),
    ("seg2d", ["medseg.seg2d"]),
    ("apps", ["medseg.apps"]),
    ("cli", ["medseg.cli", "medseg.__main__"]),
]
#: the package root only re-exports lazily (``medseg.Predictor``); it may name anything
ROOT = "medseg"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every medseg import in ``path``, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == ROOT or target.startswith(ROOT + "."):
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    found.append((alias.name, [], node.lineno))
    return found


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def part_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, _ in imports_of(path):
            # "from medseg.io import volume" names a module; "from medseg.io import load_volume" a symbol
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            edges[mod].update(subs or ([target] if target in MODULES else []))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m != ROOT and layer_of(m) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS and docs/architecture.md): {unplaced}"


def test_imports_point_down():
    upward = []
    for mod, path in MODULES.items():
        if mod == ROOT:
            continue
        here = layer_of(mod)
        for target, _, line in imports_of(path):
            there = layer_of(target)
            if target == ROOT:
                there = 0 if mod.startswith("medseg.core") else here  # medseg.__version__ only
            if there is not None and here is not None and there > here:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mod} ({LAYERS[here][0]}) imports "
                              f"{target} ({LAYERS[there][0]})")
    assert not upward, "imports against the dependency direction:\n" + "\n".join(upward)


def test_no_module_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "module import cycle: " + " -> ".join(cycle)


def test_no_cycles_between_parts():
    parts: dict[str, set[str]] = {}
    for mod, targets in graph().items():
        if mod == ROOT:
            continue
        parts.setdefault(part_of(mod), set()).update(part_of(t) for t in targets if part_of(t) != part_of(mod)
                                                     and t != ROOT)
    cycle = find_cycle(parts)
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle)


def test_no_private_names_across_modules():
    leaks = []
    for mod, path in MODULES.items():
        for target, names, line in imports_of(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != mod:
                    leaks.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {n} from {target}")
    assert not leaks, "private names imported from other modules:\n" + "\n".join(leaks)


@pytest.mark.parametrize("source, expect", [
    ("from medseg.apps.batch import run_batch\n", "imports against"),
    ("from medseg.core.config import _read_yaml_mapping\n", "private names"),
])
def test_the_checks_can_fail(tmp_path, monkeypatch, source, expect):
    """A planted violation in a core module is caught (the checks are not vacuous)."""
    bad = tmp_path / "medseg" / "core" / "errors.py"
    bad.parent.mkdir(parents=True)
    bad.write_text((PACKAGE / "core" / "errors.py").read_text() + "\n" + source)
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "medseg")
    monkeypatch.setitem(globals(), "MODULES", {"medseg.core.errors": bad})
    check = test_imports_point_down if expect == "imports against" else test_no_private_names_across_modules
    with pytest.raises(AssertionError, match=expect):
        check()
