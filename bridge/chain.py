"""The chain runner: services in order, verdicts, injection, failure policy.

A frame from the guest passes slots ``0..n-1`` and is then queued for the
uplink; a frame from the uplink passes ``n-1..0`` and is queued for the guest.
A slot with a ``match`` filter lets frames that do not match pass untouched.
``ctx.emit`` from slot *i* queues a frame that continues from slot *i+1*
(toward the uplink) or *i-1* (toward the guest); injected frames are walked
after the frame being processed, iteratively (no recursion, bounded by
``MAX_INJECT`` per call so a service cannot loop the bridge forever).

A service that raises is counted, logged (at most once a second per service)
and the frame gets the slot's failure policy: ``open`` passes it, ``closed``
drops it. A frame the service found malformed (it raised one of the
project's remote-error types, :class:`~vtl.errors.PacketError` or
:class:`~vtl.errors.RemoteProtocolError`) is counted as ``malformed``, not as
an error, and logged without a traceback; the failure policy still applies.
The chain is not thread-safe; the engine holds a lock around it.

UDP sockets (``ctx.open_datagram``) come from ``chain.open_datagram``, a factory
the bridge sets (:func:`vtl.bridge.datagram.opener`); their handlers run under
the same lock, and a handler that raises is counted like a service error.
Computations (``ctx.compute``) go to ``chain.compute``, a factory the bridge
sets (:meth:`vtl.bridge.compute.ComputePool.opener`): it gives each service that
computes a :class:`~vtl.bridge.compute.JobQueue`, a resource like a socket, so
the service's jobs are withdrawn when it stops; their ``on_done`` runs under the
same lock and counts like a datagram handler when it raises.

Upstream streams (``ctx.open_stream``, ``ctx.listen_streams``) are delegated
to ``chain.streams``, a
:class:`~vtl.bridge.streams.StreamManager` the bridge sets; its I/O thread
calls stream handlers under the same lock and then :meth:`Chain.after_external`
to walk what they injected. A handler that raises is counted like a service
error of its slot. A chain built without a bridge has no streams.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol

from vtl.bridge.config import ServiceSpec
from vtl.bridge.filter import MatchFilter
from vtl.bridge.pcapfile import PcapSink
from vtl.bridge.streams import StreamManager

from vtl.compute import DoneHandler, Job
from vtl.datagram import DatagramHandler, DatagramRequest, DatagramSocket
from vtl.errors import LocalProtocolError, PacketError, RemoteProtocolError
from vtl.frame import Frame
from vtl.hypervisor import VmEvent, VmEventHandler, Watch
from vtl.service import (
    Direction,
    FailPolicy,
    Service,
    ServiceCounters,
    Verdict,
    report_takes_now,
)
from vtl.stream import (
    Listener,
    ListenRequest,
    OfferHandler,
    Stream,
    StreamHandler,
    StreamRequest,
)
from vtl.vxlan import FrameHandler, VxlanLink, VxlanRequest

TO_UPLINK = Direction.TO_UPLINK
TO_GUEST = Direction.TO_GUEST
PASS = Verdict.PASS
DROP = Verdict.DROP
CONSUMED = Verdict.CONSUMED
MAX_INJECT = 100_000


class Jobs(Protocol):
    """A service's computations, from ``chain.compute`` (the bridge's
    :class:`vtl.bridge.compute.JobQueue`): ``ctx.compute`` submits to it; ``close`` at
    the service's stop withdraws its jobs."""

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: DoneHandler
               ) -> Job | None: ...

    def close(self) -> None: ...


