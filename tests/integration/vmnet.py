"""A real QEMU guest behind a VTL bridge: the topology of the real-VM tests.

    QEMU guest (Linux 6.1, its own TCP) -- TAP --[packet port] vtl run [packet port]-- veth
        -- peer namespace (eth0, tcp_retries2 as asked)

:func:`vm_net` builds it and removes everything (QEMU, bridge, TAP,
namespaces, processes) on exit, even on failure. The TAP is QEMU's own
(``persistent_tap=False``) or a :class:`qemuvm.PersistentTap` that outlives
QEMU, for tests that restore a guest with ``-incoming`` on the same TAP.
:class:`PeerProc` runs one of :mod:`vmpeer`'s programs in the peer namespace
and collects its JSON events.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from qemuvm import PersistentTap, QemuGuest
from vtl.bridge.topology import Topology
from vtlnet import GUEST_IP, GUEST_IP6, GUEST_MAC, PEER_IP, PEER_IP6, VtlProcess, to_toml

VMPEER = str(Path(__file__).resolve().parent / "vmpeer.py")
GUEST_PYTHON = "/usr/bin/python3"  # the host's, seen by the guest over 9p

__all__ = ["GUEST_IP", "GUEST_IP6", "PEER_IP", "PEER_IP6", "VMPEER", "PeerProc", "VmNet",
           "guest_vmpeer", "vm_net"]


def guest_vmpeer(*args: object) -> list[str]:
    """The argv that runs ``vmpeer.py ARGS`` in the guest."""
    return [GUEST_PYTHON, VMPEER, *map(str, args)]


class PeerProc:
    """A :mod:`vmpeer` program in the peer namespace; its JSON lines in a queue."""

    def __init__(self, topo: Topology, netns: str, *args: object):
        self.proc = topo.spawn(netns, [sys.executable, VMPEER, *map(str, args)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def send_line(self, line: str) -> None:
        """Write a line to the program's stdin (``chat`` sends it to the echo server)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event called ``event`` (earlier ones of other names are kept in seen)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self.events.get(timeout=max(left, 0.001))
            except queue.Empty:
                err = b""
                if self.proc.poll() is not None and self.proc.stderr is not None:
                    err = self.proc.stderr.read()[-800:]
                raise AssertionError(f"peer {self.proc.args}: no {event!r} event in "
                                     f"{timeout} s; seen {self.seen}; {err.decode()}") from None
            self.seen.append(ev)
            if ev["event"] == event:
                return ev


class VmNet:
    """The guest, its bridge and the peer namespace of one test (see the module)."""

    def __init__(self, topo: Topology, tag: str, tmp: Path, guest: QemuGuest,
                 bridge: VtlProcess):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.guest, self.bridge = guest, bridge
        self.peer_ns = f"{tag}-peer"

    def peer(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.peer_ns, cmd, timeout=timeout, check=check)

    def peer_proc(self, *args: object) -> PeerProc:
        return PeerProc(self.topo, self.peer_ns, *args)


@contextmanager
def vm_net(tag: str, tmp: Path, *, tcp_retries2: int | None = 5,
           services: list[dict[str, Any]] | None = None, persistent_tap: bool = False,
           bridge: dict[str, Any] | None = None,
           boot_timeout: float = 60.0, **guest_kw: Any) -> Iterator[VmNet]:
    """Boot a guest on a TAP named ``{tag}t`` behind ``vtl run`` (``services`` as its
    chain) with the peer namespace ``{tag}-peer`` on the uplink; all removed on exit."""
    with ExitStack() as stack:
        topo = stack.enter_context(Topology(tag))
        peer_ns = topo.netns(f"{tag}-peer")
        uplink, tap = f"{tag}u", f"{tag}t"
        topo.veth(uplink, "eth0", peer_ns)
        topo.addr(peer_ns, "eth0", f"{PEER_IP}/24")
        topo.run(peer_ns, ["ip", "-6", "addr", "add", f"{PEER_IP6}/64", "dev", "eth0", "nodad"])
        if tcp_retries2 is not None:
            topo.run(peer_ns, ["sysctl", "-qw", f"net.ipv4.tcp_retries2={tcp_retries2}"])
        if persistent_tap:
            stack.enter_context(PersistentTap(tap))
        guest_kw.setdefault("ip", f"{GUEST_IP}/24")
        guest_kw.setdefault("ip6", f"{GUEST_IP6}/64")
        guest = QemuGuest(tap, tmp / "guest", mac=GUEST_MAC, tap_by_qemu=not persistent_tap,
                          **guest_kw)
        stack.callback(guest.close)
        guest.start()
        config = tmp / "bridge.toml"
        config.write_text(to_toml({
            "bridge": {"name": tag, **(bridge or {})},
            "ports": {"guest": {"kind": "packet", "ifname": tap},
                      "uplink": {"kind": "packet", "ifname": uplink}},
            "services": services or [],
        }))
        bridge = VtlProcess(config)
        stack.callback(bridge.stop)
        bridge.wait_ready()
        guest.wait_booted(boot_timeout)
        yield VmNet(topo, tag, tmp, guest, bridge)
