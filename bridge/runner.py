"""Running one bridge in the foreground: signals, the ready line, systemd, stats.

``run_bridge`` is what ``vtl run`` does once the config is valid: open the
ports, start the services, log the ``ready`` line (and notify systemd when
``NOTIFY_SOCKET`` is set), forward until SIGINT or SIGTERM, then stop cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from types import FrameType

from vtl.bridge.config import BridgeConfig
from vtl.bridge.control import ControlServer, start_control
from vtl.bridge.engine import Bridge
from vtl.bridge.metrics import MetricsServer, parse_address


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd if it asked for notifications."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def describe(config: BridgeConfig) -> str:
    g, u = config.ports.guest, config.ports.uplink
    names = ", ".join(s.name for s in config.services) or "empty chain"
    return f"guest {g.kind} {g.ifname} <-> uplink {u.kind} {u.ifname}; services: {names}"


def run_bridge(config: BridgeConfig, log: logging.Logger) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    bridge = Bridge(config, log)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        bridge.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics = None
    control: ControlServer | None = None
    try:
        control = start_control(bridge)
        bridge.open()
        bridge.start()
        if config.bridge.metrics is not None:
            metrics = MetricsServer(bridge, config.bridge.name,
                                    *parse_address(config.bridge.metrics))
            metrics.start()
            log.info("metrics on http://%s/metrics", config.bridge.metrics)
        log.info("bridge %r ready: %s", config.bridge.name, describe(config))
        sd_notify("READY=1")
        while not bridge.wait(bridge.config.bridge.stats_interval_s or None):  # reloadable
            log.info("stats %s", json.dumps(bridge.snapshot(), default=str))
        sd_notify("STOPPING=1")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if control is not None:
            control.stop()
        if metrics is not None:
            metrics.stop()
        bridge.close()
    log.info("stopped; %s", json.dumps(bridge.snapshot(), default=str))
    if bridge.error is not None:
        return 1
    return 0
