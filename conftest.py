"""Shared test settings: hypothesis profiles. (At the repository root, not in tests/, so that
pytest puts the root on sys.path and `tests/vtl/` never shadows the `vtl` package.)"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