class SlotContext:
    """The :class:`vtl.service.ServiceContext` the bridge gives a service."""

    def __init__(self, chain: Chain, index: int, name: str, log: logging.Logger):
        self._chain = chain
        self._index = index
        self.name = name
        self.log = log
        self.counters = ServiceCounters()
        #: closed at stop
        self.resources: list[PcapSink | BinaryIO | Listener | Watch | DatagramSocket
                             | Jobs] = []
        self.slot: Slot | None = None  # set by the Slot made with this context
        self._jobs: Jobs | None = None  # made by the first compute()

    def emit(self, frame: Frame, direction: Direction) -> None:
        if not isinstance(frame, Frame):
            raise LocalProtocolError(f"{self.name}: emit() takes a vtl.Frame, not {type(frame)}")
        self.counters.injected += 1
        self._chain.pending.append((self._index, frame, direction))

    def count(self, key: str, n: int = 1) -> None:
        extra = self.counters.extra
        extra[key] = extra.get(key, 0) + n

    def open_pcap(self, path: str) -> PcapSink:
        sink = PcapSink(path)
        self.resources.append(sink)
        return sink

    def open_file(self, path: str, mode: str = "wb") -> BinaryIO:
        f = open(path, mode)  # noqa: SIM115 - closed by close_resources
        self.resources.append(f)
        return f

    def _streams(self, what: str) -> tuple[StreamManager, Callable[[float], None]]:
        """The chain's stream manager, and the guard that applies this slot's failure
        policy when a handler of ``what`` raises."""
        streams = self._chain.streams
        if streams is None:
            raise LocalProtocolError(f"{self.name}: {what}() needs a bridge; this chain has "
                                     "no stream manager (set chain.streams)")

        def on_error(now: float) -> None:
            # the slot, not its index: a reload may move the service in the chain
            if self.slot is not None:
                self.slot.failed(f"{what} handler", now)

        return streams, on_error

    def open_stream(self, request: StreamRequest, handler: StreamHandler) -> Stream:
        """Ask the bridge's stream manager for an upstream stream (see :mod:`vtl.stream`)."""
        streams, on_error = self._streams("open_stream")
        return streams.open(request, handler, on_error)

    def listen_streams(self, request: ListenRequest, on_offer: OfferHandler) -> Listener:
        """Take inbound streams (see :mod:`vtl.stream`); the listener closes at chain stop."""
        streams, on_error = self._streams("listen_streams")
        listener = streams.listen(request, on_offer, on_error)
        self.resources.append(listener)
        return listener

    def watch_qmp(self, path: str, on_event: VmEventHandler) -> Watch:
        """Follow a QEMU monitor through the bridge (see :mod:`vtl.hypervisor`); the watch
        closes at chain stop. A handler that raises is counted like a service error."""
        factory = self._chain.watch_qmp
        if factory is None:
            raise LocalProtocolError(f"{self.name}: watch_qmp() needs a bridge; this chain "
                                     "has none (set chain.watch_qmp)")

        def guarded(event: VmEvent, now: float) -> None:
            try:
                on_event(event, now)
            except Exception:  # noqa: BLE001 - the failure policy's counters, not a crash
                if self.slot is not None:
                    self.slot.failed("QMP event handler", now)

        watch = factory(path, guarded, self.log)
        self.resources.append(watch)
        return watch

    def open_datagram(self, request: DatagramRequest, handler: DatagramHandler
                      ) -> DatagramSocket:
        """A UDP socket of the host through the bridge (see :mod:`vtl.datagram`); it closes
        at chain stop. A handler that raises is counted like a service error."""
        return self._open(self._chain.open_datagram, "open_datagram", request, handler)

    def open_vxlan(self, request: VxlanRequest, handler: FrameHandler) -> VxlanLink:
        """A kernel VXLAN link through the bridge (see :mod:`vtl.vxlan`); it is removed
        at chain stop. A handler that raises is counted like a service error."""
        return self._open(self._chain.open_vxlan, "open_vxlan", request, handler)

    def compute(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: DoneHandler
                ) -> Job | None:
        """Run ``fn(*args)`` in the bridge's worker processes (see :mod:`vtl.compute`);
        the service's jobs are withdrawn at its stop. An ``on_done`` that raises is counted
        like a service error."""
        jobs = self._jobs
        if jobs is None:
            factory = self._chain.compute
            if factory is None:
                raise LocalProtocolError(f"{self.name}: compute() needs a bridge; this chain "
                                         "has none (set chain.compute)")
            jobs = self._jobs = factory(self._on_error("compute"), self.log)
            self.resources.append(jobs)
        return jobs.submit(fn, args, on_done)

    def _on_error(self, what: str) -> Callable[[float], None]:
        """Applies this slot's failure policy when a handler of ``what`` raises."""

        def on_error(now: float) -> None:
            if self.slot is not None:  # the slot, not its index: a reload may move it
                self.slot.failed(f"{what} handler", now)

        return on_error

    def _open(self, factory: Callable[..., Any] | None, what: str, request: object,
              handler: Callable[..., None]) -> Any:
        """A resource from the bridge's ``factory`` whose ``handler`` runs under the chain
        lock; a handler that raises counts against the slot's failure policy."""
        if factory is None:
            raise LocalProtocolError(f"{self.name}: {what}() needs a bridge; this chain has "
                                     f"none (set chain.{what})")
        resource = factory(request, handler, self._on_error(what), self.log)
        self.resources.append(resource)
        return resource

    def compile_filter(self, expression: str) -> MatchFilter:
        """A libpcap filter for a service (a rule's ``match``); ConfigError if refused."""
        return MatchFilter(expression)

    def pin_mac(self, mac: bytes, until: float | None) -> None:
        """Keep frames for the guest ``mac`` deliverable until ``until`` (see
        :meth:`vtl.service.ServiceContext.pin_mac`); nothing without a bridge."""
        if self._chain.pin_mac is not None:
            self._chain.pin_mac(mac, until)

    def close_resources(self) -> None:
        for r in self.resources:
            try:
                r.close()
            except Exception:  # noqa: BLE001 - closing is best effort at stop
                self.log.exception("closing %r failed", r)
        self.resources.clear()


