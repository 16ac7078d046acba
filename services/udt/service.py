"""udt: TCP-to-UDT transformation between two VTL bridges.

Synopsis
    [[services]]
    use = "udt"
    listen = "10.190.0.1:9000"      # where this bridge takes UDT from peer bridges (optional)
    peers = [{prefix = "10.191.2.0/24", bridge = "10.190.0.2:9000"}]   # longest prefix wins
    fallback = "reset"              # or "passthrough": when the peer bridge cannot be reached
    connect_timeout_s = 3
    retry_s = 10                    # a failed peer bridge gets the fallback at once this long
    mss = 1500                      # UDT packet size (to the transport)
    window = 8388608                # UDT buffer per connection (to the transport)
    max_rate_mbit = 90              # cap one UDT connection ~10 % under the WAN's rate (0: none)
    mux = true                      # one UDT connection per pair of bridges, or per TCP one
    buffer_bytes = 2097152
    max_connections = 1024

    The same block on both bridges (each with its own ``listen`` and ``peers``).

What it does to frames
    Outbound (this bridge's guest is the client): a SYN from the guest to an
    address in a ``peers`` prefix is CONSUMED and held while a UDT stream is
    opened to that prefix's bridge, carrying the original addresses, ports and
    MACs. The SYN is answered (SYN-ACK from the destination's address) only
    once the far bridge's guest accepted; then the service is the guest's TCP
    peer, CONSUMES every segment of the connection, and relays the bytes. The
    far guest refusing gives the guest a RST. The peer bridge not reached within
    ``connect_timeout_s`` (no UDT handshake answer) gives ``fallback``: ``reset``,
    a RST at once; ``passthrough``, nothing to the guest: the held SYN is emitted
    toward the uplink and every later segment of that flow PASSes both ways
    (until ``passthrough_idle_s`` without one). A failed peer bridge is
    remembered for ``retry_s``: its new connections get the fallback at once.
    Frames from the uplink of a transformed connection are DROPPED.

    Inbound (with ``listen``): each UDT stream a peer bridge offers becomes a
    TCP connection opened toward this bridge's guest *as the original client*
    (its address, port and MAC); the offer is accepted once the guest answered
    the SYN, refused (``refused``) when it resets it, and refused
    (``timeout``) when it does not answer within ``connect_timeout_s``. The
    guest's segments of it are CONSUMED, the uplink's DROPPED.

    Everything else PASSes: non-TCP, destinations outside every prefix,
    connections open before the service started. Closes propagate both ways
    (FIN to FIN, RST to RST).

Notes
    - UDT's own rate control (DAIMD, with a packet-pair capacity estimate)
      overshoots a rate-limited path badly: on a 100 Mbit/s emulated WAN with a
      one-BDP queue it lost 30-40 % of its packets to tail drops at 0 % loss and
      got 0.4x plain TCP. ``max_rate_mbit`` caps its pacing (``UDT_MAXBW``); set it
      about 10 % under the WAN's rate: libudt's pacing clock is not exact (a
      90 Mbit/s cap gave 92 Mbit/s of goodput) and the WAN also carries headers.
      With 90 on the 100 Mbit/s WAN: 0.98x plain TCP at 60 ms / 0 % loss.
    - ``mux`` (default true): every connection to a peer bridge rides one UDT
      connection, framed per stream with its own credit window. Measured at
      60 ms RTT (benchmarks/udt.py): a new connection's first byte after
      134 ms (plain TCP 125 ms) where a UDT connection of its own costs 263 ms
      (the UDT handshake first), and 50 parallel 1 MB downloads in 4.6 s (plain
      4.8 s) against 10.4 s for 50 UDT connections, whose rate controls fight.
    - The guest's MAC for an inbound connection is learnt from the frames the
      service sees from the guest (IP and ARP sources); before the guest has
      sent anything, the MAC the original SYN was sent to is used, which is only
      right when both sides agree on it. Same for the source MAC (the one the
      guest uses toward the client's address, else the client's own).
    - ``connect_timeout_s`` covers both reaching the peer bridge and its guest
      answering. Only a peer bridge that was never reached (close reason
      ``unreachable`` from the transport) takes the fallback and is remembered as
      down; a peer that answered the UDT handshake but whose guest stayed silent
      (``timeout``, from either bridge's clock) is a RST to the guest.
    - Memory per connection is bounded as in ``pep`` (``buffer_bytes`` plus one
      read chunk and the bridge's stream write buffer).
    - Counters: ``connections_opened``, ``connections_<outcome>``,
      ``connections_failed``, ``bytes_up``/``bytes_down``, ``inbound_offers``,
      ``inbound_accepted``, ``inbound_refused``, ``fallback_reset``,
      ``fallback_passthrough``; ``report()`` adds ``passthrough_active``.

See also
    UDT (Gu and Grossman, draft-gg-udt-03); ``pep`` (the same split-TCP
    machinery, ``vtl.models.split``); ``vtl.stream`` (inbound streams).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from vtl.models.split import FlowKey, SplitTable, budget, guest_key
from vtl.models.tcp_endpoint import TcpEndpoint
from vtl.models.tcp_segment import FlowAddrs
from vtl.services.udt.options import Peer, UdtOptions, parse_hostport

from vtl import CONSUMED, DROP, PASS, Direction, Frame, Service, ServiceContext
from vtl.errors import PacketError
from vtl.packet.ethernet import ETH_P_ARP
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, RST, SYN
from vtl.service import Verdict
from vtl.stream import (
    Listener,
    ListenRequest,
    Stream,
    StreamClosed,
    StreamConnected,
    StreamEvent,
    StreamHandler,
    StreamOffer,
    StreamRequest,
)

TO_GUEST, TO_UPLINK = Direction.TO_GUEST, Direction.TO_UPLINK
PEER_DOWN = frozenset({"unreachable"})  # the transport: the peer bridge was never reached
MAX_LEARNT = 4096  # MACs remembered per table (cleared when full)
FAR_SILENT = "the guest behind the peer bridge did not answer"  # B's timeout refusals
LOCAL_MAC = b"\x02\x00\x00\x00\x00\x01"  # source MAC when nothing better is known


def _ip(b: bytes) -> str:
    return str(ipaddress.ip_address(b))


class Udt(Service):
    name = "udt"
    summary = "TCP-to-UDT between two VTL bridges: TCP ends here, bytes cross over UDT"
    Options = UdtOptions

    options: UdtOptions

    def __init__(self, options: UdtOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        ep_config, self.chunk = budget(options.buffer_bytes)
        # every failure to connect is a RST to the guest (unreachable peers: see fallback)
        self.table = SplitTable(ctx, ep_config, max_connections=options.max_connections,
                                icmp_reasons=frozenset())
        self.peers = options.peer_table()
        self.listener: Listener | None = None
        self.down: dict[tuple[str, int], float] = {}  # peer bridge -> retry after
        self.passthrough: dict[FlowKey, float] = {}  # guest key -> forgotten after
        self.syns: dict[FlowKey, Frame] = {}  # held SYNs of outbound opens not yet connected
        self.guest_macs: dict[bytes, bytes] = {}  # guest IP -> the guest's MAC
        self.toward_macs: dict[bytes, bytes] = {}  # remote IP -> MAC the guest sends it to
        self._now = 0.0

    # -- life -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self._now = now
        addr = self.options.listen_address
        if addr is None:
            return
        o = self.options
        request = ListenRequest("udt", addr[0], addr[1], read_chunk=self.chunk,
                                write_buffer=self.chunk, offer_timeout_s=o.connect_timeout_s + 2,
                                options={"mss": o.mss, "window": o.window,
                                         "max_bw": o.max_bw})
        self.listener = self.ctx.listen_streams(request, self._on_offer)

    def stop(self, now: float) -> None:
        self._now = now
        self.table.stop(now)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.syns.clear()
        self.passthrough.clear()

    def poll_at(self) -> float | None:
        return self.table.poll_at()

    def on_timer(self, now: float) -> None:
        self._now = now
        self.table.on_timer(now)

    def report(self) -> dict[str, Any]:
        now = self._now
        return {**self.table.report(),
                "passthrough_active": sum(1 for t in self.passthrough.values() if t > now),
                "peers_down": sum(1 for t in self.down.values() if t > now)}

    # -- frames -----------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        self._now = now
        try:
            pkt = Packet(frame)
            if direction is TO_UPLINK:
                self._learn(pkt)
            t = pkt.tcp
            if t is None:
                return PASS
            key = guest_key(pkt)
        except PacketError:
            self.ctx.count("malformed")
            return PASS
        if direction is TO_GUEST:
            key = (key[2], key[3], key[0], key[1])
            if self._passing(key, now):
                return PASS
            return DROP if key in self.table else PASS
        if self._passing(key, now):
            return PASS
        if self.table.segment(key, pkt, now):
            return CONSUMED
        if t.flags & (SYN | ACK | RST) != SYN or pkt.data[0] & 1:
            return PASS
        peer = self.peers.lookup(key[2])
        if peer is None:
            return PASS
        until = self.down.get((peer.host, peer.port))
        if until is not None:
            if until > now:
                return self._fallback_at_once(pkt, key, now)
            del self.down[(peer.host, peer.port)]
        self._open(key, pkt, frame, peer, now)
        return CONSUMED

    def _passing(self, key: FlowKey, now: float) -> bool:
        until = self.passthrough.get(key)
        if until is None:
            return False
        if until <= now:
            del self.passthrough[key]
            return False
        self.passthrough[key] = now + self.options.passthrough_idle_s
        return True

    def _learn(self, pkt: Packet) -> None:
        """Remember the guest's MAC per address, and the MAC it uses per destination."""
        d = pkt.data
        if pkt.ethertype == ETH_P_ARP:
            a = pkt.arp
            if a is not None and any(a.spa):
                self._remember(self.guest_macs, bytes(a.spa), bytes(a.sha))
            return
        ip = pkt.ip
        if ip is None:
            return
        src, dst = ip.addrs
        if any(src):
            self._remember(self.guest_macs, src, bytes(d[6:12]))
        if not d[0] & 1:
            self._remember(self.toward_macs, dst, bytes(d[0:6]))

    @staticmethod
    def _remember(table: dict[bytes, bytes], ip: bytes, mac: bytes) -> None:
        if table.get(ip) != mac:
            if len(table) >= MAX_LEARNT:
                table.clear()
            table[ip] = mac

    # -- outbound: the guest opens toward a peer prefix -----------------------------------

    def _open(self, key: FlowKey, pkt: Packet, frame: Frame, peer: Peer, now: float) -> None:
        o = self.options
        d = pkt.data
        flow = {"src": _ip(key[0]), "sport": key[1], "dst": _ip(key[2]), "dport": key[3],
                "src_mac": bytes(d[6:12]), "dst_mac": bytes(d[0:6])}
        request = StreamRequest("udt", peer.host, peer.port, timeout_s=o.connect_timeout_s,
                                read_chunk=self.chunk, write_buffer=self.chunk,
                                options={"flow": flow, "mss": o.mss, "window": o.window,
                                         "max_bw": o.max_bw,
                                         "mux": o.mux})
        where = (peer.host, peer.port)

        def connect(handler: StreamHandler) -> Stream:
            def on_event(event: StreamEvent, now: float) -> None:
                if isinstance(event, StreamConnected):
                    self.syns.pop(key, None)
                    self.down.pop(where, None)
                elif isinstance(event, StreamClosed):
                    held = self.syns.pop(key, None)
                    if held is not None and event.reason in PEER_DOWN:  # bridge never answered
                        if o.retry_s > 0:
                            self.down[where] = now + o.retry_s
                        if o.fallback == "passthrough":
                            self._pass_through(key, held, now)
                            return
                        self.ctx.count("fallback_reset")
                handler(event, now)

            return self.ctx.open_stream(request, on_event)

        self.syns[key] = frame.copy()
        if self.table.open(key, pkt, now, connect) is None:
            self.syns.pop(key, None)

    def _fallback_at_once(self, pkt: Packet, key: FlowKey, now: float) -> Verdict:
        if self.options.fallback == "passthrough":
            self.ctx.count("fallback_passthrough")
            self.passthrough[key] = now + self.options.passthrough_idle_s
            self._prune(now)
            return PASS
        self.ctx.count("fallback_reset")
        self.table.answer_reset(pkt)
        return CONSUMED

    def _pass_through(self, key: FlowKey, syn: Frame, now: float) -> None:
        """Forget the connection silently and let the held SYN go to the uplink."""
        self.ctx.count("fallback_passthrough")
        self.table.release(key, "passthrough", now)
        self.passthrough[key] = now + self.options.passthrough_idle_s
        self._prune(now)
        self.ctx.emit(syn, TO_UPLINK)

    def _prune(self, now: float) -> None:
        if len(self.passthrough) > 4 * self.options.max_connections:
            self.passthrough = {k: t for k, t in self.passthrough.items() if t > now}

    # -- inbound: a peer bridge offers a stream -------------------------------------------

    def _on_offer(self, offer: StreamOffer, now: float) -> None:
        self._now = now
        self.ctx.count("inbound_offers")
        try:
            client, sport, server, dport, client_mac, server_mac = _flow_of(offer.meta)
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse(offer, "error", f"bad flow metadata: {exc}")
            return
        key = (server, dport, client, sport)  # as the guest will send
        if key in self.table or key in self.passthrough:
            self._refuse(offer, "error", "that connection is already live")
            return
        dst_mac = self.guest_macs.get(server, server_mac)
        src_mac = self.toward_macs.get(client, client_mac) or LOCAL_MAC
        if dst_mac is None:
            self._refuse(offer, "error", f"no MAC known for {_ip(server)} (the guest has "
                         "not sent a frame yet and the opener sent none)")
            return
        addrs = FlowAddrs(src_mac, dst_mac, client, server, sport, dport)
        endpoint = TcpEndpoint.active(addrs, self.table.ep_config, now)

        def accept(handler: StreamHandler) -> Stream:
            self.ctx.count("inbound_accepted")
            return offer.accept(handler)

        def refuse(outcome: str, message: str) -> None:
            reason = outcome if outcome in ("refused", "timeout", "reset") else "error"
            self._refuse(offer, reason, FAR_SILENT if reason == "timeout" else message)

        self.table.open_active(key, endpoint, now, accept, refuse,
                               deadline=now + self.options.connect_timeout_s)

    def _refuse(self, offer: StreamOffer, reason: Any, message: str) -> None:
        self.ctx.count("inbound_refused")
        offer.refuse(reason, message)


def _flow_of(meta: Mapping[str, Any]
             ) -> tuple[bytes, int, bytes, int, bytes | None, bytes | None]:
    """The original client and server of an offered stream, checked (MACs are optional)."""
    flow = meta["flow"]
    client = ipaddress.ip_address(flow["src"])
    server = ipaddress.ip_address(flow["dst"])
    if client.version != server.version:
        raise ValueError("src and dst are of different families")
    sport, dport = int(flow["sport"]), int(flow["dport"])
    if not (0 < sport < 65536 and 0 < dport < 65536):
        raise ValueError("ports must be 1 to 65535")
    macs = []
    for k in ("src_mac", "dst_mac"):
        mac = flow.get(k)
        if mac is not None:
            mac = bytes(mac)
            if len(mac) != 6:
                raise ValueError(f"{k} must be 6 bytes")
        macs.append(mac)
    return client.packed, sport, server.packed, dport, macs[0], macs[1]


__all__ = ["Udt", "UdtOptions", "parse_hostport"]
