"""TAP port against the kernel's own stack in a network namespace (needs root)."""

from __future__ import annotations

import os

import pytest
from portsnet import VNET_LEN, FakePeer, collect, link_exists, netns, parse_arp, serve, sh, suffix
from pydantic import ValidationError
from vtl.bridge.ports import TapPort, TapPortConfig, make_port
from vtl.bridge.ports.tap import cpu_mask

from vtl.errors import SetupError
from vtl.frame import VnetHeader

pytestmark = pytest.mark.integration

GUEST_MAC = "52:54:00:aa:bb:01"
PEER_MAC = "52:54:00:aa:bb:02"


@pytest.fixture
def ns():
    with netns() as name:
        yield name


def tap_cfg(**kw) -> TapPortConfig:
    kw.setdefault("ifname", "vtpt" + suffix() + "t")
    return TapPortConfig(kind="tap", **kw)


@pytest.mark.parametrize("vnet_hdr", [True, False])
def test_guest_arp_and_ping_through_tap(ns, vnet_hdr):
    cfg = tap_cfg(netns=ns, mac=GUEST_MAC, vnet_hdr=vnet_hdr)
    port = make_port("guest", cfg)
    assert isinstance(port, TapPort) and port.vnet is vnet_hdr and port.mac is None
    try:
        port.open()
        assert port.guest_mac == bytes.fromhex(GUEST_MAC.replace(":", ""))
        assert link_exists(cfg.ifname, ns) and not link_exists(cfg.ifname)
        assert "UP" in sh(f"ip -n {ns} link show dev {cfg.ifname}").stdout
        sh(f"ip -n {ns} addr add 10.250.0.1/24 dev {cfg.ifname}")
        peer = FakePeer(PEER_MAC, "10.250.0.2")
        rc, seen = serve(port, peer, f"ip netns exec {ns} ping -c1 -W3 10.250.0.2")
        arps = [parse_arp(f) for f in seen if parse_arp(f)]
        assert any(a[0] == 1 and a[4] == bytes([10, 250, 0, 2]) for a in arps), seen
        assert rc == 0, "the guest did not get our injected ARP reply and echo reply"
        c = port.counters
        assert c.rx_frames >= 2 and c.tx_frames == 2 and c.tx_dropped == 0
        assert c.tx_bytes == sum(len(f) for f in peer.sent)
    finally:
        port.close()
    port.close()  # idempotent
    assert not link_exists(cfg.ifname, ns), "close must remove a non-persistent TAP"


def test_vnet_header_first_and_bad_frames_dropped(ns):
    cfg = tap_cfg(netns=ns)
    with make_port("guest", cfg) as port:
        sh(f"ip -n {ns} addr add 10.250.0.1/24 dev {cfg.ifname}")
        sh(f"ip netns exec {ns} ping -c1 -W1 10.250.0.9", check=False)
        frames = collect(port, 2.0, until=lambda got: any(parse_arp(f[VNET_LEN:]) for f in got))
        arp = next(f for f in frames if parse_arp(f[VNET_LEN:]))
        assert VnetHeader.unpack(arp).is_plain
        assert port.send(b"\x01") is False  # shorter than the virtio-net header
        assert port.counters.tx_dropped == 1
        assert port.send_parts(b"\x01", bytearray()) is False  # gathered: the same
        assert port.counters.tx_dropped == 2


def test_host_namespace_tap_is_up_and_removed():
    cfg = tap_cfg(mtu=1400)
    port = make_port("guest", cfg)
    try:
        port.open()
        out = sh(f"ip link show dev {cfg.ifname}").stdout
        assert "mtu 1400" in out and ",UP" in out
        assert isinstance(port.recv_batch(), list)  # non-blocking whatever the host sends
    finally:
        port.close()
    assert not link_exists(cfg.ifname)


def test_missing_netns():
    missing = "vtpt" + suffix() + "x"
    port = make_port("guest", tap_cfg(netns=missing))
    with pytest.raises(SetupError) as ei:
        port.open()
    msg = str(ei.value)
    assert f"network namespace '{missing}' does not exist" in msg
    assert f"ip netns add {missing}" in msg
    assert not port.is_open


