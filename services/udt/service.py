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
    congestion = "vtl"              # UDT congestion control: "vtl" (default) or "native"
    max_rate_mbit = 0               # optional cap on one UDT connection, Mbit/s (0: none)
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
    - ``congestion = "vtl"`` (the default) is VTL's own UDT congestion control
      (``vtl.bridge.transports.udtcc``, a C++ extension built with VTL): model-based
      like BBR, it paces at the bottleneck bandwidth it measures from the delivery
      rate, keeps about 1.75 bandwidth-delay products in flight, probes with a gain
      cycle, and does not take random loss as a congestion signal (loss counts only
      with an inflated RTT or when it is more than 3 % of a round: an overflowing
      queue; then the data in flight is kept under what overflowed it). A short
      PROBE_RTT (half rate for two RTTs every 5 s) keeps its min RTT honest. A queue
      that outlives that PROBE_RTT (judged on the one-way queue delay the receiving
      control reports) is another sender's, one that ignores loss like BBR v1: then
      it stops yielding to loss for a while (2.5 BDPs in flight, no bandwidth cut).
      It needs no ``max_rate_mbit``. Measured with benchmarks/udt.py (100 Mbit/s WAN,
      queue one BDP, medians of 3, one iperf3 connection, 2-core machine, plain bbr
      guests in the same sittings): at 60 ms / 1 % loss 93.6 Mbit/s (plain bbr 91.2,
      cubic guests about 2; native capped at 90: about 11); at 120 ms / 1 % 86.5 (bbr
      about 80); at 0 % loss and 10 / 30 / 60 / 120 ms 86 / 91.4 / 93.5 / 91.1 (bbr
      94.1 / 94.1 / 92.5 / 84.3), with 0.5-0.7 % of its packets tail-dropped at the
      WAN's queue. Sharing the 60 ms WAN (``--fairness``, medians of 3 runs of 11 s):
      against one plain bbr connection vtl got 31-39 % (single runs 9-45 %; 40-49 %
      over 60 s; two plain bbr: 48-52 %); two vtl connections 35/65 to 55/45 (single
      runs 25-75 %), over 33 s 40-60 % each in every run. At 10 ms it is CPU-bound on
      such a machine (at 1 % loss 48-62). Both bridges spend about 0.6 of a core
      between them at that rate. ``VTL_UDTCC_DEBUG=1`` (or a file path) in ``vtl
      run``'s environment prints each connection's model twice a second.
    - ``congestion = "native"`` is libudt's own control (DAIMD, with a packet-pair
      capacity estimate). It cuts its rate on every loss event, so random loss is
      its worst case, and it overshoots a rate-limited path badly: on a 100 Mbit/s
      emulated WAN with a one-BDP queue it lost 30-40 % of its packets to tail drops
      at 0 % loss and got 0.4x plain TCP. With it, set ``max_rate_mbit`` (it caps the
      pacing, ``UDT_MAXBW``) about 10 % under the WAN's rate: libudt's pacing clock is
      not exact (a 90 Mbit/s cap gave 92 Mbit/s of goodput) and the WAN also carries
      headers. With 90 on the 100 Mbit/s WAN: 0.98x plain TCP at 60 ms / 0 % loss.
    - Give both bridges the same ``congestion``: each end's control paces what that
      end sends, and the vtl control measures the delivery rate from reports its
      peer's vtl control sends (against a native peer it falls back to a coarser
      estimate from ACKs and loss reports).
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
      ``fallback_passthrough``; ``report()`` adds ``passthrough_active``,
      ``peers_down`` and ``congestion``.

See also
    UDT (Gu and Grossman, draft-gg-udt-03); ``pep`` (the same split-TCP
    machinery, ``vtl.models.split``); ``vtl.stream`` (inbound streams).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from vtl.models.split import Route, SplitService
from vtl.models.tcp_endpoint import TcpEndpoint
from vtl.models.tcp_segment import FlowAddrs
from vtl.services.udt.options import Peer, UdtOptions, parse_hostport

