"""Test doubles for sans-IO service tests: a context, sinks and a clock driver.

Imported by the tests of this folder as ``services_fakes`` (registered by the
``conftest.py`` beside this file, under a name that cannot clash with another
folder's helpers).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from scapy.layers.inet import IP, UDP, Ether
from scapy.utils import RawPcapWriter

from vtl import Direction, Frame, Service, ServiceCounters


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
        self._writer = RawPcapWriter(str(path), linktype=1, sync=True)
        self._writer._write_header(None)
        self.closed = False

    def write(self, data: bytes, timestamp: float) -> None:
        sec = int(timestamp)
        self._writer.write_packet(bytes(data), sec=sec, usec=int((timestamp - sec) * 1e6))

    def close(self) -> None:
        self._writer.close()
        self.closed = True


class FakeContext:
    """Implements :class:`vtl.ServiceContext` for tests.

    ``emitted`` holds ``(frame, direction)`` tuples in emission order and
    ``emitted_at`` the clock (``self.now``) at each emission; test drivers set
    ``now`` before calling hooks.
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

    def emit(self, frame: Frame, direction: Direction) -> None:
        assert isinstance(frame, Frame)
        self.counters.injected += 1
        self.emitted.append((frame, direction))
        self.emitted_at.append(self.now)

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

    def extra(self, key: str) -> int:
        return self.counters.extra.get(key, 0)


def run_timers(service: Service, ctx: FakeContext, until: float) -> None:
    """Call ``on_timer`` at each ``poll_at`` up to ``until``, as the bridge would."""
    while (t := service.poll_at()) is not None and t <= until:
        ctx.now = t
        service.on_timer(t)
    ctx.now = until


def udp_frame(size: int = 100, sport: int = 1000, payload_tag: int = 0) -> Frame:
    """A valid Ethernet/IPv4/UDP frame of ``size`` bytes (>= 42)."""
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
