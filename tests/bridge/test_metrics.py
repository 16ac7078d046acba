"""The Prometheus collector and endpoint over a bridge's snapshot."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from vtl.bridge.config import parse_config
from vtl.bridge.metrics import BridgeCollector, MetricsServer, parse_address

from vtl.errors import ConfigError, SetupError

SNAPSHOT = {
    "bridge": {"not_for_guest": 3, "malformed": 1, "segmented": 7, "mac_overflow": 2,
               "macs": 5},
    "ports": {
        "guest": {"rx_frames": 10, "rx_bytes": 1000, "tx_frames": 20, "tx_bytes": 2000,
                  "tx_dropped": 1, "rx_errors": 0},
        "uplink": {"rx_frames": 21, "rx_bytes": 2100, "tx_frames": 9, "tx_bytes": 900,
                   "tx_dropped": 0, "rx_errors": 4},
    },
    "services": {
        "pep": {"frames_in": 30, "bytes_in": 3000, "frames_out": 25, "bytes_out": 2500,
                "dropped": 2, "consumed": 3, "injected": 4, "errors": 1, "malformed": 6,
                "connections_opened": 8, "bytes_up": 12345, "connections_active": 2,
                "connections_closing": 1, "buffered_bytes": 512, "tombstones": 3},
        "capture": {"frames_in": 9, "bytes_in": 900, "frames_out": 9, "bytes_out": 900,
                    "dropped": 0, "consumed": 0, "injected": 0, "errors": 0, "malformed": 0,
                    "path": "/tmp/x.pcap", "frames_written": 9, "flag": True,
                    "directions": {"to_uplink": {"held": 1}}},
    },
    "streams": {"open": 2, "opened_total": 8, "failed_total": 1, "refused_by_policy": 3,
                "bytes_up": 12345, "bytes_down": 54321},
    "egress": {"refused": 3, "refused_by_class": {"loopback": 2, "link-local": 1},
               "own_prefixes": 4, "refreshes": 1},
    "datagrams": {"tunnel 10.63.0.1:4789": {
        "rx": 40, "rx_bytes": 58000, "rx_oversize": 1, "rx_errors": 2, "tx": 30,
        "tx_bytes": 43500, "tx_dropped": 3, "rx_kernel_drops": 5, "rcvbuf": 8388608},
        "tunnel vtlvx42": {"rx": 7, "rx_bytes": 700, "tx": 9, "tx_bytes": 900,
                           "tx_dropped": 0, "unknown_peer": 11, "bad_flags": 12,
                           "bad_vni": -1}},
}


class Fake:
    def __init__(self, snap: dict[str, object]):
        self.snap = snap
        self.calls = 0

    def snapshot(self) -> dict[str, object]:
        self.calls += 1
        return self.snap


def scrape(snap: dict[str, object]) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(Fake(snap), "vm1"))
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        assert re.fullmatch(r"vtl_[a-z_]+", fam.name), fam.name
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            assert s.labels["bridge"] == "vm1"
            key = (s.name, frozenset((k, v) for k, v in s.labels.items() if k != "bridge"))
            assert key not in out, key
            out[key] = s.value
    return out


def get(m: dict, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


def test_values_equal_the_snapshot() -> None:
    m = scrape(SNAPSHOT)
    for port, c in SNAPSHOT["ports"].items():
        for d in ("rx", "tx"):
            assert get(m, "vtl_port_frames_total", port=port, direction=d) == c[f"{d}_frames"]
            assert get(m, "vtl_port_bytes_total", port=port, direction=d) == c[f"{d}_bytes"]
        assert get(m, "vtl_port_tx_dropped_total", port=port) == c["tx_dropped"]
        assert get(m, "vtl_port_rx_errors_total", port=port) == c["rx_errors"]
    for reason in ("not_for_guest", "malformed", "segmented", "mac_overflow"):
        assert get(m, "vtl_bridge_frames_total", reason=reason) == SNAPSHOT["bridge"][reason]
    assert get(m, "vtl_macs") == 5
    pep = SNAPSHOT["services"]["pep"]
    for key, verdict in (("frames_in", "in"), ("frames_out", "out"), ("dropped", "dropped"),
                         ("consumed", "consumed"), ("injected", "injected")):
        assert get(m, "vtl_service_frames_total", service="pep", verdict=verdict) == pep[key]
    assert get(m, "vtl_service_bytes_total", service="pep", direction="in") == 3000
    assert get(m, "vtl_service_bytes_total", service="pep", direction="out") == 2500
    assert get(m, "vtl_service_errors_total", service="pep") == 1
    assert get(m, "vtl_service_malformed_total", service="pep") == 6
    assert get(m, "vtl_service_events_total", service="pep", counter="connections_opened") == 8
    assert get(m, "vtl_service_events_total", service="pep", counter="bytes_up") == 12345
    assert get(m, "vtl_connections", service="pep", state="active") == 2
    assert get(m, "vtl_connections", service="pep", state="closing") == 1
    assert get(m, "vtl_service_gauge", service="pep", figure="buffered_bytes") == 512
    assert get(m, "vtl_service_gauge", service="pep", figure="tombstones") == 3
    assert get(m, "vtl_service_events_total", service="capture", counter="frames_written") == 9
    assert get(m, "vtl_streams_open") == 2
    assert get(m, "vtl_stream_opened_total") == 8
    assert get(m, "vtl_stream_failed_total") == 1
    assert get(m, "vtl_stream_refused_by_policy_total") == 3
    assert get(m, "vtl_stream_bytes_up_total") == 12345
    assert get(m, "vtl_stream_bytes_down_total") == 54321
    assert get(m, "vtl_egress_refused_total", **{"class": "loopback"}) == 2
    assert get(m, "vtl_egress_refused_total", **{"class": "link-local"}) == 1
    sock = "tunnel 10.63.0.1:4789"
    assert get(m, "vtl_datagrams_total", socket=sock, direction="rx") == 40
    assert get(m, "vtl_datagram_bytes_total", socket=sock, direction="tx") == 43500
    for reason, n in (("tx_dropped", 3), ("rx_oversize", 1), ("rx_errors", 2),
                      ("rx_kernel_drops", 5)):
        assert get(m, "vtl_datagram_dropped_total", socket=sock, reason=reason) == n
    link = "tunnel vtlvx42"
    assert get(m, "vtl_datagrams_total", socket=link, direction="tx") == 9
    assert get(m, "vtl_datagram_dropped_total", socket=link, reason="unknown_peer") == 11
    assert get(m, "vtl_datagram_dropped_total", socket=link, reason="bad_flags") == 12
    assert not [k for k in m if k[0] == "vtl_datagram_dropped_total"
                and ("reason", "bad_vni") in k[1]], "a counter not read (-1) is not shown"
    assert get(m, "vtl_build_info", version=__import__("vtl").__version__) == 1
    assert get(m, "vtl_uptime_seconds") >= 0


def test_non_numeric_and_nested_entries_are_left_out() -> None:
    m = scrape(SNAPSHOT)
    capture = {dict(k[1]).get("counter") or dict(k[1]).get("figure")
               for k in m if ("service", "capture") in k[1]}
    assert {"path", "flag", "directions"}.isdisjoint(capture)


def test_empty_sections() -> None:
    m = scrape({"bridge": {"macs": 0}, "ports": {}, "services": {}, "streams": {},
                "egress": {}})
    assert get(m, "vtl_macs") == 0
    assert not any(k[0].startswith(("vtl_stream", "vtl_datagram")) for k in m)


def test_each_scrape_takes_a_fresh_snapshot() -> None:
    fake = Fake(SNAPSHOT)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(fake, "vm1"))
    generate_latest(registry)
    generate_latest(registry)
    assert fake.calls == 2


def test_server_serves_and_stops() -> None:
    server = MetricsServer(Fake(SNAPSHOT), "vm1", "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "vtl_port_frames" in names and "vtl_connections" in names
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_taken_address_is_a_setup_error() -> None:
    first = MetricsServer(Fake(SNAPSHOT), "vm1", "127.0.0.1", 0)
    first.start()
    try:
        with pytest.raises(SetupError, match="metrics: cannot listen"):
            MetricsServer(Fake(SNAPSHOT), "vm2", "127.0.0.1", first.port).start()
    finally:
        first.stop()


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("[::1]:9477", ("::1", 9477)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
])
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["9477", "127.0.0.1", ":9477", "127.0.0.1:0",
                                  "127.0.0.1:70000", "::1:9477", "host:port"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def config(bridge: dict[str, object]) -> dict[str, object]:
    return {"bridge": bridge,
            "ports": {"guest": {"kind": "tap", "ifname": "t0"},
                      "uplink": {"kind": "packet", "ifname": "eth9"}}}


def test_config_key() -> None:
    assert parse_config(config({})).bridge.metrics is None
    assert parse_config(config({"metrics": "127.0.0.1:9477"})).bridge.metrics == "127.0.0.1:9477"
    with pytest.raises(ConfigError, match="bridge.metrics"):
        parse_config(config({"metrics": "9477"}))
