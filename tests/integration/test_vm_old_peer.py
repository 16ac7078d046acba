"""keepalive against an older peer kernel: the roles of test_vm_keepalive swapped.

Here the QEMU guest's Linux 6.1 is the *peer*, on the bridge's uplink (a ``packet`` port
on its TAP), with ``tcp_retries2 = 5``; the held end is a namespace behind the bridge's
own ``tap`` port, held by ``vtl ctl NAME hold``. A Linux before a 2023 change ignores a
window-0 ACK that acknowledges nothing new (it only takes a window from an ACK that
advances, or a larger one), so without the custody byte it goes on retransmitting into
its normal timeout and gives up about 13 s into the hold; with the custody byte (one byte
more acknowledged) it takes the zero window, and a 40 s hold is survived with every byte.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from qemuvm import QemuGuest
from tcptools import expected_sha256
from test_vm_baseline import require_vm
from vmnet import VMPEER, guest_vmpeer
from vtl.bridge.topology import Topology
from vtlnet import GUEST_IP, GUEST_MAC, PEER_IP, VtlProcess, ctl_json, to_toml

pytestmark = pytest.mark.integration

SIZE, RATE = 1_500_000, 150_000


class OldPeerNet:
    def __init__(self, topo: Topology, ns: str, vm: QemuGuest, bridge: VtlProcess, sock: Path):
        self.topo, self.ns, self.vm, self.bridge, self.sock = topo, ns, vm, bridge, sock

    def ctl(self, *args: str) -> Any:
        return ctl_json(self.sock, *args)


@contextmanager
def old_peer_net(tmp: Path, custody: bool) -> Iterator[OldPeerNet]:
    tag = "vto" + secrets.token_hex(3)
    with ExitStack() as stack:
        topo = stack.enter_context(Topology(tag))
        ns = topo.netns(f"{tag}-g")
        vm = QemuGuest(f"{tag}t", tmp / "vm", mac="02:00:00:c6:00:02", ip=f"{PEER_IP}/24")
        stack.callback(vm.close)
        vm.start()
        sock = tmp / "ctl.sock"
        config = tmp / "bridge.toml"
        config.write_text(to_toml({
            "bridge": {"name": tag, "control": str(sock)},
            "ports": {"guest": {"kind": "tap", "ifname": f"{tag}n", "netns": ns,
                                "mac": GUEST_MAC},
                      "uplink": {"kind": "packet", "ifname": f"{tag}t"}},
            "services": [{"use": "keepalive", "custody": custody}],
        }))
        bridge = VtlProcess(config)
        stack.callback(bridge.stop)
        bridge.wait_ready()
        topo.addr(ns, f"{tag}n", f"{GUEST_IP}/24")
        vm.wait_booted(60)
        vm.run(["sysctl", "-qw", "net.ipv4.tcp_retries2=5"])
        yield OldPeerNet(topo, ns, vm, bridge, sock)


def hold_against_the_old_peer(net: OldPeerNet, hold_s: float) -> dict[str, Any]:
    """The VM sends a paced stream to the namespace, which is held ``hold_s`` seconds;
    what the VM's sender reported, and what the namespace received."""
    log = "/tmp/oldpeer-stream.log"
    pid = net.vm.spawn(guest_vmpeer("stream", 9600, SIZE, 61, RATE), log=log)
    try:
        deadline = time.monotonic() + 20
        while b"listening" not in net.vm.read_file(log):
            assert time.monotonic() < deadline, "the VM's stream server did not start"
            time.sleep(0.2)
        recv = net.topo.spawn(net.ns, [sys.executable, VMPEER, "recv", PEER_IP, "9600"],
                              stdout=subprocess.PIPE, text=True)
        time.sleep(3.0)  # flowing
        net.ctl("hold")
        time.sleep(hold_s)
        released = net.ctl("release")["keepalive"]
        out, _ = recv.communicate(timeout=60)
        events = [json.loads(line) for line in net.vm.read_file(log).decode().splitlines()]
    finally:
        net.vm.kill(pid)
    received = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {"sender": events, "received": received, "released": released}


def test_without_custody_the_old_peer_gives_up(tmp_path: Path) -> None:
    require_vm()
    with old_peer_net(tmp_path, custody=False) as net:
        result = hold_against_the_old_peer(net, 20.0)
    dead = [e for e in result["sender"] if e["event"] == "dead"]
    assert dead and "timed out" in dead[0]["error"].lower(), result["sender"]
    assert result["received"].get("sha256") != expected_sha256(SIZE, 61)


def test_with_custody_the_old_peer_waits_out_a_40_s_hold(tmp_path: Path) -> None:
    require_vm()
    with old_peer_net(tmp_path, custody=True) as net:
        result = hold_against_the_old_peer(net, 40.0)
    assert [e["event"] for e in result["sender"] if e["event"] in ("dead", "done")] == \
        ["done"], result["sender"]
    assert result["received"]["sha256"] == expected_sha256(SIZE, 61)
    assert result["released"]["custody_delivered"] >= 1, result["released"]
    resumed = [e for e in result["sender"] if e["event"] == "resumed"]
    assert resumed and resumed[0]["stalled_s"] >= 39, resumed
