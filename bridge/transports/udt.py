"""The ``udt`` stream transport: a stream carried over UDT to a peer VTL bridge.

Theory of operation. ``StreamRequest(kind="udt", host, port)`` names the
*peer bridge's* UDT listener (an IPv4 literal or a name; udt4py has no IPv6).
The bytes travel over UDT, framed by :mod:`.udtwire`, and the peer bridge
hands them to its own service as an inbound stream (``listen_streams``) with
the original flow. The I/O is done by a :class:`~.udthub.Hub` (one per
transport instance, so per stream manager; started on first use, stopped at
manager stop); the manager gets the local end of a loopback TCP pair and runs
:class:`RecordHandshake` on it, which reads the hub's status records: the
stream is connected only once the far service accepted, and closes with the
far side's reason (``refused``, ``timeout``, ...) when it refused.

The guest's connection travels as ``StreamRequest.flow`` (required: a
:class:`~vtl.stream.StreamFlow` of a TCP key, MACs optional); the far service
gets it as ``offer.flow``.

Options (``StreamRequest.options`` and, for the listener, ``ListenRequest.options``):

- ``mss``: UDT packet size (``UDT_MSS``), default 1500;
- ``window``: bytes; UDT send/receive buffers and flight window, and the
  per-stream credit window of the framing; default 8 MiB;
- ``max_bw``: bytes per second one UDT connection may send (``UDT_MAXBW``),
  default 0: no cap. libudt's native control overshoots a rate-limited path;
  a cap at the path's rate keeps it under the bottleneck;
- ``congestion``: the UDT congestion control, ``"vtl"`` (default: model-based,
  finds the bottleneck rate itself and tolerates random loss) or ``"native"``
  (libudt's DAIMD); see :mod:`.udtcc`;
- ``mux``: carry the stream inside one shared UDT connection per (peer,
  mss, window, max_bw, congestion) instead of a UDT connection of its own (default False).

Failures name the peer bridge: ``UDT peer 10.0.0.2:9000 could not be
reached: ...`` (reason ``timeout`` when it did not answer within
``timeout_s``, ``unreachable`` when libudt gave up first), ``UDT peer
10.0.0.2:9000: <far service's message>`` with the far side's reason.
"""

from __future__ import annotations

import errno
import socket

from vtl.bridge.transports.base import (
    Handshake,
    HandshakeStep,
    InboundStream,
    Transport,
    TransportError,
    TransportListener,
)
from vtl.bridge.transports.udtcc import CONGESTION, DEFAULT
from vtl.bridge.transports.udtstate import FAIL, MAGIC, OK, RECORD, UP, Tuning
from vtl.bridge.transports.udtwire import MAX_WINDOW, REASONS, check_flow

from vtl.errors import LocalProtocolError
from vtl.stream import CloseReason, ListenRequest, StreamRequest

DEFAULT_MSS = 1500
DEFAULT_WINDOW = 8 << 20
MIN_WINDOW = 64 << 10


def _int_opt(opts, key: str, default: int, lo: int, hi: int) -> int:
    v = opts.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise LocalProtocolError(f"udt option {key}={v!r}: give an integer in {lo}..{hi}")
    return v


class RecordHandshake(Handshake):
    """Reads the hub's status records: UP*, then OK (connected) or FAIL."""

    def __init__(self, label: str, timeout_s: float):
        self.label = label
        self.timeout_s = timeout_s
        self.reached = False
        self._fail: CloseReason | None = None

    def start(self) -> HandshakeStep:
        return HandshakeStep(want=RECORD.size)

    def feed(self, data: bytes) -> HandshakeStep:
        if self._fail is not None:
            raise TransportError(self._fail, data.decode("utf-8", "replace"))
        magic, code, idx, length = RECORD.unpack(data)
        if magic != MAGIC or code not in (UP, OK, FAIL):
            raise TransportError("error", f"UDT peer {self.label}: bad status record")
        if code == UP:
            self.reached = True
            return HandshakeStep(want=RECORD.size)
        if code == OK:
            return HandshakeStep()
        reason: CloseReason = REASONS[idx - 1] if 1 <= idx <= len(REASONS) else "error"
        if length:
            self._fail = reason
            return HandshakeStep(want=length)
        raise TransportError(reason, f"UDT peer {self.label}: the stream failed")

    def failed(self, reason: CloseReason, message: str) -> tuple[CloseReason, str]:
        if reason == "timeout":
            if self.reached:
                return reason, (f"UDT peer {self.label}: no answer to the stream open within "
                                f"{self.timeout_s:g} s")
            # never reached: the peer bridge is down or has no listener (services fall
            # back on this reason; "timeout" means the peer answered but its far side did not)
            return "unreachable", (f"UDT peer {self.label} could not be reached: no answer within "
                            f"{self.timeout_s:g} s")
        return reason, f"UDT peer {self.label}: {message}"


