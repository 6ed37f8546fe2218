"""Dependencies point one way: floor -> algorithm API -> plug-ins -> actors -> orchestration -> CLI/API.

Every import counts, at module level or inside a function (a hidden import is still a
dependency), and so do imports under TYPE_CHECKING. Plug-ins are found by package scan
(sim/plugins.py), never imported by name from below.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("sim", "actors", "algorithms", "baselines", "run_sim.py")

# (module prefix, layer); the longest matching prefix wins. Within a layer imports go either way,
# but the units (the prefixes) must not form a cycle.
LAYERS: dict[str, int] = {
    "sim.errors": 0,
    "sim.typed": 0,
    "sim.plugins": 0,
    "sim.files": 0,
    "sim.memory": 0,
    "sim.models": 0,
    "sim.config": 0,
    "sim.data": 0,
    "sim.partition": 0,
    "sim.training": 0,
    "sim.results": 0,
    "sim.stats": 0,
    "sim.metrics": 0,
    "sim.devices": 0,
    "sim.rng": 0,
    "sim.callbacks": 0,
    "algorithms": 1,
    "baselines": 2,
    "algorithms.warmfed": 2,
    "actors": 3,
    "sim.orchestration": 4,
    "sim.api": 5,
    "sim": 5,  # only the package facade itself (`sim.run`, resolved lazily from sim.api): see EXACT
    "run_sim": 5,
}
EXACT = {"sim"}  # entries that name one module, not a prefix: sim.<new module> must get its own layer
NAMES = ("floor", "algorithm API", "plug-ins", "actors", "orchestration", "CLI/API")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    """The longest LAYERS prefix of `module` (None: not first-party)."""
    if module in EXACT:
        return module
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS and prefix not in EXACT:
            return prefix
    return None


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """First-party modules `path` imports anywhere in its body; `from a import b` counts a.b if it is a module."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if unit_of(m) is not None and m != module}


def graph(root: Path) -> dict[str, set[str]]:
    files = []
    for source in SOURCES:
        p = root / source
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    names = {module_name(root, f): f for f in files}
    return {m: imports_of(f, m, set(names)) for m, f in names.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a path that returns to its start (None: acyclic)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def violations(root: Path) -> list[str]:
    modules = graph(root)
    problems = []
    units: dict[str, set[str]] = {}
    for module, targets in sorted(modules.items()):
        src = unit_of(module)
        assert src is not None, module
        for target in sorted(targets):
            dst = unit_of(target)
            assert dst is not None
            if LAYERS[dst] > LAYERS[src]:
                problems.append(
                    f"upward import: {module} ({NAMES[LAYERS[src]]}) imports {target} ({NAMES[LAYERS[dst]]})"
                )
            if dst != src:
                units.setdefault(src, set()).add(dst)
    cycle = find_cycle(units)
    if cycle:
        problems.append("package cycle: " + " -> ".join(cycle))
    return problems


def test_the_code_base_has_no_upward_import_and_no_package_cycle():
    assert violations(ROOT) == []


def test_every_module_has_a_layer():
    for module in graph(ROOT):
        assert unit_of(module) is not None, f"{module}: add it to LAYERS"
    assert unit_of("sim.brand_new") is None and unit_of("sim") == "sim"


@pytest.fixture
def tree(tmp_path):
    for source in SOURCES:
        src = ROOT / source
        if src.is_file():
            shutil.copy(src, tmp_path / source)
        else:
            shutil.copytree(src, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    assert violations(tmp_path) == []
    return tmp_path


def test_a_hidden_upward_import_fails(tree):
    with open(tree / "sim" / "training.py", "a") as f:
        f.write("\n\ndef _late():\n    from algorithms.base import ClientContext\n\n    return ClientContext\n")
    assert violations(tree) == [
        "upward import: sim.training (floor) imports algorithms.base (algorithm API)",
        "package cycle: algorithms -> sim.training -> algorithms",  # algorithms.base imports sim.training
    ]


def test_a_plugin_importing_orchestration_fails(tree):
    with open(tree / "baselines" / "fedavg.py", "a") as f:
        f.write("\nfrom sim.orchestration import engine  # noqa\n")
    found = violations(tree)
    assert any("baselines.fedavg (plug-ins) imports sim.orchestration.engine (orchestration)" in p for p in found)


def test_a_cycle_between_packages_of_one_layer_fails(tree):
    (tree / "sim" / "stats.py").write_text((tree / "sim" / "stats.py").read_text() + "\nimport sim.results\n")
    (tree / "sim" / "results.py").write_text((tree / "sim" / "results.py").read_text() + "\nimport sim.stats\n")
    found = violations(tree)
    assert len(found) == 1 and found[0].startswith("package cycle: ")
    assert "sim.results" in found[0] and "sim.stats" in found[0]


def test_find_cycle_on_a_synthetic_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
