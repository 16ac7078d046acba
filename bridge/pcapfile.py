"""Pcap files written for services (``ctx.open_pcap``), with scapy's writer.

Services stamp frames with the bridge's monotonic ``now``; the sink turns that
into wall-clock time with an offset taken when the file is opened.
"""

from __future__ import annotations

import time
from pathlib import Path

from vtl.errors import SetupError


class PcapSink:
    """An Ethernet (DLT_EN10MB) pcap file, flushed on close."""

    def __init__(self, path: str | Path, snaplen: int = 262144):
        from scapy.utils import RawPcapWriter  # a real pcap writer; not on the forwarding path

        self.path = Path(path)
        self.frames = 0
        self._offset = time.time() - time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = RawPcapWriter(str(self.path), linktype=1, snaplen=snaplen, sync=False)
            self._writer._write_header(None)
        except OSError as exc:
            raise SetupError(
                f"cannot write capture file {str(self.path)!r}: {exc.strerror}") from None

    def write(self, data: bytes, timestamp: float) -> None:
        wall = timestamp + self._offset
        sec = int(wall)
        self._writer.write_packet(bytes(data), sec=sec, usec=int((wall - sec) * 1_000_000))
        self.frames += 1

    def close(self) -> None:
        self._writer.close()
