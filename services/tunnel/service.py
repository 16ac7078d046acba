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
from vtl.services.tunnel.neighbors import LocalHosts, Resolver
from vtl.services.tunnel.options import DEFAULT_GATEWAY_MAC, TunnelOptions
from vtl.services.tunnel.peers import Peer, StaticPeers, parse_endpoint
from vtl.services.tunnel.wire import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6

from vtl import CONSUMED, PASS, Direction, Frame, Service, ServiceContext, Verdict
from vtl.datagram import Address, DatagramRequest, DatagramSocket
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.addr import mac_bytes, mac_str
from vtl.packet.offload import complete_offloads
from vtl.packet.packet import Packet

TO_UPLINK, TO_GUEST = Direction.TO_UPLINK, Direction.TO_GUEST
ROUTE_CACHE = 4096  # destinations whose peer (or none) is remembered
ND_TYPES = range(133, 138)


class Tunnel(Service):
    name = "tunnel"
    summary = "carry traffic for other sites' subnets over VXLAN, bypassing the routers"
    Options = TunnelOptions
    tunable = frozenset(TunnelOptions.model_fields) - {"local"}

    options: TunnelOptions

    def __init__(self, options: TunnelOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.local = parse_endpoint(options.local, "local")
        self.sock: DatagramSocket | None = None
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
        self.sock = self.ctx.open_datagram(DatagramRequest(host, port), self.on_datagram)

    def retune(self, options: TunnelOptions, now: float) -> None:
        """Every option but ``local`` changes at run time (``vtl ctl NAME set`` or a
        reload): the socket stays, learnt addresses stay (unless the table's bounds
        changed), peers that stay keep their counters."""
        self._configure(options)
        self.options = options
        self._count_unresolved()

    def stop(self, now: float) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

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
            "socket": self.sock.counters() if self.sock is not None else {},
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
               now: float) -> bytearray | None:
        """The router's work and the destination MAC on ``frame``: its data, ready for the
        tunnel, or None when it was answered (ICMP) or waits for the MAC."""
        data = frame.data
        if version == 4:
            size = (data[16] << 8) | data[17]
            if size > self.mtu and data[20] & 0x40:  # DF
                self._too_big(frame, 4)
                return None
            proto, l4 = data[23], 14 + ((data[14] & 15) << 2)
        else:
            if len(data) - 14 > self.mtu:
                self._too_big(frame, 6)
                return None
            proto, l4 = data[20], 54
        if self.options.ttl_decrement and not wire.decrement_ttl(data, version):
            self._icmp(frame, version, time_exceeded=True)
            return None
        if proto == 6 and len(data) > l4 + 13 and data[l4 + 13] & wire.TCP_SYN \
                and wire.clamp_mss(data, l4, self.mss[version]):
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

    def _send(self, peer: Peer, data: bytearray) -> None:
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
        if kind == 135 and _is_link_local(data[22:24]):
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
        if self._route(version, src) is not peer:
            self.ctx.count("spoofed")
            return
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
                and wire.clamp_mss(data, l4, self.mss[version]):
            self.ctx.count("mss_clamped")
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(Frame(data), TO_GUEST)

    def _learnt(self, addr: bytes, mac: bytes, now: float) -> None:
        """``addr`` (behind a peer) is at ``mac``: send what waited for it."""
        if mac[0] & 1:
            return
        released = self.resolver.learn(addr, mac, now)
        if released is not None:
            peer, frames = released
            for f in frames:
                f.data[0:6] = mac
                self._send(peer, f.data)

    def _arp_in(self, data: bytearray, peer: Peer, now: float) -> None:
        if data[14:20] != b"\x00\x01\x08\x00\x06\x04":
            self.ctx.count("other_dropped")
            return
        spa = bytes(data[28:32])
        if self._route(4, spa) is not peer:
            self.ctx.count("spoofed")
            return
        self._learnt(spa, bytes(data[22:28]), now)
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(Frame(data), TO_GUEST)

    def _nd_in(self, data: bytearray, peer: Peer, now: float) -> None:
        """A solicitation or advertisement from the far side: learn, then deliver."""
        kind = data[54]
        if kind not in (135, 136):
            self.ctx.count("other_dropped")
            return
        addr = bytes(data[62:78]) if kind == 136 else bytes(data[22:38])
        if kind == 135 and _is_link_local(data[22:24]):
            self._probe_in(data, peer)
            return
        if self._route(6, addr) is not peer:
            self.ctx.count("spoofed")
            return
        self._learnt(addr, _lladdr_option(data, 2 if kind == 136 else 1) or bytes(data[6:12]),
                     now)
        peer.decapsulated += 1
        peer.decapsulated_bytes += len(data)
        self.ctx.emit(Frame(data), TO_GUEST)

    def _probe_in(self, data: bytearray, peer: Peer) -> None:
        """A far VM's reachability probe (from its link-local address) for a guest
        address: answered through the tunnel with the guest's MAC, since the guest's own
        answer to a link-local address could not be routed back."""
        mac = self.hosts.macs.get(bytes(data[62:78]))
        if mac is None:
            self.ctx.count("other_dropped")
            return
        try:
            self._send(peer, build.neighbor_advertisement(Packet(data), mac))
        except PacketError:
            self.ctx.count("malformed")
            return
        self.ctx.count("nd_answered")


def _is_link_local(addr: bytes) -> bool:
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def _lladdr_option(data: bytearray, kind: int) -> bytes | None:
    """The link-layer address option ``kind`` (1 source, 2 target) of an NS/NA."""
    i, end = 78, len(data)
    while i + 8 <= end:
        t, n = data[i], data[i + 1] * 8
        if n == 0:
            return None
        if t == kind and n >= 8:
            return bytes(data[i + 2:i + 8])
        i += n
    return None
