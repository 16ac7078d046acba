"""socks end to end: a VM whose every connection goes through a real SOCKS5 server.

The guest namespace's kernel talks only to VTL's ``socks`` service; its TCP is
carried through danted (root namespace) to real servers (httpsha, dnsmasq) in a
namespace that only the proxy can reach; the bridge's uplink leads to a peer
namespace that must never see a frame. Topology and choices: :mod:`socksnet`.
Data are seeded streams, checked by SHA-256.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from socksnet import (
    FAKE6_POOL,
    FAKE_POOL,
    GATEWAY_MAC,
    GW_IP,
    GW_IP6,
    HTTP_PORT,
    NX_NAME,
    SOCKS_PASSWORD,
    SOCKS_USER,
    SRV_HOST_IP,
    SRV_IP,
    SRV_IP6,
    WEB_NAME,
    SocksNet,
    send_marker,
    socks_counters,
    socks_net,
    url_host,
)
from tcptools import expected_sha256 as expected
from tcptools import parallel_downloads, upload
from vtlnet import GUEST_IP, GUEST_IP6, GUEST_MAC, PEER_IP, PEER_IP6, wait_for

pytestmark = pytest.mark.integration

MB = 1 << 20
SIZE = 100 * MB
DNS_MODES = {"fake-ip": "fake-ip", "tcp": f"tcp://{SRV_IP}:53"}
FAST = 1.0  # seconds: "at once"; every probe's own timeout is several times this


@pytest.fixture
def snet(root: None, tmp_path: Path) -> Iterator[SocksNet]:
    with socks_net("vsk", tmp_path) as s:  # vts is taken (tests/bridge)
        yield s


def url(host: str, size: int, seed: int) -> str:
    return f"http://{url_host(host)}:{HTTP_PORT}/bytes/{size}?seed={seed}"


def in_net(addresses: list[str], prefix: str) -> bool:
    net = ipaddress.ip_network(prefix)
    return bool(addresses) and all(ipaddress.ip_address(a) in net for a in addresses)


def proxy_lines(snet: SocksNet) -> list[str]:
    assert snet.vtl is not None
    return [ln for ln in snet.vtl.lines if f"SOCKS proxy {snet.dante.where}" in ln]


# ---------------------------------------------------------------- data intact

DOWNLOADS = {  # id: (host, curl flags)
    "ipv4-address": (SRV_IP, ["-4"]),
    "ipv6-address": (SRV_IP6, ["-6"]),
    "name-over-ipv4": (WEB_NAME, ["-4"]),
    "name-over-ipv6": (WEB_NAME, ["-6"]),
}


@pytest.mark.parametrize("target", list(DOWNLOADS))
@pytest.mark.parametrize("dns", list(DNS_MODES))
def test_100mb_download(snet: SocksNet, dns: str, target: str) -> None:
    snet.start(snet.socks(dns=DNS_MODES[dns]))
    host, flags = DOWNLOADS[target]
    seed = 100 + list(DOWNLOADS).index(target)
    assert snet.curl_sha256(url(host, SIZE, seed), *flags, timeout=180) == expected(SIZE, seed)
    if host == WEB_NAME:
        fam = "6" if "-6" in flags else "4"
        got = snet.probe("resolve", WEB_NAME, fam)["addresses"]
        if dns == "fake-ip":  # the VM sees a fake address; the proxy resolved the name
            assert in_net(got, FAKE6_POOL if fam == "6" else FAKE_POOL), got
        else:  # resolved by the real DNS server, through the proxy
            assert got == [SRV_IP6 if fam == "6" else SRV_IP], got
        # either way the real DNS server was asked from the proxy's side (fake-ip: by
        # danted itself, for a CONNECT by name; tcp://: by VTL, through a SOCKS CONNECT)
        assert f"{WEB_NAME} from {SRV_HOST_IP}" in snet.dns_log(), snet.dns_log()[-2000:]


@pytest.mark.parametrize("dns", list(DNS_MODES))
def test_100_parallel_connections_and_uploads(snet: SocksNet, dns: str) -> None:
    snet.start(snet.socks(dns=DNS_MODES[dns]))
    # 100 at once by address, one process, all connects started together
    result = parallel_downloads(snet.as_peer(), count=100, size=MB, seed=2000, host=SRV_IP,
                                timeout=180)
    assert result.ok, result.failures()[:5]
    assert result.max_open >= 50, result.max_open  # they really overlapped
    # 100 at once by name (curl --parallel; every connection resolves and CONNECTs)
    script = ("cd \"$(mktemp -d)\" && curl -sS --fail --max-time 150 --parallel "
              "--parallel-max 100 --parallel-immediate -4 "
              + " ".join(f"-o {i} '{url(WEB_NAME, MB, 3000 + i)}'" for i in range(100))
              + " && sha256sum $(seq 0 99) && rm -r \"$PWD\"")
    out = snet.guest(["bash", "-c", script], timeout=200).stdout.split()
    got = dict(zip(out[1::2], out[0::2], strict=True))
    bad = [i for i in range(100) if got.get(str(i)) != expected(MB, 3000 + i)]
    assert not bad, f"{len(bad)} of 100 bodies wrong, e.g. #{bad[:5]}"
    # uploads: by address over IPv4 and IPv6, and by name
    assert upload(snet.as_peer(), SIZE, seed=51, host=SRV_IP, timeout=180) == expected(SIZE, 51)
    assert upload(snet.as_peer(), 20 * MB, seed=52, host=SRV_IP6) == expected(20 * MB, 52)
    got_sha = snet.curl_upload(f"http://{WEB_NAME}:{HTTP_PORT}/upload", 20 * MB, 53, "-4")
    assert got_sha == expected(20 * MB, 53)


# ---------------------------------------------------------------- nothing leaks

def leak_attempts() -> list[tuple[list[Any], str]]:
    """(probe, what must come back) for every kind of traffic the VM tries."""
    t = 5  # each probe's own timeout; every answer must come in under FAST
    return [
        (["tcp", SRV_IP, HTTP_PORT, t, "get"], "data"),
        (["tcp", SRV_IP6, HTTP_PORT, t, "get"], "data"),
        (["tcp", WEB_NAME, HTTP_PORT, t, "get"], "data"),  # resolved by VTL, then via proxy
        (["tcp", SRV_IP, 9, t], "refused"),  # closed port behind the proxy
        (["tcp", PEER_IP, HTTP_PORT, t], "refused"),  # on-link, but the proxy won't
        (["tcp", "203.0.113.5", 443, t], "refused"),
        (["tcp", "2001:db8::5", 443, t], "refused"),
        (["tcp", PEER_IP6, 22, t], "refused"),
        (["dns", GW_IP, WEB_NAME, "A", "udp", t], "dns"),
        (["dns", "8.8.8.8", WEB_NAME, "AAAA", "udp", t], "dns"),
        (["dns", "2001:4860:4860::8888", WEB_NAME, "A", "udp", t], "dns"),
        (["dns", "1.1.1.1", WEB_NAME, "A", "tcp", t], "dns"),
        (["dns", PEER_IP, WEB_NAME, "A", "udp", t], "dns"),
        (["dns", GW_IP, NX_NAME, "MX", "udp", t], "dns"),
        (["udp", SRV_IP, 5000, t], "icmp"),
        (["udp", PEER_IP, 5000, t], "icmp"),
        (["udp", "198.51.100.7", 123, t], "icmp"),
        (["udp", SRV_IP6, 5000, t], "icmp"),
        (["udp", "2001:db8::7", 443, t], "icmp"),
        (["ping", SRV_IP, t], "icmp"),
        (["ping", PEER_IP, t], "icmp"),
        (["ping", "203.0.113.5", t], "icmp"),
        (["ping", SRV_IP6, t], "icmp"),
        (["ping", PEER_IP6, t], "icmp"),
        (["raw", SRV_IP, 253, t], "icmp"),
        (["raw", PEER_IP, 254, t], "icmp"),
    ]


def check_attempt(r: dict[str, Any], want: str) -> str | None:
    """What is wrong with one probe result, or None."""
    outcome = r["outcome"]
    if want == "data":
        ok = outcome == "data" and r["sha256"] == expected(1000, 3)
    elif want == "dns":
        ok = outcome == "dns" and r["id_matches"]
    elif want == "icmp":
        ok = outcome.startswith("icmp:")
    else:
        ok = outcome == want
    if not ok:
        return f"{r['attempt']}: wanted {want}, got {r}"
    if r["seconds"] >= FAST:
        return f"{r['attempt']}: answered only after {r['seconds']} s"
    return None


def frames(pcap: Path) -> list[Any]:
    from scapy.all import rdpcap  # all: so that the Ethernet layer is known
    return list(rdpcap(str(pcap))) if pcap.stat().st_size > 24 else []


@pytest.mark.parametrize("dns", list(DNS_MODES))
def test_nothing_leaks_and_every_attempt_gets_an_answer(snet: SocksNet, dns: str) -> None:
    """The uplink must be silent toward the network: the peer's interface receives
    no frame at all from the bridge (not only none from the VM's MAC or addresses:
    VTL itself has nothing to say there either), except one marker frame that the
    test sends itself at the end to prove the capture works. Conversely the guest
    receives nothing from the peer, which pings it and solicits its neighbours."""
    to_peer = snet.tmp / "uplink-to-peer.pcap"
    cap_peer = snet.capture(snet.peer_ns, "eth0", to_peer)  # before the VM is even up
    vtl = snet.start(snet.socks(dns=DNS_MODES[dns]), stats_interval_s=1)
    to_guest = snet.tmp / "tap-to-guest.pcap"
    cap_guest = snet.capture(snet.guest_ns, snet.tap, to_guest)

    attempts = leak_attempts()
    results = snet.probe("many", json.dumps([a for a, _ in attempts]), timeout=240)
    problems = [p for r, (_, want) in zip(results, attempts, strict=True)
                if (p := check_attempt(r, want))]
    neigh = [GW_IP, PEER_IP, "10.198.0.77", GW_IP6, PEER_IP6, "fd00:198::77"]
    quiet = ["dad:fd00:198::77", f"garp:{GUEST_IP}"]
    for r in snet.probe("neigh", snet.tap, 2, *neigh, *quiet, timeout=120):
        if r["target"] in quiet:
            if r["answer"] is not None:
                problems.append(f"{r['target']} was answered by {r['answer']}")
        elif r["answer"] != GATEWAY_MAC or r["seconds"] >= FAST:
            problems.append(f"who-has {r['target']}: {r}")
    # what the guest's own kernel learnt: every neighbour is the one fake gateway
    for line in snet.guest(["ip", "neigh", "show", "dev", snet.tap]).stdout.splitlines():
        if "FAILED" in line or "INCOMPLETE" in line or \
                ("lladdr" in line and f"lladdr {GATEWAY_MAC}" not in line):
            problems.append(f"guest neighbour table: {line}")
    # the network side tries to reach the VM
    snet.peer(["ping", "-c", "2", "-i", "0.2", "-W", "1", GUEST_IP], check=False)
    snet.peer(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", GUEST_IP6], check=False)
    snet.peer(["ping", "-b", "-c", "1", "-W", "1", "10.198.0.255"], check=False)

    marker = send_marker(snet.uplink)
    snet.stop_capture(cap_guest)
    snet.stop_capture(cap_peer)
    vtl.stop()

    leaked = [f for f in frames(to_peer) if bytes(f) != marker]
    seen_marker = len(frames(to_peer)) - len(leaked)
    peer_mac = snet.peer(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    from_uplink = [f for f in frames(to_guest) if f.src == peer_mac]
    assert seen_marker == 1, "the uplink capture did not see the marker: it proves nothing"
    assert not leaked, f"{len(leaked)} frames reached the network, e.g. " + \
        "; ".join(f.summary() for f in leaked[:5])
    assert not from_uplink, "frames from the network reached the VM: " + \
        "; ".join(f.summary() for f in from_uplink[:5])
    assert not problems, "\n".join(problems)
    c = socks_counters(vtl)
    assert c["from_uplink_dropped"] >= 3, c
    assert all(f.src != GUEST_MAC for f in frames(to_peer))


# ---------------------------------------------------------------- the proxy fails

def tcp(snet: SocksNet, host: str, port: int = HTTP_PORT, get: bool = False) -> dict[str, Any]:
    return snet.probe("tcp", host, port, 5, *(["get"] if get else []))


@pytest.mark.parametrize("dns", list(DNS_MODES))
def test_proxy_down_refuses_at_once_and_recovers_without_restarting_vtl(
        snet: SocksNet, dns: str) -> None:
    vtl = snet.start(snet.socks(dns=DNS_MODES[dns]))
    assert tcp(snet, WEB_NAME, get=True)["outcome"] == "data"
    snet.dante.stop()
    for host in (SRV_IP, SRV_IP6, *([WEB_NAME] if dns == "fake-ip" else [])):
        r = tcp(snet, host)
        assert r["outcome"] == "refused" and r["seconds"] < FAST, (host, r)
    lines = proxy_lines(snet)
    assert any(re.search(r"refused|down|not running|unreachable", ln, re.I) for ln in lines), \
        "no log line says the proxy is down:\n" + vtl.stderr[-3000:]
    # curl by name fails fast too: fake-ip answers the name and the connection is
    # refused (exit 7); tcp:// cannot reach its resolver and says so (exit 6)
    if dns == "tcp":
        r = snet.probe("dns", GW_IP, "new.vtl.test", "A", "udp", 5)
        assert r["outcome"] == "dns" and r["rcode"] == "SERVFAIL" and r["seconds"] < FAST, r
    t = time.monotonic()
    proc = snet.guest(["curl", "-sS", "--max-time", "10", url(WEB_NAME, 1000, 1)], check=False)
    assert proc.returncode == (7 if dns == "fake-ip" else 6), (proc.returncode, proc.stderr)
    assert time.monotonic() - t < 2 * FAST
    snet.dante.start()
    assert vtl.proc.poll() is None
    size = 10 * MB
    assert snet.curl_sha256(url(WEB_NAME, size, 61)) == expected(size, 61)
    assert snet.curl_sha256(url(SRV_IP6, size, 62)) == expected(size, 62)


def test_wrong_credentials_are_refused_with_a_log_line_naming_authentication(
        snet: SocksNet) -> None:
    vtl = snet.start(snet.socks(proxy=snet.dante.url(SOCKS_USER, "not-the-password")))
    for host in (SRV_IP, WEB_NAME):
        r = tcp(snet, host)
        assert r["outcome"] == "refused" and r["seconds"] < FAST, (host, r)
    assert "password authentication failed" in snet.dante.log()
    lines = proxy_lines(snet)
    assert any(re.search(r"auth", ln, re.I) for ln in lines), \
        "no log line names the authentication failure:\n" + vtl.stderr[-3000:]


def test_right_credentials_carry_data(snet: SocksNet) -> None:
    snet.start(snet.socks(proxy=snet.dante.url(SOCKS_USER, SOCKS_PASSWORD)))
    size = 20 * MB
    assert snet.curl_sha256(url(WEB_NAME, size, 71)) == expected(size, 71)
    assert snet.curl_sha256(url(SRV_IP6, size, 72), "-6") == expected(size, 72)
    assert f"username%{SOCKS_USER}@" in snet.dante.log()


# ---------------------------------------------------------------- what a user expects too

@pytest.mark.parametrize("dns", list(DNS_MODES))
def test_dns_answers(snet: SocksNet, dns: str) -> None:
    snet.start(snet.socks(dns=DNS_MODES[dns]))

    def q(name: str, rdtype: str, server: str = GW_IP, proto: str = "udp") -> dict[str, Any]:
        r = snet.probe("dns", server, name, rdtype, proto, 5)
        assert r["outcome"] == "dns" and r["id_matches"] and r["seconds"] < FAST, r
        return r

    a, aaaa = q(WEB_NAME, "A"), q(WEB_NAME, "AAAA", server=GW_IP6)
    assert a["rcode"] == aaaa["rcode"] == "NOERROR"
    if dns == "fake-ip":
        assert in_net(a["answers"], FAKE_POOL) and in_net(aaaa["answers"], FAKE6_POOL)
        # the same name keeps its address, over UDP and TCP, whichever server was asked
        assert q(WEB_NAME, "A", server="9.9.9.9", proto="tcp")["answers"] == a["answers"]
        other = q("other.vtl.test", "A")
        assert in_net(other["answers"], FAKE_POOL) and other["answers"] != a["answers"]
    else:
        assert a["answers"] == [SRV_IP] and aaaa["answers"] == [SRV_IP6]
        assert q(NX_NAME, "A")["rcode"] == "NXDOMAIN"
        assert q(WEB_NAME, "A", server="9.9.9.9", proto="tcp")["answers"] == [SRV_IP]
    # a type the mode cannot serve still gets a well-formed answer
    assert q(WEB_NAME, "MX")["rcode"] in ("NOERROR", "NOTIMP", "NXDOMAIN", "REFUSED")


def test_guest_duplicate_address_detection_still_succeeds(snet: SocksNet) -> None:
    """VTL answers every neighbour solicitation except DAD probes: a VM adding an
    address must not see it as a duplicate."""
    snet.start()
    snet.guest(["ip", "-6", "addr", "add", "fd00:198::55/64", "dev", snet.tap])

    def address_line() -> str:
        out = snet.guest(["ip", "-6", "addr", "show", "dev", snet.tap]).stdout
        return next(ln for ln in out.splitlines() if "fd00:198::55/64" in ln)

    def settled() -> bool:  # DAD done: no longer tentative (a failed DAD stays tentative)
        line = address_line()
        return "tentative" not in line or "dadfailed" in line

    wait_for(settled, 10)  # DAD takes about one second (one probe, RetransTimer)
    line = address_line()
    assert "dadfailed" not in line and "tentative" not in line, line
    r = tcp(snet, SRV_IP6, get=True)  # and the guest still works over IPv6
    assert r["outcome"] == "data", r


def test_counters_in_the_stats_snapshot(snet: SocksNet) -> None:
    vtl = snet.start(snet.socks(), stats_interval_s=1)
    size = 10 * MB
    assert snet.curl_sha256(url(WEB_NAME, size, 81), "-4") == expected(size, 81)
    assert upload(snet.as_peer(), 5 * MB, seed=82, host=SRV_IP) == expected(5 * MB, 82)
    attempts = [["tcp", "203.0.113.9", 80, 5], ["udp", SRV_IP, 5000, 5], ["ping", SRV_IP, 5],
                ["ping", SRV_IP6, 5], ["raw", SRV_IP, 253, 5], ["dns", GW_IP, NX_NAME, "A",
                                                                "udp", 5]]
    snet.probe("many", json.dumps(attempts))
    snet.probe("neigh", snet.tap, 2, "10.198.0.66", "fd00:198::66")
    vtl.stop()
    c = socks_counters(vtl)
    assert c["connections_opened"] >= 2, c  # download, upload (+ the name lookups' none)
    assert c["connections_refused"] >= 1, c
    assert c["bytes_down"] >= size and c["bytes_up"] >= 5 * MB, c
    assert c["dns_fake_ip_noerror"] >= 2, c  # curl's A, the NX name (fake-ip answers all)
    for key in ("rejected_udp", "rejected_icmp", "rejected_icmp6", "rejected_other",
                "arp_answered", "nd_answered"):
        assert c[key] >= 1, (key, c)
    assert c.get("connections_failed", 0) == 0, c
