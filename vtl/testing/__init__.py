"""The test kit for services: fakes of what the bridge gives a service, and a harness.

Theory of operation. A service is sans-IO (see :mod:`vtl.service`): frames and
``now`` come in, verdicts come back, and everything else goes through its
context (``emit``, ``count``, ``open_stream``...). So a service can be tested
without a bridge, a network or a clock by handing it a :class:`FakeContext`
that records what it asked for, and by playing the bridge's part by hand.

- :class:`FakeContext` implements :class:`vtl.ServiceContext`: ``emitted``
  holds ``(frame, direction)`` in order (``emitted_at`` the clock at each),
  ``streams`` a :class:`FakeStream` per ``open_stream``, ``listeners`` a
  :class:`FakeListener` per ``listen_streams``, ``sinks``/``files`` what
  ``open_pcap``/``open_file`` gave. ``ctx.now`` is the clock the fakes use when
  they call the service back (stream events).
- :class:`FakeStream` records what the service does with a stream (``written``,
  ``shut``, ``paused``, ``local``) and lets the test be the bridge: ``connect``,
  ``data``, ``end``, ``writable``, ``closed(reason)``; each takes an optional
  ``now`` that moves ``ctx.now`` first.
- :class:`ServiceHarness` drives one service the way the chain does, in the
  spirit of mitmproxy's Playbook and h11's event tests: build it from its
  options, ``start(now)``, ``send(frame, direction, now)`` (a :class:`vtl.Frame`,
  a :class:`vtl.Packet`, bytes or a scapy packet), ``advance(to)`` (calls
  ``on_timer`` at each due ``poll_at``, in order), then look at what came out:
  :class:`Out` records per direction (as :class:`vtl.Packet` or scapy), verdicts,
  streams, timers fired, counters and ``report(now)``. It keeps the chain's
  counters (frames in/out, dropped, consumed, injected). Time never goes back.

Example::

    h = ServiceHarness(TtlNorm, min_ttl=64)
    h.start(0.0)
    assert h.send(Ether() / IP(ttl=3) / UDP(), TO_UPLINK, 1.0) is PASS
    [out] = h.take(TO_UPLINK)
    assert out.packet.ip.ttl == 64 and out.scapy()[IP].ttl == 64
    h.advance(to=120.0)  # idle flows age out
    assert h.report()["flows"] == 0

What it does not do: run a chain of several services, apply ``match`` filters
or failure policies (an exception from the service reaches the test), or do
any I/O (scapy is imported only by the helpers that convert).
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

from vtl.frame import Frame
from vtl.packet.packet import Packet
from vtl.service import Direction, Service, ServiceCounters, ServiceOptions, Verdict
from vtl.stream import (
    CloseReason,
    ListenRequest,
    OfferHandler,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamHandler,
    StreamRequest,
    StreamWritable,
)

S = TypeVar("S", bound=Service)
MAX_TIMERS_AT_ONE_TIME = 1000  # on_timer calls at one instant before the harness gives up


# -- sinks ----------------------------------------------------------------------------------


@dataclass
class MemorySink:
    """A PacketSink that keeps (data, timestamp) records in memory."""

    records: list[tuple[bytes, float]] = field(default_factory=list)
    closed: bool = False

    def write(self, data: bytes, timestamp: float) -> None:
        assert not self.closed, "write after close"
        self.records.append((bytes(data), timestamp))

    def close(self) -> None:
        self.closed = True


class ScapySink:
    """A PacketSink writing a real pcap file with scapy's RawPcapWriter."""

    def __init__(self, path: str | Path):
        from scapy.utils import RawPcapWriter

        self._writer = RawPcapWriter(str(path), linktype=1, sync=True)
        self._writer._write_header(None)
        self.closed = False

    def write(self, data: bytes, timestamp: float) -> None:
        sec = int(timestamp)
        self._writer.write_packet(bytes(data), sec=sec, usec=int((timestamp - sec) * 1e6))

    def close(self) -> None:
        self._writer.close()
        self.closed = True


