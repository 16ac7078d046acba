"""pcap port on the host end of a veth whose peer lives in a test namespace."""

from __future__ import annotations

import pytest
from portsnet import FakePeer, mac_bytes, netns, parse_arp, serve, sh, suffix, veth_into
from vtl.bridge.ports import PcapPort, PcapPortConfig, make_port

from vtl.errors import SetupError

pytestmark = pytest.mark.integration

PEER_MAC = "02:00:00:aa:bb:03"


@pytest.fixture
def link():
    with netns() as ns, veth_into(ns, "10.252.0.1/24") as (host, peer):
        yield ns, host, peer


def test_frames_both_ways_inbound_capture_only(link):
    ns, host, _peer = link
    port = make_port("uplink", PcapPortConfig(kind="pcap", ifname=host))
    assert isinstance(port, PcapPort) and port.vnet is False
    try:
        port.open()
        assert port.mac == mac_bytes(sh(f"cat /sys/class/net/{host}/address").stdout.strip())
        assert port.mtu == 1500
        fake = FakePeer(PEER_MAC, "10.252.0.2")
        rc, seen = serve(port, fake, f"ip netns exec {ns} ping -c2 -i0.2 -W3 10.252.0.2")
        assert any(parse_arp(f) and parse_arp(f)[0] == 1 for f in seen), seen
        assert rc == 0, "the namespace did not get the ARP and echo replies we sent"
        # PCAP_D_IN: what we injected is never read back.
        assert not any(f[6:12] == fake.mac for f in seen)
        c = port.counters
        assert c.tx_frames == len(fake.sent) >= 3 and c.rx_frames == len(seen)
        assert port.send(b"") is False and c.tx_dropped == 1
    finally:
        port.close()
    port.close()
    assert port.recv_batch() == []


def test_missing_interface():
    name = "vtpt" + suffix() + "n"
    port = make_port("uplink", PcapPortConfig(kind="pcap", ifname=name))
    with pytest.raises(SetupError, match=f"interface '{name}' does not exist; check `ip link`"):
        port.open()
    assert not port.is_open
