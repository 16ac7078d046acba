"""The ``keepalive`` service: a paused VM's TCP connections held open (see :mod:`.service`).

Modules: :mod:`.service` (live tracking, hold, release, QMP events), :mod:`.conn` (what
is kept of one connection and the segments forged from it).
"""

from vtl.services.keepalive.service import Keepalive, KeepaliveOptions

__all__ = ["Keepalive", "KeepaliveOptions"]
