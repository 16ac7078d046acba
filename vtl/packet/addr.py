"""Address conversions between wire bytes and text (MAC, IPv4, IPv6).

Views return addresses as ``bytes`` (6, 4 or 16 long): cheap, hashable, ready
for flow keys. Setters and builders accept bytes, text ("aa:bb:cc:dd:ee:ff",
"10.0.0.1", "fe80::1") or :mod:`ipaddress` objects. A value that is not an
address is API misuse and raises :class:`~vtl.errors.LocalProtocolError`.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TypeAlias

from vtl.errors import LocalProtocolError

MacLike: TypeAlias = bytes | bytearray | memoryview | str
IPLike: TypeAlias = (
    bytes | bytearray | memoryview | str | ipaddress.IPv4Address | ipaddress.IPv6Address
)

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = bytes(6)


def mac_bytes(value: MacLike) -> bytes:
    """A MAC address as 6 bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        b = bytes(value)
    elif isinstance(value, str):
        try:
            b = bytes.fromhex(value.replace(":", "").replace("-", ""))
        except ValueError:
            b = b""
    else:
        raise LocalProtocolError(f"not a MAC address: {value!r}")
    if len(b) != 6:
        raise LocalProtocolError(f"not a MAC address: {value!r}")
    return b


def mac_str(value: bytes | bytearray | memoryview) -> str:
    """``aa:bb:cc:dd:ee:ff``."""
    return bytes(value).hex(":")


def ip_bytes(value: IPLike, size: int | None = None) -> bytes:
    """An IP address as 4 or 16 bytes; ``size`` (4 or 16) insists on one family."""
    if isinstance(value, bytes | bytearray | memoryview):
        b = bytes(value)
    elif isinstance(value, str):
        try:
            b = socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
        except OSError:
            b = b""
    elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        b = value.packed
    else:
        raise LocalProtocolError(f"not an IP address: {value!r}")
    if len(b) not in (4, 16) or (size is not None and len(b) != size):
        raise LocalProtocolError(f"not an IP address of the expected family: {value!r}")
    return b


def ip_str(value: bytes | bytearray | memoryview) -> str:
    """Text form of a 4- or 16-byte address."""
    b = bytes(value)
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)
