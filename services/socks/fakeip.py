"""fakeip: stand-in addresses for host names, so that names are resolved at the proxy's exit.

Theory of operation
    The ``socks`` service answers the VM's DNS itself. In fake-ip mode an A or AAAA
    query for a name gets an address from a private pool (by default 198.18.0.0/15,
    the benchmarking range, and fd98:18::/64); when the VM then connects to that
    address, the service looks the name back up and asks the proxy to CONNECT to the
    *name*, so resolution happens at the proxy's exit, never on the host (Tor's
    ``AutomapHostsOnResolve``). ``.onion`` names work the same way.

    :class:`FakeIpPool` keeps two independent pools (IPv4 and IPv6). Each maps a
    normalised name to one address and back:

    - a name gets an address on first use and keeps it while it is in use; every
      :meth:`~FakeIpPool.address` or :meth:`~FakeIpPool.name` call refreshes it;
    - the first and last address of each pool (network and broadcast-like) are
      never handed out; addresses are taken in order from the second one;
    - memory is bounded: a pool holds at most ``min(usable addresses, max_entries)``
      names. When it is full, the least recently used entry is recycled (its address
      goes to the new name), but never one used within the last ``2 * ttl`` seconds:
      a VM may still hold it in its cache (the DNS answers carry ``ttl``) and would
      otherwise connect to the wrong name. If no entry can be recycled,
      :meth:`~FakeIpPool.address` raises :class:`PoolExhausted` (the resolver answers
      SERVFAIL and the VM retries later).

    Names are normalised: ASCII letters lower-cased and one trailing dot removed.
    Internationalised names are left as the VM sent them (normally the ``xn--``
    form); nothing is IDNA-encoded or decoded here.

What it does not do
    No persistence (the mapping is lost on restart), no per-name expiry timer
    (entries only go when their address is needed), and no check that the pools do
    not overlap real networks the VM uses: pick ranges the VM never talks to.
    Time is passed in as ``now`` (monotonic seconds); nothing here reads the clock.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vtl.errors import VTLError

DEFAULT_V4 = "198.18.0.0/15"
DEFAULT_V6 = "fd98:18::/64"
DEFAULT_MAX_ENTRIES = 1 << 17  # per pool: the whole default IPv4 pool fits
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class PoolExhausted(VTLError):
    """Every address of a pool is held by a name used within the last ``2 * ttl`` s."""


def normalise(name: str) -> str:
    """The form names are stored in: ASCII lower case, no trailing dot."""
    name = name.translate(_LOWER)
    return name[:-1] if name.endswith(".") else name


@dataclass(slots=True)
class _Entry:
    name: str
    used: float  # last time it was handed out or looked up


class _Pool:
    """One address family: offsets 1 .. capacity of ``network`` (offset 0 is skipped)."""

    def __init__(self, network: Network, max_entries: int):
        self.network = network
        self.base = int(network.network_address)
        self.capacity = min(network.num_addresses - 2, max_entries)
        self.by_name: dict[str, int] = {}
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.next_fresh = 1
        self.recycled = 0

    def address(self, name: str, now: float, hold: float) -> int:
        offset = self.by_name.get(name)
        if offset is not None:
            self._touch(offset, now)
            return offset
        if self.next_fresh <= self.capacity:
            offset = self.next_fresh
            self.next_fresh += 1
        else:
            offset, oldest = next(iter(self.entries.items()))
            if now - oldest.used < hold:
                raise PoolExhausted(
                    f"fake-ip pool {self.network} is exhausted: all {self.capacity} addresses "
                    f"were used within the last {hold:g} s")
            del self.entries[offset]
            del self.by_name[oldest.name]
            self.recycled += 1
        self.entries[offset] = _Entry(name, now)
        self.by_name[name] = offset
        return offset

    def name(self, offset: int, now: float) -> str | None:
        if offset not in self.entries:
            return None
        self._touch(offset, now)
        return self.entries[offset].name

    def _touch(self, offset: int, now: float) -> None:
        entry = self.entries[offset]
        entry.used = max(entry.used, now)
        self.entries.move_to_end(offset)

    def report(self) -> dict[str, Any]:
        return {"network": str(self.network), "in_use": len(self.entries),
                "capacity": self.capacity, "recycled": self.recycled}


def _parse_network(text: str, version: int) -> Network:
    label = f"IPv{version} fake-ip pool {text!r}"
    if not isinstance(text, str):
        raise ValueError(f"{label}: expected a network like "
                         f"{DEFAULT_V4 if version == 4 else DEFAULT_V6!r}")
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    if network.version != version:
        raise ValueError(f"{label}: is an IPv{network.version} network")
    if network.num_addresses < 3:
        raise ValueError(f"{label}: too small; the first and last addresses are never used, "
                         f"so it needs at least 3 addresses")
    return network


class FakeIpPool:
    """Fake addresses for names, IPv4 and IPv6 (see the module docstring).

    ``v4`` and ``v6`` are networks in CIDR form; a bad one raises ValueError saying
    what is wrong. ``ttl`` is the TTL of the DNS answers carrying these addresses:
    an entry used within the last ``2 * ttl`` seconds is never recycled.
    ``max_entries`` bounds each pool's memory (names held at once).
    """

    def __init__(self, v4: str = DEFAULT_V4, v6: str = DEFAULT_V6, *, ttl: int = 60,
                 max_entries: int = DEFAULT_MAX_ENTRIES):
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
            raise ValueError(f"fake-ip ttl {ttl!r}: must be a whole number of seconds >= 0")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"fake-ip max_entries {max_entries!r}: must be a positive integer")
        self.ttl = ttl
        self.hold = 2.0 * ttl
        self._pools = {4: _Pool(_parse_network(v4, 4), max_entries),
                       6: _Pool(_parse_network(v6, 6), max_entries)}

    @property
    def v4(self) -> ipaddress.IPv4Network:
        return self._pools[4].network  # type: ignore[return-value]

    @property
    def v6(self) -> ipaddress.IPv6Network:
        return self._pools[6].network  # type: ignore[return-value]

    def address(self, name: str, version: int, now: float) -> str:
        """The fake address (text) of ``name`` in the IPv``version`` pool.

        Allocated on first use, the same for as long as the name keeps being used.
        Raises :class:`PoolExhausted` when the pool is full of recently used names,
        ValueError for an empty name or a version other than 4 or 6.
        """
        pool = self._pools.get(version)
        if pool is None:
            raise ValueError(f"IP version must be 4 or 6, not {version!r}")
        key = normalise(name)
        if not key:
            raise ValueError("the root name has no fake address")
        offset = pool.address(key, now, self.hold)
        return str(ipaddress.ip_address(pool.base + offset))

    def name(self, addr: bytes | str, now: float) -> str | None:
        """The name a fake address stands for, or None (not in a pool, or not allocated).

        ``addr`` is packed (4 or 16 bytes) or text. A hit counts as a use: it keeps
        the entry from being recycled.
        """
        found = self._locate(addr)
        if found is None:
            return None
        pool, offset = found
        return pool.name(offset, now)

    def contains(self, addr: bytes | str) -> bool:
        """True when ``addr`` (packed or text) lies inside either pool (allocated or not)."""
        ip = _parse_ip(addr)
        return ip is not None and ip in self._pools[ip.version].network

    def report(self) -> dict[str, Any]:
        """Pool sizes and use, for the service's report."""
        return {"v4": self._pools[4].report(), "v6": self._pools[6].report()}

    def _locate(self, addr: bytes | str) -> tuple[_Pool, int] | None:
        ip = _parse_ip(addr)
        if ip is None:
            return None
        pool = self._pools[ip.version]
        if ip not in pool.network:
            return None
        return pool, int(ip) - pool.base


def _parse_ip(addr: bytes | str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        if isinstance(addr, bytes | bytearray | memoryview):
            raw = bytes(addr)
            if len(raw) not in (4, 16):
                return None
            return ipaddress.ip_address(raw)
        if isinstance(addr, str):
            return ipaddress.ip_address(addr.strip())
    except ValueError:
        return None
    return None
