"""What a service hears from the hypervisor running its VM (QEMU's QMP monitor).

A service asks the bridge to follow a monitor with ``ctx.watch_qmp(path, handler)``
(the bridge connects, negotiates and reconnects; see :mod:`vtl.bridge.qmp`) and is
called back, under the chain's lock like a stream handler, with one
:class:`VmEvent` per thing that happened:

- ``connected`` / ``disconnected``: the monitor answered, or went away (QEMU
  quit, or was restarted: a migration's destination is a new QEMU and a new
  connection);
- ``status``: right after each connection, what ``query-status`` said
  (``data``: ``running`` and ``status``, e.g. ``"paused"``, ``"inmigrate"``);
- QEMU's own events by name, with their ``data``: ``STOP``, ``RESUME``,
  ``MIGRATION`` (``status``), ``SHUTDOWN``...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class VmEvent:
    """One event of a VM's monitor: ``kind`` as above, ``data`` as QEMU sent it."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


VmEventHandler = Callable[[VmEvent, float], None]


class Watch(Protocol):
    """A followed monitor; :meth:`close` stops following it (also done at chain stop)."""

    def close(self) -> None: ...


__all__ = ["VmEvent", "VmEventHandler", "Watch"]