class Slot:
    """One position of the chain: a service, its context and counters, its ``match``
    filter and failure policy, and the config entry it came from (None when built
    from a factory)."""

    __slots__ = ("service", "ctx", "match", "fail", "spec", "counters", "log", "_last_log",
                 "_quiet", "_report_takes_now", "_last_malformed", "_quiet_malformed")

    def __init__(self, service: Service, ctx: SlotContext, match: MatchFilter | None,
                 fail: FailPolicy, spec: ServiceSpec | None = None):
        self.service = service
        self.ctx = ctx
        ctx.slot = self
        self.match = match
        self.fail = fail
        self.spec = spec
        self.counters = ctx.counters
        self.log = ctx.log
        self._last_log = -1e9
        self._quiet = 0
        self._report_takes_now: bool | None = None
        self._last_malformed = -1e9  # malformed frames have their own log budget, so a
        self._quiet_malformed = 0  # flood of them never hides a real failure's line

    def failed(self, what: str, now: float) -> None:
        """Count and log (rate-limited) an exception raised by the service."""
        self.counters.errors += 1
        if now - self._last_log >= 1.0:
            extra = f" ({self._quiet} more suppressed)" if self._quiet else ""
            self.log.warning("%s failed in %s; failure policy %r%s", self.ctx.name, what,
                             self.fail, extra, exc_info=not what.startswith("process ("))
            self._last_log = now
            self._quiet = 0
        else:
            self._quiet += 1

    def report(self, now: float) -> dict[str, object]:
        """The service's own figures; a failing report is counted, never raised. A
        third-party service written before ``report`` took ``now`` is still called."""
        report = self.service.report
        try:
            if self._report_takes_now is None:
                self._report_takes_now = report_takes_now(self.service)
            return dict(report(now) if self._report_takes_now else report())  # type: ignore[call-arg]
        except Exception:  # noqa: BLE001 - a report must not break the bridge
            self.failed("report", now)
            return {}

    def malformed(self, exc: Exception, now: float) -> None:
        """Count and log (rate-limited, no traceback) a frame the service found malformed."""
        self.counters.malformed += 1
        if now - self._last_malformed >= 1.0:
            q = self._quiet_malformed
            extra = f" ({q} more suppressed)" if q else ""
            self.log.info("%s: malformed frame: %s; failure policy %r%s", self.ctx.name, exc,
                          self.fail, extra)
            self._last_malformed = now
            self._quiet_malformed = 0
        else:
            self._quiet_malformed += 1


