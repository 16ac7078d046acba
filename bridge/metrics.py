"""Prometheus metrics of one bridge, served over HTTP while it runs.

Every bridge is its own process with its own lifetime, so each serves its own endpoint
(``[bridge] metrics = "127.0.0.1:9477"``): Prometheus discovers one target per VM the same
way the operator discovers the bridges, and there is no host daemon or socket protocol to
keep in step with the bridges.

``BridgeCollector`` is a prometheus-client custom collector: on every scrape it takes one
``snapshot()`` of the bridge (the bridge takes its own lock for that) and turns it into
metric families, so a scrape shows one consistent moment and costs nothing between scrapes.
The snapshot's sections map as follows (every family carries a ``bridge`` label):

- ``ports``: ``vtl_port_frames_total`` and ``vtl_port_bytes_total`` by ``port`` and
  ``direction`` (``rx``/``tx``), ``vtl_port_tx_dropped_total``, ``vtl_port_rx_errors_total``;
- ``bridge``: ``vtl_bridge_frames_total{reason}`` and the ``vtl_macs`` gauge;
- ``services``: ``vtl_service_frames_total{verdict}``, ``vtl_service_bytes_total{direction}``,
  ``vtl_service_errors_total``, ``vtl_service_malformed_total``, the ``vtl_connections``
  gauge ``{state="active|closing"}``, the gauges a service reports
  (``vtl_service_gauge{figure}``: buffered bytes, tombstones, ...) and every other top-level
  integer as ``vtl_service_events_total{counter}`` (connections_opened, bytes_up, ...);
  non-numeric and nested report entries are not exposed;
- ``streams``: ``vtl_streams_open`` and ``vtl_stream_*_total``;
- ``egress``: ``vtl_egress_refused_total{class}``;
- ``datagrams`` (UDP sockets and VXLAN links of services, e.g. the tunnel's):
  ``vtl_datagrams_total`` and ``vtl_datagram_bytes_total`` by ``socket`` and
  ``direction``, and ``vtl_datagram_dropped_total{socket,reason}`` (``tx_dropped``,
  ``rx_oversize``, ``rx_errors``, ``rx_kernel_drops``; a link's filter adds
  ``unknown_peer``, ``bad_flags``, ``bad_vni``).

Plus ``vtl_build_info{version}`` and ``vtl_uptime_seconds``. The HTTP server is
prometheus-client's own, on a dedicated registry, stopped with the bridge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import vtl
from vtl.errors import SetupError

SERVICE_VERDICTS = {"frames_in": "in", "frames_out": "out", "dropped": "dropped",
                    "consumed": "consumed", "injected": "injected"}
SERVICE_BYTES = {"bytes_in": "in", "bytes_out": "out"}
CONNECTION_STATES = {"connections_active": "active", "connections_closing": "closing"}
# figures a service reports that go up and down (everything else numeric is a counter)
SERVICE_GAUGES = frozenset({"buffered_bytes", "buffered_max_per_connection", "tombstones",
                            "passthrough_active", "peers_down", "dns_pending"})
STREAM_COUNTERS = {"opened_total": "vtl_stream_opened_total",
                   "failed_total": "vtl_stream_failed_total",
                   "refused_by_policy": "vtl_stream_refused_by_policy_total",
                   "bytes_up": "vtl_stream_bytes_up_total",
                   "bytes_down": "vtl_stream_bytes_down_total"}


class Snapshotting(Protocol):
    def snapshot(self) -> dict[str, object]: ...


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _single(kind: type[Metric], name: str, doc: str, bridge: str, value: float) -> Metric:
    fam = kind(name, doc, labels=["bridge"])  # type: ignore[call-arg]
    fam.add_metric([bridge], value)  # type: ignore[attr-defined]
    return fam


class BridgeCollector(Collector):
    """Metric families from ``source.snapshot()``, taken afresh on each scrape."""

    def __init__(self, source: Snapshotting, name: str, started: float | None = None):
        self.source, self.name = source, name
        self.started = time.monotonic() if started is None else started

    def collect(self) -> Iterator[Metric]:
        snap: Mapping[str, Any] = self.source.snapshot()
        b = self.name
        info = GaugeMetricFamily("vtl_build_info", "VTL version of this bridge",
                                 labels=["bridge", "version"])
        info.add_metric([b, vtl.__version__], 1)
        yield info
        yield _single(GaugeMetricFamily, "vtl_uptime_seconds", "seconds since the bridge "
                      "started", b, time.monotonic() - self.started)
        yield from self._ports(b, snap.get("ports", {}))
        yield from self._bridge(b, snap.get("bridge", {}))
        yield from self._services(b, snap.get("services", {}))
        yield from self._streams(b, snap.get("streams", {}))
        yield from self._egress(b, snap.get("egress", {}))
        yield from self._datagrams(b, snap.get("datagrams", {}))

    def _ports(self, b: str, ports: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
        lab = ["bridge", "port", "direction"]
        frames = CounterMetricFamily("vtl_port_frames", "frames a port read (rx) or wrote (tx)",
                                     labels=lab)
        nbytes = CounterMetricFamily("vtl_port_bytes", "bytes a port read (rx) or wrote (tx)",
                                     labels=lab)
        dropped = CounterMetricFamily("vtl_port_tx_dropped",
                                      "frames a port could not write", labels=lab[:2])
        errors = CounterMetricFamily("vtl_port_rx_errors", "read errors of a port",
                                     labels=lab[:2])
        for port, c in ports.items():
            for d in ("rx", "tx"):
                frames.add_metric([b, port, d], c.get(f"{d}_frames", 0))
                nbytes.add_metric([b, port, d], c.get(f"{d}_bytes", 0))
            dropped.add_metric([b, port], c.get("tx_dropped", 0))
            errors.add_metric([b, port], c.get("rx_errors", 0))
        yield from (frames, nbytes, dropped, errors)

    def _bridge(self, b: str, counters: Mapping[str, int]) -> Iterator[Metric]:
        frames = CounterMetricFamily("vtl_bridge_frames", "frames the bridge itself decided "
                                     "about, by reason", labels=["bridge", "reason"])
        macs = GaugeMetricFamily("vtl_macs", "MACs learnt behind the guest port",
                                 labels=["bridge"])
        for key, value in counters.items():
            if key == "macs":
                macs.add_metric([b], value)
            elif _number(value):
                frames.add_metric([b, key], value)
        yield from (frames, macs)

    def _services(self, b: str, services: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        lab = ["bridge", "service"]
        frames = CounterMetricFamily("vtl_service_frames", "frames a service saw, by verdict",
                                     labels=[*lab, "verdict"])
        nbytes = CounterMetricFamily("vtl_service_bytes", "bytes into and out of a service",
                                     labels=[*lab, "direction"])
        errors = CounterMetricFamily("vtl_service_errors", "exceptions a service raised",
                                     labels=lab)
        malformed = CounterMetricFamily("vtl_service_malformed",
                                        "frames a service found malformed", labels=lab)
        conns = GaugeMetricFamily("vtl_connections", "connections a service holds, by state",
                                  labels=[*lab, "state"])
        gauges = GaugeMetricFamily("vtl_service_gauge", "a figure a service reports",
                                   labels=[*lab, "figure"])
        events = CounterMetricFamily("vtl_service_events", "a service's own counters",
                                     labels=[*lab, "counter"])
        for svc, figures in services.items():
            for key, value in figures.items():
                if not _number(value):
                    continue
                if key in SERVICE_VERDICTS:
                    frames.add_metric([b, svc, SERVICE_VERDICTS[key]], value)
                elif key in SERVICE_BYTES:
                    nbytes.add_metric([b, svc, SERVICE_BYTES[key]], value)
                elif key == "errors":
                    errors.add_metric([b, svc], value)
                elif key == "malformed":
                    malformed.add_metric([b, svc], value)
                elif key in CONNECTION_STATES:
                    conns.add_metric([b, svc, CONNECTION_STATES[key]], value)
                elif key in SERVICE_GAUGES:
                    gauges.add_metric([b, svc, key], value)
                else:
                    events.add_metric([b, svc, key], value)
        yield from (frames, nbytes, errors, malformed, conns, gauges, events)

    def _streams(self, b: str, streams: Mapping[str, int]) -> Iterator[Metric]:
        if not streams:
            return
        yield _single(GaugeMetricFamily, "vtl_streams_open", "host sockets open for services",
                      b, streams.get("open", 0))
        for key, name in STREAM_COUNTERS.items():
            yield _single(CounterMetricFamily, name.removesuffix("_total"),
                          f"host sockets of services: {key}", b, streams.get(key, 0))

    def _egress(self, b: str, egress: Mapping[str, Any]) -> Iterator[Metric]:
        fam = CounterMetricFamily("vtl_egress_refused", "connections the egress policy "
                                  "refused, by destination class", labels=["bridge", "class"])
        for cls, value in (egress.get("refused_by_class") or {}).items():
            fam.add_metric([b, str(cls)], value)
        yield fam


    def _datagrams(self, b: str, sockets: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
        if not sockets:
            return
        lab = ["bridge", "socket", "direction"]
        count = CounterMetricFamily("vtl_datagrams", "datagrams a service socket read (rx) or "
                                    "sent (tx)", labels=lab)
        nbytes = CounterMetricFamily("vtl_datagram_bytes", "bytes of those datagrams",
                                     labels=lab)
        dropped = CounterMetricFamily("vtl_datagram_dropped", "datagrams lost, by reason",
                                      labels=["bridge", "socket", "reason"])
        for sock, c in sockets.items():
            for d in ("rx", "tx"):
                count.add_metric([b, sock, d], c.get(d, 0))
                nbytes.add_metric([b, sock, d], c.get(f"{d}_bytes", 0))
            for reason in ("tx_dropped", "rx_oversize", "rx_errors", "rx_kernel_drops"):
                dropped.add_metric([b, sock, reason], c.get(reason, 0))
            for reason in ("unknown_peer", "bad_flags", "bad_vni"):  # a VXLAN link's filter
                if c.get(reason, -1) >= 0:
                    dropped.add_metric([b, sock, reason], c[reason])
        yield from (count, nbytes, dropped)


class MetricsServer:
    """prometheus-client's HTTP server for one bridge's collector, on its own registry."""

    def __init__(self, source: Snapshotting, name: str, host: str, port: int):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BridgeCollector(source, name))
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread; SetupError if the address cannot be bound."""
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise SetupError(f"metrics: cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` as (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: give HOST:PORT, e.g. \"127.0.0.1:9477\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. \"[::1]:9477\"")
    return host, int(port)


__all__ = ["BridgeCollector", "MetricsServer", "parse_address"]
