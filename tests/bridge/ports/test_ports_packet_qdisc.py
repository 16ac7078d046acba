"""The ``qdisc_bypass`` option of the ``packet`` port: config, and what a capture sees.

With the bypass frames the port sends skip the qdisc and the taps of other packet
sockets, so a sniffer on the interface (what ``tcpdump`` is) sees none of them; with
``qdisc_bypass = false`` (the default) it sees every one. The far end receives them both ways.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from portsnet import mac_bytes, netns, sh, veth_into
from pydantic import TypeAdapter, ValidationError
from vtl.bridge.ports import PacketPortConfig, PortConfig, make_port

ADAPTER = TypeAdapter(PortConfig)
ETH_P_ALL = 0x0003
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: nothing else sends it
COUNT = 20


def test_qdisc_bypass_defaults_to_false():
    cfg = ADAPTER.validate_python({"kind": "packet", "ifname": "eth1"})
    assert isinstance(cfg, PacketPortConfig) and cfg.qdisc_bypass is False


def test_qdisc_bypass_false_is_accepted():
    cfg = ADAPTER.validate_python({"kind": "packet", "ifname": "eth1", "qdisc_bypass": False})
    assert cfg.qdisc_bypass is False


def test_qdisc_bypass_must_be_a_boolean():
    with pytest.raises(ValidationError, match="valid boolean"):
        ADAPTER.validate_python({"kind": "packet", "ifname": "eth1", "qdisc_bypass": "sometimes"})


def test_qdisc_bypass_is_documented():
    field = PacketPortConfig.model_fields["qdisc_bypass"]
    assert field.description and "tcpdump" in field.description


def _sniff(sock: socket.socket, marker: bytes, seconds: float) -> int:
    """Frames carrying ``marker`` that ``sock`` sees within ``seconds``."""
    seen = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            frame = sock.recv(65536)
        except BlockingIOError:
            continue
        if frame[12:14] == ETHERTYPE and marker in frame:
            seen += 1
    return seen


def _sniffer(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setblocking(False)
    sock.bind((ifname, ETH_P_ALL))
    return sock


def _rx_packets(ns: str, ifname: str) -> int:
    return int(sh(f"ip netns exec {ns} cat /sys/class/net/{ifname}/statistics/rx_packets").stdout)


@pytest.mark.integration
@pytest.mark.parametrize("bypass, captured", [(True, 0), (False, COUNT)])
def test_capture_on_the_interface_sees_sent_frames_only_without_bypass(bypass, captured):
    with netns() as ns, veth_into(ns, "10.252.9.2/24") as (host, peer):
        dst = mac_bytes(sh(f"ip netns exec {ns} cat /sys/class/net/{peer}/address").stdout.strip())
        src = mac_bytes(sh(f"cat /sys/class/net/{host}/address").stdout.strip())
        marker = f"vtl-qdisc-{bypass}-{time.monotonic_ns()}".encode()
        frame = b"\0" * 10 + dst + src + ETHERTYPE + marker.ljust(46, b".")
        cfg = PacketPortConfig(kind="packet", ifname=host, qdisc_bypass=bypass)
        with _sniffer(host) as tap, make_port("uplink", cfg) as port:
            assert port.qdisc_bypass is bypass
            before = _rx_packets(ns, peer)
            for _ in range(COUNT):
                assert port.send(frame) is True
            assert _sniff(tap, marker, 1.0) == captured
            assert _rx_packets(ns, peer) - before >= COUNT  # the far end gets them either way
            assert port.qdisc_fallbacks == 0
