"""Live retune of a real bridge (issue 12): `vtl ctl set netem delay_ms=80` applied while
the guest's kernel downloads 100 MB takes the ping RTT from about 40 ms to about 160 ms
with no restart (same pid, same TAP, counters not reset), and the download completes
intact; a bad `set` exits 1 with an error naming the key and changes nothing."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tcptools import download, ensure_http_server
from tcptools import expected_sha256 as expected
from vtl.bridge.ctl import request
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP, Net, wait_for
from vtlnet import ctl_json as ctl
from vtlnet import vtl_cli as vtl

pytestmark = pytest.mark.integration

SIZE = 100 << 20  # the 100 MB
SEED = 12
UNDER_WAY = 1 << 20  # bytes in on the uplink before the retune: the download is running


def ping_rtts(net: Net, count: int = 10) -> list[float]:
    """RTTs in ms of ``count`` pings guest -> peer at 0.1 s interval (at most one lost)."""
    out = net.guest(["ping", "-n", "-c", str(count), "-i", "0.1", "-W", "3", PEER_IP],
                    timeout=30, check=False).stdout
    rtts = parse_ping_rtts(out)
    assert len(rtts) >= count - 1, out
    return rtts


def uplink_rx(sock: Path) -> int:
    """Bytes the bridge has read on its uplink port (the download's data come in there);
    asked in-process, not through the CLI, to poll faster than a download moves."""
    return request(sock, "counters")["ports"]["uplink"]["rx_bytes"]


def tap_ifindex(net: Net) -> str:
    """The guest TAP's ifindex: a bridge that closed and reopened its port would change it."""
    return net.guest(["cat", f"/sys/class/net/{net.tap}/ifindex"]).stdout.strip()


def netem_config(sock: Path) -> dict[str, Any]:
    return ctl(sock, "counters")["services"]["netem"]["config"]


def test_set_netem_delay_during_a_100mb_download(net: Net, tmp_path: Path) -> None:
    sock = tmp_path / f"{net.tag}.sock"
    bridge = net.start([{"use": "netem", "delay_ms": 20}], control=str(sock))
    ensure_http_server(net)
    status0 = ctl(sock, "status")
    assert status0["pid"] == bridge.pid and [s["name"] for s in status0["services"]] == ["netem"]
    ifindex = tap_ifindex(net)
    assert netem_config(sock)["delay_ms"] == 20

    before = ping_rtts(net)
    assert 35.0 <= statistics.median(before) <= 55.0, before

    result: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            result["sha"] = download(net, SIZE, seed=SEED, timeout=90)
        except Exception as exc:  # reported by the assertion below
            result["error"] = repr(exc)
        result["seconds"] = time.monotonic() - t0

    base = uplink_rx(sock)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: uplink_rx(sock) - base > UNDER_WAY, 20, 0.02), \
            f"the download never got under way: {result}"
        answer = ctl(sock, "set", "netem", "delay_ms=80")
        moved_at_set = uplink_rx(sock) - base
        running_at_set = t.is_alive()
        during = ping_rtts(net)
        running_after_ping = t.is_alive()
    finally:
        t.join(120)
    assert not t.is_alive(), "the download did not end"
    assert answer == {"service": "netem", "options": {"delay_ms": 80}}, answer
    assert running_at_set and moved_at_set < SIZE, \
        f"the retune came after the download ({moved_at_set} bytes moved)"
    assert result.get("sha") == expected(SIZE, SEED), f"the download completes intact: {result}"

    after = ping_rtts(net)
    figures = (f"before {before}, during {during} (download running after: "
               f"{running_after_ping}), after {after}, download {result['seconds']:.1f} s")
    print(f"live retune: {figures}, retuned after {moved_at_set >> 20} MB")
    assert 145.0 <= statistics.median(during) <= 185.0, figures
    assert 145.0 <= statistics.median(after) <= 185.0, figures

    status1 = ctl(sock, "status")
    assert status1["pid"] == bridge.pid == status0["pid"], "no restart"
    assert status1["uptime_s"] > status0["uptime_s"] + 1.0
    assert bridge.proc.poll() is None and tap_ifindex(net) == ifindex, "the ports stayed open"
    config = netem_config(sock)
    assert config["delay_ms"] == 80, config
    assert "set netem delay_ms=80" in bridge.stderr

    # bad requests: exit 1, an error naming the key, nothing changed
    bad = {  # the words after `set`: what the error must say
        ("netem", "delay_ms=-5"): ["netem.delay_ms", "greater than or equal to 0"],
        ("netem", "delay_ms=30", "loss=2"): ["netem.loss"],  # the good key waits too
        ("netem", "match=tcp"): ["netem.match", "cannot change while the bridge runs"],
        ("netem", "no_such_key=1"): ["netem.no_such_key", "unknown option"],
        ("pep", "delay_ms=1"): ["no service named 'pep'"],
    }
    for args, says in bad.items():
        proc = vtl("ctl", "--socket", str(sock), "set", *args, "--json", check=False)
        assert proc.returncode == 1 and proc.stdout == "", (args, proc.returncode, proc.stdout)
        assert all(s in proc.stderr for s in says), (args, proc.stderr)
    assert netem_config(sock) == config, "a refused set changes nothing"
    assert ctl(sock, "status")["pid"] == bridge.pid
    still = ping_rtts(net, 5)
    assert 145.0 <= statistics.median(still) <= 185.0, still
    assert bridge.stop() == 0
