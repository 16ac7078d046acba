"""The service API: what a plugin author subclasses.

A service sits at one position in a bridge's chain. Frames from the guest pass
the chain first to last and leave on the uplink; frames from the uplink pass it
last to first and reach the guest. For each frame the service returns a
:class:`Verdict`:

- ``PASS``: the frame (possibly modified in place) goes on to the next service;
- ``DROP``: the frame is discarded and counted as dropped;
- ``CONSUMED``: the service kept the frame (to release it later, answer it, or
  hold it in a model); the bridge forgets it.

A service may inject frames toward either side from its own position with
``ctx.emit(frame, direction)``: what it sends toward the guest passes only the
services between it and the guest.

Services are sans-IO: they never read the clock or touch a socket. ``now``
(seconds, monotonic) comes in as an argument; a service that needs to act
later says when through :meth:`Service.poll_at` and is called back at
:meth:`Service.on_timer`. Anything that needs I/O (a pcap file, an upstream
connection) is obtained through the context the bridge hands in.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, BinaryIO, ClassVar, Literal, NamedTuple, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict

from vtl.compute import DoneHandler, Job
from vtl.datagram import DatagramHandler, DatagramRequest, DatagramSocket
from vtl.frame import Frame
from vtl.hypervisor import VmEventHandler, Watch
from vtl.stream import (
    Listener,
    ListenRequest,
    OfferHandler,
    Stream,
    StreamHandler,
    StreamRequest,
)
from vtl.vxlan import FrameHandler, VxlanLink, VxlanRequest

FailPolicy = Literal["open", "closed"]


class Direction(enum.Enum):
    """Which way a frame travels through the chain."""

    TO_UPLINK = "to_uplink"  # from the guest (VM) toward the network
    TO_GUEST = "to_guest"  # from the network toward the guest

    @property
    def reverse(self) -> Direction:
        return Direction.TO_GUEST if self is Direction.TO_UPLINK else Direction.TO_UPLINK


class Verdict(enum.Enum):
    """What a service decided about a frame."""

    PASS = "pass"
    DROP = "drop"
    CONSUMED = "consumed"


PASS = Verdict.PASS
DROP = Verdict.DROP
CONSUMED = Verdict.CONSUMED


class ServiceOptions(BaseModel):
    """Base class of a service's options.

    Declare each option once, as a typed field with a default and a
    ``Field(description=...)`` help line; the same declaration validates the
    config and feeds ``vtl services``. Unknown keys are errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class HostCheck(NamedTuple):
    """Metadata on an option whose value only the host can judge (a kernel module, a
    device): ``Annotated[str | None, HostCheck("tcp_congestion")]``. Services stay
    sans-IO; the bridge runs the named check when it loads or changes the config and
    reports a problem under the option's key (``vtl.bridge.hostcheck``)."""

    kind: str


def _congestion_name(value: str | None) -> str | None:
    if value is not None and not (1 <= len(value) <= 15 and value.isascii()
                                  and value.replace("_", "").isalnum() and value.islower()):
        raise ValueError(f"{value!r} is not a congestion control name (like \"bbr\" or "
                         "\"cubic\": lower-case letters, digits and _, at most 15)")
    return value


#: The congestion control of the host's TCP sockets a service opens (``TCP_CONGESTION``);
#: None keeps the kernel's default. The bridge checks the kernel has it.
TcpCongestion = Annotated[str | None, AfterValidator(_congestion_name), HostCheck("tcp_congestion")]


