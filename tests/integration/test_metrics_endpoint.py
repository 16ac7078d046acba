"""A running bridge's metrics endpoint: scraped once traffic has passed and the counters
have settled, its counters equal the bridge's own snapshot (the ``stopped; {...}`` line
logged right after), and it stops with the bridge."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tcptools import connect_result, download
from tcptools import expected_sha256 as expected
from vtl.bridge.topology import parse_ping_rtts
from vtlnet import PEER_IP, Net, VtlProcess, to_toml, wait_for

import vtl

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
VERDICTS = {"frames_in": "in", "frames_out": "out", "dropped": "dropped",
            "consumed": "consumed", "injected": "injected"}
GAUGES = {"connections_active", "connections_closing", "buffered_bytes",
          "buffered_max_per_connection", "tombstones", "passthrough_active", "peers_down",
          "dns_pending"}


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
    return {k: v for k, v in m.items() if k[0].endswith("_total")}


def scrape_settled_then_stop(net: Net, vtl: VtlProcess, port: int) -> tuple[Samples, dict]:
    """A scrape once two scrapes a second apart show the same counters, and the bridge's
    next ``stats {...}`` snapshot logged after it (the final ``stopped`` one has no
    streams: they are closed by then); the endpoint is gone after the stop."""
    last = counters(scrape(port, net.tag))
    for _ in range(20):
        time.sleep(1.0)
        scraped = scrape(port, net.tag)
        if counters(scraped) == last:
            break
        last = counters(scraped)
    else:
        pytest.fail("the bridge's counters never settled")
    seen = len(vtl.lines)
    assert wait_for(lambda: any("stats " in ln for ln in vtl.lines[seen:]), timeout=5)
    line = next(ln for ln in vtl.lines[seen:] if "stats " in ln)
    assert vtl.stop() == 0
    assert "Traceback" not in vtl.stderr
    with pytest.raises(OSError):
        scrape(port, net.tag)
    return scraped, json.loads(line.split("stats ", 1)[1])


def expected_counters(snap: dict[str, Any]) -> Samples:
    """The counter samples the snapshot should show up as, written out independently."""
    want: Samples = {}

    def put(name: str, value: float, **labels: str) -> None:
        want[(name, frozenset(labels.items()))] = value

    for role, c in snap["ports"].items():
        for d in ("rx", "tx"):
            put("vtl_port_frames_total", c[f"{d}_frames"], port=role, direction=d)
            put("vtl_port_bytes_total", c[f"{d}_bytes"], port=role, direction=d)
        put("vtl_port_tx_dropped_total", c["tx_dropped"], port=role)
        put("vtl_port_rx_errors_total", c["rx_errors"], port=role)
    for reason in ("not_for_guest", "malformed", "segmented", "mac_overflow"):
        put("vtl_bridge_frames_total", snap["bridge"][reason], reason=reason)
    for svc, figures in snap["services"].items():
        for key, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in VERDICTS:
                put("vtl_service_frames_total", value, service=svc, verdict=VERDICTS[key])
            elif key in ("bytes_in", "bytes_out"):
                put("vtl_service_bytes_total", value, service=svc, direction=key[6:])
            elif key in ("errors", "malformed"):
                put(f"vtl_service_{key}_total", value, service=svc)
            elif key in GAUGES:
                pass  # figures that go up and down
            else:
                put("vtl_service_events_total", value, service=svc, counter=key)
    for key, value in snap["streams"].items():
        if key != "open":
            name = key if key.endswith("_total") else f"{key}_total"
            put(f"vtl_stream_{name}", value)
    for cls, value in snap["egress"].get("refused_by_class", {}).items():
        put("vtl_egress_refused_total", value, **{"class": cls})
    return want


def check(scraped: Samples, snap: dict[str, Any]) -> None:
    want = expected_counters(snap)
    assert want.keys() == counters(scraped).keys()
    for key, value in want.items():
        assert scraped.get(key) == value, key
    assert scraped[("vtl_macs", frozenset())] == snap["bridge"]["macs"] >= 1
    assert scraped[("vtl_build_info", frozenset({("version", vtl.__version__)}))] == 1
    assert scraped[("vtl_uptime_seconds", frozenset())] > 1


def test_scrape_equals_the_snapshot(net: Net, tmp_path) -> None:
    port = free_port()
    bridge = net.start([{"use": "capture", "path": str(tmp_path / "c.pcap")},
                        {"use": "netem", "delay_ms": 1}],
                       metrics=f"127.0.0.1:{port}", stats_interval_s=0.5)
    out = net.guest(["ping", "-c", "10", "-i", "0.1", "-W", "2", PEER_IP], timeout=20).stdout
    assert len(parse_ping_rtts(out)) == 10
    scraped, snap = scrape_settled_then_stop(net, bridge, port)
    check(scraped, snap)
    assert snap["ports"]["guest"]["rx_frames"] >= 10  # the pings did pass
    capture = snap["services"]["capture"]
    assert capture["frames_in"] >= 20
    assert scraped[("vtl_service_events_total",
                    frozenset({("service", "capture"), ("counter", "frames_written")}))] == \
        capture["frames_written"] > 0


def test_pep_connections_and_streams(net: Net) -> None:
    port = free_port()
    net.host_path()
    bridge = net.start([{"use": "pep", "connect_timeout_s": 2.0}],
                       metrics=f"127.0.0.1:{port}", stats_interval_s=0.5)
    size = 2 << 20
    assert download(net, size, seed=5) == expected(size, 5)
    assert connect_result(net, PEER_IP, 9)[0] == "refused"
    scraped, snap = scrape_settled_then_stop(net, bridge, port)
    check(scraped, snap)
    pep = snap["services"]["pep"]
    assert pep["connections_opened"] >= 1 and pep["bytes_down"] >= size
    assert snap["streams"]["opened_total"] >= 2
    for state in ("active", "closing"):
        assert scraped[("vtl_connections",
                        frozenset({("service", "pep"), ("state", state)}))] == \
            pep[f"connections_{state}"]


def test_a_taken_address_stops_the_bridge_at_start(net: Net) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = net.tmp / "taken.toml"
        path.write_text(to_toml(net.config(metrics=f"127.0.0.1:{port}")))
        proc = VtlProcess(path)
        net.bridges.append(proc)
        assert proc.proc.wait(20) == 1
    proc.stop()
    assert "metrics: cannot listen on 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and " ready" not in proc.stderr
