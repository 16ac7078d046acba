"""`vtl ctl NAME reload` on a real `vtl run` with a real kernel guest: services are added
(capture, then pep) and removed under a long-lived connection and a 1 ms ping flood; the
connection survives, no ping is lost, the next connection is split by pep, and removing
pep resets the connection it held and says so in the log."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, TCP
from scapy.utils import rdpcap
from tcptools import download, slow_reader
from tcptools import expected_sha256 as expected
from vtlnet import PEER_IP, Net, to_toml, wait_for
from vtlnet import ctl_json as ctl

pytestmark = pytest.mark.integration

LONG = 24 << 20  # the long-lived connection: 1 MiB read, a stall, then the rest
PINGS = 20_000  # at 1 ms: 20 s or more, across every reload


def write_config(net: Net, path: Path, services: list[dict[str, Any]], sock: Path) -> Path:
    path.write_text(to_toml(net.config(services, control=str(sock))))
    return path


def ping_loss(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out[-500:]
    return int(m.group(1)), int(m.group(2))


def test_reload_adds_capture_then_pep_and_removing_pep_resets(net: Net, tmp_path: Path):
    net.host_path()
    sock = tmp_path / "ctl.sock"
    pcap = tmp_path / "live.pcap"
    bridge = net.start([], control=str(sock))  # the empty chain: frames take the fast path
    with_capture = write_config(net, tmp_path / "capture.toml",
                                [{"use": "capture", "path": str(pcap)}], sock)
    with_pep = write_config(net, tmp_path / "pep.toml",
                            [{"use": "capture", "path": str(pcap)}, {"use": "pep"}], sock)
    without_pep = write_config(net, tmp_path / "nopep.toml",
                               [{"use": "capture", "path": str(pcap)}], sock)
    pid = ctl(sock, "status")["pid"]
    flood = net.topo.spawn(net.guest_ns, ["ping", "-q", "-n", "-i", "0.001", "-c", str(PINGS),
                                          "-W", "2", "-w", "60", PEER_IP],
                           stdout=subprocess.PIPE, text=True)
    steps: dict[str, Any] = {}

    def reloads() -> None:
        """Runs while the long-lived connection is open (its client is not reading)."""
        t0 = time.monotonic()
        time.sleep(1.0)
        steps["capture"] = ctl(sock, "reload", str(with_capture))
        assert wait_for(lambda: ctl(sock, "counters")["services"]["capture"][
            "frames_written"] > 100, 10), "frames are captured"
        time.sleep(1.0)
        steps["pep"] = ctl(sock, "reload", str(with_pep))
        assert download(net, 1 << 20, seed=31, timeout=60) == expected(1 << 20, 31)
        pep = ctl(sock, "counters")["services"]["pep"]
        steps["pep_bytes"] = pep["bytes_down"]
        # a connection pep holds, stalled; removing pep resets it
        try:
            read = slow_reader(net, 8 << 20, 8.0, during_stall=remove_pep, seed=33,
                               first=256 << 10, timeout=60)
            steps["held"] = f"read {read.bytes} bytes, no reset"
        except AssertionError as exc:
            steps["held"] = str(exc)
        steps["seconds"] = time.monotonic() - t0
        assert flood.poll() is None, "the ping flood lasts across every reload"

    def remove_pep() -> None:
        assert wait_for(lambda: ctl(sock, "connections").get("pep"), 10)
        steps["remove"] = ctl(sock, "reload", str(without_pep))

    long_lived = slow_reader(net, LONG, 24.0, during_stall=reloads, seed=32, timeout=90)
    out, _ = flood.communicate(timeout=90)
    print(f"reloads took {steps['seconds']:.1f} s; ping: {out.strip().splitlines()[-2:]}")

    assert long_lived.ok and long_lived.bytes == LONG, "the long-lived connection survived"
    assert steps["capture"]["added"] == ["capture"] and steps["capture"]["removed"] == []
    assert steps["pep"]["added"] == ["pep"] and steps["pep"]["kept"] == ["capture"]
    assert steps["pep_bytes"] >= 1 << 20, "the next new connection was split by pep"
    assert "ConnectionResetError" in steps["held"], steps["held"]
    assert steps["remove"]["removed"] == ["pep"]
    assert steps["remove"]["reset_connections"] == {"pep": 1}
    assert wait_for(lambda: "pep taken out of the chain; reset the 1 connection it held"
                    in bridge.stderr, 5), bridge.stderr[-2000:]
    sent, received = ping_loss(out)
    assert sent == PINGS and received == sent, f"{sent - received} of {sent} pings lost"
    status = ctl(sock, "status")
    assert status["pid"] == pid, "no restart"
    assert [s["name"] for s in status["services"]] == ["capture"]
    assert status["config"] == str(without_pep)
    assert bridge.stop() == 0
    frames = rdpcap(str(pcap))
    assert sum(1 for f in frames if ICMP in f) > 1000
    assert any(TCP in f and f[TCP].dport == 8080 or TCP in f and f[TCP].sport == 8080
               for f in frames)
