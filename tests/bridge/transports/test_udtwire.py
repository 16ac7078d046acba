"""The VTL-over-UDT framing codec: round trips, any split, strict errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vtl.bridge.transports import udtwire as w

from vtl.errors import LocalProtocolError, RemoteProtocolError
from vtl.flow import FlowKey
from vtl.stream import StreamFlow

V4 = st.ip_addresses(v=4).map(lambda a: a.packed)
V6 = st.ip_addresses(v=6).map(lambda a: a.packed)
PORT = st.integers(0, 65535)
MAC = st.just(b"") | st.binary(min_size=6, max_size=6)
SID = st.integers(1, 2**32 - 1)
WIN = st.integers(1, w.MAX_WINDOW)


@st.composite
def flows(draw) -> StreamFlow:
    version, fam = draw(st.sampled_from([(4, V4), (6, V6)]))
    key = FlowKey(version, 6, draw(fam), draw(PORT), draw(fam), draw(PORT))
    return StreamFlow(key, draw(MAC), draw(MAC))


@st.composite
def messages(draw) -> tuple[bytes, w.Message]:
    sid = draw(SID)
    kind = draw(st.sampled_from(list(w.Type)))
    if kind is w.Type.OPEN:
        flow, win = draw(flows()), draw(WIN)
        return w.encode_open(sid, flow, win), w.Message(kind, sid, flow=flow, window=win)
    if kind in (w.Type.OPEN_OK, w.Type.WINDOW):
        win = draw(WIN)
        enc = w.encode_open_ok if kind is w.Type.OPEN_OK else w.encode_window
        return enc(sid, win), w.Message(kind, sid, window=win)
    if kind is w.Type.REFUSE:
        reason, text = draw(st.sampled_from(w.REASONS)), draw(st.text(max_size=60))
        return w.encode_refuse(sid, reason, text), w.Message(kind, sid, reason=reason, text=text)
    if kind is w.Type.DATA:
        data = draw(st.binary(min_size=1, max_size=300))
        return w.encode_data(sid, data), w.Message(kind, sid, data=data)
    enc = w.encode_fin if kind is w.Type.FIN else w.encode_rst
    return enc(sid), w.Message(kind, sid)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=12), st.data())
def test_any_split_parses_identically(items, data):
    stream = b"".join(b for b, _ in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec, got, prev = w.Decoder(), [], 0
    for cut in [*cuts, len(stream)]:
        got += dec.feed(stream[prev:cut])
        prev = cut
    assert got == [m for _, m in items]
    assert dec.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_our_error(blob):
    dec = w.Decoder()
    try:
        dec.feed(blob)
    except RemoteProtocolError as exc:
        assert isinstance(exc, w.UdtWireError)
        with pytest.raises(w.UdtWireError):
            dec.feed(b"")  # a dead decoder stays dead


@settings(max_examples=300, deadline=None)
@given(messages(), st.integers(0, 200), st.integers(0, 255))
def test_mutated_messages_raise_only_our_error(item, pos, value):
    raw = bytearray(item[0])
    raw[pos % len(raw)] = value
    try:
        w.Decoder().feed(bytes(raw))
    except w.UdtWireError:
        pass


@pytest.mark.parametrize("raw, what", [
    (bytes([2, 4, 0, 0, 0, 1, 0, 0, 0, 1]) + b"x", "version"),
    (bytes([1, 99, 0, 0, 0, 1, 0, 0, 0, 0]), "type"),
    (bytes([1, 4, 0, 0, 0, 0, 0, 0, 0, 1]) + b"x", "stream id 0"),
    (bytes([1, 4, 0, 0, 0, 1, 0, 0, 0, 0]), "empty DATA"),
    (bytes([1, 5, 0, 0, 0, 1, 0, 0, 0, 1]) + b"x", "payload"),
    (bytes([1, 4, 0, 0, 0, 1, 0, 0x10, 0, 0]), "max"),
    (bytes([1, 7, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0]), "window 0"),
    (bytes([1, 3, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0xFF]), "UTF-8"),
    (bytes([1, 3, 0, 0, 0, 1, 0, 0, 0, 1, 9]), "reason"),
    (bytes([1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 5]), "family"),
])
def test_strict_errors(raw, what):
    with pytest.raises(w.UdtWireError, match=what):
        w.Decoder().feed(raw)


def test_open_with_macs_and_v6_round_trip():
    flow = StreamFlow(FlowKey.tcp("fd00::1", 40000, "fd00::2", 443), b"\x02" * 6, b"\x04" * 6)
    (m,) = w.Decoder().feed(w.encode_open(7, flow, 1 << 20))
    assert m.flow == flow and m.window == 1 << 20 and m.sid == 7
    assert w.check_flow(flow) is flow
    v4 = StreamFlow(FlowKey.tcp("10.0.0.1", 1, "10.0.0.2", 2))  # no MACs: none on the wire
    (m,) = w.Decoder().feed(w.encode_open(1, v4, 1))
    assert m.flow == v4


_V4 = FlowKey.tcp("10.0.0.1", 1, "10.0.0.2", 2)


@pytest.mark.parametrize("bad", [
    {"src": "10.0.0.1", "sport": 1, "dst": "10.0.0.2", "dport": 2},  # the old dict
    _V4,  # a key, not a StreamFlow
    StreamFlow(FlowKey(4, 6, _V4.src, 1, bytes(16), 2)),  # mixed address lengths
    StreamFlow(FlowKey(6, 6, _V4.src, 1, _V4.dst, 2)),  # IPv6 with 4-byte addresses
    StreamFlow(_V4._replace(proto=17)),  # UDP: udt carries TCP only
    StreamFlow(_V4._replace(sport=70000)),
    StreamFlow(_V4, client_mac=b"12345"),
    StreamFlow(_V4, server_mac=b"1234567"),
])
def test_flow_validation(bad):
    with pytest.raises(LocalProtocolError):
        w.check_flow(bad)