# -- streams --------------------------------------------------------------------------------


class FakeStream:
    """A :class:`vtl.stream.Stream` with no I/O: it records what the service does and
    lets the test play the bridge's part (``connect``, ``data``, ``end``, ``closed``...).

    ``written`` holds every byte the service wrote; ``calls`` every method the service
    called with the ``now`` it passed. ``room`` is what ``write_room`` reports while
    open: None means ``request.write_buffer`` forever (the upstream takes everything);
    an int is decremented by each write, and :meth:`writable` gives room back. Like the
    bridge, ``close()``/``abort()`` do not call the handler from inside the call: they
    record ``local`` ("close" or "abort") and :meth:`FakeContext.deliver_local_closes`
    (or :meth:`closed`) delivers the ``StreamClosed("local")``. Every delivery uses
    ``ctx.now`` (moved to ``now`` first when given) and asserts that nothing follows
    StreamClosed.
    """

    def __init__(self, ctx: FakeContext, sid: int, request: StreamRequest,
                 handler: StreamHandler):
        self.ctx = ctx
        self.id = sid
        self.request = request
        self.handler = handler
        self.written = bytearray()
        self.room: int | None = None
        self.connected = False
        self.shut = False  # shutdown_write() was called
        self.paused = False
        self.local: str | None = None  # "close" or "abort" once the service called it
        self.final: StreamClosed | None = None  # the StreamClosed delivered, if any
        self.events: list[StreamEvent] = []  # everything delivered, in order
        self.calls: list[tuple[str, float | None]] = []  # (method, now) the service called
        self.short_write = False

    # -- the Stream API the service uses ---------------------------------------------

    @property
    def write_room(self) -> int:
        if not self.connected or self.shut or self.local or self.final:
            return 0
        return self.request.write_buffer if self.room is None else max(0, self.room)

    def write(self, data: bytes | bytearray | memoryview, now: float | None = None) -> int:
        self.calls.append(("write", now))
        offered = len(memoryview(data).cast("B"))
        take = min(offered, self.write_room)
        self.written += memoryview(data).cast("B")[:take]
        if self.room is not None:
            self.room -= take
        if take < offered:
            self.short_write = True
        return take

    def shutdown_write(self, now: float | None = None) -> None:
        self.calls.append(("shutdown_write", now))
        if self.connected and not self.local and not self.final:
            self.shut = True

    def pause_reading(self, paused: bool, now: float | None = None) -> None:
        self.calls.append(("pause_reading", now))
        if not self.local and not self.final:
            self.paused = bool(paused)

    def close(self, now: float | None = None) -> None:
        self.calls.append(("close", now))
        if not self.local and not self.final:
            self.local = "close"

    def abort(self, now: float | None = None) -> None:
        self.calls.append(("abort", now))
        if self.final is None and self.local != "abort":
            self.local = "abort"

    # -- the bridge's part, driven by the test -------------------------------------------

    def deliver(self, event: StreamEvent, now: float | None = None) -> None:
        assert self.final is None, f"event {event!r} after StreamClosed"
        if now is not None:
            self.ctx.now = now
        self.events.append(event)
        if isinstance(event, StreamClosed):
            self.final = event
        self.handler(event, self.ctx.now)

    def connect(self, local: tuple[str, int] | None = ("10.0.0.1", 40000),
                remote: tuple[str, int] | None = None,
                reply: tuple[str, int] | None = None, now: float | None = None) -> None:
        """Deliver StreamConnected; ``reply`` is the handshake's report (SOCKS BND)."""
        self.connected = True
        self.deliver(StreamConnected(self, local, remote or (self.request.host,
                                                             self.request.port), reply), now)

    def data(self, data: bytes, now: float | None = None) -> None:
        assert not self.paused, "the bridge delivers no StreamData while paused"
        self.deliver(StreamData(self, bytes(data)), now)

    def end(self, now: float | None = None) -> None:
        self.deliver(StreamEnded(self), now)

    def writable(self, room: int | None = None, now: float | None = None) -> None:
        """Give room back (``room`` bytes, or unlimited) and send StreamWritable."""
        self.room = room
        self.short_write = False
        self.deliver(StreamWritable(self), now)

    def closed(self, reason: CloseReason = "closed", message: str = "",
               now: float | None = None) -> None:
        self.connected = False
        self.deliver(StreamClosed(self, reason, message), now)


