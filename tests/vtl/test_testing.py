"""vtl.testing: the fakes and the service harness, on small services written here."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field
from scapy.layers.inet import IP, UDP, Ether

from vtl import (
    CONSUMED,
    DROP,
    PASS,
    Direction,
    Frame,
    Packet,
    PacketError,
    Service,
    ServiceOptions,
    StreamRequest,
    Verdict,
)
from vtl.stream import StreamClosed, StreamConnected, StreamData, StreamEvent
from vtl.testing import FakeContext, FakeStream, ServiceHarness, as_frame, call_report, udp_frame

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST


class DelayOptions(ServiceOptions):
    delay: float = Field(1.0, gt=0, description="seconds each frame is held")


class Delay(Service):
    """Holds every frame ``delay`` seconds, then emits it on; drops frames of 13 bytes or less
    than 60; raises on a frame of 61 bytes; an empty UDP payload is a malformed frame."""

    name = "delay"
    Options = DelayOptions

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self.queue: list[tuple[float, Frame, Direction]] = []

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        if len(frame) == 61:
            raise ValueError("a bug")
        if len(frame) == 42:
            raise PacketError("empty datagram")
        if len(frame) < 60:
            return DROP
        self.queue.append((now + self.options.delay, frame, direction))
        return CONSUMED

    def poll_at(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def on_timer(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, f, d = self.queue.pop(0)
            self.ctx.emit(f, d)

    def report(self, now: float) -> dict[str, Any]:
        return {"queued": len(self.queue), "now": now}


class Echo(Service):
    """Passes every frame and sends a copy back the other way; opens one stream on the
    first frame and echoes its data toward the guest; report() takes no time (old style)."""

    name = "echo"

    def __init__(self, options: Any, ctx: Any):
        super().__init__(options, ctx)
        self.stream: Any = None
        self.events: list[tuple[str, float]] = []

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        if self.stream is None:
            self.stream = self.ctx.open_stream(StreamRequest("tcp", "10.0.0.9", 80), self.on_event)
        self.ctx.emit(frame.copy(), direction.reverse)
        return PASS

    def on_event(self, event: StreamEvent, now: float) -> None:
        self.events.append((type(event).__name__, now))
        if isinstance(event, StreamConnected):
            self.stream.write(b"hello", now)
        elif isinstance(event, StreamData):
            self.ctx.emit(Frame(udp_frame(60 + len(event.data)).data), DOWN)
        elif isinstance(event, StreamClosed):
            self.stream = None

    def report(self) -> dict[str, Any]:  # type: ignore[override]
        return {"stream": self.stream is not None}


def test_frames_in_timers_fire_in_order_and_frames_come_out_at_their_time():
    h = ServiceHarness(Delay, delay=0.5)
    h.start(10.0)
    assert h.poll_at() is None
    for i, t in enumerate((10.0, 10.2, 10.3)):
        assert h.send(udp_frame(100 + i), UP if i != 1 else DOWN, t) is CONSUMED
    assert h.take() == [] and h.poll_at() == 10.5
    h.advance(to=10.75)
    assert h.timers == [10.5, 10.7] and h.now == 10.75
    assert [(len(o.frame), o.direction, o.at, o.injected) for o in h.take()] == [
        (100, UP, 10.5, True), (101, DOWN, 10.7, True)]
    assert h.send(udp_frame(103), UP, 11.0) is CONSUMED  # the due timer (10.8) runs first
    assert h.timers == [10.5, 10.7, 10.8] and [o.at for o in h.take(UP)] == [10.8]
    assert len(h.emitted(UP)) == 2 and len(h.emitted(DOWN)) == 1 and h.passed() == []
    assert h.report()["queued"] == 1 and h.report(12.0)["now"] == 12.0  # report(now)
    c = h.counters
    assert (c.frames_in, c.consumed, c.injected, c.frames_out) == (4, 4, 3, 0)


def test_verdicts_are_counted_like_the_chain_counts_them():
    h = ServiceHarness(Delay, {"delay": 1.0})
    h.start()
    assert h.send(Frame(bytes(59)), UP) is DROP
    assert h.send(udp_frame(70), DOWN) is CONSUMED
    assert h.verdicts == [DROP, CONSUMED]
    c = h.counters
    assert (c.frames_in, c.bytes_in, c.dropped, c.consumed) == (2, 129, 1, 1)


def test_a_passed_frame_comes_out_before_what_the_service_emitted_meanwhile():
    h = ServiceHarness(Echo)
    h.start(1.0)
    sent = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / b"x"
    assert h.send(sent, UP, 2.0) is PASS
    out = h.take()
    assert [(o.direction, o.injected) for o in out] == [(UP, False), (DOWN, True)]
    assert out[0].scapy()[UDP].payload.load == b"x" and bytes(out[1].frame.data) == bytes(sent)
    assert isinstance(out[0].packet, Packet) and out[0].packet.udp is not None
    assert [p.data for p in h.passed(UP)] == [bytearray(bytes(sent))]
    assert h.counters.frames_out == 1 and h.counters.injected == 1
    h.send(sent, UP, 3.0)
    assert [o.direction for o in h.take(DOWN)] == [DOWN]
    assert [o.direction for o in h.take()] == [UP]  # the other one waited
    assert h.take() == [] and len(h.out) == 4


def test_streams_are_driven_by_the_test_with_the_clock():
    h = ServiceHarness(Echo)
    h.start(0.0)
    h.send(udp_frame(), UP, 1.0)
    h.take()
    [stream] = h.streams
    assert isinstance(stream, FakeStream) and h.requests == [StreamRequest("tcp", "10.0.0.9", 80)]
    stream.connect(now=2.0)
    assert bytes(stream.written) == b"hello" and stream.calls == [("write", 2.0)]
    stream.data(b"abc", now=3.0)
    [out] = h.take(DOWN)
    assert (out.at, len(out.frame), h.now) == (3.0, 63, 3.0)
    stream.closed("reset", "peer reset", now=4.0)
    assert h.service.events == [("StreamConnected", 2.0), ("StreamData", 3.0),
                                ("StreamClosed", 4.0)]
    with pytest.raises(AssertionError, match="after StreamClosed"):
        stream.end()
    assert h.report(5.0) == {"stream": False}  # a report() without now is still called
    with pytest.raises(ValueError, match="time goes back"):
        h.send(udp_frame(), UP, 4.5)


def test_fake_stream_flow_control_and_local_close():
    ctx = FakeContext()
    got: list[StreamEvent] = []
    s = ctx.open_stream(StreamRequest("tcp", "h", 1, write_buffer=10), lambda e, now: got.append(e))
    assert s.write_room == 0 and s.write(b"x", 0.0) == 0  # not connected yet
    s.connect()
    s.room = 4
    assert s.write(b"abcdef", 1.0) == 4 and s.short_write and s.write_room == 0
    s.writable()
    assert s.write_room == 10 and not s.short_write
    s.close(2.0)
    assert s.local == "close" and s.final is None and s.write_room == 0
    ctx.deliver_local_closes()
    assert isinstance(got[-1], StreamClosed) and got[-1].reason == "local"
    assert [name for name, _ in s.calls] == ["write", "write", "close"]


def test_the_failure_policy_counts_malformed_frames_apart_from_bugs():
    for fail, verdict in (("open", PASS), ("closed", DROP)):
        h = ServiceHarness(Delay, fail=fail)
        h.start()
        assert h.send(udp_frame(42), UP) is verdict  # PacketError: the frame's fault
        assert h.send(Frame(bytes(61)), UP) is verdict  # ValueError: the service's
        assert (h.counters.malformed, h.counters.errors) == (1, 1)
        assert [type(e) for e in h.errors] == [PacketError, ValueError]
        assert len(h.take()) == (2 if fail == "open" else 0)
    h = ServiceHarness(Delay)
    h.start()
    with pytest.raises(PacketError):
        h.send(udp_frame(42), UP)


class Stuck(Service):
    def poll_at(self) -> float | None:
        return 1.0


def test_a_timer_that_never_moves_is_reported_not_looped_forever():
    h = ServiceHarness(Stuck)
    h.start()
    with pytest.raises(AssertionError, match="timer loop"):
        h.advance(to=2.0)


def test_misuse_is_refused():
    h = ServiceHarness(Delay)
    with pytest.raises(RuntimeError, match="start"):
        h.send(udp_frame(), UP, 0.0)
    h.start(5.0)
    with pytest.raises(RuntimeError):
        h.start(6.0)
    with pytest.raises(ValueError):
        h.advance(to=4.0)
    h.stop(6.0)
    with pytest.raises(RuntimeError):
        h.send(udp_frame(), UP, 7.0)
    with pytest.raises(TypeError):
        ServiceHarness(Delay, DelayOptions(), delay=2.0)
    with pytest.raises(TypeError):
        as_frame(42)


def test_inputs_and_old_style_reports():
    raw = bytes(udp_frame(80).data)
    f = Frame(raw)
    assert as_frame(f) is f and as_frame(Packet(f)) is f
    assert bytes(as_frame(raw).data) == raw and bytes(as_frame(Ether(raw)).data) == raw
    assert bytes(as_frame(Packet(bytearray(raw))).data) == raw
    svc = Echo(None, FakeContext())
    assert call_report(svc, 1.0) == {"stream": False}
    assert call_report(Delay(DelayOptions(), FakeContext()), 2.0) == {"queued": 0, "now": 2.0}
