"""capture: write the frames that pass this position in the chain to a pcap file.

Synopsis
    [[services]]
    use = "capture"
    path = "/var/tmp/vm1-after-netem.pcap"
    direction = "both"     # both | to_uplink | to_guest
    snaplen = 262144

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
    - Frames carrying virtio-net offload metadata are written as they are, as tcpdump
      on the host's TAP device shows them: a GSO frame appears as one frame of up to
      64 KB, and a frame whose checksum is left to the kernel shows a partial checksum
      (Wireshark flags it as wrong). The virtio-net header itself is not written.
    - The sink's ``write(data, timestamp)`` has no original-length argument, so a
      record cut by ``snaplen`` has its original length equal to its captured length.
      The default snaplen covers the largest GSO frame, so nothing is cut by default.
    - A failure to write propagates to the bridge, which applies the failure policy
      (open by default: the frame still passes).

See also
    ``netem`` (what to look at), tcpdump(8), Click's ToDump element.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vtl import PASS, Direction, Frame, Service, ServiceContext, ServiceOptions, Verdict
from vtl.service import PacketSink


class CaptureOptions(ServiceOptions):
    """Options of the ``capture`` service."""

    path: str = Field(min_length=1, description="pcap file to write (replaced if it exists)")
    direction: Literal["both", "to_uplink", "to_guest"] = Field(
        "both", description="which direction(s) to write")
    snaplen: int = Field(262144, ge=14, le=262144, description="bytes kept of each frame")


class Capture(Service):
    name = "capture"
    summary = "write the frames passing this position in the chain to a pcap file"
    Options = CaptureOptions

    options: CaptureOptions

    def __init__(self, options: CaptureOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self._dirs = {
            "both": frozenset(Direction),
            "to_uplink": frozenset({Direction.TO_UPLINK}),
            "to_guest": frozenset({Direction.TO_GUEST}),
        }[options.direction]
        self._sink: PacketSink | None = None
        self.frames_written = 0
        self.bytes_written = 0

    def start(self, now: float) -> None:
        self._sink = self.ctx.open_pcap(self.options.path)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        sink = self._sink
        if sink is not None and direction in self._dirs:
            snaplen = self.options.snaplen
            data = frame.data
            record = bytes(data) if len(data) <= snaplen else bytes(data[:snaplen])
            sink.write(record, now)
            self.frames_written += 1
            self.bytes_written += len(record)
        return PASS

    def stop(self, now: float) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()

    def report(self) -> dict[str, Any]:
        return {
            "path": self.options.path,
            "direction": self.options.direction,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
        }
