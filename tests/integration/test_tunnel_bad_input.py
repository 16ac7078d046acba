"""Hostile datagrams at a tunnel endpoint: counted and dropped, never a crash, never the guest's.

From host-B's namespace (the fast path's far end) :mod:`vxlanjunk` sends a
bounded flood of datagrams that bridge A's ``tunnel`` must drop to its endpoint
10.63.0.1:4789: random bytes, wrong VNIs, no I flag, truncated headers, mutated
headers, inner sources outside the peer's prefixes and inner protocols that are
neither IP nor ARP from the known peer, and well-formed ones from an address
that is no peer (a UDP socket on a second address of host-B) or with a spoofed
source (a raw socket). A capture in VM-A sees none of it; bridge A keeps running
and keeps tunnelling VM-A's traffic. Both datapaths: with ``socket`` the service
checks every datagram; with ``kernel`` the bridge's nftables filter drops unknown
senders, missing I flags and other VNIs (its counters are in the bridge's
``datagrams`` section), the kernel drops truncated headers, and the service checks
the inner frames the kernel hands it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tcptools import download
from tcptools import expected_sha256 as expected
from tunnelnet import FAST_A, FAST_B, VM_B, TunnelNet, open_sites
from vtl.bridge.topology import parse_ping_rtts
from vxlanjunk import MARKER

pytestmark = pytest.mark.integration

JUNK = str(Path(__file__).parent / "vxlanjunk.py")
UNKNOWN, SPOOFED = "10.63.0.99", "10.63.0.77"
COUNT = 30_000


@pytest.fixture(params=["kernel", "socket"])
def sites(root: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TunnelNet]:
    with open_sites(tmp_path, wan_delay_ms=0) as net:
        net.chains(tunnel=True, datapath=request.param)
        yield net
        bad = net.stop_all()
        assert not bad, f"`vtl run` did not stop cleanly on SIGTERM: {bad}"


def test_a_flood_of_bad_datagrams_is_dropped_and_counted(sites: TunnelNet) -> None:
    assert len(parse_ping_rtts(sites.vm_a(["ping", "-c", "2", "-i", "0.1", VM_B]).stdout)) == 2
    before = dropped(sites)
    sites.run("hb", ["ip", "addr", "add", f"{UNKNOWN}/24", "dev", "fast"])
    # everything VM-A receives, but the neighbour discovery its gateway may do meanwhile
    cap = sites.capture("vma", "eth0", "junk-at-a", "not arp and not (icmp6 and "
                        "ip6[40] >= 133 and ip6[40] <= 136)", direction="in")
    out = sites.run("hb", [sys.executable, JUNK, FAST_A, str(COUNT), "1", FAST_B, UNKNOWN,
                           SPOOFED], timeout=120).stdout
    sent = json.loads(out.strip().splitlines()[-1])
    vtl = sites.bridges["a"]
    assert vtl.proc.poll() is None, vtl.stderr[-3000:]
    after = dropped(sites)
    cap.stop()
    reached = cap.lines(flags=("-e", "-X"))
    marked = [ln for ln in cap.lines(flags=("-A",)) if MARKER.decode() in ln]
    assert sent["errors"] == 0 and sum(sent["sent"].values()) == COUNT, sent
    assert not reached, reached[:20]
    assert not marked, marked[:5]
    kinds = ["unknown_peer", "bad_vni", "bad_flags", "spoofed", "other_dropped"]
    if after["datapath"] == "socket":
        kinds.append("malformed")  # the kernel drops truncated headers itself
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in kinds}
    assert all(v > 0 for v in grew.values()), grew
    p_before, p_after = before["peers"][0], after["peers"][0]
    assert p_after["decapsulated"] == p_before["decapsulated"], (p_before, p_after)
    # still tunnelling, unharmed
    assert len(parse_ping_rtts(sites.vm_a(["ping", "-c", "3", "-i", "0.1", VM_B]).stdout)) == 3
    assert download(sites, 5_000_000, seed=41, host=VM_B, timeout=60) == \
        expected(5_000_000, 41)
    assert "Traceback" not in vtl.stderr, vtl.stderr[-3000:]
    print("sent", sent, "counted", grew, "socket", after["socket"], "link", after["link"])


def dropped(sites: TunnelNet) -> dict[str, Any]:
    """Bridge A's tunnel counters, with its kernel link's filter counters (if any)."""
    snap = sites.counters("a")
    out: dict[str, Any] = dict(snap["services"]["tunnel"])
    for key, c in snap["datagrams"].items():
        if key.startswith("tunnel vtlvx"):
            for k in ("unknown_peer", "bad_vni", "bad_flags"):
                out[k] = out.get(k, 0) + c[k]
    return out
