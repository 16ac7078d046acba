"""Integration fixtures: real namespaces, real kernel stacks, a real `vtl run`.

Every test gets its own namespace prefix and removes what it made in teardown,
even on failure. These tests need root; in CI (``CI`` set) a missing root is a
failure, never a skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from vtl.bridge.topology import Topology
from vtlnet import Net


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("integration tests need root, and CI runs as root")
        pytest.skip("needs root")



@pytest.fixture
def net(root: None, tmp_path: Path) -> Iterator[Net]:
    tag = "vti" + secrets.token_hex(3)
    topo = Topology(tag)
    n: Net | None = None
    try:
        n = Net(topo, tag, tmp_path)
        yield n
    finally:
        if n is not None:
            n.stop_all()
        topo.close()
