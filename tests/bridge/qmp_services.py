"""A service for the QMP watcher's bridge test (loaded as a plugin: ``use = "FILE:VmLog"``):
it follows the monitor at ``qmp`` and records every event it hears."""

from __future__ import annotations

from pydantic import Field

from vtl import Service, ServiceOptions
from vtl.hypervisor import VmEvent, Watch


class VmLogOptions(ServiceOptions):
    qmp: str = Field(description="the QMP monitor's unix socket")
    fail_on: str = Field("", description="an event kind whose handler raises")


class VmLog(Service):
    """Records ``(kind, data, now)`` for each event of its VM's monitor."""

    name = "vmlog"
    Options = VmLogOptions

    def start(self, now: float) -> None:
        self.heard: list[tuple[str, dict, float]] = []
        self.watch: Watch = self.ctx.watch_qmp(self.options.qmp, self.on_event)

    def on_event(self, event: VmEvent, now: float) -> None:
        self.heard.append((event.kind, event.data, now))
        if event.kind == self.options.fail_on:
            raise RuntimeError(f"handler fails on {event.kind}")
