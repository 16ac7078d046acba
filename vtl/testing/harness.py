"""The service harness: one service, a fake context and an explicit clock.

Theory of operation. :class:`ServiceHarness` plays the chain's part for one
service (mitmproxy's Playbook, h11's event tests): it builds the service from
its options with a :class:`~vtl.testing.fakes.FakeContext`, moves the clock
only forward (``send`` and ``advance`` run every due ``on_timer`` first, at its
``poll_at``, in order), counts each verdict as the chain does, and logs every
frame that leaves as an :class:`Out` record: a passed frame first, then what
the service emitted during that call, as the chain walks them. Emissions from
stream handlers and timers are logged as they happen (``ctx.on_emit``).

Invariants: time never goes back (ValueError); a service is started once and
gets no frame after ``stop``; a timer that does not move ``poll_at`` is
reported after :data:`MAX_TIMERS_AT_ONE_TIME` calls at one instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vtl.errors import RemoteProtocolError
from vtl.frame import Frame
from vtl.packet.packet import Packet
from vtl.service import (
    Direction,
    FailPolicy,
    Service,
    ServiceCounters,
    ServiceOptions,
    Verdict,
    report_takes_now,
)
from vtl.stream import StreamRequest
from vtl.testing.fakes import FakeContext, FakeListener, FakeStream

S = TypeVar("S", bound=Service)
MAX_TIMERS_AT_ONE_TIME = 1000  # on_timer calls at one instant before the harness gives up


def call_report(service: Service, now: float) -> dict[str, Any]:
    """``service.report(now)``, or ``service.report()`` for a service written before
    ``report`` took the time."""
    takes_now = report_takes_now(service)
    return dict(service.report(now) if takes_now else service.report())  # type: ignore[call-arg]


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
    give them as keyword arguments. ``fail``: None (exceptions reach the test) or the
    chain's failure policy. ``out`` logs every frame that left, in order; ``verdicts``
    every verdict; ``timers`` the time of every ``on_timer`` call; ``errors`` the
    exceptions the failure policy absorbed.
    """

    def __init__(self, service_cls: type[S], opt: ServiceOptions | Mapping[str, Any] | None = None,
                 *, name: str | None = None, ctx: FakeContext | None = None,
                 fail: FailPolicy | None = None, **options: Any):
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
        self.fail = fail
        self.errors: list[Exception] = []
        self.started = False
        self.stopped = False
        self._untaken: list[Out] = []
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
        except Exception as exc:
            if self.fail is None:
                raise
            self.errors.append(exc)
            if isinstance(exc, RemoteProtocolError):
                c.malformed += 1
            else:
                c.errors += 1
            verdict = Verdict.PASS if self.fail == "open" else Verdict.DROP
        finally:
            held, self._held = self._held, None
        if not isinstance(verdict, Verdict):
            raise AssertionError(f"process() returned {verdict!r}, not a Verdict")
        self.verdicts.append(verdict)
        if verdict is Verdict.PASS:
            c.frames_out += 1
            c.bytes_out += len(f.data)
            self._log(Out(f, direction, now, False))
        elif verdict is Verdict.DROP:
            c.dropped += 1
        else:
            c.consumed += 1
        for rec in held:
            self._log(rec)
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
        if self._held is None:
            self._log(rec)
        else:
            self._held.append(rec)

    def _log(self, rec: Out) -> None:
        self.out.append(rec)
        self._untaken.append(rec)

    # -- what came out --------------------------------------------------------------------

    def take(self, direction: Direction | None = None) -> list[Out]:
        """The frames that left (toward ``direction``) and were not taken yet, in order;
        frames that went the other way stay for a later ``take``."""
        if direction is None:
            new, self._untaken = self._untaken, []
        else:
            new = [o for o in self._untaken if o.direction is direction]
            self._untaken = [o for o in self._untaken if o.direction is not direction]
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


__all__ = ["MAX_TIMERS_AT_ONE_TIME", "Out", "ServiceHarness", "as_frame", "call_report"]
