"""Fixtures for the service tests; registers ``fakes.py`` as ``services_fakes`` and
``../bridge/transports/socks5peer.py`` (the scripted SOCKS5 / Tor peer) as
``transports_socks5peer``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
for _NAME, _PATH in (("services_fakes", _HERE / "fakes.py"),
                     ("transports_socks5peer", _HERE.parent / "bridge" / "transports"
                      / "socks5peer.py")):
    if _NAME not in sys.modules:
        _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
        assert _spec is not None and _spec.loader is not None
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[_NAME] = _mod
        _spec.loader.exec_module(_mod)

from services_fakes import FakeContext  # noqa: E402


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()
