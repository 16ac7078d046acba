"""capture: write the frames that pass this position in the chain to a pcap file.

Synopsis
    [[services]]
    use = "capture"
    path = "/var/tmp/vm1-after-netem.pcap"
    direction = "both"     # both | to_uplink | to_guest
    snaplen = 262144
    segment = true         # write GSO frames as the wire segments they become
    active = true          # false: configured but stopped (start it with vtl ctl ... set)

What it does to frames
    Nothing: every frame PASSes unchanged. Frames travelling in a covered direction
    are written, in the order this service sees them, to a pcap file (Ethernet link
    type), cut to ``snaplen`` bytes. Put it anywhere in the chain (several times, with
    different paths) to see what each service did: a capture first in the list sees
    the guest's frames as sent and the network's frames as finally delivered.

Notes
    - Sans-IO: the file is opened by the bridge (``ctx.open_pcap(path)``) in ``start``
      and closed in ``stop``. Services see monotonic time, so each record is written
      with the monotonic ``now``; the bridge's sink converts it to wall-clock time.
    - Frames carrying virtio-net offload metadata (a GSO super-frame, or a checksum
      left to the receiver) are written, with ``segment = true`` (the default), as the
      wire segments they become: a copy goes through
      :func:`vtl.packet.offload.complete_offloads`, so a 64 KB GSO frame is written as
      its MSS-sized segments with finished checksums, each with the same timestamp, as
      tcpdump inside the guest or on the wire would show them. The passing frame is
      never changed. A frame whose offload metadata cannot be completed (malformed) is
      written as it is. ``frames_written`` counts records, not frames.
    - With ``segment = false`` such frames are written as they are, as tcpdump on the
      host's TAP device shows them: a GSO frame appears as one frame of up to 64 KB,
      and a frame whose checksum is left to the kernel shows a partial checksum
      (Wireshark flags it as wrong). The virtio-net header itself is never written.
    - The sink's ``write(data, timestamp)`` has no original-length argument, so a
      record cut by ``snaplen`` has its original length equal to its captured length.
      The default snaplen covers the largest GSO frame, so nothing is cut by default.
      ``snaplen`` applies to each written segment.
    - A failure to write propagates to the bridge, which applies the failure policy
      (open by default: the frame still passes).
    - At run time (``vtl ctl NAME set capture ...``) ``active``, ``path``,
      ``direction``, ``snaplen``, ``segment`` and ``match`` change without a restart:
      ``active=false`` stops and closes the file, ``active=true`` starts a new capture
      at ``path`` (replacing that file), a new ``path`` moves it, ``match=""`` removes
      the filter. ``frames_written`` counts across captures.

See also
    ``netem`` (what to look at), tcpdump(8), Click's ToDump element.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vtl import (
    PASS,
    Direction,
    Frame,
    PacketError,
    Service,
    ServiceContext,
    ServiceOptions,
    Verdict,
)
from vtl.packet.offload import complete_offloads
from vtl.service import PacketSink

_DIRS = {
    "both": frozenset(Direction),
    "to_uplink": frozenset({Direction.TO_UPLINK}),
    "to_guest": frozenset({Direction.TO_GUEST}),
}


class CaptureOptions(ServiceOptions):
    """Options of the ``capture`` service."""

    path: str = Field(min_length=1, description="pcap file to write (replaced if it exists)")
    direction: Literal["both", "to_uplink", "to_guest"] = Field(
        "both", description="which direction(s) to write")
    snaplen: int = Field(262144, ge=14, le=262144, description="bytes kept of each frame")
    segment: bool = Field(
        True, description="write GSO frames as the wire segments they become, with checksums "
        "finished, as tcpdump inside the guest would see them")
    active: bool = Field(
        True, description="capturing; false: stopped with the file closed (set at run time: "
        "active=true starts a new capture at path, replacing the file)")


class Capture(Service):
    name = "capture"
    summary = "write the frames passing this position in the chain to a pcap file"
    Options = CaptureOptions

    tunable = frozenset({"path", "direction", "snaplen", "segment", "active", "match"})

    options: CaptureOptions

    def __init__(self, options: CaptureOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self._dirs = _DIRS[options.direction]
        self._sink: PacketSink | None = None
        self.frames_written = 0
        self.bytes_written = 0

    def start(self, now: float) -> None:
        if self.options.active:
            self._sink = self.ctx.open_pcap(self.options.path)

    def retune(self, options: CaptureOptions, now: float) -> None:
        """Start (``active=true``), stop (``active=false``: the file is closed, complete)
        or move (a new ``path``) the capture while the bridge runs. The new file is
        opened before the old one closes, so a path that cannot be written changes
        nothing."""
        old = self.options
        moved = options.active and (not old.active or options.path != old.path)
        sink = self.ctx.open_pcap(options.path) if moved else self._sink
        if self._sink is not None and (moved or not options.active):
            self._sink.close()
            self.ctx.log.info("%s: closed %s (%d records)", self.ctx.name, old.path,
                              self.frames_written)
        self._sink = sink if options.active else None
        if moved:
            self.ctx.log.info("%s: capturing to %s", self.ctx.name, options.path)
        self.options = options
        self._dirs = _DIRS[options.direction]

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        sink = self._sink
        if sink is not None and direction in self._dirs:
            vnet = frame.vnet
            if self.options.segment and vnet is not None and not vnet.is_plain:
                try:
                    segments = complete_offloads(frame.copy())
                except PacketError:
                    segments = [frame]  # malformed offload metadata: write it as it is
                for seg in segments:
                    self._write(sink, seg.data, now)
            else:
                self._write(sink, frame.data, now)
        return PASS

    def _write(self, sink: PacketSink, data: bytearray, now: float) -> None:
        snaplen = self.options.snaplen
        record = bytes(data) if len(data) <= snaplen else bytes(data[:snaplen])
        sink.write(record, now)
        self.frames_written += 1
        self.bytes_written += len(record)

    def stop(self, now: float) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()

    def report(self, now: float) -> dict[str, Any]:
        return {
            "path": self.options.path,
            "active": self.options.active,
            "direction": self.options.direction,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
        }
