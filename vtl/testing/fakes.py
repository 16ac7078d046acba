"""Fakes of what the bridge gives a service: a context, streams, listeners, pcap sinks.

Theory of operation. :class:`FakeContext` implements :class:`vtl.ServiceContext`
and records what the service asked for; :class:`FakeStream`,
:class:`FakeListener` and :class:`FakeOffer` implement the stream protocols of
:mod:`vtl.stream` with no I/O and let the test play the bridge's part (connect,
deliver data, close with a reason, offer an inbound stream). They call the
service back the way the bridge does: never from inside the service's own call
(``close()`` only records; :meth:`FakeContext.deliver_local_closes` delivers),
with ``ctx.now`` as the time, and never after a stream's StreamClosed.

Invariant: the fakes read no clock; ``ctx.now`` moves only when the test (or
:class:`vtl.testing.ServiceHarness`) moves it. scapy is imported only by the
helpers that need it (:class:`ScapySink`, :func:`udp_frame`).
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pcapy

from vtl.compute import MAX_PENDING, DoneHandler
from vtl.datagram import DatagramHandler, DatagramRequest
from vtl.errors import LocalProtocolError
from vtl.frame import Frame
from vtl.hypervisor import VmEvent, VmEventHandler
from vtl.service import Direction, Service, ServiceCounters
from vtl.stream import (
    CloseReason,
    ListenRequest,
    OfferHandler,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamFlow,
    StreamHandler,
    StreamRequest,
    StreamWritable,
)
from vtl.testing.fake_links import FakeVxlanLink
from vtl.vxlan import FrameHandler, VxlanRequest

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

    def offer(self, meta: dict | None = None, peer: tuple[str, int] = ("10.190.0.1", 50000),
              now: float | None = None, flow: StreamFlow | None = None) -> FakeOffer:
        """Play an inbound stream (carrying ``flow``, for ``udt``): the service's
        ``on_offer`` is called with it."""
        assert not self.closed, "offer on a closed listener"
        if now is not None:
            self.ctx.now = now
        offer = FakeOffer(self, peer, meta or {}, flow)
        self.offers.append(offer)
        self.on_offer(offer, self.ctx.now)
        return offer


class FakeOffer:
    """A :class:`vtl.stream.StreamOffer`: ``answer`` is None until the service answers,
    then ``"accept"`` or ``(reason, message)``; ``stream`` is the :class:`FakeStream`
    ``accept`` gave (not yet connected: the test calls ``stream.connect()``, as the
    bridge would deliver StreamConnected after the call)."""

    def __init__(self, listener: FakeListener, peer: tuple[str, int], meta: dict,
                 flow: StreamFlow | None = None):
        self.listener = listener
        self.peer = peer
        self.meta = meta
        self.flow = flow
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


class FakeWatch:
    """A monitor a service asked to follow (``ctx.watch_qmp``): a test plays the
    hypervisor with :meth:`event`."""

    def __init__(self, path: str, on_event: VmEventHandler):
        self.path = path
        self.on_event = on_event
        self.closed = False

    def event(self, kind: str, now: float, **data: Any) -> None:
        """Deliver one event (``kind``: "STOP", "RESUME", "status", "connected"...)."""
        assert not self.closed, "the service closed this watch"
        self.on_event(VmEvent(kind, dict(data)), now)

    def close(self) -> None:
        self.closed = True


class FakeDatagramSocket:
    """A :class:`vtl.datagram.DatagramSocket` for tests: ``sent`` holds ``(bytes, dest)``
    per datagram sent (:meth:`send`, or each unit of :meth:`send_train`; the unit
    count of each train is in ``trains``); :meth:`deliver` calls the service's handler
    as the bridge would.
    ``fail_sends`` makes :meth:`send` return False (a full socket buffer)."""

    def __init__(self, request: DatagramRequest, handler: DatagramHandler):
        self.request = request
        self.handler = handler
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.trains: list[int] = []
        self.closed = False
        self.fail_sends = False
        self._counters = {"rx": 0, "rx_bytes": 0, "rx_oversize": 0, "rx_errors": 0,
                          "tx": 0, "tx_bytes": 0, "tx_dropped": 0}

    @property
    def local(self) -> tuple[str, int]:
        return self.request.host, self.request.port or 40000

    def send(self, parts: Sequence[bytes | bytearray | memoryview],
             dest: tuple[str, int]) -> bool:
        assert not self.closed, "send() on a closed datagram socket"
        data = b"".join(bytes(p) for p in parts)
        if self.fail_sends:
            self._counters["tx_dropped"] += 1
            return False
        self.sent.append((data, dest))
        self._counters["tx"] += 1
        self._counters["tx_bytes"] += len(data)
        return True

    def send_train(self, units: Sequence[Sequence[bytes | bytearray | memoryview]],
                   dest: tuple[str, int]) -> int:
        """Each unit as :meth:`send` would (one entry in ``sent`` per unit); ``trains``
        holds the number of units of each call. Stops at the first unit not sent."""
        self.trains.append(len(units))
        for i, parts in enumerate(units):
            if not self.send(parts, dest):
                self._counters["tx_dropped"] += len(units) - i - 1
                return i
        return len(units)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def close(self) -> None:
        self.closed = True

    def deliver(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """A datagram arrives from ``source`` (nothing once closed, as with the bridge)."""
        if self.closed:
            return
        self._counters["rx"] += 1
        self.handler(bytearray(data), source, now)


class FakeJob:
    """A :class:`vtl.compute.Job` for tests (``ctx.compute``): nothing runs until the
    test says so (:meth:`FakeContext.run_jobs`, or :meth:`run` / :meth:`finish` for
    one job). ``result`` is what ``on_done`` got; ``cancelled`` whether the service
    withdrew it."""

    def __init__(self, ctx: FakeContext, fn: Callable[..., Any], args: tuple[Any, ...],
                 on_done: DoneHandler):
        self.ctx = ctx
        self.fn = fn
        self.args = args
        self.on_done = on_done
        self.done = False  # on_done was called, or the job was cancelled
        self.cancelled = False
        self.result: Any = None

    def cancel(self) -> None:
        if not self.done:
            self.done = self.cancelled = True

    def run(self, now: float | None = None) -> None:
        """Run ``fn`` here as a worker would (on pickled copies of the call, so a call the
        bridge could not send fails the same way) and deliver what it returned or raised."""
        assert not self.done, f"{self!r} already done"
        try:
            fn, args = pickle.loads(pickle.dumps((self.fn, self.args)))
            result = pickle.loads(pickle.dumps(fn(*args)))
        except Exception as exc:  # noqa: BLE001 - delivered, as the bridge does
            result = exc
        self.finish(result, now)

    def finish(self, result: Any, now: float | None = None) -> None:
        """Deliver ``result`` (an exception instance plays a failure, e.g.
        ``BrokenProcessPool()`` a worker that died) without running ``fn``."""
        assert not self.done, f"{self!r} already done"
        if now is not None:
            self.ctx.now = now
        self.done = True
        self.result = result
        self.on_done(result, self.ctx.now)

    def __repr__(self) -> str:
        return f"<FakeJob {getattr(self.fn, '__qualname__', self.fn)}{self.args!r}>"


class FakeContext:
    """Implements :class:`vtl.ServiceContext` for tests.

    ``emitted`` holds ``(frame, direction)`` tuples in emission order and
    ``emitted_at`` the clock (``self.now``) at each emission; test drivers set
    ``now`` before calling hooks. ``streams`` holds a :class:`FakeStream` per
    ``open_stream`` call, in order; ``listeners`` a :class:`FakeListener` per
    ``listen_streams`` call and ``accepted`` the streams of accepted offers.
    ``jobs`` holds a :class:`FakeJob` per ``compute`` call that returned one;
    :meth:`run_jobs` runs the pending ones. ``on_emit``, when set, is called with each
    emitted frame (the harness uses it).
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
        self.watches: list[FakeWatch] = []
        self.datagrams: list[FakeDatagramSocket] = []
        self.links: list[FakeVxlanLink] = []
        self.jobs: list[FakeJob] = []
        self.pins: dict[bytes, float | None] = {}  # ctx.pin_mac: MAC -> until
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

    def compile_filter(self, expression: str) -> Callable[[bytes | bytearray], bool]:
        """libpcap's own compiler, as the bridge's (a bad expression raises PcapError)."""
        prog = pcapy.compile(pcapy.DLT_EN10MB, 262144, expression, 1, 0)
        return lambda data: prog.filter(bytes(data)) != 0

    def pin_mac(self, mac: bytes, until: float | None) -> None:
        self.pins[bytes(mac)] = until

    def watch_qmp(self, path: str, on_event: VmEventHandler) -> FakeWatch:
        watch = FakeWatch(path, on_event)
        self.watches.append(watch)
        return watch

    def open_datagram(self, request: DatagramRequest,
                      handler: DatagramHandler) -> FakeDatagramSocket:
        assert isinstance(request, DatagramRequest)
        sock = FakeDatagramSocket(request, handler)
        self.datagrams.append(sock)
        return sock

    def open_vxlan(self, request: VxlanRequest, handler: FrameHandler) -> FakeVxlanLink:
        assert isinstance(request, VxlanRequest)
        link = FakeVxlanLink(request, handler)
        self.links.append(link)
        return link

    def compute(self, fn: Callable[..., Any], args: tuple[Any, ...],
                on_done: DoneHandler) -> FakeJob | None:
        """Record a job (nothing runs until :meth:`run_jobs`); None when the service has
        :data:`~vtl.compute.MAX_PENDING` jobs not done, as the bridge does."""
        if not callable(fn) or "<" in getattr(fn, "__qualname__", "<"):
            raise LocalProtocolError(f"compute() takes a module-level function, not {fn!r}")
        if type(args) is not tuple:
            raise LocalProtocolError(f"compute() takes the arguments as a tuple, not "
                                     f"{type(args).__name__}")
        if sum(not job.done for job in self.jobs) >= MAX_PENDING:
            return None
        job = FakeJob(self, fn, args, on_done)
        self.jobs.append(job)
        return job

    def run_jobs(self, now: float | None = None) -> int:
        """Run every pending job in order, here, and call its ``on_done(result, now)``
        (``ctx.now`` moved to ``now`` first when given); jobs submitted meanwhile wait for
        the next call. An exception ``on_done`` raises reaches the test. How many ran."""
        if now is not None:
            self.now = now
        ran = 0
        for job in [job for job in self.jobs if not job.done]:
            if not job.done:  # an on_done before it may have cancelled it
                job.run()
                ran += 1
        return ran

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


# -- frames ---------------------------------------------------------------------------------


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


__all__ = [
    "FakeContext", "FakeJob", "FakeListener", "FakeOffer", "FakeStream", "FakeWatch", "MemorySink",
    "ScapySink",
    "run_timers", "tag_of", "tagged_frame", "udp_frame",
]
