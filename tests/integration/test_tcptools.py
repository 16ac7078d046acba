"""Self-tests of the TCP test tooling (tcptools); through the empty chain where it needs one."""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import IP, TCP, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap
from tcptools import (
    connect_result,
    download,
    expected_sha256,
    half_close,
    parallel_downloads,
    rss_bytes,
    slow_reader,
    tshark_bad_segments,
    upload,
)
from vtlnet import PEER_IP

MB = 1_000_000


def segment(seq: int, payload: bytes, **tcp: object) -> Ether:
    return (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="10.0.0.1", dst="10.0.0.2")
            / TCP(sport=40000, dport=80, seq=seq, ack=1, flags="PA", **tcp) / Raw(payload))


def test_tshark_bad_segments_finds_only_the_bad_checksum(tmp_path):
    path = tmp_path / "mixed.pcap"
    wrpcap(str(path), [segment(1000, b"a" * 100), segment(1100, b"b" * 100, chksum=0x1234)])
    bad = tshark_bad_segments(path)
    assert len(bad) == 1, bad
    assert bad[0].startswith("frame 2: 10.0.0.1:40000 -> 10.0.0.2:80 seq=1100 len=100")
    assert "checksum" in bad[0].lower()
    good = tmp_path / "good.pcap"
    wrpcap(str(good), [segment(1000 + 100 * i, bytes([i]) * 100) for i in range(5)])
    assert tshark_bad_segments(good) == []


def test_tshark_bad_segments_finds_a_truncated_segment(tmp_path):
    raw = bytearray(bytes(segment(1, b"c" * 100)))
    raw[16:18] = (2000).to_bytes(2, "big")  # IPv4 total length beyond the frame
    path = tmp_path / "trunc.pcap"
    wrpcap(str(path), [segment(0, b""), Ether(bytes(raw))])
    (line,) = tshark_bad_segments(path)
    assert line.startswith("frame 2:") and "length" in line


def test_rss_bytes_of_this_process():
    assert 1 << 20 < rss_bytes(os.getpid()) < 1 << 40
    with pytest.raises(OSError):
        rss_bytes(2**22 + 12345)


@pytest.mark.integration
def test_transfers_through_the_empty_chain(net):
    net.start()
    assert download(net, 20 * MB, seed=3, timeout=60) == expected_sha256(20 * MB, 3)
    assert upload(net, 20 * MB, seed=4, timeout=60) == expected_sha256(20 * MB, 4)
    r = parallel_downloads(net, count=20, size=MB, timeout=60)
    assert r.ok, r.failures()[:5]
    assert r.max_open >= 2


@pytest.mark.integration
def test_half_close_and_connect_outcomes(net):
    net.start()
    got, want = half_close(net, port=9090)
    assert len(want) > 65536 and got == want
    outcome, seconds = connect_result(net, PEER_IP, 9, timeout=5)  # closed: the peer's RST
    assert outcome == "refused" and seconds < 1.0
    download(net, 1000)  # starts the HTTP server
    assert connect_result(net, PEER_IP, 8080, timeout=5)[0] == "connected"
    outcome, seconds = connect_result(net, "10.198.0.99", 80, timeout=8)  # nobody answers ARP
    assert outcome == "unreachable" and seconds < 8, (outcome, seconds)


@pytest.mark.integration
def test_slow_reader_stalls_and_finishes(net):
    vtl = net.start()
    samples: list[int] = []

    def during_stall() -> float:
        t = time.monotonic()
        for _ in range(5):
            samples.append(rss_bytes(vtl.pid))
            time.sleep(0.1)
        return time.monotonic() - t

    t0 = time.monotonic()
    r = slow_reader(net, 20 * MB, stall_s=2.0, during_stall=during_stall, timeout=60)
    assert r.ok and r.bytes == 20 * MB
    assert MB <= r.before_stall < 20 * MB
    assert r.stall_value < 2.0 and len(samples) == 5 and min(samples) > 1 << 20
    assert time.monotonic() - t0 >= 2.0