class FakeListener:
    """A :class:`vtl.stream.Listener` that records ``close()``; offers come from the test
    (:meth:`offer`)."""

    def __init__(self, ctx: FakeContext, request: ListenRequest, on_offer: OfferHandler):
        self.ctx = ctx
        self.request = request
        self.on_offer = on_offer
        self.address = (request.host, request.port or 40999)
        self.closed = False
        self.offers: list[FakeOffer] = []

    def close(self) -> None:
        self.closed = True
        for offer in self.offers:
            if offer.answer is None:
                offer.answer = ("refused", "listener closed")

    def offer(self, meta: dict, peer: tuple[str, int] = ("10.190.0.1", 50000),
              now: float | None = None) -> FakeOffer:
        """Play an inbound stream: the service's ``on_offer`` is called with it."""
        assert not self.closed, "offer on a closed listener"
        if now is not None:
            self.ctx.now = now
        offer = FakeOffer(self, peer, meta)
        self.offers.append(offer)
        self.on_offer(offer, self.ctx.now)
        return offer


class FakeOffer:
    """A :class:`vtl.stream.StreamOffer`: ``answer`` is None until the service answers,
    then ``"accept"`` or ``(reason, message)``; ``stream`` is the :class:`FakeStream`
    ``accept`` gave (not yet connected: the test calls ``stream.connect()``, as the
    bridge would deliver StreamConnected after the call)."""

    def __init__(self, listener: FakeListener, peer: tuple[str, int], meta: dict):
        self.listener = listener
        self.peer = peer
        self.meta = meta
        self.answer: str | tuple[str, str] | None = None
        self.stream: FakeStream | None = None

    def accept(self, handler: StreamHandler) -> FakeStream:
        assert self.answer is None, f"offer answered twice (was {self.answer!r})"
        self.answer = "accept"
        ctx, req = self.listener.ctx, self.listener.request
        request = StreamRequest(req.kind, self.peer[0], self.peer[1], read_chunk=req.read_chunk,
                                write_buffer=req.write_buffer, options=dict(self.meta))
        self.stream = FakeStream(ctx, len(ctx.streams) + 1, request, handler)
        ctx.accepted.append(self.stream)
        return self.stream

    def refuse(self, reason: CloseReason, message: str = "") -> None:
        assert self.answer is None, f"offer answered twice (was {self.answer!r})"
        self.answer = (reason, message)


# -- the context ------------------------------------------------------------------------------


