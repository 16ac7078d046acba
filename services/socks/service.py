"""socks: transparent SOCKS5 / Tor anonymizer; every VM connection through the proxy.

Synopsis
    [[services]]
    use = "socks"
    proxy = "socks5://127.0.0.1:9050"   # Tor; or socks5://user:pass@[2001:db8::1]:1080
    dns = "fake-ip"                     # or "tor-resolve", or "tcp://9.9.9.9:53"
    fake_ip_pool = "198.18.0.0/15"
    fake_ip6_pool = "fd98:18::/64"
    gateway_mac = "02:00:5e:10:00:01"   # default: random, locally administered
    reject = true                       # ICMP administratively prohibited for the rest
    isolate = false                     # true: per-VM credentials (Tor IsolateSOCKSAuth)
    connect_timeout_s = 20
    congestion = "bbr"                  # toward the proxy (default: the kernel's)

What it does to frames
    Nothing from the guest reaches the uplink, and nothing from the uplink
    reaches the guest (both DROPped, counted). The guest is answered locally:

    - TCP: a SYN is held while the proxy is asked to CONNECT to its destination
      (an IPv4/IPv6 literal, or, for a fake-ip address, the *name* it stands
      for, so that the proxy's exit resolves it); the SYN-ACK goes out only once
      the proxy says connected. Then the virtual TCP endpoint is the guest's
      peer and bytes are relayed through the tunnel. A proxy that refuses, is
      down, or rejects the credentials gives the guest a RST at once, and a log
      line names the cause ("SOCKS proxy 127.0.0.1:9050 ..."); a destination
      the proxy reports unreachable gives ICMP host unreachable. A segment of
      no known connection gets a RST. Destinations the bridge's egress policy
      refuses by default (loopback, link-local, ...; ``vtl.addrclass``), port 0
      and ``localhost`` names get ICMP administratively prohibited, unasked.
    - DNS, UDP and TCP port 53 to any address: answered by VTL, never
      forwarded (modes below). UDP answers come from the address the guest
      asked.
    - ARP requests and IPv6 neighbour solicitations for any address are
      answered with ``gateway_mac`` (except duplicate-address probes and
      gratuitous ARP, which must stay unanswered), so the guest needs no real
      gateway and learns nothing about the host's network.
    - Everything else (other UDP, ICMP echo, other IP protocols) is dropped; with
      ``reject`` an ICMP / ICMPv6 "administratively prohibited" tells the
      application at once (never about broadcast, multicast or ICMP errors).

DNS modes
    ``fake-ip``: A/AAAA get an address from the pools, remembered name <->
    address (like Tor's AutomapHostsOnResolve); PTR of a pool address gives the
    name; other types get NOTIMP. ``tor-resolve``: A/AAAA/PTR through Tor's
    SOCKS RESOLVE / RESOLVE_PTR. ``tcp://ADDR:PORT``: the query as the guest sent
    it, over DNS-over-TCP through a SOCKS CONNECT to that resolver (any SOCKS5
    proxy).

Notes
    - Fail-closed: the service must see every frame and an error in it drops the
      frame, so ``match`` and ``fail = "open"`` are config errors.
    - One bridge per VM is the usual deployment; with ``isolate`` the credentials
      are per guest MAC (user ``vtl-<mac>``, password random per start), so Tor
      puts each VM (and each VTL run) on its own circuits.
    - The guest needs a static address and routes (no DHCP or router
      advertisements are served); any on-link gateway address works.
    - UDP other than DNS cannot go through SOCKS5 here (no UDP ASSOCIATE: Tor
      does not support it); QUIC falls back to TCP when rejected.
    - At start the service probes its proxy (the SOCKS5 greeting, and the
      credentials when it has some; no request) without delaying readiness: a
      proxy that is down, does not speak SOCKS5 or refuses us gets one WARNING
      naming it and the problem. The service is ready all the same: the proxy
      may come up later, and connections are reset until it does.
    - ``congestion`` sets the congestion control (``TCP_CONGESTION``) of the
      connections to the proxy, for a proxy across a long or lossy path; a name the
      kernel lacks is a config error. With Tor the proxy is usually local and the
      choice is Tor's own, on its circuits.

See also
    RFC 1928 and 1929 (SOCKS5), Tor's socks-extensions.txt; ``pep`` (the same
    split-TCP machinery, ``vtl.models.split``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vtl.models.split import Route, SplitService
from vtl.services.socks.dns import DnsResolver
from vtl.services.socks.dnstcp import LocalDnsStream
from vtl.services.socks.fakeip import FakeIpPool
from vtl.services.socks.options import SocksOptions

from vtl import CONSUMED, DROP, Direction, FlowKey, Frame, ServiceContext
from vtl.addrclass import refusal
from vtl.errors import PacketError
from vtl.packet import build
from vtl.packet.arp import ARP_REQUEST
from vtl.packet.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6
from vtl.packet.icmp import ICMP6_NEIGHBOR_SOLICIT
from vtl.packet.packet import Packet
from vtl.service import Verdict
from vtl.stream import Stream, StreamClosed, StreamConnected, StreamEvent, StreamRequest

TO_GUEST = Direction.TO_GUEST
DNS_PORT = 53
UDP, TCP, ICMP, ICMP6 = 17, 6, 1, 58


class Socks(SplitService):
    name = "socks"
    summary = "transparent SOCKS5/Tor anonymizer: all VM TCP through the proxy, nothing leaks"
    Options = SocksOptions
    default_fail = "closed"
    tunable = frozenset({"congestion"})  # for connections opened from then on
    airtight = True
    # proxy down / refusing / bad credentials: RST at once; only a destination the
    # proxy reports unreachable is ICMP (the application then says "no route")
    icmp_reasons = frozenset({"unreachable"})

    options: SocksOptions

    def __init__(self, options: SocksOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.proxy = options.proxy_url
        self.gateway_mac = options.gateway_mac
        self.secret = os.urandom(16).hex()  # isolation password: new circuits every run
        mode, _ = options.dns_mode
        self.pool = (FakeIpPool(options.fake_ip_pool, options.fake_ip6_pool, ttl=options.dns_ttl)
                     if mode == "fake-ip" else None)
        self.resolver = DnsResolver(options.dns, ctx, pool=self.pool, upstream=self._upstream,
                                    timeout_s=options.dns_timeout_s, ttl=options.dns_ttl)
        self._vm_mac = b""  # the guest a resolver upstream is opened for (isolation)
        self._local_ids = 0
        self.probe: Stream | None = None  # the start-up check of the proxy, until it ends
        self.probe_result: str | None = None  # "up", or what is wrong with the proxy
        self._stopped = False

    # -- upstream requests ----------------------------------------------------------

    def _credentials(self) -> tuple[str | None, str | None]:
        if self.options.isolate:
            return "vtl-" + self._vm_mac.hex(), self.secret
        return self.proxy.username, self.proxy.password

    def _upstream(self, host: str, port: int, command: str = "connect") -> StreamRequest:
        user, password = self._credentials()
        options = {"proxy": (self.proxy.host, self.proxy.port), "username": user,
                   "password": password, "command": command}
        if self.options.congestion:
            options["congestion"] = self.options.congestion
        return self.budget.request(
            "socks5", host, port, timeout_s=self.options.connect_timeout_s, options=options)

    # -- frames ------------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        if direction is TO_GUEST:
            self.ctx.count("from_uplink_dropped")
            return DROP
        try:
            super().process(frame, direction, now)  # TCP: route() and stray(); else other()
        except PacketError:
            self.ctx.count("malformed")
        return CONSUMED  # nothing from the guest leaves through the uplink

    def other(self, pkt: Packet, direction: Direction, now: float) -> Verdict:
        et = pkt.ethertype
        if et == ETH_P_ARP:
            self._arp(pkt)
        elif et in (ETH_P_IP, ETH_P_IPV6):
            self._ip(pkt, now)
        else:
            self.ctx.count("rejected_other")
        return CONSUMED

    def _arp(self, pkt: Packet) -> None:
        a = pkt.arp
        if a is None or a.op != ARP_REQUEST:
            self.ctx.count("arp_ignored")
            return
        if a.spa == bytes(4) or a.spa == a.tpa:  # RFC 5227 probe / announcement
            self.ctx.count("arp_ignored")
            return
        self.ctx.emit(Frame(build.arp_reply(pkt, self.gateway_mac)), TO_GUEST)
        self.ctx.count("arp_answered")

    def _ip(self, pkt: Packet, now: float) -> None:
        ip = pkt.ip
        if ip is None:
            self.ctx.count("malformed")
            return
        proto = pkt.l4_proto
        if proto == UDP and pkt.udp is not None and pkt.udp.dport == DNS_PORT:
            self._dns_udp(pkt, now)
        elif proto == ICMP6 and pkt.icmp6 is not None and pkt.icmp6.type >= 128 \
                and pkt.icmp6.type != 128:
            self._nd(pkt)
        else:
            name = {UDP: "udp", ICMP: "icmp", ICMP6: "icmp6"}.get(proto or -1, "other")
            self._reject(pkt, name)

    def _nd(self, pkt: Packet) -> None:
        """Neighbour discovery and other informational ICMPv6 (echo is rejected)."""
        icmp6 = pkt.icmp6
        ip = pkt.ipv6
        assert icmp6 is not None and ip is not None
        if icmp6.type != ICMP6_NEIGHBOR_SOLICIT:
            self.ctx.count("icmp6_ignored")  # RS, MLD, NA, RA, echo replies: nobody to tell
            return
        if ip.src == bytes(16):  # duplicate address detection: stay silent
            self.ctx.count("nd_ignored")
            return
        self.ctx.emit(Frame(build.neighbor_advertisement(pkt, self.gateway_mac, router=True)),
                      TO_GUEST)
        self.ctx.count("nd_answered")

    def _reject(self, pkt: Packet, proto: str) -> None:
        self.ctx.count(f"rejected_{proto}")
        if not self.options.reject:
            return
        try:
            reply = build.unreachable(pkt)  # administratively prohibited, either family
        except PacketError:
            return  # broadcast, multicast, an ICMP error, a later fragment: no error
        self.ctx.emit(Frame(reply), TO_GUEST)
        self.ctx.count("icmp_sent")

    # -- DNS ------------------------------------------------------------------------

    def _dns_udp(self, pkt: Packet, now: float) -> None:
        ip, udp, eth = pkt.ip, pkt.udp, pkt.eth
        assert ip is not None and udp is not None
        payload = pkt.payload
        if payload is None:
            self.ctx.count("malformed")
            return
        src_mac, dst_mac = bytes(eth.dst), bytes(eth.src)
        src_ip, dst_ip = ip.dst, ip.src
        dport = udp.sport
        tags = bytes(pkt.data[12 : 12 + 4 * pkt.ntags])

        def reply(wire: bytes, now: float) -> None:
            self.ctx.emit(Frame(build.udp_datagram(src_mac, dst_mac, src_ip, dst_ip, DNS_PORT,
                                                   dport, wire, tags=tags)), TO_GUEST)

        self._vm_mac = dst_mac
        self.resolver.answer(bytes(payload), now, reply, transport="udp")

    # -- TCP --------------------------------------------------------------------------

    def stray(self, key: FlowKey, pkt: Packet, now: float) -> Verdict:
        self.ctx.count("tcp_unknown")
        self.table.answer_reset(pkt)
        return CONSUMED

    def route(self, key: FlowKey, syn: Packet, now: float) -> Route:
        if syn.data[0] & 1:  # a SYN to a group MAC: nobody answers that
            self.ctx.count("malformed")
            return CONSUMED
        vm_mac = bytes(syn.eth.src)
        if key.dport == DNS_PORT:
            return lambda handler: self._local_dns(key, vm_mac, now)
        host = key.dst_ip
        if self.pool is not None and self.pool.contains(key.dst):
            name = self.pool.name(key.dst, now)
            if name is None:  # a fake address this run never handed out (or recycled)
                self.ctx.count("fake_ip_unknown")
                self.table.answer_reset(syn)
                return CONSUMED
            host = name
        why = refusal(host, key.dport)  # the bridge's default egress classes, port 0 and
        if why is not None:  # localhost names are refused before the proxy is asked
            self.ctx.count("refused_destination")
            if why not in ("multicast", "broadcast", "reserved"):  # no ICMP error about those
                self.ctx.emit(Frame(build.unreachable(syn)), TO_GUEST)  # admin prohibited
            return CONSUMED
        self._vm_mac = vm_mac
        return self._upstream(host, key.dport)

    def _local_dns(self, key: FlowKey, vm_mac: bytes, now: float) -> Stream:
        self._local_ids += 1

        def answer(query: bytes, reply: Callable[[bytes, float], None], now: float) -> None:
            self._vm_mac = vm_mac
            self.resolver.answer(query, now, reply, transport="tcp")

        request = StreamRequest("dns", key.dst_ip, key.dport)
        return LocalDnsStream(-self._local_ids, request,
                              lambda ev, now: self.table.post(key, ev, now), answer, now)

    # -- the proxy check at start ------------------------------------------------------

    def start(self, now: float) -> None:
        """Probe the proxy (asynchronously: the bridge is ready meanwhile)."""
        user, password = self._credentials()
        request = StreamRequest(
            "socks5", self.proxy.host, self.proxy.port, timeout_s=self.options.connect_timeout_s,
            read_chunk=4096, write_buffer=4096,
            options={"proxy": (self.proxy.host, self.proxy.port), "username": user,
                     "password": password, "command": "probe"})
        try:
            self.probe = self.ctx.open_stream(request, self._probed)
        except Exception as exc:  # noqa: BLE001 - a check must never stop the service
            self._probe_failed(f"SOCKS proxy {self.proxy.where}: cannot probe it: {exc}")

    def _probed(self, event: StreamEvent, now: float) -> None:
        if self.probe_result is not None or self._stopped:
            return  # the StreamClosed of our own close(), or after stop()
        if isinstance(event, StreamConnected):
            self.probe_result = "up"
            self.ctx.log.info("SOCKS proxy %s answers (SOCKS5)", self.proxy.where)
            event.stream.close(now)
        elif isinstance(event, StreamClosed):
            self.probe = None
            why = event.message or event.reason
            if not why.startswith("SOCKS proxy"):
                why = f"SOCKS proxy {self.proxy.where}: {why}"
            self._probe_failed(why)

    def _probe_failed(self, why: str) -> None:
        self.probe_result = why
        self.ctx.count("proxy_probe_failed")
        self.ctx.log.warning("%s; socks runs on, resetting the guest's connections until the "
                             "proxy answers", why)

    # -- timers and life ----------------------------------------------------------------

    def poll_at(self) -> float | None:
        times = [t for t in (self.table.poll_at(), self.resolver.poll_at()) if t is not None]
        return min(times) if times else None

    def on_timer(self, now: float) -> None:
        self.table.on_timer(now)
        self.resolver.on_timer(now)

    def stop(self, now: float) -> None:
        self._stopped = True
        if self.probe is not None and self.probe_result is None:
            self.probe.abort(now)
        self.probe = None
        self.resolver.stop(now)
        self.table.stop(now)

    def report(self, now: float) -> dict[str, Any]:
        return {**self.table.report(now), **self.resolver.report()}
