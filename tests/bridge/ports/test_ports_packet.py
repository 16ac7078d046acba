"""AF_PACKET port on the host end of a veth whose peer lives in a test namespace."""

from __future__ import annotations

import pytest
from portsnet import (
    VNET_LEN,
    FakePeer,
    collect,
    mac_bytes,
    netns,
    parse_arp,
    serve,
    sh,
    suffix,
    veth_into,
)
from vtl.bridge.ports import PacketPort, PacketPortConfig, make_port

from vtl.errors import SetupError
from vtl.frame import VnetHeader

pytestmark = pytest.mark.integration

PEER_MAC = "02:00:00:aa:bb:02"


@pytest.fixture
def link():
    with netns() as ns, veth_into(ns, "10.251.0.1/24") as (host, peer):
        yield ns, host, peer


@pytest.mark.parametrize("vnet_hdr", [True, False])
def test_frames_both_ways(link, vnet_hdr):
    ns, host, _peer = link
    port = make_port("uplink", PacketPortConfig(kind="packet", ifname=host, vnet_hdr=vnet_hdr))
    assert isinstance(port, PacketPort) and port.vnet is vnet_hdr
    try:
        port.open()
        host_mac = sh(f"cat /sys/class/net/{host}/address").stdout.strip()
        assert port.mac == mac_bytes(host_mac)
        assert port.mtu == 1500
        assert "promiscuity 1 " in sh(f"ip -d link show dev {host}").stdout
        fake = FakePeer(PEER_MAC, "10.251.0.2")
        rc, seen = serve(port, fake, f"ip netns exec {ns} ping -c2 -i0.2 -W3 10.251.0.2")
        assert any(parse_arp(f) and parse_arp(f)[0] == 1 for f in seen), seen
        assert rc == 0, "the namespace did not get the ARP and echo replies we sent"
        # PACKET_IGNORE_OUTGOING: nothing we injected came back to us.
        assert not any(f[6:12] == fake.mac for f in seen)
        assert len(fake.sent) >= 3 and port.counters.tx_frames == len(fake.sent)
        assert port.counters.rx_frames == len(seen) and port.counters.tx_dropped == 0
    finally:
        port.close()
    port.close()
    assert "promiscuity 0 " in sh(f"ip -d link show dev {host}").stdout


def test_vnet_header_present_on_receive(link):
    ns, host, peer = link
    # One ARP probe, no retransmission: ping exits after 1 s, about when the kernel would
    # send its second probe, which then raced the "drained" check below (seen once in CI).
    sh(f"ip netns exec {ns} sysctl -qw net.ipv4.neigh.{peer}.mcast_solicit=1")
    with make_port("uplink", PacketPortConfig(kind="packet", ifname=host)) as port:
        sh(f"ip netns exec {ns} ping -c1 -W1 10.251.0.7", check=False)
        frames = port.recv_batch(64)
        arp = next(f for f in frames if parse_arp(f[VNET_LEN:]))
        assert VnetHeader.unpack(arp).is_plain
        assert port.recv_batch() == []  # drained, non-blocking
        assert port.send(b"\x00" * 3) is False  # malformed: dropped, not raised
        assert port.counters.tx_dropped == 1


def test_views_are_the_same_frames_read_into_the_ports_own_buffers(link):
    ns, host, _peer = link
    with make_port("uplink", PacketPortConfig(kind="packet", ifname=host)) as port:
        sh(f"ip netns exec {ns} arping -c3 -w2 -I eth0 10.251.0.7 || "
           f"ip netns exec {ns} ping -c3 -i0.2 -W1 10.251.0.7", check=False)
        frames = port.recv_batch(64, views=True)
        assert frames and all(isinstance(f, memoryview) for f in frames)
        assert all(f.obj is port._ring[k] for k, f in enumerate(frames))  # no copy made
        arp = next(bytes(f) for f in frames if parse_arp(bytes(f[VNET_LEN:])))
        assert VnetHeader.unpack(arp).is_plain
        assert port.counters.rx_frames == len(frames)
        # buffers are made as needed (one more for the read that found none), then reused
        assert len(frames) <= len(port._ring) <= len(frames) + 1 <= 65


def test_missing_interface():
    name = "vtpt" + suffix() + "n"
    port = make_port("uplink", PacketPortConfig(kind="packet", ifname=name))
    with pytest.raises(SetupError, match=f"interface '{name}' does not exist; check `ip link`"):
        port.open()
    assert not port.is_open
    port.close()


def test_interface_deleted_underneath(link):
    _ns, host, _peer = link
    port = make_port("uplink", PacketPortConfig(kind="packet", ifname=host))
    with port:
        sh(f"ip link del {host}")
        assert port.send(bytes(VNET_LEN + 60)) is False
        with pytest.raises(SetupError, match="went away"):
            collect(port, 2.0)
