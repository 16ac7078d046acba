"""What a capture on the uplink of the host running VTL sees of the frames VTL sends.

A real `vtl run` with a `packet` uplink; the guest pings the peer. A packet socket bound to
the uplink in the host namespace (what `tcpdump -i UPLINK` is) sees the guest's echo
requests leave with ``qdisc_bypass = false`` (the default); with the bypass it sees none of
them, although the peer answers every one.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import GUEST_IP, PEER_IP, VtlProcess, to_toml

pytestmark = pytest.mark.integration

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PINGS = 5


def outgoing_echo_requests(sock: socket.socket, seconds: float) -> int:
    """Echo requests from the guest that ``sock`` saw leave its interface."""
    src = socket.inet_aton(GUEST_IP)
    seen = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            frame, addr = sock.recvfrom(65536)
        except BlockingIOError:
            continue
        if addr[2] != PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 1:
            continue
        ihl = (frame[14] & 15) * 4
        if frame[26:30] == src and frame[14 + ihl] == 8:
            seen += 1
    return seen


@pytest.mark.parametrize("bypass, captured", [(True, 0), (False, PINGS)])
def test_tcpdump_on_the_uplink_sees_what_vtl_sends_only_without_bypass(net, bypass, captured):
    cfg = net.config()
    cfg["ports"]["uplink"]["qdisc_bypass"] = bypass
    path = net.tmp / "bridge.toml"
    path.write_text(to_toml(cfg))
    vtl = VtlProcess(path)
    net.bridges.append(vtl)
    vtl.wait_ready()
    net.topo.addr(net.guest_ns, net.tap, f"{GUEST_IP}/24")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sniffer:
        sniffer.setblocking(False)
        sniffer.bind((net.uplink, ETH_P_ALL))
        out = net.guest(["ping", "-c", str(PINGS), "-i", "0.2", "-W", "2", PEER_IP], timeout=30)
        assert len(parse_ping_rtts(out.stdout)) == PINGS, out.stdout  # the peer got them all
        assert outgoing_echo_requests(sniffer, 1.0) == captured
