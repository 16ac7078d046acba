"""The example plugins, loaded from their files the way a config's
``use = "examples/plugins/NAME.py:Class"`` loads them (:func:`vtl.bridge.plugins.load_file`)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
from vtl.bridge.plugins import load_file

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "examples" / "plugins"


def load_plugin(name: str, cls: str) -> ModuleType:
    """The module of ``examples/plugins/<name>.py``, loaded through the bridge's loader."""
    return sys.modules[load_file(f"{PLUGINS / name}.py:{cls}").__module__]


@pytest.fixture(scope="module")
def protocount() -> ModuleType:
    return load_plugin("protocount", "ProtoCount")


@pytest.fixture(scope="module")
def ttlnorm() -> ModuleType:
    return load_plugin("ttlnorm", "TtlNorm")
