"""The bridge forwards a real kernel stack's traffic (empty chain)."""

from __future__ import annotations

import pytest
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP, PEER_IP6

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("uplink_kind", ["packet", "pcap"])
def test_arp_and_ping_through_empty_chain(net, uplink_kind):
    vtl = net.start(uplink_kind=uplink_kind)
    out = net.guest(["ping", "-c", "5", "-i", "0.1", "-W", "2", PEER_IP], timeout=20).stdout
    assert len(parse_ping_rtts(out)) == 5
    neigh = net.guest(["ip", "neigh", "show", PEER_IP]).stdout
    assert "lladdr" in neigh  # ARP resolved through the bridge
    out6 = net.guest(["ping", "-6", "-c", "3", "-i", "0.1", "-W", "2", PEER_IP6], timeout=20)
    assert len(parse_ping_rtts(out6.stdout)) == 3
    assert vtl.stop() == 0
    assert "Traceback" not in vtl.stderr
