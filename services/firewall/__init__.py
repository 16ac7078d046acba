"""The ``firewall`` service: conntrack and rules outside the VM's reach (see ``service``)."""

from vtl.services.firewall.service import Firewall, FirewallOptions

__all__ = ["Firewall", "FirewallOptions"]