def test_name_too_long():
    with pytest.raises(ValidationError, match="at most 15"):
        TapPortConfig(kind="tap", ifname="vtpt-much-too-long")
    cfg = TapPortConfig.model_construct(
        kind="tap", ifname="vtpt-much-too-long", netns=None, persist=False, vnet_hdr=True,
        mtu=1500, mac=None,
    )
    with pytest.raises(SetupError, match="at most 15; choose a shorter name"):
        TapPort("guest", cfg).open()


def test_busy_name():
    cfg = tap_cfg()
    first = make_port("guest", cfg)
    first.open()
    try:
        with pytest.raises(SetupError, match="busy: another process already has it open"):
            make_port("guest", cfg).open()
    finally:
        first.close()
    assert not link_exists(cfg.ifname)


def test_name_taken_by_other_kind_of_device(ns):
    name = "vtpt" + suffix() + "v"
    sh(f"ip link add {name} type veth peer name {name}p netns {ns}")
    try:
        with pytest.raises(SetupError, match="already exists and is not a TAP"):
            make_port("guest", tap_cfg(ifname=name)).open()
    finally:
        sh(f"ip link del {name}", check=False)


def test_name_taken_inside_netns(ns):
    cfg = tap_cfg(netns=ns)
    with make_port("guest", cfg):
        with pytest.raises(SetupError, match=f"already exists in network namespace .{ns}."):
            make_port("guest", cfg).open()
        assert not link_exists(cfg.ifname), "the half-made second TAP must be gone"


def test_persist_keeps_device(ns):
    cfg = tap_cfg(netns=ns, persist=True)
    try:
        port = make_port("guest", cfg)
        port.open()
        port.close()
        out = sh(f"ip -n {ns} -d link show dev {cfg.ifname}").stdout
        assert "persist on" in out
    finally:
        sh(f"ip -n {ns} link del {cfg.ifname}", check=False)
    assert not link_exists(cfg.ifname, ns)


def test_persist_in_host_namespace_reattach():
    cfg = tap_cfg(persist=True)
    try:
        with make_port("guest", cfg):
            pass
        assert link_exists(cfg.ifname)
        with make_port("guest", cfg) as again:  # attaches to the persistent device
            assert again.is_open
    finally:
        sh(f"ip link del {cfg.ifname}", check=False)


def test_device_gone_with_its_namespace():
    with netns() as ns:
        port = make_port("guest", tap_cfg(netns=ns))
        port.open()
    try:
        with pytest.raises(SetupError, match="went away"):
            collect(port, 2.0)
        assert port.send(bytes(VNET_LEN + 60)) is False
    finally:
        port.close()


def test_rx_cpus_steer_the_guest_receive_processing(ns):
    """The frames the bridge writes are the namespace's receive: steered (RPS) to the CPUs
    of ``rx_cpus``, and still delivered (the guest answers a ping through them)."""
    last = (os.cpu_count() or 1) - 1
    cfg = tap_cfg(netns=ns, mac=GUEST_MAC, rx_cpus=[last])
    with make_port("guest", cfg) as port:
        rps = sh(f"ip netns exec {ns} cat /sys/class/net/{cfg.ifname}/queues/rx-0/rps_cpus")
        assert int(rps.stdout.strip().replace(",", ""), 16) == 1 << last
        sh(f"ip -n {ns} addr add 10.250.0.1/24 dev {cfg.ifname}")
        rc, _ = serve(port, FakePeer(PEER_MAC, "10.250.0.2"),
                      f"ip netns exec {ns} ping -c1 -W3 10.250.0.2")
        assert rc == 0, "the steered guest did not take our ARP reply and echo reply"


def test_without_rx_cpus_the_kernel_default_stays(ns):
    cfg = tap_cfg(netns=ns)
    with make_port("guest", cfg):
        rps = sh(f"ip netns exec {ns} cat /sys/class/net/{cfg.ifname}/queues/rx-0/rps_cpus")
        assert int(rps.stdout.strip().replace(",", ""), 16) == 0


def test_rx_cpus_that_do_not_exist_are_a_config_error():
    n = os.cpu_count() or 1
    with pytest.raises(ValidationError, match=f"CPU {n} does not exist"):
        tap_cfg(rx_cpus=[0, n])


def test_cpu_mask_text():
    assert cpu_mask((0,)) == "00000001"
    assert cpu_mask((0, 1)) == "00000003"
    assert cpu_mask((1, 33)) == "00000002,00000002"
