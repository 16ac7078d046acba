"""Relay: one virtual TCP endpoint (facing the VM) joined to an upstream byte stream.

Theory of operation. A :class:`Relay` owns a :class:`~vtl.models.tcp_endpoint.TcpEndpoint`
and the :class:`~vtl.stream.Stream` the bridge opened for it, and moves bytes
between them whenever either side can take more:

- VM to upstream: bytes are read from the endpoint only as far as the stream's
  ``write_room`` allows, so unread bytes stay in the endpoint and its advertised
  window closes: the VM slows to the upstream's pace.
- upstream to VM: a :class:`~vtl.stream.StreamData` chunk goes into the endpoint's
  send buffer; what does not fit is held (at most one chunk) and the stream's
  reading is paused until the endpoint reports :class:`Writable`.

Memory per connection is therefore bounded by the endpoint's two buffers plus
one read chunk (and the bridge's own bounded stream write buffer).

Opening (passive, the VM's SYN): the endpoint waits in LISTEN while the stream
connects; ``StreamConnected`` accepts the SYN, ``refused`` answers RST, and
``timeout`` or ``unreachable`` answer ICMP destination unreachable (which
reasons do is ``icmp_reasons``), and ``prohibited`` (the bridge's egress policy)
ICMP administratively prohibited.

Opening (active, toward the VM on behalf of a remote client): the relay starts
with an endpoint in SYN-SENT and no stream (``Relay(endpoint, connect_deadline=...)``).
Once the VM answered (:attr:`established`), the owner obtains the stream and
hands it over with :meth:`attach`; bytes the VM sent meanwhile wait in the
endpoint. A VM that resets the SYN ends the relay with outcome ``refused``; one
that does not answer by ``connect_deadline`` (or within the endpoint's SYN
retries) with ``timeout``. Closing:
FIN to FIN in both directions, each only after the bytes before it were
delivered; RST to RST (an aborted stream resets the VM's connection and a VM
reset aborts the stream). :attr:`done` turns true once both sides are finished.

What it does not do: the I/O (the bridge does it) or choosing the upstream
(the service does).
"""

from __future__ import annotations

from dataclasses import dataclass

from vtl.models.tcp_endpoint import Aborted, Closed, Connected, TcpEndpoint
from vtl.models.tcp_state import TcpState

from vtl.frame import Frame
from vtl.packet.icmp import ICMP6_ADMIN_PROHIBITED, ICMP_ADMIN_PROHIBITED
from vtl.packet.packet import Packet
from vtl.stream import (
    Stream,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
)


@dataclass(slots=True)
class RelayStats:
    """What one relay moved and how it ended."""

    bytes_up: int = 0  # VM -> upstream
    bytes_down: int = 0  # upstream -> VM
    counted_up: int = 0  # how much of bytes_up the owner's counters already include
    counted_down: int = 0
    outcome: str = ""  # "", "closed", "refused", "timeout", "unreachable", "reset", "error"
    message: str = ""  # what the stream said when it failed


