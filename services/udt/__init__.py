"""The ``udt`` service: TCP-to-UDT transformation between two VTL bridges (see :mod:`.service`).

Modules: :mod:`.service` (the frames, both directions), :mod:`.options` (config, the
peer table and ``host:port`` parsing).
"""

from vtl.services.udt.options import UdtOptions
from vtl.services.udt.service import Udt

__all__ = ["Udt", "UdtOptions"]
