"""A service for the timer test (loaded as a plugin: ``use = "FILE:Ticker"``): it asks
for a timer every ``period_ms`` and reports how late each one fired."""

from __future__ import annotations

import statistics
from typing import Any

from pydantic import Field

from vtl import PASS, Direction, Frame, Service, ServiceOptions, Verdict


class TickerOptions(ServiceOptions):
    period_ms: float = Field(5.0, gt=0, description="time between timers")
    count: int = Field(200, gt=0, le=10_000, description="timers to measure, then stop")


class Ticker(Service):
    """Passes every frame; measures its own timers' lateness."""

    name = "ticker"
    Options = TickerOptions

    def start(self, now: float) -> None:
        self.due: float | None = now + self.options.period_ms / 1000
        self.late: list[float] = []

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        return PASS

    def poll_at(self) -> float | None:
        return self.due

    def on_timer(self, now: float) -> None:
        assert self.due is not None
        self.late.append(now - self.due)
        period = self.options.period_ms / 1000
        self.due = now + period if len(self.late) < self.options.count else None

    def report(self, now: float) -> dict[str, Any]:
        late = sorted(self.late) or [0.0]
        return {"timers": len(self.late),
                "late_median_us": round(statistics.median(late) * 1e6, 1),
                "late_p90_us": round(late[len(late) * 9 // 10] * 1e6, 1),
                "late_max_us": round(late[-1] * 1e6, 1)}
