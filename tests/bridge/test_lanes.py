"""bridge.lanes: the chainless path for each pairing of port kinds, and the offload
negotiation (fake ports: no I/O)."""

from __future__ import annotations

import logging
import threading

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from vtl.bridge.lanes import Lane, forward_plain, negotiate_offloads
from vtl.bridge.ports.base import OFF_ALL, OFF_CSUM

from vtl import Direction
from vtl.frame import NO_OFFLOAD, VnetHeader

FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(dst="10.0.0.2")
              / TCP(flags="PA") / Raw(b"x" * 100))
GSO = VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                 csum_offset=16).pack()


class Fake:
    def __init__(self, vnet: bool, role: str = "uplink", carries: int = OFF_ALL,
                 mtu: int = 1500, vnet_tx: bool | None = None):
        self.vnet, self.role, self.ifname, self.mtu = vnet, role, f"{role}0", mtu
        self.vnet_tx = vnet if vnet_tx is None else vnet_tx
        self._carries = carries
        self.sent: list[bytes] = []
        self.offered: int | None = None

    def send(self, raw: bytes | bytearray | memoryview) -> bool:
        self.sent.append(bytes(raw))
        return True

    def send_parts(self, head: bytes, body: bytes | bytearray) -> bool:
        self.sent.append(bytes(head) + bytes(body))
        return True

    def carries(self) -> int:
        return self._carries if self.vnet_tx else 0

    def offer(self, offloads: int) -> None:
        self.offered = offloads


def lane(src: Fake, dst: Fake, empty: bool = True) -> Lane:
    return Lane(src, dst, Direction.TO_UPLINK, empty)  # type: ignore[arg-type]


def test_the_mode_follows_the_ports_and_the_chain() -> None:
    assert lane(Fake(True), Fake(True)).mode == "same"
    assert lane(Fake(False), Fake(False)).mode == "same"
    assert lane(Fake(True), Fake(False)).mode == "strip"
    assert lane(Fake(False), Fake(True)).mode == "add"
    pcap = Fake(False, vnet_tx=True)  # reads without headers, writes with them
    assert lane(Fake(True), pcap).mode == "same" and lane(pcap, Fake(True)).mode == "add"
    one = lane(Fake(True), Fake(True), empty=False)
    assert one.mode is None
    one.chain_is(True)
    assert one.mode == "same"


def test_strip_writes_plain_frames_and_leaves_offloaded_ones_to_the_chain() -> None:
    src, dst = Fake(True), Fake(False)
    plain, gso = bytearray(NO_OFFLOAD + FRAME), bytearray(GSO + FRAME)
    rest = forward_plain(lane(src, dst), [plain, gso], threading.Lock())
    assert dst.sent == [FRAME] and rest == [gso]


def test_add_asks_the_kernel_to_finish_checksums_and_leaves_big_frames() -> None:
    src, dst = Fake(False), Fake(True, mtu=1500)
    broken = bytearray(FRAME)
    broken[50:52] = b"\xde\xad"  # the TCP checksum, unfinished
    big = bytes(Ether() / IP() / TCP() / Raw(b"y" * 3000))
    rest = forward_plain(lane(src, dst), [bytes(broken), big], threading.Lock())
    [out] = dst.sent
    head = VnetHeader.unpack(out[:10])
    assert head.needs_csum and (head.csum_start, head.csum_offset) == (34, 16)
    assert out[10:60] == FRAME[:50] and out[62:] == FRAME[52:], "only the checksum changes"
    assert [bytes(r) for r in rest] == [big]


def test_same_writes_everything_as_read() -> None:
    src, dst = Fake(True), Fake(True)
    frames = [bytearray(GSO + FRAME), bytearray(NO_OFFLOAD + FRAME)]
    assert forward_plain(lane(src, dst), list(frames), threading.Lock()) == []
    assert dst.sent == [bytes(f) for f in frames]


def test_a_tap_offers_what_the_other_port_carries() -> None:
    log = logging.getLogger("test")
    for uplink, want in ((Fake(True), OFF_ALL), (Fake(False), 0),
                         (Fake(True, carries=OFF_CSUM), OFF_CSUM)):
        guest = Fake(True, role="guest")
        negotiate_offloads(guest, uplink, log)  # type: ignore[arg-type]
        assert guest.offered == want
    plain_guest = Fake(False, role="guest")
    negotiate_offloads(plain_guest, Fake(True), log)  # type: ignore[arg-type]
    assert plain_guest.offered is None, "a TAP without virtio-net headers offers nothing"