class _UdtListener:
    def __init__(self, hub, rec):
        self._hub, self._rec = hub, rec
        self.address = rec.address

    def close(self) -> None:
        self._hub.unlisten(self._rec)


class UdtTransport(Transport):
    """Streams to and from peer bridges over UDT (see the module docstring)."""

    kind = "udt"
    options = frozenset({"mss", "window", "max_bw", "congestion", "mux"})

    def __init__(self) -> None:
        self._hub = None

    def hub(self):
        if self._hub is None:
            from vtl.bridge.transports.udthub import Hub
            self._hub = Hub()
        return self._hub

    def _settings(self, opts) -> Tuning:
        cc = opts.get("congestion", DEFAULT)
        if cc not in CONGESTION:
            raise LocalProtocolError(f"udt option congestion={cc!r}: give one of "
                                     f"{', '.join(CONGESTION)}")
        return Tuning(_int_opt(opts, "mss", DEFAULT_MSS, 76, 65536),
                      _int_opt(opts, "window", DEFAULT_WINDOW, MIN_WINDOW, MAX_WINDOW),
                      _int_opt(opts, "max_bw", 0, 0, 1 << 40), cc)

    def check(self, request: StreamRequest) -> None:
        super().check(request)
        opts = request.options
        if request.flow is None:
            raise LocalProtocolError("udt stream: StreamRequest.flow is required")
        check_flow(request.flow)
        self._settings(opts)
        if not isinstance(opts.get("mux", False), bool):
            raise LocalProtocolError(f"udt option mux={opts['mux']!r}: give a bool")

    def connect(self, request: StreamRequest, family: int, sockaddr: tuple) -> socket.socket:
        if family != socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "UDT (udt4py) supports IPv4 peers only")
        opts = request.options
        assert request.flow is not None  # check() said so
        return self.hub().open((sockaddr[0], sockaddr[1]), request.flow, self._settings(opts),
                               bool(opts.get("mux", False)))

    def connect_failed(self, request: StreamRequest, reason: CloseReason,
                       message: str) -> tuple[CloseReason, str]:
        return reason, f"UDT peer {request.host}:{request.port} could not be reached: {message}"

    def handshake(self, request: StreamRequest) -> Handshake:
        return RecordHandshake(f"{request.host}:{request.port}", request.timeout_s)

    def listen(self, request: ListenRequest, deliver) -> TransportListener:
        unknown = set(request.options) - {"mss", "window", "max_bw", "congestion"}
        if unknown:
            raise LocalProtocolError(f"udt listen: unknown option(s) {sorted(unknown)} "
                                     "(known: mss, window, max_bw, congestion)")
        tuning = self._settings(request.options)
        hub = self.hub()

        def arrive(a) -> None:
            label = f"{a.peer[0]}:{a.peer[1]}"

            def accept() -> Handshake:
                hub.accept(a.pipe)
                return RecordHandshake(label, 10.0)

            deliver(InboundStream(a.sock, a.peer, a.meta, accept,
                                  lambda reason, message: hub.refuse(a.pipe, reason, message),
                                  flow=a.flow))

        return _UdtListener(hub, hub.listen(request.host.strip("[]"), request.port, tuning,
                                            arrive))

    def close(self) -> None:
        if self._hub is not None:
            self._hub.stop()
            self._hub = None


__all__ = ["RecordHandshake", "UdtTransport"]
