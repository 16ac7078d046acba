"""Throw-away topologies of network namespaces, for the demo, tests and benchmarks.

A :class:`Topology` remembers every namespace, link and process it made and
removes them all in :meth:`close` (also used as a context manager), so a
failure or Ctrl-C never leaves namespaces behind. Commands go through
iproute2, which every operator can read and re-type by hand.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence

from vtl.errors import SetupError


def require_root(what: str = "this") -> None:
    if os.geteuid() != 0:
        raise SetupError(f"{what} needs root (network namespaces and TAP devices); "
                         "run it as root or with CAP_NET_ADMIN")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise SetupError with iproute2's own words on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SetupError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def parse_ping_rtts(output: str) -> list[float]:
    """Round-trip times in milliseconds from ``ping`` output."""
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", output)]


class Topology:
    """Namespaces, veths and processes made for one run; all removed on close."""

    def __init__(self, prefix: str):
        require_root("building a topology")
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, name: str) -> str:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, host_end: str, ns_end: str, netns: str) -> None:
        """A veth pair: ``host_end`` stays here (up, no address), ``ns_end`` goes to ``netns``."""
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", netns)
        self.links.append(host_end)
        self.sysctl(f"net.ipv6.conf.{host_end}.disable_ipv6", "1")
        ip("link", "set", host_end, "up")
        ip("-n", netns, "link", "set", ns_end, "up")

    def addr(self, netns: str, ifname: str, cidr: str) -> None:
        ip("-n", netns, "addr", "add", cidr, "dev", ifname)
        ip("-n", netns, "link", "set", ifname, "up")

    @staticmethod
    def sysctl(key: str, value: str, netns: str | None = None) -> None:
        cmd = ["sysctl", "-qw", f"{key}={value}"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        subprocess.run(cmd, capture_output=True)

    def run(self, netns: str, cmd: Sequence[str] | str, timeout: float = 60,
            check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``netns`` and wait (bounded by ``timeout``)."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        proc = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                              text=input is None, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise SetupError(f"`{' '.join(argv)}` in {netns} exited {proc.returncode}: "
                             f"{str(proc.stderr).strip()[-500:]}")
        return proc

    def spawn(self, netns: str | None, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a background process (inside ``netns`` if given); stopped on close."""
        argv = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def wait_tcp(self, netns: str, host: str, port: int, timeout: float = 10.0) -> None:
        """Wait until something listens on host:port inside ``netns``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(netns, ["ss", "-ltnH"], check=False).stdout
            if f"{host}:{port} " in out or f"*:{port} " in out:
                return
            time.sleep(0.05)
        raise SetupError(f"nothing listens on {host}:{port} in {netns} after {timeout:.0f} s")

    def stop_proc(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass

    def close(self) -> None:
        """Remove everything, in reverse order; never raises."""
        for proc in reversed(self.procs):
            self.stop_proc(proc)
        self.procs.clear()
        for link in reversed(self.links):
            ip("link", "del", link, check=False)
        self.links.clear()
        for ns in reversed(self.namespaces):
            # kill stragglers left inside the namespace, then remove it
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        self.namespaces.clear()
