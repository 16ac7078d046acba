"""Neighbour discovery across the tunnel: the ``tunnel`` service's ARP and IPv6 ND work.

A router between two sites would answer for its own addresses and keep the
neighbours of each side to itself; a tunnel that bypasses it carries the
guests' own ARP and ND across instead, so each VM resolves the far VM's MAC
itself: questions about peer addresses go through the tunnel (as the guest),
answers come back and teach the service the far MACs. This module holds that
half of :class:`~vtl.services.tunnel.service.Tunnel` as a mixin; it uses the
service's tables and senders and adds no state of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtl.services.tunnel.wire import ETH_P_ARP, is_link_local, lladdr_option

from vtl import CONSUMED, PASS, Direction, Frame, Verdict
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.packet import Packet

if TYPE_CHECKING:
    from vtl.services.tunnel.neighbors import LocalHosts, Resolver
    from vtl.services.tunnel.options import TunnelOptions
    from vtl.services.tunnel.peers import Peer

    from vtl import ServiceContext

TO_GUEST = Direction.TO_GUEST


class NeighborDiscovery:
    """ARP and ND toward and from the tunnel (mixed into ``Tunnel``)."""

    if TYPE_CHECKING:  # what the service provides
        ctx: ServiceContext
        options: TunnelOptions
        hosts: LocalHosts
        resolver: Resolver
        gateway_ips: set[bytes]

        def _route(self, version: int, dst: bytes) -> Peer | None: ...
        def _send(self, peer: Peer, data: bytearray) -> None: ...
        def _learnt(self, addr: bytes, mac: bytes, now: float) -> None: ...

    # -- from the guest ---------------------------------------------------------------

    def _arp_out(self, frame: Frame) -> Verdict:
        """An ARP frame from the guest: a question for the gateway (answered with
        ``answer_arp``), an answer about a peer address (tunnelled), or neither."""
        data = frame.data
        if len(data) < 42 or (data[12] << 8 | data[13]) != ETH_P_ARP or data[14:20] != \
                b"\x00\x01\x08\x00\x06\x04":
            return PASS
        op, spa, tpa = data[21], bytes(data[28:32]), bytes(data[38:42])
        self.hosts.learn(spa, bytes(data[22:28]))
        if op == 1 and self.options.answer_arp and tpa in self.gateway_ips:
            mac = self.hosts.gateway_mac[4]
            assert mac is not None  # answer_arp fixes it
            self.ctx.emit(Frame(build.arp_reply(Packet(frame), mac)), TO_GUEST)
            self.ctx.count("arp_answered")
            return CONSUMED
        peer = self._route(4, tpa)
        if peer is None:
            return PASS
        self._send(peer, data)
        return CONSUMED

    def _nd_out(self, frame: Frame, now: float) -> Verdict:
        """Neighbour discovery from the guest: a question for the gateway (answered with
        ``answer_arp``), a solicitation or advertisement about a peer address (tunnelled)."""
        data = frame.data
        target = bytes(data[62:78])
        if data[54] == 135 and self.options.answer_arp and target in self.gateway_ips:
            mac = self.hosts.gateway_mac[6]
            assert mac is not None
            try:
                reply = build.neighbor_advertisement(Packet(frame), mac, router=True)
            except PacketError:
                self.ctx.count("malformed")
                return CONSUMED
            self.ctx.emit(Frame(reply), TO_GUEST)
            self.ctx.count("nd_answered")
            return CONSUMED
        kind = data[54]
        if kind == 136:  # an answer: goes where it is addressed
            peer = self._route(6, bytes(data[38:54]))
        elif kind == 135:  # a question: goes where its target lives
            peer = self._route(6, target)
        else:
            return PASS
        if peer is None:
            return PASS
        if kind == 135 and is_link_local(data[22:24]):
            # a reachability probe from a link-local source: its answer could not be
            # routed back by address, so the service answers from what it learnt
            mac = peer.mac or self.resolver.lookup(target, now)
            if mac is not None:
                try:
                    self.ctx.emit(Frame(build.neighbor_advertisement(Packet(frame), mac)),
                                  TO_GUEST)
                    self.ctx.count("nd_answered")
                except PacketError:
                    self.ctx.count("malformed")
            return CONSUMED
        self._send(peer, data)
        return CONSUMED

    def _gateway_said(self, data: bytearray, et: int) -> None:
        """A frame from the uplink: the gateway's own ARP or neighbour advertisement
        tells us its MAC."""
        if et == ETH_P_ARP:
            if len(data) >= 42 and bytes(data[28:32]) in self.gateway_ips:
                self.hosts.learn_gateway(4, bytes(data[22:28]))
        elif len(data) >= 78 and data[20] == 58 and data[54] == 136 \
                and bytes(data[62:78]) in self.gateway_ips:
            self.hosts.learn_gateway(6, bytes(data[6:12]))

    # -- from the tunnel --------------------------------------------------------------

    def _arp_in(self, data: bytearray, peer: Peer | None, now: float) -> None:
        if data[14:20] != b"\x00\x01\x08\x00\x06\x04":
            self.ctx.count("other_dropped")
            return
        spa = bytes(data[28:32])
        behind = self._route(4, spa)
        if behind is None or (peer is not None and behind is not peer):
            self.ctx.count("spoofed")
            return
        peer = behind
        self._learnt(spa, bytes(data[22:28]), now)
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(Frame(data), TO_GUEST)

    def _nd_in(self, data: bytearray, peer: Peer | None, now: float) -> None:
        """A solicitation or advertisement from the far side: learn, then deliver."""
        kind = data[54]
        if kind not in (135, 136):
            self.ctx.count("other_dropped")
            return
        addr = bytes(data[62:78]) if kind == 136 else bytes(data[22:38])
        if kind == 135 and is_link_local(data[22:24]):
            self._probe_in(data, peer)
            return
        behind = self._route(6, addr)
        if behind is None or (peer is not None and behind is not peer):
            self.ctx.count("spoofed")
            return
        peer = behind
        self._learnt(addr, lladdr_option(data, 2 if kind == 136 else 1) or bytes(data[6:12]),
                     now)
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(Frame(data), TO_GUEST)

    def _probe_in(self, data: bytearray, peer: Peer | None) -> None:
        """A far VM's reachability probe (from its link-local address) for a guest
        address: answered through the tunnel with the guest's MAC, since the guest's own
        answer to a link-local address could not be routed back. Without the outer
        source (the kernel's link), the peer is the one the prober's MAC was learnt at."""
        mac = self.hosts.macs.get(bytes(data[62:78]))
        if peer is None:
            peer = self._peer_of_mac(bytes(data[6:12]))
        if mac is None or peer is None:
            self.ctx.count("other_dropped")
            return
        try:
            self._send(peer, build.neighbor_advertisement(Packet(data), mac))
        except PacketError:
            self.ctx.count("malformed")
            return
        self.ctx.count("nd_answered")

    def _peer_of_mac(self, mac: bytes) -> Peer | None:
        """The peer behind which ``mac`` was learnt (a bounded scan: rare probes only)."""
        for addr, learnt in self.resolver.macs.items():
            if learnt == mac:
                return self._route(6 if len(addr) == 16 else 4, addr)
        return None

