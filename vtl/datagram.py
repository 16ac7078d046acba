"""Datagrams: how a service asks the bridge for a UDP socket of the host.

A service that carries frames over UDP (``tunnel``: VXLAN between sites) does
not open sockets itself (services are sans-IO). It describes the socket it
wants with a :class:`DatagramRequest` and calls
``ctx.open_datagram(request, on_datagram)``; the bridge binds the socket at
once (a failure raises :class:`vtl.errors.SetupError` naming the address and
the reason, so the service's ``start`` fails and the bridge does not start)
and returns a :class:`DatagramSocket` handle.

- **Receiving**: the bridge reads the socket in a thread of its own, in
  batches, and calls ``on_datagram(data, source, now)`` for each datagram under
  the chain lock, exactly like ``process``; ``data`` is a ``bytearray`` the
  handler may keep and change, ``source`` is ``(host, port)`` as the kernel
  reports it (IPv6 hosts without scope). Frames the handler emits with
  ``ctx.emit`` are walked and written to the ports after the batch. A handler
  that raises is counted against the service's failure policy; the socket
  goes on. Datagrams longer than ``max_size`` are dropped and counted.
- **Sending**: :meth:`DatagramSocket.send` sends one datagram made of one or
  more buffers (gathered, not joined: an encapsulation header and a frame go
  out without a copy) to ``dest`` at once, without blocking. It returns
  ``False`` when the datagram was not sent (socket buffer full, no route,
  message too long); the reason is counted, never raised.
  :meth:`DatagramSocket.send_train` sends several datagrams (units, each the
  parts of one datagram) to one ``dest`` with as few system calls as the
  kernel allows: the bridge uses UDP GSO (``UDP_SEGMENT``), one ``sendmsg`` for
  up to 64 units of equal size (the last may be shorter) and 64 KB, and falls
  back to one ``sendmsg`` per unit on a kernel that refuses it. The receiver
  gets the same datagrams as from ``send`` one by one, in order. It returns how
  many were sent: always the first ones (sending stops at the first failure;
  the rest are counted as dropped). A tunnel sends the segments of one GSO
  frame so.
- **Closing**: the handle closes at chain stop (or with :meth:`close`); no
  handler is called after that.

The destinations are the operator's (a tunnel's configured peers), not the
guest's, so the bridge's egress policy for guest-chosen destinations
(``[bridge] deny``/``allow``) does not apply to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Address = tuple[str, int]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class DatagramRequest:
    """The socket a service wants: ``host`` is the local IPv4 or IPv6 literal to bind
    (it decides the family), ``port`` the local UDP port (0: any free one)."""

    host: str
    port: int
    rcvbuf: int = 4 << 20  # SO_RCVBUF asked for (the kernel may cap it)
    sndbuf: int = 4 << 20  # SO_SNDBUF asked for
    max_size: int = 65535  # longer datagrams are dropped (counted as rx_oversize)
    batch: int = 64  # datagrams read per wake-up, handled under one chain lock


DatagramHandler = Callable[[bytearray, Address, float], None]


class DatagramSocket(Protocol):
    """The handle the bridge returns (see the module docstring)."""

    @property
    def local(self) -> Address:
        """The bound address (with the port the kernel chose when 0 was asked)."""

    def send(self, parts: Sequence[Buffer], dest: Address) -> bool:
        """Send ``b"".join(parts)`` as one datagram to ``dest``; False when not sent."""

    def send_train(self, units: Sequence[Sequence[Buffer]], dest: Address) -> int:
        """Send each unit (``b"".join(unit)``) as one datagram to ``dest``, in order, in
        few system calls; returns ``n``: ``units[:n]`` were sent, the rest were not."""

    def counters(self) -> dict[str, int]:
        """rx, rx_bytes, rx_oversize, rx_errors, tx, tx_bytes, tx_dropped."""

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
