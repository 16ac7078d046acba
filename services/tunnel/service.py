"""tunnel: carry a VM's traffic to other sites over VXLAN, bypassing the routers.

Synopsis
    [[services]]
    use = "tunnel"
    local = "10.63.0.1"            # this site's tunnel endpoint: ADDR or ADDR:PORT (4789)
    vni = 42
    gateway = ["10.61.1.1", "fd61::1"]      # this subnet's gateway addresses
    peers = [{prefix = "10.62.2.0/24", remote = "10.63.0.2"},
             {prefix = "fd62::/64", remote = "10.63.0.2"}]   # longest prefix wins

What it does to frames
    From the guest, an IPv4 or IPv6 packet whose destination falls in a peer's prefix
    (whatever its destination MAC: typically the gateway's) is taken off the chain and
    sent to that peer's endpoint in a VXLAN datagram (RFC 7348) through a UDP socket of
    the host, so the host's routing picks the fast path link. On the way it is treated
    as the bypassed router would treat it: the TTL / hop limit is decremented
    (``ttl_decrement``; a packet that expires gets ICMP time exceeded from the gateway
    address, so traceroute shows the gateway as the one hop), a SYN's MSS is clamped to
    the tunnel MTU, a packet larger than the tunnel MTU with DF set (any IPv6 packet)
    gets ICMP fragmentation needed / packet too big with the tunnel MTU, and a GSO
    frame is cut into segments. Its destination MAC becomes the remote VM's: learnt
    from the tunnel, or asked for with an ARP request / neighbour solicitation sent
    through the tunnel as the guest (the frames wait meanwhile, like a router's), or a
    peer's fixed ``mac``. ARP and neighbour discovery about peer addresses (the
    guest's answers to the far side's questions) go through the tunnel too.

    ``datapath`` says who encapsulates. ``"kernel"`` (the default): the bridge creates
    a Linux vxlan device for the service (``vtlvx<VNI>``, see vtl.vxlan) and the
    service hands it whole frames, GSO frames of 64 KB included, after the router's
    work above; the kernel encapsulates, segments and checksums them in C, and
    coalesces what it decapsulates (GRO), so the tunnel runs near the speed of the
    empty chain. Broadcast questions (ARP requests, neighbour solicitations) still
    leave through a UDP socket, since the device would flood them to every peer.
    ``"socket"``: the service encapsulates each segment itself and sends it through
    a UDP socket of the bridge (UDP GSO); about 1 Gbit/s, no kernel device, any
    peer port.

    From the tunnel, a datagram on the local endpoint is checked (a known peer's
    address, the I flag, this VNI; the inner source address in that peer's prefixes)
    and decapsulated; an IP packet gets this subnet's gateway MAC as source and the
    VM's MAC as destination and goes toward the guest from this service's position.
    ARP and neighbour discovery from the far side teach the remote MACs and are
    delivered too (the guest answers questions about its own addresses).

    Everything else passes untouched: traffic to other destinations still goes
    through the gateway. VLAN-tagged frames pass untouched.

Notes
    - The tunnel MTU (``mtu``) is the largest inner IP packet: 1450 by default over an
      IPv4 underlay (the encapsulation costs 50 bytes), 1430 over IPv6 (70).
    - ``answer_arp``: answer ARP and neighbour solicitations for the gateway addresses
      (with ``gateway_mac``, or 02:76:74:6c:00:01), for a site that has no gateway.
    - A Linux ``vxlan`` device interoperates as a peer (``ip link add vx type vxlan id
      VNI local ... remote ... dstport 4789``): it sends from a port hashed per flow,
      so only the peer's address is checked.
    - The kernel datapath filters senders with an nftables table of the bridge's
      (``inet vtl_vtlvx<VNI>``): unknown peers, a missing I flag and other VNIs are
      dropped there and counted in the bridge's ``datagrams`` counters.
    - The peer table sits behind one small interface (``peers.PeerDirectory``) so a
      shared directory can replace the static one later.
    - Bounded: learnt MACs (``max_neighbors``, least recently used forgotten), frames
      waiting for a MAC (8 per address, 256 addresses, 3 s), guest addresses (256).

See also
    docs/tunnel.md (sites, the fast path, a kernel vxlan peer), RFC 7348 (VXLAN).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from vtl.services.tunnel import wire
from vtl.services.tunnel.discovery import NeighborDiscovery
from vtl.services.tunnel.neighbors import LocalHosts, Resolver
from vtl.services.tunnel.options import DEFAULT_GATEWAY_MAC, TunnelOptions
from vtl.services.tunnel.peers import Peer, StaticPeers, parse_endpoint
from vtl.services.tunnel.wire import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6

from vtl import CONSUMED, PASS, Direction, Frame, Service, ServiceContext, Verdict
from vtl.datagram import Address, DatagramRequest, DatagramSocket
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.addr import mac_bytes, mac_str
from vtl.packet.checksum import is_partial
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet
from vtl.packet.tcp import clamp_mss
from vtl.vxlan import VxlanLink, VxlanRequest

TO_UPLINK, TO_GUEST = Direction.TO_UPLINK, Direction.TO_GUEST
ROUTE_CACHE = 4096  # destinations whose peer (or none) is remembered
ND_TYPES = range(133, 138)


class Tunnel(NeighborDiscovery, Service):
    name = "tunnel"
    summary = "carry traffic for other sites' subnets over VXLAN, bypassing the routers"
    Options = TunnelOptions
    tunable = frozenset(TunnelOptions.model_fields) - {"local", "datapath"}

    options: TunnelOptions

    def __init__(self, options: TunnelOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.local = parse_endpoint(options.local, "local")
        self.sock: DatagramSocket | None = None
        self.link: VxlanLink | None = None  # datapath "kernel"
        self.hosts = LocalHosts(None)
        self.resolver = Resolver(options.max_neighbors, options.learn_timeout_s)
        self.peers = StaticPeers([])
        self._configure(options)

    def _configure(self, o: TunnelOptions) -> None:
        """The state the options decide (at start and at each retune; cannot fail, the
        options were validated)."""
        old = {p.remote: p for p in self.peers.peers()}
        self.peers = StaticPeers([(p.prefix, p.remote, None if p.mac is None else
                                   mac_bytes(p.mac)) for p in o.peers])
        for peer in self.peers.peers():  # a peer that stays keeps its counters
            if (was := old.get(peer.remote)) is not None:
                for key in ("encapsulated", "encapsulated_bytes", "decapsulated",
                            "decapsulated_bytes", "send_failed"):
                    setattr(peer, key, getattr(was, key))
        self.mtu = o.mtu or (1430 if ":" in self.local[0] else 1450)
        self.mss = {4: self.mtu - 40, 6: self.mtu - 60}
        gw = [ipaddress.ip_address(g) for g in o.gateway]
        self.gateway_ip = {v: next((a.packed for a in gw if a.version == v), None)
                           for v in (4, 6)}
        self.gateway_ips = {a.packed for a in gw}
        fixed = o.gateway_mac or (DEFAULT_GATEWAY_MAC if o.answer_arp else None)
        hosts = LocalHosts(None if fixed is None else mac_bytes(fixed))
        hosts.macs = self.hosts.macs
        if fixed is None and self.hosts.fixed_gateway is False:
            hosts.gateway_mac = self.hosts.gateway_mac  # what was learnt stays
        self.hosts = hosts
        r = self.resolver
        if (r.macs.max_entries, r.macs.timeout) != (o.max_neighbors, o.learn_timeout_s):
            self.resolver = Resolver(o.max_neighbors, o.learn_timeout_s)
            self.resolver.dropped = r.dropped + sum(len(w.frames) for w in r.waiting.values())
        self.header = wire.vxlan_header(o.vni)
        self.routes: dict[bytes, Peer | None] = {}  # destination -> peer (cache)

    # -- hooks ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        host, port = self.local
        if self.options.datapath == "kernel":
            self.link = self.ctx.open_vxlan(self._link_request(), self.on_frame)
            port = 0  # the socket only sends what the link cannot: broadcast, multicast
        self.sock = self.ctx.open_datagram(DatagramRequest(host, port), self.on_datagram)

    def _link_request(self) -> VxlanRequest:
        o = self.options
        return VxlanRequest(self.local[0], o.vni, self._remotes(), self.local[1], self.mtu,
                            max_macs=o.max_neighbors + len(o.peers))

    def _remotes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.remote[0] for p in self.peers.peers()))

    def retune(self, options: TunnelOptions, now: float) -> None:
        """Every option but ``local`` changes at run time (``vtl ctl NAME set`` or a
        reload): the socket stays, learnt addresses stay (unless the table's bounds
        changed), peers that stay keep their counters."""
        old = self.options
        self._configure(options)
        self.options = options
        if self.link is not None:
            if (old.vni, old.mtu, old.max_neighbors) != \
                    (options.vni, options.mtu, options.max_neighbors):
                self.link.close()  # the device's own settings: a new one
                self.link = None
                self.link = self.ctx.open_vxlan(self._link_request(), self.on_frame)
            else:
                self.link.set_remotes(self._remotes())
        self._count_unresolved()

    def stop(self, now: float) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.link is not None:
            self.link.close()
            self.link = None

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        data = frame.data
        if len(data) < 34:
            return PASS
        et = (data[12] << 8) | data[13]
        if direction is TO_GUEST:
            if et in (ETH_P_ARP, ETH_P_IPV6):
                self._gateway_said(data, et)
            return PASS
        if et == ETH_P_IP:
            dst = bytes(data[30:34])
            version = 4
        elif et == ETH_P_IPV6:
            if len(data) < 54:
                return PASS
            dst = bytes(data[38:54])
            version = 6
            if data[20] == 58 and len(data) >= 78 and data[54] in ND_TYPES:
                return self._nd_out(frame, now)
        elif et == ETH_P_ARP:
            return self._arp_out(frame)
        else:
            return PASS
        peer = self._route(version, dst)
        if peer is None:
            return PASS
        if version == 4:
            self.hosts.learn(bytes(data[26:30]), bytes(data[6:12]))
        else:
            self.hosts.learn(bytes(data[22:38]), bytes(data[6:12]))
        self.hosts.learn_gateway(version, bytes(data[0:6]))
        v = frame.vnet
        if self.link is not None:  # the kernel segments and checksums
            gso = v is not None and v.is_gso
            if gso and v.hdr_len - 14 + v.gso_size > self.mtu:  # type: ignore[union-attr]
                self._too_big(frame, version)
            elif self._ready(frame, version, dst, peer, now, whole=gso) is not None:
                self._send_frame(peer, frame)
            return CONSUMED
        if v is not None:
            if v.is_gso and v.hdr_len - 14 + v.gso_size > self.mtu:
                self._too_big(frame, version)
                return CONSUMED
            try:
                segments = complete_offloads(frame)
            except PacketError:
                self.ctx.count("malformed")
                return CONSUMED
            if len(segments) > 1:
                self.ctx.count("segmented")
            header = self.header
            train: list[tuple[bytes, bytearray]] = []
            for seg in segments:
                ready = self._ready(seg, version, dst, peer, now)
                if ready is not None:
                    train.append((header, ready))
            if train:
                self._send_train(peer, train)
        else:
            self._out(frame, version, dst, peer, now)
        return CONSUMED

    def poll_at(self) -> float | None:
        return self.resolver.poll_at()

    def on_timer(self, now: float) -> None:
        self.resolver.expire(now)
        self._count_unresolved()

    def _count_unresolved(self) -> None:
        """Frames the resolver gave up on (no answer in time, or its queue full)."""
        n = self.resolver.dropped - self.ctx.counters.extra.get("unresolved_dropped", 0)
        if n:
            self.ctx.count("unresolved_dropped", n)

    def report(self, now: float) -> dict[str, Any]:
        return {
            "local": self.options.local, "vni": self.options.vni, "mtu": self.mtu,
            "peers": [p.report() for p in self.peers.peers()],
            "learnt": len(self.resolver.macs), "waiting": len(self.resolver.waiting),
            "guest_addresses": len(self.hosts.macs),
            "gateway_mac": {f"ipv{v}": mac_str(m) if m else None
                            for v, m in self.hosts.gateway_mac.items()},
            "datapath": self.options.datapath,
            "socket": self.sock.counters() if self.sock is not None else {},
            "link": self.link.counters() if self.link is not None else {},
        }

    # -- toward the tunnel ------------------------------------------------------------

    def _route(self, version: int, dst: bytes) -> Peer | None:
        try:
            return self.routes[dst]
        except KeyError:
            pass
        peer = self.peers.route(version, dst)
        if len(self.routes) >= ROUTE_CACHE:
            self.routes.clear()
        self.routes[dst] = peer
        return peer

    def _out(self, frame: Frame, version: int, dst: bytes, peer: Peer, now: float) -> None:
        """One wire-size frame (checksums complete) for ``peer``: the router's work, the
        destination MAC, then the tunnel."""
        data = self._ready(frame, version, dst, peer, now)
        if data is not None:
            self._send(peer, data)

    def _ready(self, frame: Frame, version: int, dst: bytes, peer: Peer,
               now: float, whole: bool = False) -> bytearray | None:
        """The router's work and the destination MAC on ``frame`` (``whole``: a GSO frame
        whose segments fit): its data, ready for the tunnel, or None when it was
        answered (ICMP) or waits for the MAC."""
        data = frame.data
        if version == 4:
            size = (data[16] << 8) | data[17]
            if size > self.mtu and data[20] & 0x40 and not whole:  # DF
                self._too_big(frame, 4)
                return None
            proto, l4 = data[23], 14 + ((data[14] & 15) << 2)
        else:
            if len(data) - 14 > self.mtu and not whole:
                self._too_big(frame, 6)
                return None
            proto, l4 = data[20], 54
        if self.options.ttl_decrement and not wire.decrement_ttl(data, version):
            self._icmp(frame, version, time_exceeded=True)
            return None
        if proto == 6 and len(data) > l4 + 13 and data[l4 + 13] & wire.TCP_SYN \
                and clamp_mss(data, l4, self.mss[version], is_partial(frame.vnet, l4)):
            self.ctx.count("mss_clamped")
        mac = peer.mac or self.resolver.lookup(dst, now)
        if mac is None and self.options.learn:
            if self.resolver.wait(dst, frame, peer, now):
                self._ask(frame, version, dst, peer)
            self._count_unresolved()
            return None
        if mac is not None:
            data[0:6] = mac
        return data

    def _send_frame(self, peer: Peer, frame: Frame) -> None:
        """A frame (GSO or not) that waited for nothing: to the kernel's link when there
        is one, else to the socket."""
        if self.link is None:
            self._send(peer, frame.data)
        elif self.link.send(frame, peer.remote[0]):
            v = frame.vnet
            n = 1
            if v is not None and v.is_gso and v.gso_size:
                n = max(1, -(-(len(frame.data) - v.hdr_len) // v.gso_size))
            peer.encapsulated += n
            peer.encapsulated_bytes += len(frame.data)
        else:
            peer.send_failed += 1
            self.ctx.count("send_failed")

    def _send(self, peer: Peer, data: bytearray) -> None:
        if self.link is not None and not data[0] & 1:
            self._send_frame(peer, Frame(data))
            return
        sock = self.sock
        if sock is not None and sock.send((self.header, data), peer.remote):
            peer.encapsulated += 1
            peer.encapsulated_bytes += len(data)
        else:
            peer.send_failed += 1
            self.ctx.count("send_failed")

    def _send_train(self, peer: Peer, train: list[tuple[bytes, bytearray]]) -> None:
        """The segments of one GSO frame to ``peer``, in few system calls."""
        sock = self.sock
        n = sock.send_train(train, peer.remote) if sock is not None else 0
        if n:
            peer.encapsulated += n
            peer.encapsulated_bytes += sum(len(d) for _, d in train[:n])
        if n < len(train):
            peer.send_failed += len(train) - n
            self.ctx.count("send_failed", len(train) - n)

    def _ask(self, frame: Frame, version: int, dst: bytes, peer: Peer) -> None:
        """Ask the far side for ``dst``'s MAC, as the guest that sent ``frame``."""
        data = frame.data
        if version == 4:
            # asked as the guest, so the answer comes to the guest's MAC
            req = build.arp_request(bytes(data[6:12]), bytes(data[26:30]), dst)
        else:
            req = wire.neighbor_solicitation(bytes(data[6:12]), bytes(data[22:38]), dst)
        self.ctx.count("resolve_sent")
        self._send(peer, req)

    def _too_big(self, frame: Frame, version: int) -> None:
        self._icmp(frame, version, time_exceeded=False)

    def _icmp(self, frame: Frame, version: int, *, time_exceeded: bool) -> None:
        """ICMP time exceeded or too big toward the guest, from the gateway address."""
        src = self.gateway_ip[version]
        try:
            pkt = Packet(frame)
            if version == 4:
                reply = build.icmp_error(pkt, 11 if time_exceeded else 3,
                                         0 if time_exceeded else 4,
                                         rest=0 if time_exceeded else self.mtu, src_ip=src)
            else:
                reply = build.icmp6_error(pkt, 3 if time_exceeded else 2, 0,
                                          param=0 if time_exceeded else self.mtu, src_ip=src)
        except PacketError:
            self.ctx.count("malformed")
            return
        self.ctx.count("ttl_expired" if time_exceeded else "too_big_sent")
        self.ctx.emit(Frame(reply), TO_GUEST)

    # -- from the tunnel --------------------------------------------------------------

    def on_datagram(self, data: bytearray, source: Address, now: float) -> None:
        peer = self.peers.by_source(source[0])
        if peer is None:
            self.ctx.count("unknown_peer")
            return
        if len(data) < wire.VXLAN_HLEN + 14:
            self.ctx.count("malformed")
            return
        vni = wire.vxlan_vni(data)
        if vni is None:
            self.ctx.count("bad_flags")
            return
        if vni != self.options.vni:
            self.ctx.count("bad_vni")
            return
        del data[:wire.VXLAN_HLEN]
        self._inner(Frame(data), peer, now)

    def on_frame(self, frame: Frame, now: float) -> None:
        """A frame the kernel's link decapsulated (its filter checked the sender, the
        flags and the VNI): which peer it came from is told by its inner source."""
        if len(frame.data) < 14:
            self.ctx.count("malformed")
            return
        self._inner(frame, None, now)

    def _inner(self, frame: Frame, peer: Peer | None, now: float) -> None:
        """A decapsulated frame from ``peer`` (None: whichever peer its source is
        behind): checked, given this side's MACs, toward the guest."""
        data = frame.data
        et = (data[12] << 8) | data[13]
        if et == ETH_P_IP and len(data) >= 34:
            src, dst, version = bytes(data[26:30]), bytes(data[30:34]), 4
        elif et == ETH_P_IPV6 and len(data) >= 54:
            src, dst, version = bytes(data[22:38]), bytes(data[38:54]), 6
        elif et == ETH_P_ARP and len(data) >= 42:
            self._arp_in(data, peer, now)
            return
        else:
            self.ctx.count("malformed" if et in (ETH_P_IP, ETH_P_IPV6) else "other_dropped")
            return
        if version == 6 and data[20] == 58 and len(data) >= 78 and data[54] in ND_TYPES:
            self._nd_in(data, peer, now)
            return
        behind = self._route(version, src)
        if behind is None or (peer is not None and behind is not peer):
            self.ctx.count("spoofed")
            return
        peer = behind
        if self.options.learn:
            self._learnt(src, bytes(data[6:12]), now)
        gw = self.hosts.gateway_mac[version]
        if gw is not None:
            data[6:12] = gw
        guest = self.hosts.macs.get(dst)
        if guest is not None:
            data[0:6] = guest
        if version == 4:
            proto, l4 = data[23], 14 + ((data[14] & 15) << 2)
        else:
            proto, l4 = data[20], 54
        if proto == 6 and len(data) > l4 + 13 and data[l4 + 13] & wire.TCP_SYN \
                and clamp_mss(data, l4, self.mss[version], is_partial(frame.vnet, l4)):
            self.ctx.count("mss_clamped")
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(frame, TO_GUEST)

    def _learnt(self, addr: bytes, mac: bytes, now: float) -> None:
        """``addr`` (behind a peer) is at ``mac``: send what waited for it."""
        if mac[0] & 1:
            return
        released = self.resolver.learn(addr, mac, now)
        if released is not None:
            peer, frames = released
            for f in frames:
                f.data[0:6] = mac
                self._send_frame(peer, f)
