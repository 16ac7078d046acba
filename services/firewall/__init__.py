"""The ``firewall`` service: connection tracking and rules outside the VM's reach (in progress)."""
