"""The ``tunnel`` service: subnets of other sites reached over VXLAN (see ``service``)."""

from vtl.services.tunnel.service import Tunnel, TunnelOptions

__all__ = ["Tunnel", "TunnelOptions"]
