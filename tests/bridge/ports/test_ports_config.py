"""Port configs: the discriminated union, validation and make_port (no root needed)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from vtl.bridge.ports import (
    PacketPort,
    PacketPortConfig,
    PcapPort,
    PcapPortConfig,
    PortConfig,
    PortCounters,
    TapPort,
    TapPortConfig,
    make_port,
)

ADAPTER = TypeAdapter(PortConfig)


def test_union_picks_kind():
    assert isinstance(ADAPTER.validate_python({"kind": "tap", "ifname": "vtl0"}), TapPortConfig)
    assert isinstance(ADAPTER.validate_python({"kind": "pcap", "ifname": "eth1"}), PcapPortConfig)
    pk = ADAPTER.validate_python({"kind": "packet", "ifname": "eth1"})
    assert isinstance(pk, PacketPortConfig)
    assert pk.vnet_hdr and pk.promisc


def test_defaults():
    tap = TapPortConfig(kind="tap", ifname="vtl0")
    got = (tap.netns, tap.persist, tap.vnet_hdr, tap.mtu, tap.mac)
    assert got == (None, False, True, 1500, None)
    pcap = PcapPortConfig(kind="pcap", ifname="eth1")
    assert pcap.timeout_ms == 1 and pcap.snaplen >= 65536 + 24 and pcap.promisc


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"kind": "tap", "ifname": "x" * 16}, "at most 15"),
        ({"kind": "tap", "ifname": "a/b"}, "not valid"),
        ({"kind": "tap", "ifname": ""}, "empty"),
        ({"kind": "tap", "ifname": "vtl0", "mac": "not-a-mac"}, "pattern"),
        ({"kind": "tap", "ifname": "vtl0", "colour": "red"}, "Extra inputs"),
        ({"kind": "packet", "ifname": "eth1", "rcvbuf": -1}, "greater than or equal"),
        ({"kind": "pcap", "ifname": "eth1", "timeout_ms": 0}, "greater than or equal"),
        ({"kind": "vde", "ifname": "eth1"}, "tag"),
    ],
)
def test_invalid(data, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ADAPTER.validate_python(data)


def test_frozen_and_documented():
    cfg = TapPortConfig(kind="tap", ifname="vtl0")
    with pytest.raises(ValidationError):
        cfg.mtu = 9000  # type: ignore[misc]
    model: type[BaseModel]
    for model in (TapPortConfig, PcapPortConfig, PacketPortConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_make_port_builds_closed_ports():
    tap = make_port("guest", TapPortConfig(kind="tap", ifname="vtl0", mac="52:54:00:00:00:01"))
    assert isinstance(tap, TapPort) and tap.role == "guest" and tap.vnet and tap.mac is None
    assert tap.guest_mac == bytes.fromhex("525400000001") and not tap.is_open
    assert isinstance(make_port("uplink", PcapPortConfig(kind="pcap", ifname="e")), PcapPort)
    pk = make_port("uplink", PacketPortConfig(kind="packet", ifname="e", vnet_hdr=False))
    assert isinstance(pk, PacketPort) and pk.vnet is False
    assert pk.recv_batch() == [] and pk.send(b"x" * 60) is False
    assert pk.counters == PortCounters(tx_dropped=1)
    with pytest.raises(ValueError):
        pk.fileno()
    with pytest.raises(ValueError, match="role"):
        make_port("middle", PcapPortConfig(kind="pcap", ifname="e"))