class Relay:
    """Moves bytes between a TCP endpoint and an upstream stream, with back-pressure."""

    __slots__ = ("endpoint", "stream", "pending", "upstream_eof", "upstream_closed",
                 "sent_shutdown", "connected", "stats", "_paused", "endpoint_closed",
                 "icmp_reasons", "established", "endpoint_aborted", "connect_deadline")

    def __init__(self, endpoint: TcpEndpoint, stream: Stream | None = None, *,
                 icmp_reasons: frozenset[str] = frozenset({"timeout", "unreachable"}),
                 connect_deadline: float | None = None):
        """``icmp_reasons``: close reasons before connect that the VM hears as ICMP
        destination unreachable; every other failure to connect is a RST.
        ``connect_deadline``: for an active open, when to give up on the VM's answer."""
        self.endpoint = endpoint
        self.icmp_reasons = icmp_reasons
        self.stream = stream
        self.established = False  # the endpoint's handshake with the VM completed
        self.endpoint_aborted = False
        self.connect_deadline = connect_deadline
        self.pending = b""  # upstream bytes the endpoint could not take yet
        self.upstream_eof = False
        self.upstream_closed = False
        self.endpoint_closed = False
        self.sent_shutdown = False
        self.connected = False
        self.stats = RelayStats()
        self._paused = False

    # -- inputs ----------------------------------------------------------------------

    def on_segment(self, pkt: Packet, now: float) -> None:
        """A segment from the VM for this connection."""
        self.endpoint.receive(pkt, now)
        self.pump(now)

    def on_stream_event(self, event: StreamEvent, now: float) -> None:
        ep = self.endpoint
        if isinstance(event, StreamData):
            self.pending = bytes(self.pending) + event.data if self.pending else event.data
        elif isinstance(event, StreamConnected):
            self.connected = True
            ep.accept(now)
        elif isinstance(event, StreamEnded):
            self.upstream_eof = True
        elif isinstance(event, StreamClosed):
            self.upstream_closed = True
            self._upstream_closed(event, now)
        self.pump(now)  # StreamWritable needs nothing more: the pump writes what fits

    def on_timer(self, now: float) -> None:
        d = self.connect_deadline
        if d is not None and now >= d and not self.established:
            self.connect_deadline = None
            self.stats.outcome = "timeout"
            self.stats.message = "no answer from the guest"
            self.endpoint.abort(now)  # SYN-SENT: nothing to reset; later segments get RST
        else:
            self.endpoint.on_timer(now)
        self.pump(now)

    def poll_at(self) -> float | None:
        t = self.endpoint.poll_at()
        d = self.connect_deadline
        if d is not None and not self.established and (t is None or d < t):
            return d
        return t

    @property
    def wants_stream(self) -> bool:
        """An active open whose VM answered: the owner should :meth:`attach` the stream."""
        return self.stream is None and self.established and not self.endpoint_closed

    def attach(self, stream: Stream, now: float) -> None:
        """Hand over the stream of an active open (see :attr:`wants_stream`)."""
        assert self.stream is None, "a relay has one stream"
        self.stream = stream
        if self.endpoint_aborted and not self.upstream_closed:
            stream.abort(now)
        self.pump(now)

    def abort(self, now: float) -> None:
        """Reset both sides (the service is stopping or over a limit)."""
        self.endpoint.abort(now)
        if self.stream is not None and not self.upstream_closed:
            self.stream.abort(now)
        self.pump(now)

    # -- outputs ------------------------------------------------------------------------

    def take_frames(self) -> list[Frame]:
        out = self.endpoint.outbox
        if out:
            self.endpoint.outbox = []
        return out

    @property
    def done(self) -> bool:
        return self.endpoint_closed and (self.upstream_closed or self.stream is None)

    @property
    def buffered(self) -> int:
        """Bytes this connection holds in VTL's memory."""
        return self.endpoint.buffered + len(self.pending)

    # -- the pump --------------------------------------------------------------------------

    def pump(self, now: float) -> None:
        ep = self.endpoint
        stream = self.stream
        for ev in ep.events:
            if isinstance(ev, Connected):
                self.established = True
                self.connect_deadline = None
            elif isinstance(ev, Aborted):
                self.endpoint_aborted = True
                if not self.stats.outcome:
                    if self.stream is None and not self.established \
                            and ep.syn is None:  # an active open the VM did not take
                        if ev.reason != "local":
                            self.stats.outcome = ("refused" if ev.reason == "reset"
                                                  else "timeout")
                    elif ev.reason == "reset":
                        self.stats.outcome = "reset"
                if stream is not None and not self.upstream_closed:
                    stream.abort(now)
            elif isinstance(ev, Closed):
                self.endpoint_closed = True
                if not self.stats.outcome:
                    self.stats.outcome = "closed"
        ep.events.clear()
        if stream is None or self.upstream_closed and self.endpoint_closed:
            return
        # VM -> upstream, as far as the upstream takes
        if not self.upstream_closed:
            while ep.readable:
                room = stream.write_room
                if room <= 0:
                    break
                data = ep.read(room, now)
                taken = stream.write(data, now)
                self.stats.bytes_up += taken
                if taken < len(data):  # cannot happen when write_room is honest
                    raise AssertionError("stream took less than its write_room")
            if ep.eof and not self.sent_shutdown:
                self.sent_shutdown = True
                stream.shutdown_write(now)
        # upstream -> VM, as far as the endpoint takes
        if self.pending:
            n = ep.send(self.pending, now)
            self.stats.bytes_down += n
            if n:  # the rest as a view: no copy of what the endpoint could not take yet
                self.pending = memoryview(self.pending)[n:] if n < len(self.pending) else b""
        want_pause = bool(self.pending)
        if want_pause != self._paused and not self.upstream_closed:
            self._paused = want_pause
            stream.pause_reading(want_pause, now)
        if self.upstream_eof and not self.pending and not ep.fin_queued:
            ep.shutdown(now)
        if ep.events:  # send/read/shutdown may have produced events
            self.pump(now)

    def _upstream_closed(self, event: StreamClosed, now: float) -> None:
        ep = self.endpoint
        reason = event.reason
        if reason not in ("closed", "local"):
            self.stats.message = event.message
        if not self.connected:
            self.stats.outcome = reason
            if ep.state is TcpState.LISTEN and reason == "prohibited":
                # the bridge's egress policy: administratively prohibited, either family
                ep.unreachable(now, ICMP_ADMIN_PROHIBITED, ICMP6_ADMIN_PROHIBITED)
            elif ep.state is TcpState.LISTEN and reason in self.icmp_reasons:
                ep.unreachable(now)
            else:
                ep.abort(now)  # LISTEN: RST to the held SYN; an active open: RST
            return
        if reason in ("closed", "local"):
            self.upstream_eof = True  # deliver what is pending, then FIN
            return
        self.stats.outcome = reason
        ep.abort(now)
