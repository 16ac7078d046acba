"""The shape of the tree: the import rule between layers, no import cycles, house size.

The check reads every source module with ``ast`` (nothing is imported) and
builds the graph of imports between the project's own modules, counting every
``import`` statement wherever it stands (module level, inside functions, under
``TYPE_CHECKING``): a cycle through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vtl": "vtl", "models": "vtl.models", "services": "vtl.services",
            "bridge": "vtl.bridge"}
MAX_LINES = 600
# which layer may import which (DESIGN.md): vtl imports nothing of ours above it
ALLOWED = {
    "vtl": {"vtl"},
    "vtl.models": {"vtl", "vtl.models"},
    "vtl.services": {"vtl", "vtl.models", "vtl.services"},
    "vtl.bridge": {"vtl", "vtl.models", "vtl.services", "vtl.bridge"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()
# native extensions (setup.py): modules too, leaves that import nothing of the project
EXTENSIONS = set(re.findall(r'Extension\(\s*"([\w.]+)"', (ROOT / "setup.py").read_text()))


def _layer(module: str) -> str:
    for layer in ("vtl.models", "vtl.services", "vtl.bridge"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "vtl"


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent if is_pkg else parent[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and name not in EXTENSIONS:
                # vtl.packet.tcp.SYN -> vtl.packet.tcp
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_check_sees_the_tree() -> None:
    assert "vtl.flow" in MODULES and "vtl.bridge.engine" in MODULES
    assert "vtl.flow" in GRAPH["vtl.bridge.engine"]
    assert "vtl.bridge.transports._udtcc" in GRAPH["vtl.bridge.transports.udtcc"]


def test_layers_import_only_what_the_design_allows() -> None:
    bad = []
    for module, deps in GRAPH.items():
        layer = _layer(module)
        for dep in deps:
            if _layer(dep) not in ALLOWED[layer]:
                bad.append(f"{module} imports {dep}")
            elif layer == "vtl.services" and _layer(dep) == "vtl.services":
                svc = module.split(".")[2]  # vtl.services.<name>...
                if dep.split(".")[2:3] != [svc] and dep != "vtl.services":
                    bad.append(f"{module} imports another service: {dep}")
    assert not bad, "\n".join(sorted(bad))


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w.endswith("__init__") or w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def _package_imports_are_not_cycles(comp: list[str]) -> bool:
    """A package's ``__init__`` re-exporting its submodules, which import the package's
    siblings through it, is how Python packages are built: only cycles that remain
    among plain modules count."""
    plain = [m for m in comp if MODULES[m].name != "__init__.py"]
    return len(plain) <= 1


def test_no_import_cycles() -> None:
    cycles = [c for c in _cycles() if not _package_imports_are_not_cycles(c)]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_source_files_stay_house_size() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