class FakeContext:
    """Implements :class:`vtl.ServiceContext` for tests.

    ``emitted`` holds ``(frame, direction)`` tuples in emission order and
    ``emitted_at`` the clock (``self.now``) at each emission; test drivers set
    ``now`` before calling hooks. ``streams`` holds a :class:`FakeStream` per
    ``open_stream`` call, in order; ``listeners`` a :class:`FakeListener` per
    ``listen_streams`` call and ``accepted`` the streams of accepted offers.
    ``on_emit``, when set, is called with each emitted frame (the harness uses it).
    """

    def __init__(self, name: str = "svc", pcap_dir: Path | None = None):
        self.name = name
        self.log = logging.getLogger(f"vtl.test.{name}")
        self.counters = ServiceCounters()
        self.emitted: list[tuple[Frame, Direction]] = []
        self.emitted_at: list[float] = []
        self.now = 0.0
        self.pcap_dir = pcap_dir
        self.sinks: dict[str, MemorySink | ScapySink] = {}
        self.files: dict[str, io.BytesIO] = {}
        self.streams: list[FakeStream] = []
        self.listeners: list[FakeListener] = []
        self.accepted: list[FakeStream] = []
        self.on_emit: Callable[[Frame, Direction], None] | None = None

    def emit(self, frame: Frame, direction: Direction) -> None:
        assert isinstance(frame, Frame), f"emit() takes a vtl.Frame, not {type(frame)!r}"
        assert isinstance(direction, Direction), f"emit() direction {direction!r}"
        self.counters.injected += 1
        self.emitted.append((frame, direction))
        self.emitted_at.append(self.now)
        if self.on_emit is not None:
            self.on_emit(frame, direction)

    def count(self, key: str, n: int = 1) -> None:
        self.counters.extra[key] = self.counters.extra.get(key, 0) + n

    def open_pcap(self, path: str) -> MemorySink | ScapySink:
        sink: MemorySink | ScapySink
        sink = MemorySink() if self.pcap_dir is None else ScapySink(self.pcap_dir / path)
        self.sinks[path] = sink
        return sink

    def open_file(self, path: str, mode: str = "wb") -> BinaryIO:
        f = io.BytesIO()
        self.files[path] = f
        return f

    def open_stream(self, request: StreamRequest, handler: StreamHandler) -> FakeStream:
        assert isinstance(request, StreamRequest)
        stream = FakeStream(self, len(self.streams) + 1, request, handler)
        self.streams.append(stream)
        return stream

    def listen_streams(self, request: ListenRequest, on_offer: OfferHandler) -> FakeListener:
        assert isinstance(request, ListenRequest)
        listener = FakeListener(self, request, on_offer)
        self.listeners.append(listener)
        return listener

    def deliver_local_closes(self) -> None:
        """Deliver StreamClosed("local") to every stream the service closed or aborted."""
        for stream in self.streams + self.accepted:
            if stream.local and stream.final is None:
                stream.closed("local", f"{stream.local}()")

    def extra(self, key: str) -> int:
        return self.counters.extra.get(key, 0)


def run_timers(service: Service, ctx: FakeContext, until: float) -> None:
    """Call ``on_timer`` at each ``poll_at`` up to ``until``, as the bridge would."""
    while (t := service.poll_at()) is not None and t <= until:
        ctx.now = t
        service.on_timer(t)
    ctx.now = until


def call_report(service: Service, now: float) -> dict[str, Any]:
    """``service.report(now)``, or ``service.report()`` for a service written before
    ``report`` took the time."""
    try:
        takes_now = bool(inspect.signature(service.report).parameters)
    except (TypeError, ValueError):
        takes_now = True
    return dict(service.report(now) if takes_now else service.report())  # type: ignore[call-arg]


# -- frames ---------------------------------------------------------------------------------


def as_frame(frame: Frame | Packet | bytes | bytearray | memoryview | Any) -> Frame:
    """A :class:`Frame` from a Frame (as is), a Packet (its frame), bytes or a scapy
    packet (its bytes)."""
    if isinstance(frame, Frame):
        return frame
    if isinstance(frame, Packet):
        return frame.frame if frame.frame is not None else Frame(frame.data)
    if isinstance(frame, bytes | bytearray | memoryview):
        return Frame(bytes(frame))
    if hasattr(frame, "__bytes__"):  # a scapy packet
        return Frame(bytes(frame))
    raise TypeError(f"cannot make a frame of {type(frame)!r}")


def udp_frame(size: int = 100, sport: int = 1000, payload_tag: int = 0) -> Frame:
    """A valid Ethernet/IPv4/UDP frame of ``size`` bytes (>= 42)."""
    from scapy.layers.inet import IP, UDP, Ether

    head = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(
        src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9)
    pad = max(0, size - 42)
    body = payload_tag.to_bytes(4, "big") + bytes(max(0, pad - 4)) if pad >= 4 else bytes(pad)
    return Frame(bytes(head / body))


