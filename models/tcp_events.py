"""The virtual TCP endpoint's configuration and the events it reports.

:class:`EndpointConfig` is how one :class:`~vtl.models.tcp_endpoint.TcpEndpoint`
behaves (buffer sizes, what it offers in its SYN, its timers); the event classes
are what the endpoint appends to ``TcpEndpoint.events`` for the service driving
it. They live apart from the endpoint so that its two halves (the endpoint and
:mod:`vtl.models.tcp_sender`) share them without importing each other; import
them from :mod:`vtl.models.tcp_endpoint`, which re-exports them.

Invariants: events are frozen and carry no state of the connection; ``Closed``
is always the last event of an endpoint.

What it does not do: validate the configuration (the services declare and
check their options; these are the model's own defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """How the endpoint behaves; the defaults suit a VM one hop away."""

    mss: int = 1460  # MSS announced (IPv6 subtracts 20)
    wscale: int = 9  # largest window-scale shift offered (used only if the peer offers one;
    # lowered so that recv_buffer is at least eight window units)
    sack: bool = True
    timestamps: bool = True
    send_buffer: int = 1 << 20  # bytes accepted by send() and not yet acknowledged
    recv_buffer: int = 1 << 20  # received bytes not yet read, including out of order
    offload: bool = True  # GSO super-frames and NEEDS_CSUM checksums
    gso_max: int = 62 * 1024  # largest payload of one super-frame
    initial_cwnd_segments: int = 10
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 30.0
    max_retries: int = 12  # consecutive timeouts before giving up (the peer is gone)
    syn_retries: int = 5
    persist_max: float = 5.0  # longest interval between zero-window probes
    time_wait: float = 1.0  # bounded TIME-WAIT (the VM is local, 2*MSL is not needed)
    verify_checksums: bool = True  # for frames whose checksum the kernel did not leave us


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake completed."""


@dataclass(frozen=True, slots=True)
class DataReady:
    """New bytes can be read (:attr:`TcpEndpoint.readable`)."""


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The VM sent FIN: after the bytes already readable, it sends nothing more."""


@dataclass(frozen=True, slots=True)
class Writable:
    """:attr:`TcpEndpoint.send_room` grew after :meth:`TcpEndpoint.send` took less than offered."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The connection ended abnormally; ``reason`` is ``"reset"`` (the VM sent RST),
    ``"timeout"`` (the VM stopped answering) or ``"local"`` (abort/refuse)."""

    reason: Literal["reset", "timeout", "local"]


@dataclass(frozen=True, slots=True)
class Closed:
    """The endpoint is CLOSED and can be forgotten (always the last event)."""


Event = Connected | DataReady | PeerFinished | Writable | Aborted | Closed
