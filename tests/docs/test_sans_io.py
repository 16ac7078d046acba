"""The rule docs/architecture.md states, "only `vtl.bridge` does I/O or reads the clock",
holds in the source tree: no module outside ``bridge/`` imports the clock, waits on
sockets or runs threads and processes (``tests/test_layers.py`` checks which layer imports
which, and import cycles). Checked statically on every module (imports inside functions
included, so a lazy import cannot hide). ``vtl.testing`` is the test kit and may do what a
test does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"vtl": "vtl", "models": "vtl.models", "services": "vtl.services",
           "bridge": "vtl.bridge"}
SANS_IO = [p for folder in ("vtl", "models", "services")
           for p in sorted((ROOT / folder).rglob("*.py"))
           if p.relative_to(ROOT).parts[:2] != ("vtl", "testing")]
#: the clock, waiting on I/O, threads and processes: only vtl.bridge imports these
IO_MODULES = {"time", "datetime", "select", "selectors", "asyncio", "threading",
              "subprocess", "multiprocessing", "signal", "pyroute2", "pcapy"}
#: socket is allowed outside the bridge for address conversion only
SOCKET_PURE = {"inet_pton", "inet_ntop", "inet_aton", "inet_ntoa", "AF_INET", "AF_INET6"}


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_does_no_io_and_reads_no_clock(path):
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            names = []
        problems += [f"{where}:{node.lineno}: imports {n}" for n in names
                     if n.split(".")[0] in IO_MODULES]
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "socket" and node.attr not in SOCKET_PURE):
            problems.append(f"{where}:{node.lineno}: socket.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "open":
            problems.append(f"{where}:{node.lineno}: open() (files come from ctx.open_file)")
    assert not problems, "only vtl.bridge does I/O or reads the clock:\n" + "\n".join(problems)


def test_the_rule_is_the_one_the_architecture_page_states():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert "only `vtl.bridge` does I/O or reads the clock" in page
    for folder, package in FOLDERS.items():
        assert f"| `{folder}/` | `{package}` |" in page