def tagged_frame(i: int, size: int = 100) -> Frame:
    """A cheap frame (no scapy) of ``size`` bytes whose bytes 14..18 carry ``i``."""
    data = bytearray(size)
    data[12:14] = b"\x08\x00"
    data[14:18] = i.to_bytes(4, "big")
    return Frame(data)


def tag_of(frame: Frame) -> int:
    return int.from_bytes(frame.data[14:18], "big")


@dataclass(frozen=True)
class Out:
    """One frame that left the service: passed on (``injected`` False: the frame given
    to :meth:`ServiceHarness.send`, as the service left it) or emitted by it."""

    frame: Frame
    direction: Direction
    at: float  # the clock when it left
    injected: bool

    @property
    def packet(self) -> Packet:
        return Packet(self.frame)

    def scapy(self) -> Any:
        """The frame's bytes dissected by scapy, as they are (offloads not completed)."""
        from vtl.packet.scapy_compat import to_scapy

        return to_scapy(self.frame)

    def wire(self) -> list[Any]:
        """What a plain port would send: offloads done in software on a copy (GSO
        segmented, partial checksums finished), each segment dissected by scapy."""
        from vtl.packet.offload import complete_offloads
        from vtl.packet.scapy_compat import to_scapy

        return [to_scapy(f) for f in complete_offloads(self.frame.copy())]


# -- the harness ------------------------------------------------------------------------------


