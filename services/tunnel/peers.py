"""The tunnel's peer table: which remote site a destination address lives behind.

The service asks two questions of it and nothing else, through
:class:`PeerDirectory`, so a shared directory (a store such as etcd, for many
hosts) can replace the static table of the config later without touching the
service:

- :meth:`PeerDirectory.route`: the peer whose prefix holds a destination address
  (longest prefix wins), or None;
- :meth:`PeerDirectory.by_source`: the peer a datagram came from (by the remote
  endpoint's address; the source port is not checked: a Linux ``vxlan`` device
  sends from a port it hashes per flow).

:class:`StaticPeers` answers from the config, with a dict per prefix length:
a lookup costs one shift and one dict probe per distinct prefix length.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

VXLAN_PORT = 4789  # IANA (RFC 7348)


@dataclass(slots=True, eq=False)
class Peer:
    """One remote site: its tunnel endpoint and the prefixes behind it, with counters."""

    remote: tuple[str, int]  # (address literal, UDP port)
    prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    mac: bytes | None = None  # a fixed inner destination MAC for this site (else resolved)
    encapsulated: int = 0
    encapsulated_bytes: int = 0
    decapsulated: int = 0
    decapsulated_bytes: int = 0
    send_failed: int = 0

    @property
    def name(self) -> str:
        host, port = self.remote
        h = f"[{host}]" if ":" in host else host
        return h if port == VXLAN_PORT else f"{h}:{port}"

    def report(self) -> dict[str, object]:
        return {"remote": self.name, "prefixes": [str(p) for p in self.prefixes],
                "encapsulated": self.encapsulated, "encapsulated_bytes": self.encapsulated_bytes,
                "decapsulated": self.decapsulated, "decapsulated_bytes": self.decapsulated_bytes,
                "send_failed": self.send_failed}


class PeerDirectory(Protocol):
    """What the tunnel service needs to know about remote sites."""

    def route(self, version: int, dst: bytes) -> Peer | None:
        """The peer behind destination ``dst`` (4 or 16 bytes), longest prefix first."""

    def by_source(self, host: str) -> Peer | None:
        """The peer whose tunnel endpoint is ``host`` (as the socket reports it)."""

    def peers(self) -> list[Peer]:
        """Every peer, for reports."""


def parse_endpoint(text: str, what: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT`` or ``[ADDR6]:PORT`` -> (canonical address, port);
    ValueError naming ``what``."""
    host, port = text, VXLAN_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: {text!r} is not ADDR, ADDR:PORT or [ADDR6]:PORT")
        if rest:
            port = _port(rest[1:], what, text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, what, text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what}: {host!r} is not an IPv4 or IPv6 address") from None
    return str(addr), port


def _port(text: str, what: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: bad UDP port in {whole!r}")
    return int(text)


class StaticPeers:
    """The peer table from the config (``peers = [{prefix, remote}, ...]``); entries
    with the same ``remote`` are one peer with several prefixes."""

    def __init__(self, entries: list[tuple[str, str, bytes | None]]):
        """``entries``: (prefix, remote, mac or None) in config order; ValueError names
        the entry at fault (``peers[1].prefix: ...``)."""
        self._peers: dict[tuple[str, int], Peer] = {}
        self._by_host: dict[str, Peer] = {}
        self._tables: dict[int, dict[int, dict[int, Peer]]] = {4: {}, 6: {}}
        for i, (prefix, remote, mac) in enumerate(entries):
            try:
                net = ipaddress.ip_network(prefix, strict=False)
            except ValueError as exc:
                raise ValueError(f"peers[{i}].prefix: {exc}") from None
            endpoint = parse_endpoint(remote, f"peers[{i}].remote")
            peer = self._peers.get(endpoint)
            if peer is None:
                peer = self._peers[endpoint] = Peer(endpoint, mac=mac)
                self._by_host[endpoint[0]] = peer
            elif mac is not None and peer.mac not in (None, mac):
                raise ValueError(f"peers[{i}].mac: {remote} was given another MAC before")
            elif mac is not None:
                peer.mac = mac
            table = self._tables[net.version].setdefault(net.prefixlen, {})
            key = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
            if key in table:
                raise ValueError(f"peers[{i}].prefix: {net} is listed twice")
            table[key] = peer
            peer.prefixes.append(net)
        # longest prefixes first: (shift, table)
        self._order = {v: [((32 if v == 4 else 128) - plen, t[plen])
                           for plen in sorted(t, reverse=True)]
                       for v, t in self._tables.items()}

    def route(self, version: int, dst: bytes) -> Peer | None:
        n = int.from_bytes(dst, "big")
        for shift, table in self._order[version]:
            peer = table.get(n >> shift)
            if peer is not None:
                return peer
        return None

    def by_source(self, host: str) -> Peer | None:
        peer = self._by_host.get(host)
        if peer is None and "%" in host:  # a link-local source with its scope
            peer = self._by_host.get(host.partition("%")[0])
        return peer

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def families(self) -> set[int]:
        """IP versions the prefixes cover."""
        return {v for v, t in self._tables.items() if t}
