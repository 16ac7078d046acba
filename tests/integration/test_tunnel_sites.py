"""Subnet tunneling between two sites: VM-A and VM-B talk over VXLAN between two VTL bridges.

The topology is :mod:`tunnelnet` (two subnets behind two routers whose WAN link
has 5 ms each way; the bridge hosts share a fast-path link). Without the
service, VM-A reaches VM-B through both routers; with ``tunnel`` on both
bridges the frames cross the fast path as VXLAN and no router sees them (with
either datapath: the kernel's vxlan device or the service's own socket). One
topology serves the whole module; each test asks for the chains it needs
(:meth:`TunnelNet.chains` restarts the bridges only when they change).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from tcptools import download, ensure_http_server, upload
from tcptools import expected_sha256 as expected
from tunnelnet import (
    FAST_A,
    FAST_B,
    GW_A,
    GW_A6,
    TUNNEL_MTU,
    VM_A,
    VM_A6,
    VM_B,
    VM_B6,
    VNI,
    WAN_B,
    WAN_B6,
    TunnelNet,
    open_sites,
    require_root,
    traceroute_hops,
    tshark_fields,
    vm_pair_filter,
)
from vtl.bridge.topology import parse_ping_rtts

pytestmark = pytest.mark.integration

MB = 1_000_000
WAN_DELAY_MS = 5.0
# the kernel's vxlan device (the default) and the service's own encapsulation
DATAPATHS = pytest.mark.parametrize("datapath", ["kernel", "socket"])
ROUTER_LINKS = [("ra", "lan"), ("ra", "wan"), ("rb", "lan"), ("rb", "wan")]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelNet]:
    require_root()
    with open_sites(tmp_path_factory.mktemp("tunnel"), WAN_DELAY_MS) as net:
        yield net
        assert "Traceback" not in "".join(b.stderr for b in net.bridges.values())
        bad = net.stop_all()
        assert not bad, f"`vtl run` did not stop cleanly on SIGTERM: {bad}"


def traceroute(net: TunnelNet, dest: str) -> list[str]:
    v6 = ["-6"] if ":" in dest else []
    out = net.vm_a(["traceroute", *v6, "-n", "-q", "1", "-w", "2", "-m", "6", dest],
                   timeout=60).stdout
    return traceroute_hops(out)


def ping_rtts(net: TunnelNet, dest: str, count: int = 5) -> list[float]:
    v6 = ["-6"] if ":" in dest else []
    out = net.vm_a(["ping", *v6, "-c", str(count), "-i", "0.1", "-W", "2", dest],
                   timeout=30, check=False).stdout
    return parse_ping_rtts(out)


def test_without_the_service_traceroute_shows_the_routers(sites: TunnelNet) -> None:
    sites.chains(tunnel=False)
    caps = [sites.capture(r, dev, f"slow-{r}-{dev}", vm_pair_filter(), snaplen=128)
            for r, dev in ROUTER_LINKS]
    assert traceroute(sites, VM_B) == [GW_A, WAN_B, VM_B]
    assert traceroute(sites, VM_B6) == [GW_A6, WAN_B6, VM_B6]
    rtts = ping_rtts(sites, VM_B)
    assert len(rtts) == 5 and min(rtts) >= 2 * WAN_DELAY_MS  # the WAN, both ways
    assert len(ping_rtts(sites, VM_B6)) == 5
    # the captures the tunnel tests expect empty do see the VMs' traffic on this path
    for cap in caps:
        lines = cap.stop() and cap.lines()
        assert any(f"{VM_A} > {VM_B}" in ln for ln in lines), (cap.pcap.stem, lines[:5])
        assert any(f"{VM_B6} > {VM_A6}" in ln for ln in lines), (cap.pcap.stem, lines[:5])


def test_with_the_service_one_hop_and_the_routers_see_nothing(sites: TunnelNet) -> None:
    sites.chains(tunnel=True)
    caps = [sites.capture(r, dev, f"quiet-{r}-{dev}", vm_pair_filter(), snaplen=128)
            for r, dev in ROUTER_LINKS]
    hops4, hops6 = traceroute(sites, VM_B), traceroute(sites, VM_B6)
    rtts4, rtts6 = ping_rtts(sites, VM_B), ping_rtts(sites, VM_B6)
    digest = download(sites, 2 * MB, seed=3, host=VM_B, timeout=60)
    seen = {c.stop().stem: c.lines() for c in caps}
    # the gateway (time exceeded from its address, as the bypassed router would) then VM-B
    assert hops4 == [GW_A, VM_B], hops4
    assert len(rtts4) == 5 and max(rtts4) < 2 * WAN_DELAY_MS, rtts4  # not over the WAN
    assert digest == expected(2 * MB, 3)
    assert all(not lines for lines in seen.values()), {k: v[:5] for k, v in seen.items()}
    assert hops6 == [GW_A6, VM_B6], hops6
    assert len(rtts6) == 5 and max(rtts6) < 2 * WAN_DELAY_MS, rtts6
    peer = sites.counters("a")["services"]["tunnel"]["peers"][0]
    assert peer["encapsulated"] > 0 and peer["decapsulated"] > 0, peer


@DATAPATHS
def test_the_fast_path_carries_only_vxlan_that_tshark_decodes(sites: TunnelNet,
                                                             datapath: str) -> None:
    sites.chains(tunnel=True, datapath=datapath)
    ensure_http_server(sites, host=VM_B6)
    cap = sites.capture("ha", "fast", "fastpath")
    ping_rtts(sites, VM_B, 3)
    ping_rtts(sites, VM_B6, 3)
    assert download(sites, 3 * MB, seed=4, host=VM_B, timeout=60) == expected(3 * MB, 4)
    assert upload(sites, 3 * MB, seed=5, host=VM_B, timeout=60) == expected(3 * MB, 5)
    v6 = sites.vm_a(["curl", "-sS", "--max-time", "15", "-o", "/dev/null",
                     f"http://[{VM_B6}]:8080/bytes/{MB}?seed=6"], check=False, timeout=30)
    pcap = cap.stop()
    rows = tshark_fields(pcap, ["frame.number", "frame.len", "frame.protocols", "ip.src",
                                "ip.dst", "udp.dstport", "vxlan.vni", "vxlan.flags"])
    assert len(rows) > 1000, f"only {len(rows)} frames on the fast path"
    not_vxlan = [r for r in rows if ":udp:vxlan:eth:ethertype:" not in r["frame.protocols"]]
    assert not not_vxlan, not_vxlan[:5]
    outer = {(r["ip.src"].split(";")[0], r["ip.dst"].split(";")[0]) for r in rows}
    assert outer == {(FAST_A, FAST_B), (FAST_B, FAST_A)}, outer
    assert {r["udp.dstport"].split(";")[0] for r in rows} == {"4789"}
    assert {r["vxlan.vni"] for r in rows} == {str(VNI)}
    # nothing fragmented, nothing above the tunnel MTU + 50 bytes + the Ethernet header
    too_long = [r for r in rows if int(r["frame.len"]) > TUNNEL_MTU + 50 + 14]
    assert not too_long, too_long[:5]
    inner: dict[str, int] = {}  # the inner frames' protocols: ip, ipv6, arp, ip:tcp...
    for r in rows:
        kind = r["frame.protocols"].split(":vxlan:eth:ethertype:", 1)[1]
        for k in (kind.split(":")[0], ":".join(kind.split(":")[:2])):
            inner[k] = inner.get(k, 0) + 1
    assert inner.get("ip:tcp", 0) > 1000 and inner.get("ip:icmp"), inner
    bad = tshark_fields(pcap, ["frame.number", "frame.protocols", "_ws.expert.message"],
                        "_ws.malformed || _ws.expert.severity >= error || "
                        "ip.checksum.status == 0 || udp.checksum.status == 0 || "
                        "tcp.checksum.status == 0 || icmp.checksum.status == 0",
                        checksums=True)
    assert not bad, f"{len(bad)} malformed or bad-checksum frames: {bad[:5]}"
    assert v6.returncode == 0, v6.stderr
    assert inner.get("ipv6:tcp") and inner.get("ipv6:icmpv6"), inner


@DATAPATHS
def test_200_mb_each_way_intact(sites: TunnelNet, datapath: str) -> None:
    sites.chains(tunnel=True, datapath=datapath)
    caps = [sites.capture(r, dev, f"bulk-{r}-{dev}", vm_pair_filter(), snaplen=96)
            for r, dev in ROUTER_LINKS]
    t0 = time.monotonic()
    got_down = download(sites, 200 * MB, seed=11, host=VM_B, timeout=120)
    t1 = time.monotonic()
    got_up = upload(sites, 200 * MB, seed=12, host=VM_B, timeout=120)
    t2 = time.monotonic()
    seen = {c.stop().stem: c.lines() for c in caps}
    print(f"200 MB over the tunnel: VM-B -> VM-A {t1 - t0:.1f} s, VM-A -> VM-B {t2 - t1:.1f} s")
    assert got_down == expected(200 * MB, 11), "VM-B -> VM-A corrupted"
    assert got_up == expected(200 * MB, 12), "VM-A -> VM-B corrupted"
    assert all(not lines for lines in seen.values()), {k: v[:5] for k, v in seen.items()}


@DATAPATHS
def test_ipv6_20_mb_each_way_intact(sites: TunnelNet, datapath: str) -> None:
    sites.chains(tunnel=True, datapath=datapath)
    caps = [sites.capture(r, dev, f"bulk6-{r}-{dev}", vm_pair_filter(), snaplen=96)
            for r, dev in ROUTER_LINKS]
    rtts6 = ping_rtts(sites, VM_B6)
    assert len(rtts6) == 5, "ping6 VM-A -> VM-B through the tunnel"
    got_down6 = download(sites, 20 * MB, seed=13, host=VM_B6, timeout=30)
    got_up6 = upload(sites, 20 * MB, seed=14, host=VM_B6, timeout=30)
    seen = {c.stop().stem: c.lines() for c in caps}
    assert got_down6 == expected(20 * MB, 13), "IPv6 VM-B -> VM-A corrupted"
    assert got_up6 == expected(20 * MB, 14), "IPv6 VM-A -> VM-B corrupted"
    assert all(not lines for lines in seen.values()), {k: v[:5] for k, v in seen.items()}


@DATAPATHS
def test_path_mtu_is_the_tunnel_mtu(sites: TunnelNet, datapath: str) -> None:
    sites.chains(tunnel=True, datapath=datapath)
    for cmd in (["ip", "route", "flush", "cache"], ["ip", "-6", "route", "flush", "cache"]):
        sites.vm_a(cmd)
    payload = TUNNEL_MTU - 28
    out = sites.vm_a(["ping", "-M", "do", "-s", str(payload + 50), "-c", "2", "-W", "2", VM_B],
                     check=False).stdout
    assert re.search(rf"From {re.escape(GW_A)} .*[Ff]rag needed.*mtu ?= ?{TUNNEL_MTU}", out), out
    fits = sites.vm_a(["ping", "-M", "do", "-s", str(payload), "-c", "2", "-W", "2", VM_B],
                      check=False).stdout
    assert len(parse_ping_rtts(fits)) == 2, fits
    sites.vm_a(["ip", "route", "flush", "cache"])
    tp = sites.vm_a(["tracepath", "-n", "-m", "6", VM_B], timeout=60, check=False).stdout
    assert re.search(rf"Resume: pmtu {TUNNEL_MTU} hops 2\b", tp), tp
    out6 = sites.vm_a(["ping", "-6", "-M", "do", "-s", str(TUNNEL_MTU - 48 + 50), "-c", "2",
                       "-W", "2", VM_B6], check=False).stdout
    assert re.search(rf"From {re.escape(GW_A6)} .*[Pp]acket too big.*mtu ?= ?{TUNNEL_MTU}",
                     out6), out6
    sites.vm_a(["ip", "-6", "route", "flush", "cache"])
    tp6 = sites.vm_a(["tracepath", "-n", "-m", "6", VM_B6], timeout=60, check=False).stdout
    assert re.search(rf"Resume: pmtu {TUNNEL_MTU} hops 2\b", tp6), tp6


def syn_mss(net: TunnelNet, role: str, name: str, dests: list[tuple[str, int]]) -> \
        list[dict[str, str]]:
    """SYN and SYN-ACK options seen on ``eth0`` in ``role`` while VM-A fetches a little
    from each (host, seed) of ``dests``."""
    cap = net.capture(role, "eth0", name, "tcp", snaplen=128)
    for host, seed in dests:
        assert download(net, 10_000, seed=seed, host=host, timeout=30) == expected(10_000, seed)
    pcap = cap.stop()
    return tshark_fields(pcap, ["ip.src", "ipv6.src", "tcp.flags.ack", "tcp.options.mss_val"],
                         "tcp.flags.syn == 1")


@DATAPATHS
def test_tcp_syns_arrive_with_the_mss_clamped(sites: TunnelNet, datapath: str) -> None:
    sites.chains(tunnel=True, datapath=datapath)
    for host, at, (vm_a, vm_b), limit in ((VM_B, 21, (VM_A, VM_B), 1410),
                                           (VM_B6, 23, (VM_A6, VM_B6), 1390)):
        seen_b = syn_mss(sites, "vmb", f"syn-at-b-{at}", [(host, at)])
        syns = [r for r in seen_b if r["tcp.flags.ack"] in ("0", "False")]
        assert {r["ip.src"] or r["ipv6.src"] for r in syns} == {vm_a}, seen_b
        assert all(int(r["tcp.options.mss_val"]) <= limit for r in syns), syns
        seen_a = syn_mss(sites, "vma", f"syn-at-a-{at}", [(host, at + 1)])
        synacks = [r for r in seen_a if r["tcp.flags.ack"] in ("1", "True")]
        assert {r["ip.src"] or r["ipv6.src"] for r in synacks} == {vm_b}, seen_a
        assert all(int(r["tcp.options.mss_val"]) <= limit for r in synacks), synacks
        c = sites.counters("a")["services"]["tunnel"]
        assert c["mss_clamped"] >= 2, c
