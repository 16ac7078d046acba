"""vtl.packet.tcp.clamp_mss: a SYN's MSS lowered in place, its checksum kept right."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from vtl.packet.packet import Packet, verify_checksums
from vtl.packet.tcp import clamp_mss


def frame(flags: str = "S", options: list | None = None) -> bytearray:
    opts = [("NOP", None), ("MSS", 1460), ("SAckOK", b"")] if options is None else options
    return bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2")
                           / TCP(flags=flags, options=opts)))


@pytest.mark.parametrize("options", [
    [("MSS", 1460), ("SAckOK", b"")],  # aligned, as stacks send it
    [("NOP", None), ("MSS", 1460), ("SAckOK", b"")],  # the value across two words
])
def test_a_larger_mss_is_lowered_and_the_checksum_follows(options: list) -> None:
    f = frame(options=options)
    assert clamp_mss(f, 34, 1400)
    assert dict(Ether(bytes(f))[TCP].options)["MSS"] == 1400
    assert verify_checksums(Packet(f))


def test_smaller_mss_no_option_or_no_syn_are_left_alone() -> None:
    for f, mss in ((frame(options=[("MSS", 536)]), 1400), (frame(options=[]), 1400),
                   (frame(flags="A"), 1000)):
        before = bytes(f)
        assert not clamp_mss(f, 34, mss)
        assert bytes(f) == before


def test_a_truncated_option_list_is_not_walked_past() -> None:
    f = frame(options=[("NOP", None), ("NOP", None), ("NOP", None), ("NOP", None)])
    f[-1] = 2  # an MSS kind in the last byte, without its length
    assert not clamp_mss(f, 34, 1000)
