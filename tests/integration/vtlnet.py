"""Helpers for integration tests: a `vtl run` subprocess and the guest/peer topology."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vtl.bridge.topology import Topology

GUEST_IP, PEER_IP = "10.198.0.1", "10.198.0.2"
GUEST_IP6, PEER_IP6 = "fd00:198::1", "fd00:198::2"
GUEST_MAC = "02:00:00:c6:00:01"
# the host's own path to the peer (Net.host_path)
HOST_IP, HOST_PEER_IP = "10.199.0.1", "10.199.0.2"
HOST_IP6, HOST_PEER_IP6 = "fd00:199::1", "fd00:199::2"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):  # arrays, and inline tables in them (firewall rules)
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(cfg: dict[str, Any]) -> str:
    lines = []
    for table in ("bridge",):
        if table in cfg:
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in cfg[table].items()]
    for role, port in cfg.get("ports", {}).items():
        lines.append(f"[ports.{role}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in port.items()]
    for svc in cfg.get("services", []):
        lines.append("[[services]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in svc.items()]
    return "\n".join(lines) + "\n"


class VtlProcess:
    """`vtl run CONFIG` as a subprocess; waits for the ready line."""

    def __init__(self, config_path: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vtl.bridge.cli", "run", str(config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if " ready" in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self._ready.is_set():
            self.stop()
            raise AssertionError("vtl run never said ready:\n" + "".join(self.lines[-30:]))

    @property
    def pid(self) -> int:
        """The pid of the `vtl run` process itself (for /proc sampling, e.g. its memory)."""
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


class Net:
    """guest netns (TAP made by VTL) <-> vtl run <-> veth <-> peer netns."""

    def __init__(self, topo: Topology, tag: str, tmp: Path):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.guest_ns = topo.netns(f"{tag}-vm")
        self.peer_ns = topo.netns(f"{tag}-peer")
        self.tap, self.uplink = f"{tag}t", f"{tag}u"
        topo.veth(self.uplink, "eth0", self.peer_ns)
        topo.addr(self.peer_ns, "eth0", f"{PEER_IP}/24")
        topo.run(self.peer_ns, ["ip", "-6", "addr", "add", f"{PEER_IP6}/64", "dev", "eth0",
                                "nodad"])
        self.bridges: list[VtlProcess] = []

    def config(self, services: list[dict[str, Any]] | None = None,
               uplink_kind: str = "packet", **bridge: Any) -> dict[str, Any]:
        return {
            "bridge": {"name": self.tag, **bridge},
            "ports": {
                "guest": {"kind": "tap", "ifname": self.tap, "netns": self.guest_ns,
                          "mac": GUEST_MAC},
                "uplink": {"kind": uplink_kind, "ifname": self.uplink},
            },
            "services": services or [],
        }

    def start(self, services: list[dict[str, Any]] | None = None, **kw: Any) -> VtlProcess:
        path = self.tmp / f"bridge{len(self.bridges)}.toml"
        path.write_text(to_toml(self.config(services, **kw)))
        vtl = VtlProcess(path)
        self.bridges.append(vtl)
        vtl.wait_ready()
        self.topo.addr(self.guest_ns, self.tap, f"{GUEST_IP}/24")
        self.topo.run(self.guest_ns, ["ip", "-6", "addr", "add", f"{GUEST_IP6}/64", "dev",
                                      self.tap, "nodad"])
        return vtl

    def host_path(self) -> None:
        """Let the host itself reach the peer (services that open host sockets, like
        ``pep``, connect from the host's stack): a second veth from the root namespace
        into the peer namespace, with routes to PEER_IP and PEER_IP6 through it."""
        hv = f"{self.tag}h"
        self.topo.veth(hv, "eth1", self.peer_ns)
        self.topo.sysctl(f"net.ipv6.conf.{hv}.disable_ipv6", "0")
        host(["ip", "addr", "add", f"{HOST_IP}/30", "dev", hv])
        host(["ip", "-6", "addr", "add", f"{HOST_IP6}/64", "dev", hv, "nodad"])
        self.peer(["ip", "addr", "add", f"{HOST_PEER_IP}/30", "dev", "eth1"])
        self.peer(["ip", "-6", "addr", "add", f"{HOST_PEER_IP6}/64", "dev", "eth1", "nodad"])
        self.peer(["ip", "link", "set", "eth1", "up"])
        host(["ip", "route", "replace", f"{PEER_IP}/32", "via", HOST_PEER_IP])
        host(["ip", "-6", "route", "replace", f"{PEER_IP6}/128", "via", HOST_PEER_IP6])

    def stop_all(self) -> None:
        for b in self.bridges:
            b.stop()

    def guest(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.guest_ns, cmd, timeout=timeout, check=check)

    def peer(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.peer_ns, cmd, timeout=timeout, check=check)


def host(cmd: list[str], timeout: float = 30) -> None:
    """Run a command in the host (root) namespace; raise with its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def vtl_cli(*args: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real CLI, ``python -m vtl.bridge.cli ARGS``; asserts exit 0 when ``check``."""
    proc = subprocess.run([sys.executable, "-m", "vtl.bridge.cli", *args],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"vtl {' '.join(args)}: {proc.stderr}"
    return proc


def ctl_json(sock: Path | str, *args: str) -> Any:
    """``vtl ctl --socket SOCK ARGS --json``, parsed."""
    return json.loads(vtl_cli("ctl", "--socket", str(sock), *args, "--json").stdout)


def nstat(run: Any, counter: str) -> int:
    """A kernel counter (``nstat -az``) where ``run(argv)`` runs a command (a namespace's)."""
    out = run(["nstat", "-az", counter]).stdout
    m = re.search(rf"^{counter}\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else 0
