"""What the tunnel learns about the VMs at both ends, and the frames waiting for a MAC.

- :class:`Resolver`: remote VM addresses -> MACs, learnt from decapsulated frames
  (as a Linux ``vxlan`` device learns its FDB) and from the answers to the ARP
  requests / neighbour solicitations the service sends through the tunnel; and
  the frames waiting for such an answer, like a router's neighbour queue: at most
  :data:`MAX_WAITING_PER_ADDR` frames per address and :data:`MAX_WAITING_ADDRS`
  addresses, dropped (and counted) after :data:`RESOLVE_TIMEOUT_S`.
- :class:`LocalHosts`: the guest side's addresses -> MACs (the VM's, learnt from
  its frames) and the gateway's MAC per IP version.

Both are bounded: a VM (or a remote site) sending from ever new addresses cannot
grow the bridge's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vtl.services.tunnel.peers import Peer

from vtl import FlowTable, Frame

MAX_WAITING_ADDRS = 256
MAX_WAITING_PER_ADDR = 8
RESOLVE_TIMEOUT_S = 3.0
ASK_EVERY_S = 1.0
MAX_LOCAL = 256  # guest addresses remembered


@dataclass(slots=True)
class Waiting:
    """Frames for one remote address whose MAC is being asked for."""

    peer: Peer
    deadline: float
    asked_at: float
    frames: list[Frame] = field(default_factory=list)


class Resolver:
    def __init__(self, max_entries: int, timeout_s: float):
        self.macs: FlowTable[bytes, bytes] = FlowTable(max_entries, timeout=timeout_s,
                                                       evict="lru")
        self.waiting: dict[bytes, Waiting] = {}
        self.dropped = 0  # frames given up on (no answer, or a full queue)

    def lookup(self, addr: bytes, now: float) -> bytes | None:
        return self.macs.get(addr, now)

    def learn(self, addr: bytes, mac: bytes, now: float) -> tuple[Peer, list[Frame]] | None:
        """Remember ``addr`` at ``mac``; the frames that waited for it, if any."""
        if self.macs.get(addr) != mac:
            self.macs.put(addr, mac, now)
        else:
            self.macs.touch(addr, now)
        w = self.waiting.pop(addr, None)
        return None if w is None else (w.peer, w.frames)

    def wait(self, addr: bytes, frame: Frame, peer: Peer, now: float) -> bool:
        """Queue ``frame`` until ``addr`` is resolved; True when a request should be sent
        now (first frame, or the last request was :data:`ASK_EVERY_S` ago)."""
        w = self.waiting.get(addr)
        if w is None:
            if len(self.waiting) >= MAX_WAITING_ADDRS:
                self.dropped += 1
                return False
            self.waiting[addr] = Waiting(peer, now + RESOLVE_TIMEOUT_S, now, [frame])
            return True
        if len(w.frames) < MAX_WAITING_PER_ADDR:
            w.frames.append(frame)
        else:
            self.dropped += 1
        if now - w.asked_at >= ASK_EVERY_S:
            w.asked_at = now
            return True
        return False

    def poll_at(self) -> float | None:
        t = self.macs.poll_at()
        for w in self.waiting.values():
            if t is None or w.deadline < t:
                t = w.deadline
        return t

    def expire(self, now: float) -> None:
        self.macs.expire(now)
        for addr in [a for a, w in self.waiting.items() if w.deadline <= now]:
            self.dropped += len(self.waiting.pop(addr).frames)


class LocalHosts:
    """The guest's addresses and MACs, and the gateway's MAC, as seen on the guest side."""

    def __init__(self, gateway_mac: bytes | None):
        self.macs: dict[bytes, bytes] = {}
        self.fixed_gateway = gateway_mac is not None
        self.gateway_mac: dict[int, bytes | None] = {4: gateway_mac, 6: gateway_mac}

    def learn(self, addr: bytes, mac: bytes) -> None:
        if mac[0] & 1 or self.macs.get(addr) == mac:
            return
        if addr not in self.macs and len(self.macs) >= MAX_LOCAL:
            self.macs.pop(next(iter(self.macs)))  # the oldest learnt goes
        self.macs[addr] = mac

    def learn_gateway(self, version: int, mac: bytes) -> None:
        if not self.fixed_gateway and not mac[0] & 1:
            self.gateway_mac[version] = mac
