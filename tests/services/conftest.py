"""Fixtures for the service tests (the fakes are :mod:`vtl.testing`); registers
``../bridge/transports/socks5peer.py`` (the scripted SOCKS5 / Tor peer) as
``transports_socks5peer``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vtl.testing import FakeContext

_HERE = Path(__file__).parent
_NAME = "transports_socks5peer"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, _HERE.parent / "bridge" / "transports" / "socks5peer.py")
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()
