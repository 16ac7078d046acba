"""The ``socks`` service: a transparent SOCKS5 / Tor anonymizer (see :mod:`.service`).

Modules: :mod:`.service` (the frames), :mod:`.options` (config and proxy URL),
:mod:`.dns` (the DNS modes), :mod:`.fakeip` (the fake-ip pools),
:mod:`.dnstcp` (DNS over TCP from the VM, answered in-process).
"""

from vtl.services.socks.options import SocksOptions
from vtl.services.socks.service import Socks

__all__ = ["Socks", "SocksOptions"]