class ServiceHarness(Generic[S]):
    """One service, a :class:`FakeContext` and an explicit clock (see the module doc).

    ``opt``: the options (an instance of ``service_cls.Options``, or a mapping); or
    give them as keyword arguments. ``out`` logs every frame that left, in order;
    ``verdicts`` every verdict; ``timers`` the time of every ``on_timer`` call.
    """

    def __init__(self, service_cls: type[S], opt: ServiceOptions | Mapping[str, Any] | None = None,
                 *, name: str | None = None, ctx: FakeContext | None = None, **options: Any):
        if opt is None:
            opt = service_cls.Options(**options)
        elif isinstance(opt, Mapping):
            opt = service_cls.Options(**{**opt, **options})
        elif options:
            raise TypeError("give the options as opt= or as keywords, not both")
        self.ctx = ctx if ctx is not None else FakeContext(name or service_cls.name or "svc")
        self.ctx.on_emit = self._emitted
        self.service: S = service_cls(opt, self.ctx)
        self.out: list[Out] = []
        self.verdicts: list[Verdict] = []
        self.timers: list[float] = []
        self.started = False
        self.stopped = False
        self._taken = 0
        self._held: list[Out] | None = None

    # -- the clock --------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.ctx.now

    def _move(self, now: float | None) -> float:
        if now is None:
            return self.ctx.now
        if now < self.ctx.now:
            raise ValueError(f"time goes back: {now} after {self.ctx.now}")
        self.ctx.now = now
        return now

    # -- driving the service ------------------------------------------------------------

    def start(self, now: float = 0.0) -> S:
        if self.started:
            raise RuntimeError("start() twice")
        self.started = True
        self.service.start(self._move(now))
        return self.service

    def send(self, frame: Frame | Packet | bytes | bytearray | Any,
             direction: Direction = Direction.TO_UPLINK, now: float | None = None) -> Verdict:
        """Run due timers up to ``now``, then offer one frame; the verdict, counted as the
        chain counts it. A passed frame is logged before what the service emitted."""
        if not self.started or self.stopped:
            raise RuntimeError("send() needs start() first and no stop() yet")
        f = as_frame(frame)
        now = self.advance(now if now is not None else self.ctx.now)
        c = self.ctx.counters
        c.frames_in += 1
        c.bytes_in += len(f.data)
        self._held = []
        try:
            verdict = self.service.process(f, direction, now)
        finally:
            held, self._held = self._held, None
        if not isinstance(verdict, Verdict):
            raise AssertionError(f"process() returned {verdict!r}, not a Verdict")
        self.verdicts.append(verdict)
        if verdict is Verdict.PASS:
            c.frames_out += 1
            c.bytes_out += len(f.data)
            self.out.append(Out(f, direction, now, False))
        elif verdict is Verdict.DROP:
            c.dropped += 1
        else:
            c.consumed += 1
        self.out += held
        return verdict

    def advance(self, to: float) -> float:
        """Call ``on_timer`` at each due ``poll_at`` up to ``to``, in order (a deadline
        already past runs at the current time); then the clock reads ``to``."""
        if to < self.ctx.now:
            raise ValueError(f"time goes back: {to} after {self.ctx.now}")
        same = 0
        while (t := self.service.poll_at()) is not None and t <= to:
            t = max(t, self.ctx.now)
            same = same + 1 if self.timers and self.timers[-1] == t else 0
            if same >= MAX_TIMERS_AT_ONE_TIME:
                raise AssertionError(f"on_timer({t}) keeps poll_at() at {t}: a timer loop")
            self.ctx.now = t
            self.timers.append(t)
            self.service.on_timer(t)
        self.ctx.now = to
        return to

    def poll_at(self) -> float | None:
        return self.service.poll_at()

    def stop(self, now: float | None = None) -> None:
        self.service.stop(self._move(now))
        self.stopped = True

    def report(self, now: float | None = None) -> dict[str, Any]:
        """``service.report(now)`` (``report()`` if the service's takes no time)."""
        return call_report(self.service, self._move(now))

    def _emitted(self, frame: Frame, direction: Direction) -> None:
        rec = Out(frame, direction, self.ctx.now, True)
        (self.out if self._held is None else self._held).append(rec)

    # -- what came out --------------------------------------------------------------------

    def take(self, direction: Direction | None = None) -> list[Out]:
        """The frames that left since the last ``take``, in order. With ``direction``, it
        is an error that a frame went the other way (take it with that direction first)."""
        new = self.out[self._taken:]
        if direction is not None:
            other = [o for o in new if o.direction is not direction]
            if other:
                raise AssertionError(f"{len(other)} frame(s) went {other[0].direction.value}, "
                                     f"not {direction.value}: {other[0].packet!r}")
        self._taken = len(self.out)
        return new

    def take_wire(self, direction: Direction | None = None) -> list[Any]:
        """:meth:`take`, each frame as the scapy packets a plain port would send."""
        return [p for o in self.take(direction) for p in o.wire()]

    def emitted(self, direction: Direction | None = None) -> list[Packet]:
        """Every frame the service emitted (toward ``direction``), as packets."""
        return [o.packet for o in self.out
                if o.injected and (direction is None or o.direction is direction)]

    def passed(self, direction: Direction | None = None) -> list[Packet]:
        """Every frame the service passed on (toward ``direction``), as packets."""
        return [o.packet for o in self.out
                if not o.injected and (direction is None or o.direction is direction)]

    @property
    def streams(self) -> list[FakeStream]:
        return self.ctx.streams

    @property
    def requests(self) -> list[StreamRequest]:
        return [s.request for s in self.ctx.streams]

    @property
    def listeners(self) -> list[FakeListener]:
        return self.ctx.listeners

    @property
    def counters(self) -> ServiceCounters:
        return self.ctx.counters

    def extra(self, key: str) -> int:
        return self.ctx.extra(key)


__all__ = [
    "FakeContext", "FakeListener", "FakeOffer", "FakeStream", "MemorySink", "Out", "ScapySink",
    "ServiceHarness", "as_frame", "call_report", "run_timers", "tag_of", "tagged_frame",
    "udp_frame",
]
