"""A running bridge's metrics endpoint: scraped while traffic has passed, its counters
equal the bridge's own snapshot (the ``stopped; {...}`` line logged right after)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, bridge: str) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.labels["bridge"] == bridge
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "bridge")
            out[(s.name, labels)] = s.value
    return out


def counters(m: Samples) -> Samples:
    """Everything but the clock."""
    return {k: v for k, v in m.items() if k[0] != "vtl_uptime_seconds"}


def final_snapshot(stderr: str) -> dict:
    line = [ln for ln in stderr.splitlines() if "stopped; " in ln][-1]
    return json.loads(line.split("stopped; ", 1)[1])


def test_scrape_equals_the_snapshot(net, tmp_path):
    port = free_port()
    vtl = net.start([{"use": "capture", "path": str(tmp_path / "c.pcap")},
                     {"use": "netem", "delay_ms": 1}],
                    metrics=f"127.0.0.1:{port}")
    out = net.guest(["ping", "-c", "10", "-i", "0.1", "-W", "2", PEER_IP], timeout=20).stdout
    assert len(parse_ping_rtts(out)) == 10
    # wait for quiet: two scrapes a second apart with the same counters
    last = counters(scrape(port, net.tag))
    for _ in range(20):
        time.sleep(1.0)
        now = counters(scrape(port, net.tag))
        if now == last:
            break
        last = now
    else:
        pytest.fail("the bridge's counters never settled")
    scraped = scrape(port, net.tag)
    assert vtl.stop() == 0
    assert "Traceback" not in vtl.stderr
    snap = final_snapshot(vtl.stderr)

    def get(name: str, **labels: str) -> float:
        return scraped[(name, frozenset(labels.items()))]

    assert get("vtl_build_info", version=__import__("vtl").__version__) == 1
    assert get("vtl_uptime_seconds") > 1
    for role, c in snap["ports"].items():
        for d in ("rx", "tx"):
            assert get("vtl_port_frames_total", port=role, direction=d) == c[f"{d}_frames"]
            assert get("vtl_port_bytes_total", port=role, direction=d) == c[f"{d}_bytes"]
        assert get("vtl_port_tx_dropped_total", port=role) == c["tx_dropped"]
        assert get("vtl_port_rx_errors_total", port=role) == c["rx_errors"]
    assert snap["ports"]["guest"]["rx_frames"] >= 10  # the pings did pass
    for reason in ("not_for_guest", "malformed", "segmented", "mac_overflow"):
        assert get("vtl_bridge_frames_total", reason=reason) == snap["bridge"][reason]
    assert get("vtl_macs") == snap["bridge"]["macs"] >= 1
    verdicts = {"frames_in": "in", "frames_out": "out", "dropped": "dropped",
                "consumed": "consumed", "injected": "injected"}
    for svc, figures in snap["services"].items():
        for key, verdict in verdicts.items():
            assert get("vtl_service_frames_total", service=svc, verdict=verdict) == figures[key]
        assert get("vtl_service_bytes_total", service=svc, direction="in") == figures["bytes_in"]
        assert get("vtl_service_bytes_total", service=svc, direction="out") == \
            figures["bytes_out"]
        assert get("vtl_service_errors_total", service=svc) == figures["errors"]
        assert get("vtl_service_malformed_total", service=svc) == figures["malformed"]
    capture = snap["services"]["capture"]
    assert capture["frames_in"] >= 20
    assert get("vtl_service_events_total", service="capture", counter="frames_written") == \
        capture["frames_written"]
    # the endpoint stops with the bridge
    with pytest.raises(OSError):
        scrape(port, net.tag)