from vtl import CONSUMED, PASS, Direction, FlowKey, FlowTable, Frame, ServiceContext
from vtl.errors import PacketError
from vtl.packet.ethernet import ETH_P_ARP
from vtl.packet.packet import Packet
from vtl.service import Verdict
from vtl.stream import (
    Listener,
    ListenRequest,
    Stream,
    StreamClosed,
    StreamConnected,
    StreamEvent,
    StreamFlow,
    StreamHandler,
    StreamOffer,
)

TO_GUEST, TO_UPLINK = Direction.TO_GUEST, Direction.TO_UPLINK
PEER_DOWN = frozenset({"unreachable"})  # the transport: the peer bridge was never reached
MAX_LEARNT = 4096  # MACs remembered per table (the least recently learnt goes first)
MAX_PEERS_DOWN = 1024  # peer bridges remembered as down
FAR_SILENT = "the guest behind the peer bridge did not answer"  # B's timeout refusals
LOCAL_MAC = b"\x02\x00\x00\x00\x00\x01"  # source MAC when nothing better is known


def _ip(b: bytes) -> str:
    return str(ipaddress.ip_address(b))


class Udt(SplitService):
    name = "udt"
    summary = "TCP-to-UDT between two VTL bridges: TCP ends here, bytes cross over UDT"
    Options = UdtOptions
    icmp_reasons = frozenset()  # every failure to connect is a RST (unreachable: fallback)

    options: UdtOptions

    def __init__(self, options: UdtOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.peers = options.peer_table()
        self.listener: Listener | None = None
        # peer bridges that failed, until retry_s passed
        self.down: FlowTable[tuple[str, int], bool] = FlowTable(
            MAX_PEERS_DOWN, timeout=options.retry_s or None, evict="lru")
        # guest keys let through untouched (fallback passthrough), until idle that long
        self.passthrough: FlowTable[FlowKey, bool] = FlowTable(
            4 * options.max_connections, timeout=options.passthrough_idle_s, evict="lru")
        self.syns: dict[FlowKey, Frame] = {}  # held SYNs of outbound opens not yet connected
        self.guest_macs: FlowTable[bytes, bytes] = FlowTable(MAX_LEARNT)  # guest IP -> MAC
        # remote IP -> the MAC the guest sends it to
        self.toward_macs: FlowTable[bytes, bytes] = FlowTable(MAX_LEARNT)

    # -- life -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        addr = self.options.listen_address
        if addr is None:
            return
        o = self.options
        request = ListenRequest("udt", addr[0], addr[1], read_chunk=self.budget.chunk,
                                write_buffer=self.budget.chunk,
                                offer_timeout_s=o.connect_timeout_s + 2,
                                options={"mss": o.mss, "window": o.window,
                                         "max_bw": o.max_bw, "congestion": o.congestion})
        self.listener = self.ctx.listen_streams(request, self._on_offer)

    def stop(self, now: float) -> None:
        super().stop(now)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.syns.clear()
        self.passthrough.clear()

    def report(self, now: float) -> dict[str, Any]:
        self.passthrough.expire(now)
        self.down.expire(now)
        return {**super().report(now), "passthrough_active": len(self.passthrough),
                "peers_down": len(self.down), "congestion": self.options.congestion}

    # -- frames -----------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        try:
            if direction is TO_UPLINK:
                self._learn(Packet(frame))
            return super().process(frame, direction, now)
        except PacketError:
            self.ctx.count("malformed")
            return PASS

    def from_uplink(self, key: FlowKey, pkt: Packet, now: float) -> Verdict:
        self._passing(key, now)  # keeps a passed-through flow alive both ways
        return PASS

    def stray(self, key: FlowKey, pkt: Packet, now: float) -> Verdict:
        self._passing(key, now)
        return PASS

    def route(self, key: FlowKey, syn: Packet, now: float) -> Route:
        if self._passing(key, now) or syn.data[0] & 1:
            return PASS
        peer = self.peers.lookup(key.dst)
        if peer is None:
            return PASS
        if self.down.get((peer.host, peer.port), now) is not None:
            return self._fallback_at_once(syn, key, now)
        return self._connector(key, syn, peer)

    def _passing(self, key: FlowKey, now: float) -> bool:
        if self.passthrough.get(key, now) is None:
            return False
        self.passthrough.touch(key, now)
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
    def _remember(table: FlowTable[bytes, bytes], ip: bytes, mac: bytes) -> None:
        if table.get(ip) != mac:
            table.put(ip, mac, 0.0)  # no aging: the least recently learnt goes when full

    # -- outbound: the guest opens toward a peer prefix -----------------------------------

    def _connector(self, key: FlowKey, syn: Packet, peer: Peer) -> Route:
        o = self.options
        d = syn.data
        src_mac, dst_mac = bytes(d[6:12]), bytes(d[0:6])
        request = self.budget.request(
            "udt", peer.host, peer.port, timeout_s=o.connect_timeout_s,
            options={"mss": o.mss, "window": o.window, "max_bw": o.max_bw,
                     "congestion": o.congestion, "mux": o.mux},
            flow=StreamFlow(key, src_mac, dst_mac))
        where = (peer.host, peer.port)

        def connect(handler: StreamHandler) -> Stream:
            def on_event(event: StreamEvent, now: float) -> None:
                if isinstance(event, StreamConnected):
                    self.syns.pop(key, None)
                    self.down.pop(where)
                elif isinstance(event, StreamClosed):
                    syn_frame = self.syns.pop(key, None)
                    if syn_frame is not None and event.reason in PEER_DOWN:  # never answered
                        if o.retry_s > 0:
                            self.down.put(where, True, now)
                        if o.fallback == "passthrough":
                            self._pass_through(key, syn_frame, now)
                            return
                        self.ctx.count("fallback_reset")
                handler(event, now)

            assert syn.frame is not None
            self.syns[key] = syn.frame.copy()  # held for a passthrough fallback
            try:
                return self.ctx.open_stream(request, on_event)
            except BaseException:
                self.syns.pop(key, None)
                raise

        return connect

    def _fallback_at_once(self, pkt: Packet, key: FlowKey, now: float) -> Verdict:
        if self.options.fallback == "passthrough":
            self.ctx.count("fallback_passthrough")
            self.passthrough.put(key, True, now)
            return PASS
        self.ctx.count("fallback_reset")
        self.table.answer_reset(pkt)
        return CONSUMED

    def _pass_through(self, key: FlowKey, syn: Frame, now: float) -> None:
        """Forget the connection silently and let the held SYN go to the uplink."""
        self.ctx.count("fallback_passthrough")
        self.table.release(key, "passthrough", now)
        self.passthrough.put(key, True, now)
        self.ctx.emit(syn, TO_UPLINK)

    # -- inbound: a peer bridge offers a stream -------------------------------------------

    def _on_offer(self, offer: StreamOffer, now: float) -> None:
        self.ctx.count("inbound_offers")
        try:
            client, sport, server, dport, client_mac, server_mac = _flow_of(offer.flow)
        except ValueError as exc:
            self._refuse(offer, "error", f"bad flow: {exc}")
            return
        key = FlowKey(4 if len(server) == 4 else 6, 6, server, dport, client, sport)
        if key in self.table or self.passthrough.get(key, now) is not None:
            self._refuse(offer, "error", "that connection is already live")
            return
        dst_mac = self.guest_macs.get(server) or server_mac
        src_mac = self.toward_macs.get(client) or client_mac or LOCAL_MAC
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


def _flow_of(flow: StreamFlow | None
             ) -> tuple[bytes, int, bytes, int, bytes | None, bytes | None]:
    """The original client and server of an offered stream, checked (MACs are optional)."""
    if flow is None:
        raise ValueError("the offer carries no flow")
    k = flow.key
    if k.proto != 6 or len(k.src) != len(k.dst) or len(k.src) not in (4, 16):
        raise ValueError(f"{k!r} is not a TCP connection within one address family")
    if not (0 < k.sport < 65536 and 0 < k.dport < 65536):
        raise ValueError("ports must be 1 to 65535")
    macs = []
    for name, mac in (("client_mac", flow.client_mac), ("server_mac", flow.server_mac)):
        if mac and len(mac) != 6:
            raise ValueError(f"{name} must be 6 bytes")
        macs.append(bytes(mac) if mac else None)
    return k.src, k.sport, k.dst, k.dport, macs[0], macs[1]


__all__ = ["Udt", "UdtOptions", "parse_hostport"]
