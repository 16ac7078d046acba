"""Fixtures for the service tests; registers ``fakes.py`` as ``services_fakes``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "services_fakes"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("fakes.py"))
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)

from services_fakes import FakeContext  # noqa: E402


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()
