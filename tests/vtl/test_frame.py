"""vtl.frame: frames from the wire, their virtio-net header read only when asked."""

from __future__ import annotations

from vtl.frame import NO_OFFLOAD, Frame, VnetHeader

GSO = VnetHeader(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                 csum_offset=16)
BODY = bytes(range(256)) * 4


def test_a_header_nobody_reads_goes_out_as_it_came() -> None:
    raw = bytearray(GSO.pack() + BODY)
    frame = Frame.from_wire(raw, True)
    assert frame.data == BODY and frame._vraw == GSO.pack()
    assert frame.vnet_bytes() == GSO.pack()
    assert frame.to_wire(True) == GSO.pack() + BODY
    assert frame._vraw is not None, "writing it out did not unpack it"


def test_reading_the_header_unpacks_it_and_edits_go_out() -> None:
    frame = Frame.from_wire(GSO.pack() + BODY, True)  # bytes: copied, not taken over
    assert frame.vnet == GSO
    frame.vnet.gso_size = 1400  # type: ignore[union-attr]
    assert VnetHeader.unpack(frame.vnet_bytes() or b"").gso_size == 1400
    frame.vnet = None
    assert frame.vnet_bytes() is None and frame.to_wire(True) == NO_OFFLOAD + BODY


def test_no_offload_and_no_header() -> None:
    plain = Frame.from_wire(bytearray(NO_OFFLOAD + BODY), True)
    assert plain.vnet is None and plain.vnet_bytes() is None
    bare = Frame.from_wire(BODY, False)
    assert bare.vnet is None and bare.to_wire(False) == BODY


def test_a_copy_keeps_the_header_and_is_independent() -> None:
    frame = Frame.from_wire(bytearray(GSO.pack() + BODY), True)
    twin = frame.copy()
    assert twin.vnet_bytes() == GSO.pack() and twin.data == frame.data
    twin.vnet.flags = 0  # type: ignore[union-attr]
    twin.data[0] ^= 0xFF
    assert frame.vnet == GSO and frame.data == BODY
