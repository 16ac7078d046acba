"""Flow keys and bounded flow tables: the per-flow state every service and the bridge keep.

Theory of operation. A :class:`FlowKey` names one direction of a flow: IP
version, protocol, source address and port, destination address and port.
It is a ``NamedTuple`` (immutable, hashed in C, cheap to build on the hot
path) with a few methods: :meth:`FlowKey.of` reads it off a packet,
:meth:`FlowKey.reversed` is the other direction, :meth:`FlowKey.canonical`
is the same value for both directions, ``str(key)`` reads as
``tcp 10.0.0.1:40000 -> 10.0.0.2:80``. Ports are 0 for protocols without
them; an ICMP echo request or reply uses its identifier as both ports, so an
echo and its reply have reversed keys, as conntrack's do.

A :class:`FlowTable` maps keys (any hashable: a FlowKey, a MAC address) to
values with three promises:

- **bounded**: never more than ``max_entries``. When full, ``evict="lru"``
  drops the entry of the lowest ``rank`` touched longest ago (its
  ``on_evict(key, value, "evicted")`` is called) and ``evict="refuse"`` makes
  :meth:`FlowTable.put` return False. Both are counted.
- **aging**: each entry has an idle ``timeout`` (None: never expires),
  restarted by :meth:`FlowTable.touch` and by ``put``. :meth:`FlowTable.expire`
  removes what is due (``on_evict(key, value, "expired")``);
  :meth:`FlowTable.poll_at` says when the next entry is due, for a service's
  own ``poll_at``. :meth:`FlowTable.get` with ``now`` does not return an entry
  that is due even if ``expire`` has not run yet.
- **O(1)** per get/put/touch/pop: entries live in a few *buckets*, one per
  (rank, timeout) pair, each an insertion-ordered dict. Within a bucket every
  entry has the same timeout and ``now`` only grows, so the order of last
  touch is the order of deadlines: expiry looks only at bucket fronts, and LRU
  eviction takes the front of the lowest-ranked bucket. The number of buckets
  is bounded (:data:`MAX_BUCKETS`), so those scans are constant too.

Counters (``counters``, also :meth:`FlowTable.stats`): entries, inserted,
expired, evicted, refused. The table reads no clock: ``now`` comes in.

Not here: per-packet state machines (those are the services' and the models'),
locking (the bridge serialises the chain). One thread may write while others
call :meth:`FlowTable.expires_at`, which only reads (the learning switch does so).
``now`` must not go backwards between calls (the bridge's clock is monotonic).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, NamedTuple, TypeVar

from vtl.errors import LocalProtocolError
from vtl.packet.tcp import TCP
from vtl.packet.udp import UDP

if TYPE_CHECKING:
    from vtl.packet.packet import Packet

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
EvictPolicy = Literal["lru", "refuse"]
EvictReason = Literal["expired", "evicted"]
MAX_BUCKETS = 64  # distinct (rank, timeout) pairs in one table
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 132: "sctp"}
_PORTED = frozenset({6, 17, 132, 136})  # TCP, UDP, SCTP, UDP-Lite
_ECHO = {1: (8, 0), 58: (128, 129)}  # ICMP echo request/reply types per protocol
_tuple_new = tuple.__new__


class FlowKey(NamedTuple):
    """One direction of a flow. ``src``/``dst`` are packed addresses (4 or 16 bytes)."""

    version: int  # 4 or 6
    proto: int  # IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...)
    src: bytes
    sport: int
    dst: bytes
    dport: int

    @classmethod
    def of(cls, pkt: Packet) -> FlowKey | None:
        """The key of an IP packet as sent (None when it is not IP).

        Raises :class:`~vtl.errors.PacketError` for a malformed IP or L4 header."""
        ip = pkt.ip
        if ip is None:
            return None
        l4 = pkt.l4
        kind = type(l4)
        if kind is TCP or kind is UDP:  # the hot path: one tuple, no Python __new__ frame
            src, dst = ip.addrs
            sport, dport = l4.ports  # type: ignore[union-attr]
            return _tuple_new(cls, (ip.version_number, 6 if kind is TCP else 17, src, sport,
                                    dst, dport))
        src, dst = ip.addrs
        proto = ip.l4_proto
        if proto not in _ECHO:
            l4 = None
        if l4 is None:
            return cls(ip.version_number, proto, src, 0, dst, 0)
        if proto in _ECHO:
            if l4.type in _ECHO[proto]:
                ident = l4.id
                return cls(ip.version_number, proto, src, ident, dst, ident)
            return cls(ip.version_number, proto, src, 0, dst, 0)
        sport, dport = l4.ports
        return cls(ip.version_number, proto, src, sport, dst, dport)

    @classmethod
    def tcp(cls, src: str, sport: int, dst: str, dport: int) -> FlowKey:
        """A TCP key from address strings (tests, configs, logs)."""
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if a.version != b.version:
            raise LocalProtocolError(f"flow key mixes IPv{a.version} and IPv{b.version}")
        return cls(a.version, 6, a.packed, sport, b.packed, dport)

    def reversed(self) -> FlowKey:
        """The key of the other direction."""
        return FlowKey(self.version, self.proto, self.dst, self.dport, self.src, self.sport)

    def canonical(self) -> FlowKey:
        """The same key for both directions (the lower endpoint first)."""
        if (self.src, self.sport) <= (self.dst, self.dport):
            return self
        return self.reversed()

    @property
    def src_ip(self) -> str:
        return str(ipaddress.ip_address(self.src))

    @property
    def dst_ip(self) -> str:
        return str(ipaddress.ip_address(self.dst))

    @property
    def proto_name(self) -> str:
        return _PROTO_NAMES.get(self.proto, str(self.proto))

    def __str__(self) -> str:
        if self.version == 6:
            a, b = f"[{self.src_ip}]", f"[{self.dst_ip}]"
        else:
            a, b = self.src_ip, self.dst_ip
        if self.proto in _PORTED or self.sport or self.dport:
            return f"{self.proto_name} {a}:{self.sport} -> {b}:{self.dport}"
        return f"{self.proto_name} {a} -> {b}"


@dataclass(slots=True)
class TableCounters:
    """What a :class:`FlowTable` did since it was made."""

    inserted: int = 0
    expired: int = 0
    evicted: int = 0
    refused: int = 0


class _Bucket:
    __slots__ = ("rank", "timeout", "entries")

    def __init__(self, rank: int, timeout: float | None):
        self.rank = rank
        self.timeout = timeout
        self.entries: OrderedDict = OrderedDict()  # key -> time of last touch, in that order


_DEFAULT: float = math.nan  # "the table's default timeout"


class FlowTable(Generic[K, V]):
    """A bounded map with per-entry idle timeouts and an eviction policy (see module doc).

    ``timeout``: the default idle timeout of an entry (None: no aging);
    ``evict``: ``"lru"`` or ``"refuse"`` when full; ``on_evict(key, value, reason)``
    is called for entries removed by expiry or eviction (not for :meth:`pop`)."""

    __slots__ = ("max_entries", "timeout", "evict", "on_evict", "counters", "_values",
                 "lookup", "_where", "_buckets")

    def __init__(self, max_entries: int, *, timeout: float | None = None,
                 evict: EvictPolicy = "lru",
                 on_evict: Callable[[K, V, EvictReason], None] | None = None):
        if max_entries < 1:
            raise LocalProtocolError(f"FlowTable: max_entries must be >= 1, not {max_entries}")
        if evict not in ("lru", "refuse"):
            raise LocalProtocolError(f"FlowTable: evict must be 'lru' or 'refuse', not {evict!r}")
        self.max_entries = max_entries
        self.timeout = timeout
        self.evict = evict
        self.on_evict = on_evict
        self.counters = TableCounters()
        self._values: dict[K, V] = {}
        #: ``lookup(key)``: the value or None, at the speed of a dict (no expiry check)
        self.lookup: Callable[[K], V | None] = self._values.get
        self._where: dict[K, _Bucket] = {}
        self._buckets: dict[tuple[int, float | None], _Bucket] = {}

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._values))

    def items(self) -> list[tuple[K, V]]:
        return list(self._values.items())

    def values(self) -> list[V]:
        return list(self._values.values())

    def get(self, key: K, now: float | None = None) -> V | None:
        """The value of ``key``, or None; with ``now``, None for an entry already due
        (it is expired on the spot)."""
        v = self._values.get(key)
        if v is None or now is None:
            return v
        b = self._where[key]
        if b.timeout is not None and b.entries[key] + b.timeout <= now:
            self._remove(key, "expired")
            return None
        return v

    def deadline(self, key: K) -> float | None:
        """When ``key`` expires if not touched (None: never or not present)."""
        b = self._where.get(key)
        if b is None or b.timeout is None:
            return None
        return b.entries[key] + b.timeout

    def expires_at(self, key: K) -> float | None:
        """When ``key`` expires (``math.inf``: never), None when absent. Safe to call from
        another thread while one thread writes (only atomic dict reads)."""
        b = self._where.get(key)
        if b is None:
            return None
        t = b.entries.get(key)
        if t is None:  # being moved to another bucket right now
            return None
        return math.inf if b.timeout is None else t + b.timeout

    @property
    def full(self) -> bool:
        return len(self._values) >= self.max_entries

    # -- writing -------------------------------------------------------------------

    def put(self, key: K, value: V, now: float, *, timeout: float | None = _DEFAULT,
            rank: int = 0) -> bool:
        """Insert or replace ``key``; its idle clock starts at ``now``. False (and nothing
        changed) when the table is full and its policy is ``"refuse"``."""
        if key not in self._values:
            if len(self._values) >= self.max_entries and not self._make_room(now):
                self.counters.refused += 1
                return False
            self.counters.inserted += 1
        self._values[key] = value
        self._place(key, now, timeout, rank)
        return True

    def touch(self, key: K, now: float, *, timeout: float | None = _DEFAULT,
              rank: int | None = None) -> bool:
        """Restart ``key``'s idle clock (optionally with a new timeout or rank).
        False when ``key`` is not in the table."""
        b = self._where.get(key)
        if b is None:
            return False
        if timeout is _DEFAULT and rank is None:
            e = b.entries
            e[key] = now
            e.move_to_end(key)  # one C call: a reader on another thread never misses it
            return True
        self._place(key, now, b.timeout if timeout is _DEFAULT else timeout,
                    b.rank if rank is None else rank)
        return True

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` without calling ``on_evict``; its value, or ``default``."""
        b = self._where.pop(key, None)
        if b is None:
            return default
        del b.entries[key]
        return self._values.pop(key)

    def clear(self) -> None:
        self._values.clear()
        self._where.clear()
        self._buckets.clear()

    # -- time ----------------------------------------------------------------------

    def poll_at(self) -> float | None:
        """When the next entry is due (None: none ages)."""
        best: float | None = None
        for b in self._buckets.values():
            if b.timeout is None or not b.entries:
                continue
            t = next(iter(b.entries.values())) + b.timeout
            if best is None or t < best:
                best = t
        return best

    def expire(self, now: float, limit: int | None = None) -> int:
        """Remove the entries due at ``now`` (at most ``limit``); how many went."""
        n = 0
        for b in list(self._buckets.values()):
            if b.timeout is None:
                continue
            e, timeout = b.entries, b.timeout
            while e and (limit is None or n < limit):
                key, t = next(iter(e.items()))
                if t + timeout > now:
                    break
                self._remove(key, "expired")
                n += 1
        return n

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"entries": len(self._values), "inserted": c.inserted, "expired": c.expired,
                "evicted": c.evicted, "refused": c.refused}

    # -- inside --------------------------------------------------------------------

    def _place(self, key: K, now: float, timeout: float | None, rank: int) -> None:
        if timeout is _DEFAULT or (timeout is not None and math.isnan(timeout)):
            timeout = self.timeout
        old = self._where.get(key)
        if old is not None:
            del old.entries[key]
        b = self._buckets.get((rank, timeout))
        if b is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets = {k: v for k, v in self._buckets.items() if v.entries}
                if len(self._buckets) >= MAX_BUCKETS:
                    raise LocalProtocolError(
                        f"FlowTable: more than {MAX_BUCKETS} distinct (rank, timeout) pairs")
            b = self._buckets[(rank, timeout)] = _Bucket(rank, timeout)
        b.entries[key] = now
        self._where[key] = b

    def _make_room(self, now: float) -> bool:
        """Free one entry for an insert: an expired one first, then by policy."""
        victim = None
        best = None
        for b in self._buckets.values():
            if not b.entries:
                continue
            key, touched = next(iter(b.entries.items()))
            if b.timeout is not None and touched + b.timeout <= now:
                self._remove(key, "expired")
                return True
            if self.evict == "lru":
                order = (b.rank, touched)  # lowest rank first, then touched longest ago
                if best is None or order < best:
                    best, victim = order, key
        if victim is None:
            return False
        self._remove(victim, "evicted")
        return True

    def _remove(self, key: K, reason: EvictReason) -> None:
        b = self._where.pop(key)
        del b.entries[key]
        value = self._values.pop(key)
        if reason == "expired":
            self.counters.expired += 1
        else:
            self.counters.evicted += 1
        if self.on_evict is not None:
            self.on_evict(key, value, reason)


__all__ = ["EvictPolicy", "EvictReason", "FlowKey", "FlowTable", "MAX_BUCKETS", "TableCounters"]
