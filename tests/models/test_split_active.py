"""SplitTable/Relay active opens (toward the VM on behalf of a remote client) and release()."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, Ether
from vtl.models.relay import Relay
from vtl.models.split import SplitTable
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint
from vtl.models.tcp_segment import FlowAddrs
from vtl.models.tcp_state import TcpState

from vtl import Direction, Frame
from vtl.packet.packet import Packet
from vtl.stream import StreamRequest
from vtl.testing import FakeContext, FakeStream

VM_MAC, CL_MAC = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
VM_IP, CL_IP = bytes([10, 0, 0, 1]), bytes([10, 9, 9, 9])
KEY = (VM_IP, 80, CL_IP, 40000)  # as the VM sends


def vm(flags: str, seq: int, ack: int, data: bytes = b"") -> Packet:
    return Packet(Frame(bytes(Ether(src=VM_MAC, dst=CL_MAC) / IP(src="10.0.0.1", dst="10.9.9.9")
                              / TCP(sport=80, dport=40000, flags=flags, seq=seq, ack=ack,
                                    window=65535) / data)))


def only_to_guest(frame: Frame, direction: Direction) -> None:
    assert direction is Direction.TO_GUEST


def setup(deadline: float | None = 3.0):
    ctx = FakeContext("t")
    ctx.on_emit = only_to_guest
    table = SplitTable(ctx, EndpointConfig(), max_connections=4)  # type: ignore[arg-type]
    ep = TcpEndpoint.active(FlowAddrs(CL_MAC, VM_MAC, CL_IP, VM_IP, 40000, 80),
                            EndpointConfig(), 0.0)
    calls: dict = {"accept": [], "refuse": []}

    def accept(handler):
        s = FakeStream(ctx, 1, StreamRequest("x", "h", 1), handler)
        calls["accept"].append(s)
        return s

    relay = table.open_active(KEY, ep, 0.0, accept,
                              lambda o, m: calls["refuse"].append((o, m)), deadline=deadline)
    return ctx, table, relay, calls


def toward_guest(ctx: FakeContext) -> list[Frame]:
    return [f for f, _ in ctx.emitted]


def syn_of(ctx: FakeContext) -> Ether:
    [f] = toward_guest(ctx)
    ctx.emitted.clear()
    return Ether(bytes(f.data))


def test_answer_attaches_the_stream_and_bytes_flow() -> None:
    ctx, table, relay, calls = setup()
    assert isinstance(relay, Relay) and KEY in table
    syn = syn_of(ctx)
    assert syn[TCP].flags == "S" and syn[IP].dst == "10.0.0.1" and syn[TCP].sport == 40000
    assert table.poll_at() is not None
    assert table.segment(KEY, vm("SA", 500, syn[TCP].seq + 1), 0.1)
    [stream] = calls["accept"]
    assert relay.stream is stream and relay.established and calls["refuse"] == []
    table.segment(KEY, vm("PA", 501, syn[TCP].seq + 1, b"banner"), 0.2)
    assert stream.written == b""  # not connected yet: held in the endpoint
    stream.connect(now=0.3)
    assert stream.written == b"banner"
    stream.data(b"hi", now=0.4)
    assert any(bytes(Ether(bytes(f.data))[TCP].payload) == b"hi" for f in toward_guest(ctx))
    stream.closed("reset", now=0.5)
    assert KEY not in table and ctx.counters.extra["connections_reset"] == 1


def test_vm_reset_refuses() -> None:
    ctx, table, relay, calls = setup()
    syn = syn_of(ctx)
    table.segment(KEY, vm("RA", 0, syn[TCP].seq + 1), 0.1)
    assert calls == {"accept": [], "refuse": [("refused", "the connection ended")]}
    assert KEY not in table and ctx.counters.extra["connections_refused"] == 1
    assert "connections_failed" not in ctx.counters.extra


def test_deadline_refuses_with_timeout_and_late_answers_get_rst() -> None:
    ctx, table, relay, calls = setup(deadline=2.5)
    syn = syn_of(ctx)
    table.on_timer(1.0)  # a SYN retransmission
    assert [Ether(bytes(f.data))[TCP].flags for f in toward_guest(ctx)] == ["S"]
    ctx.emitted.clear()
    assert table.poll_at() == 2.5
    table.on_timer(2.5)
    assert calls["refuse"] == [("timeout", "no answer from the guest")]
    assert relay.endpoint.state is TcpState.CLOSED and table.poll_at() is None
    assert ctx.counters.extra["connections_failed"] == 1
    assert table.segment(KEY, vm("SA", 500, syn[TCP].seq + 1), 3.0)  # tombstone: RST
    assert Ether(bytes(toward_guest(ctx)[-1].data))[TCP].flags.R


def test_over_the_limit_and_stop_refuse() -> None:
    ctx, table, relay, calls = setup()
    table.max_connections = 1
    refused = []
    ep = TcpEndpoint.active(FlowAddrs(CL_MAC, VM_MAC, CL_IP, VM_IP, 40001, 80),
                            EndpointConfig(), 0.0)
    assert table.open_active((VM_IP, 80, CL_IP, 40001), ep, 0.0, lambda h: None,
                             lambda o, m: refused.append(o)) is None
    assert refused == ["error"]
    table.stop(1.0)
    assert calls["refuse"] == [("error", "the service is stopping")]


def test_release_forgets_silently_without_tombstone() -> None:
    ctx, table, relay, calls = setup()
    ctx.emitted.clear()
    assert table.release(KEY, "passthrough", 0.5) is relay
    assert KEY not in table and KEY not in table.tombstones and ctx.emitted == []
    assert ctx.counters.extra["connections_passthrough"] == 1
    assert "connections_failed" not in ctx.counters.extra
    assert calls["refuse"] == []  # released on purpose: nobody is told
    assert table.release(KEY, "passthrough", 0.6) is None