class Chain:
    """An ordered list of service slots and the frames they produced."""

    def __init__(self, specs: Sequence[ServiceSpec], log: logging.Logger):
        self.slots: list[Slot] = []
        self.pending: deque[tuple[int, Frame, Direction]] = deque()
        self.out_uplink: list[Frame] = []
        self.out_guest: list[Frame] = []
        self.streams: StreamManager | None = None  # set by the bridge
        #: follows a QEMU monitor for a service: (path, handler, log) -> Watch (the bridge)
        self.watch_qmp: Callable[[str, VmEventHandler, logging.Logger], Watch] | None = None
        #: binds a UDP socket for a service: (request, handler, on_error(now), log) ->
        #: DatagramSocket; its handler runs under the chain lock (the bridge)
        self.open_datagram: Callable[[DatagramRequest, DatagramHandler,
                                      Callable[[float], None], logging.Logger],
                                     DatagramSocket] | None = None
        #: creates a kernel VXLAN link for a service: (request, handler, on_error(now),
        #: log) -> VxlanLink; its handler runs under the chain lock (the bridge)
        self.open_vxlan: Callable[[VxlanRequest, FrameHandler, Callable[[float], None],
                                   logging.Logger], VxlanLink] | None = None
        #: a service's job queue for ctx.compute: (on_error(now), log) -> Jobs; its
        #: jobs' on_done runs under the chain lock (the bridge's ComputePool.opener)
        self.compute: Callable[[Callable[[float], None], logging.Logger], Jobs] | None = None
        #: keeps a guest MAC deliverable (ctx.pin_mac): (mac, until) -> None (the bridge)
        self.pin_mac: Callable[[bytes, float | None], None] | None = None
        self.log = log
        for i, spec in enumerate(specs):
            self.slots.append(self.make_slot(spec, i))

    def make_slot(self, spec: ServiceSpec, index: int) -> Slot:
        """A new service instance for ``spec`` at position ``index`` (not started)."""
        ctx = SlotContext(self, index, spec.name, self.log.getChild(spec.name))
        service = spec.cls(spec.options, ctx)
        return Slot(service, ctx, spec.match, spec.fail, spec)

    def install(self, slots: list[Slot]) -> None:
        """Make ``slots`` the chain (a reload), telling each context its new position."""
        for i, slot in enumerate(slots):
            slot.ctx._index = i
        self.slots = slots

    @classmethod
    def from_services(cls, services: Sequence[Callable[[SlotContext], Service]],
                      log: logging.Logger) -> Chain:
        """A chain from factories (tests and embedding): each gets its context."""
        chain = cls((), log)
        for i, factory in enumerate(services):
            ctx = SlotContext(chain, i, f"svc{i}", log.getChild(f"svc{i}"))
            service = factory(ctx)
            ctx.name = service.name or ctx.name
            chain.slots.append(Slot(service, ctx, None, service.default_fail))
        return chain

    def __len__(self) -> int:
        return len(self.slots)

    def start(self, now: float) -> None:
        for slot in self.slots:
            slot.service.start(now)
        self._drain(now)

    def stop(self, now: float) -> None:
        for slot in self.slots:
            self.stop_slot(slot, now)
        self.pending.clear()

    def stop_slot(self, slot: Slot, now: float) -> None:
        """Stop one service and close what the bridge opened for it (never raises)."""
        try:
            slot.service.stop(now)
        except Exception:  # noqa: BLE001 - one service's failure must not stop the others
            slot.failed("stop", now)
        slot.ctx.close_resources()

    def process(self, frame: Frame, direction: Direction, now: float) -> None:
        """Run one frame through the chain from its entry side."""
        start = 0 if direction is TO_UPLINK else len(self.slots) - 1
        self._walk(frame, direction, start, now)
        if self.pending:
            self._drain(now)

    def next_deadline(self) -> float | None:
        best: float | None = None
        for slot in self.slots:
            try:
                t = slot.service.poll_at()
            except Exception:  # noqa: BLE001
                slot.failed("poll_at", 0.0)
                continue
            if t is not None and (best is None or t < best):
                best = t
        return best

    def run_timers(self, now: float) -> None:
        for slot in self.slots:
            try:
                t = slot.service.poll_at()
                if t is not None and t <= now:
                    slot.service.on_timer(now)
            except Exception:  # noqa: BLE001
                slot.failed("on_timer", now)
        if self.pending:
            self._drain(now)

    def after_external(self, now: float) -> None:
        """Walk frames injected outside process/run_timers (stream handlers)."""
        self.drain(now)

    def drain(self, now: float) -> None:
        """Walk the frames services injected (from their positions) until none is left."""
        if self.pending:
            self._drain(now)

    def _drain(self, now: float) -> None:
        pending = self.pending
        budget = MAX_INJECT
        while pending and budget:
            budget -= 1
            index, frame, direction = pending.popleft()
            nxt = index + 1 if direction is TO_UPLINK else index - 1
            self._walk(frame, direction, nxt, now)
        if pending:
            pending.clear()

    def _walk(self, frame: Frame, direction: Direction, start: int, now: float) -> None:
        slots = self.slots
        if direction is TO_UPLINK:
            indices = range(start, len(slots))
            out = self.out_uplink
        else:
            indices = range(start, -1, -1)
            out = self.out_guest
        for i in indices:
            slot = slots[i]
            if slot.match is not None and not slot.match(frame.data):
                continue
            c = slot.counters
            size = len(frame.data)
            c.frames_in += 1
            c.bytes_in += size
            try:
                verdict = slot.service.process(frame, direction, now)
            except (PacketError, RemoteProtocolError) as exc:  # the frame, not the service
                slot.malformed(exc, now)
                verdict = PASS if slot.fail == "open" else DROP
            except Exception:  # noqa: BLE001 - the failure policy decides
                slot.failed("process", now)
                verdict = PASS if slot.fail == "open" else DROP
            if verdict is PASS:
                c.frames_out += 1
                c.bytes_out += len(frame.data)
            elif verdict is DROP:
                c.dropped += 1
                return
            elif verdict is CONSUMED:
                c.consumed += 1
                return
            else:  # not a Verdict: a bug in the service, handled like an exception
                slot.failed(f"process (returned {verdict!r}, not a Verdict)", now)
                if slot.fail == "closed":
                    c.dropped += 1
                    return
                c.frames_out += 1
                c.bytes_out += len(frame.data)
        out.append(frame)