@dataclass(slots=True)
class ServiceCounters:
    """Per-service counters, kept by the bridge (and by the service for ``extra``)."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped: int = 0
    consumed: int = 0
    injected: int = 0
    errors: int = 0  # the service raised: a bug, or a failure it did not handle
    malformed: int = 0  # the service raised PacketError/RemoteProtocolError about a frame
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        d = {
            "frames_in": self.frames_in, "bytes_in": self.bytes_in,
            "frames_out": self.frames_out, "bytes_out": self.bytes_out,
            "dropped": self.dropped, "consumed": self.consumed,
            "injected": self.injected, "errors": self.errors, "malformed": self.malformed,
        }
        d.update(self.extra)
        return d


def report_takes_now(service: Service) -> bool:
    """Whether ``service.report`` takes ``now`` (a third-party service written before it
    did has ``report(self)``; the bridge and :mod:`vtl.testing` still call it)."""
    try:
        return bool(inspect.signature(service.report).parameters)
    except (TypeError, ValueError):
        return True


class PacketSink(Protocol):
    """Where a capture-like service writes frames (the bridge provides it)."""

    def write(self, data: bytes, timestamp: float) -> None: ...

    def close(self) -> None: ...


class ServiceContext(Protocol):
    """What the bridge gives each service instance."""

    name: str  # instance name, unique in the chain ("netem", "netem#2", or `name =`)
    log: logging.Logger
    counters: ServiceCounters

    def emit(self, frame: Frame, direction: Direction) -> None:
        """Inject ``frame`` from this service's position toward ``direction``."""

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the service-specific counter ``key``."""

    def open_pcap(self, path: str) -> PacketSink:
        """Open a pcap file for writing (Ethernet link type)."""

    def open_file(self, path: str, mode: str = "wb") -> BinaryIO:
        """Open a local file for the service (the bridge owns the I/O)."""

    def open_stream(self, request: StreamRequest, handler: StreamHandler) -> Stream:
        """Ask the bridge for an upstream byte stream (see :mod:`vtl.stream`)."""

    def listen_streams(self, request: ListenRequest, on_offer: OfferHandler) -> Listener:
        """Take inbound streams at ``request``'s address; each arrives as an offer
        (``on_offer(offer, now)``, under the chain lock). Raises OSError when the
        address cannot be bound."""

    def compile_filter(self, expression: str) -> Callable[[bytes | bytearray], bool]:
        """A libpcap filter expression compiled for Ethernet frames (the bridge's
        :class:`~vtl.bridge.filter.MatchFilter`): call it with a frame's bytes. Raises
        :class:`~vtl.errors.ConfigError` for an expression libpcap refuses."""

    def pin_mac(self, mac: bytes, until: float | None) -> None:
        """Keep delivering frames for the guest's ``mac`` until ``until`` (monotonic
        seconds; None: until pinned again), however long the guest has been silent: the
        bridge forgets a MAC after ``mac_aging_s`` without a frame from it, and a paused
        VM sends none. At most 64 pins per bridge."""

    def watch_qmp(self, path: str, on_event: VmEventHandler) -> Watch:
        """Follow the QEMU monitor at unix socket ``path`` (see :mod:`vtl.hypervisor`):
        ``on_event(event, now)`` is called under the chain lock; reconnects when QEMU
        restarts; stops at chain stop."""

    def open_datagram(self, request: DatagramRequest, handler: DatagramHandler
                      ) -> DatagramSocket:
        """Bind a UDP socket of the host at ``request``'s address (see
        :mod:`vtl.datagram`): ``handler(data, source, now)`` is called for each datagram
        under the chain lock; ``send(parts, dest)`` on the handle sends without blocking.
        Raises :class:`~vtl.errors.SetupError` when the address cannot be bound; the
        socket closes at chain stop."""

    def open_vxlan(self, request: VxlanRequest, handler: FrameHandler) -> VxlanLink:
        """Create a kernel VXLAN device for the service (see :mod:`vtl.vxlan`):
        ``send(frame, remote)`` on the handle hands a frame to the kernel, which
        encapsulates and segments it; ``handler(frame, now)`` gets the decapsulated
        frames under the chain lock. Raises :class:`~vtl.errors.SetupError` when the
        device or its filter cannot be made; removed at chain stop."""

    def compute(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: DoneHandler
                ) -> Job | None:
        """Run ``fn(*args)`` in one of the bridge's worker processes, off the forwarding
        threads (see :mod:`vtl.compute`): ``fn`` is a module-level function, ``args`` a
        tuple of picklable values. ``on_done(result, now)`` is called under the chain
        lock once it returned, with what it returned or the exception it raised (or the
        one that kept it from running). Returns the :class:`~vtl.compute.Job`, or None
        when the service already has :data:`~vtl.compute.MAX_PENDING` jobs; never
        blocks. Pending jobs are withdrawn at chain stop (no ``on_done`` after it)."""


class Service:
    """Base class of every VTL service. Subclass it, set the class attributes,
    override what you need; every hook has a harmless default."""

    #: the name used in config (`use = "..."`)
    name: ClassVar[str] = ""
    #: one line for `vtl services`
    summary: ClassVar[str] = ""
    #: the options model (a :class:`ServiceOptions` subclass)
    Options: ClassVar[type[ServiceOptions]] = ServiceOptions
    #: failure policy when the config does not say: security services use "closed"
    default_fail: ClassVar[FailPolicy] = "open"
    #: a service that must see every frame and fail closed (an anonymizer): the
    #: config refuses ``match`` and ``fail = "open"`` for it
    airtight: ClassVar[bool] = False
    #: actions the control socket can ask of the service (``vtl ctl NAME ACTION``),
    #: name -> a help line; carried out by :meth:`act`
    actions: ClassVar[dict[str, str]] = {}
    #: options that may change while the bridge runs (``vtl ctl NAME set``, or a
    #: ``reload`` that changes only these): the bridge validates the new options with
    #: :attr:`Options` and calls :meth:`retune`. ``"match"`` here lets the slot's
    #: ``match`` filter change too. Any other change replaces the service by a new
    #: instance (its state, and the connections it holds, are lost).
    tunable: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Any, ctx: ServiceContext):
        self.options = options
        self.ctx = ctx

    def start(self, now: float) -> None:
        """Called once, after every port is open, before the first frame."""

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        """Decide about one frame. The default passes everything."""
        return Verdict.PASS

    def poll_at(self) -> float | None:
        """When this service next needs :meth:`on_timer` (monotonic seconds), or None."""
        return None

    def on_timer(self, now: float) -> None:
        """Called when ``now`` has reached :meth:`poll_at`."""

    def retune(self, options: Any, now: float) -> None:
        """Take new, already validated options that differ from :attr:`options` only in
        keys listed in :attr:`tunable`; keep the state (held frames, connections). Do
        whatever can fail first: if this raises, the bridge reports the error and the
        service must be left running with its old options. The default sets
        ``self.options``."""
        self.options = options

    def act(self, action: str, now: float) -> dict[str, Any]:
        """Carry out one of :attr:`actions` (``vtl ctl NAME ACTION``); what it did. An
        exception is the request's error."""
        raise NotImplementedError(f"{self.name} has no actions")

    def drain(self, now: float) -> None:
        """Called when a reload takes the service out of a running chain, just before
        :meth:`stop`: emit what it holds that should still be delivered (frames it
        delays). The default does nothing."""

    def stop(self, now: float) -> None:
        """Called once when the bridge stops, or when a reload removes or replaces the
        service; release what the service holds (reset the connections it terminates)."""

    def report(self, now: float) -> dict[str, Any]:
        """Service-specific figures for summaries at ``now`` (counters are added by the
        bridge)."""
        return {}

    def connections(self, now: float) -> list[dict[str, Any]]:
        """The connections the service holds at ``now``, one dict each (flow, state, age,
        bytes, upstream), for ``vtl ctl NAME connections``; none by default."""
        return []
