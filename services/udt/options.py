"""Options of the ``udt`` service, and the peer table they describe.

Every check names the key and the problem, so that ``vtl check`` tells an
operator exactly what to fix (``services[0].peers[1].prefix: ...``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vtl import ServiceOptions

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_hostport(value: str) -> tuple[str, int]:
    """``"10.190.0.1:9000"`` or ``"[2001:db8::1]:9000"`` -> (address, port); ValueError
    says what is wrong. The address must be an IP literal (it is bound or dialled as is)."""
    if not isinstance(value, str) or not value:
        raise ValueError("give ADDRESS:PORT, e.g. 10.190.0.1:9000 or [2001:db8::1]:9000")
    if value.startswith("["):
        host, sep, port_s = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r}: give [IPv6]:PORT, e.g. [2001:db8::1]:9000")
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r}: no port; give ADDRESS:PORT, e.g. 10.190.0.1:9000")
        if ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. "
                             "[2001:db8::1]:9000")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address (names are not "
                         "resolved here)") from None
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1 to 65535")
    if addr.version == 6 and not value.startswith("["):
        raise ValueError(f"{value!r}: write an IPv6 address in brackets")
    if addr.version == 6:
        raise ValueError(f"{value!r}: bridges reach each other over IPv4 only (udt4py has no "
                         "IPv6 sockets); the connections carried may still be IPv6")
    return str(addr), int(port_s)


def parse_prefix(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits" in str(exc):
            net = ipaddress.ip_network(value, strict=False)
            raise ValueError(f"{value!r} has host bits set; did you mean {net}?") from None
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 prefix ({exc})") from None


class PeerSpec(BaseModel):
    """One entry of ``peers``: the guests behind another bridge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(description="destinations behind that bridge (IPv4 or IPv6 prefix)")
    bridge: str = Field(description="the peer bridge's UDT address, ADDRESS:PORT or [IPv6]:PORT")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return str(parse_prefix(v))

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str) -> str:
        parse_hostport(v)
        return v


@dataclass(frozen=True, slots=True)
class Peer:
    network: IPNetwork
    host: str
    port: int

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class PeerTable:
    """Longest-prefix match of a destination address (packed bytes) to its peer bridge."""

    def __init__(self, peers: list[Peer]):
        # per family, longest prefixes first: a few peers, a linear scan is fine
        self._by_len = sorted(peers, key=lambda p: -p.network.prefixlen)
        self._cache: dict[bytes, Peer | None] = {}

    def lookup(self, addr: bytes) -> Peer | None:
        hit = self._cache.get(addr, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        ip = ipaddress.ip_address(addr)
        found = None
        for p in self._by_len:
            if p.network.version == ip.version and ip in p.network:
                found = p
                break
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[addr] = found
        return found


class UdtOptions(ServiceOptions):
    """Options of the ``udt`` service (``match`` is the generic per-service filter)."""

    listen: str | None = Field(None, description="ADDRESS:PORT where this bridge takes UDT "
                               "from peer bridges (unset: outbound only)")
    peers: list[PeerSpec] = Field(default_factory=list, description="[{prefix, bridge}]: "
                                  "connections to a prefix go over UDT to that bridge "
                                  "(longest prefix wins)")
    fallback: Literal["reset", "passthrough"] = Field(
        "reset", description="when the peer bridge cannot be reached: reset the guest's "
        "connection, or let it pass to the uplink untouched")
    connect_timeout_s: float = Field(3.0, gt=0, le=300, description="give up reaching the "
                                     "peer bridge (and its guest answering) after this long")
    retry_s: float = Field(10.0, ge=0, le=3600, description="a peer bridge that failed gets "
                           "the fallback at once for this long, then is tried again")
    passthrough_idle_s: float = Field(300.0, gt=0, le=86400, description="a passed-through "
                                      "connection is forgotten after this long without "
                                      "segments")
    mss: int = Field(1500, ge=576, le=65535, description="UDT packet size (bytes)")
    window: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=1 << 30,
                        description="UDT buffer per connection (bytes)")
    congestion: Literal["vtl", "native"] = Field(
        "vtl", description="UDT congestion control: vtl (model-based like BBR: finds the "
        "bottleneck rate itself, random loss is not a congestion signal) or native "
        "(libudt's own DAIMD, which cuts its rate on every loss and overshoots a "
        "rate-limited WAN unless max_rate_mbit is set)")
    max_rate_mbit: float = Field(0.0, ge=0, le=1_000_000, description="cap on what one UDT "
                                 "connection sends, in Mbit/s of UDT packets (0: no cap); with "
                                 "congestion = \"native\" set it about 10 % under the WAN's "
                                 "rate")
    mux: bool = Field(True, description="one UDT connection per pair of bridges (true) or "
                      "one per TCP connection (false)")
    buffer_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024, le=1 << 30,
                              description="memory per connection, both directions together")
    max_connections: int = Field(1024, ge=1, le=1_000_000,
                                 description="connections at once; more get RST")

    @property
    def max_bw(self) -> int:
        """``max_rate_mbit`` as the transport's ``max_bw`` (bytes per second, 0: none)."""
        return int(self.max_rate_mbit * 1e6 / 8)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v)
        return v

    @field_validator("peers")
    @classmethod
    def _unique(cls, v: list[PeerSpec]) -> list[PeerSpec]:
        seen: dict[str, int] = {}
        for i, p in enumerate(v):
            if p.prefix in seen:
                raise ValueError(f"peers[{i}].prefix {p.prefix} is also peers[{seen[p.prefix]}]"
                                 "'s prefix; give each prefix once")
            seen[p.prefix] = i
        return v

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return parse_hostport(self.listen) if self.listen is not None else None

    def peer_table(self) -> PeerTable:
        return PeerTable([Peer(parse_prefix(p.prefix), *parse_hostport(p.bridge))
                          for p in self.peers])
