"""keepalive with a real QEMU guest paused through QMP (issue 13).

The guest (Linux 6.1 under TCG) sits behind ``vtl run`` with ``keepalive`` following
its own QMP monitor; the peer namespace has ``tcp_retries2 = 5``, so unanswered it
would give up 13 s into a pause (test_vm_baseline). The guest is paused for 120 s:
a bidirectional paced bulk connection, a peer-send-only connection and an idle one
with TCP keep-alive 5/2/3 survive with every byte intact both ways, the peer saw no
PAWS drop and no reset, its ARP for the guest was answered, and data flows again
within a second of ``cont``. An application heartbeat and a peer with
``TCP_USER_TIMEOUT`` die, as documented.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tcptools import expected_sha256
from test_vm_baseline import require_vm
from vmnet import GUEST_IP, PEER_IP, PeerProc, VmNet, guest_vmpeer, vm_net
from vtlnet import ctl_json, nstat, to_toml

pytestmark = pytest.mark.integration

PAUSE_S = float(os.environ.get("VTL_TEST_PAUSE_S", "120"))  # shorter when debugging
SIZE, RATE = 2_000_000, 200_000  # 10 s of paced data, the pause in its middle


def ctl(vm: VmNet, *args: str) -> Any:
    return ctl_json(f"/run/vtl/{vm.tag}.sock", *args)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmNet]:
    require_vm()
    tag = "vtk" + secrets.token_hex(3)
    tmp = tmp_path_factory.mktemp("vmka")
    services = [{"use": "keepalive", "qmp": str(tmp / "guest" / "qmp-vtl.sock")}]
    # the bridge forgets a silent guest's MAC after 20 s (300 s by default): the hold must
    # keep it, or the peers' frames stop at the learning switch (found in a 30 min pause)
    with vm_net(tag, tmp, tcp_retries2=5, services=services,
                bridge={"mac_aging_s": 20}) as net:
        assert ctl(net, "counters")["services"]["keepalive"]["qmp_connected"]
        yield net


def drained(peer: PeerProc) -> list[dict[str, Any]]:
    """Every event the peer program reported so far, waited for or not."""
    while not peer.events.empty():
        peer.seen.append(peer.events.get())
    return peer.seen


def guest_result(vm: VmNet, log: str, timeout: float) -> dict[str, Any]:
    """The last JSON line a guest program wrote to ``log`` once it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = vm.guest.read_file(log).decode().splitlines()
        if lines and json.loads(lines[-1])["event"] in ("done", "closed"):
            return json.loads(lines[-1])
        time.sleep(0.5)
    raise AssertionError(f"guest program {log}: no result in {timeout} s: {lines}")


def test_a_120_s_pause_keeps_the_connections(vm: VmNet) -> None:
    paws = nstat(vm.peer, "TcpExtPAWSEstab")
    peers = {
        "send": vm.peer_proc("stream", 9300, SIZE, 31, RATE),
        "bidir": vm.peer_proc("echo", 9301),
        "keepalive": vm.peer_proc("hold", 9302, "keepalive"),
        "heartbeat": vm.peer_proc("heartbeat", 9303),
        "user_timeout": vm.peer_proc("stream", 9304, SIZE, 32, RATE, 5000),
    }
    for p in peers.values():
        p.wait("listening", 10)
    guests = {
        "send": ("recv", 9300), "bidir": ("bidir", 9301, SIZE, 33, RATE),
        "keepalive": ("connect", 9302), "heartbeat": ("pong", 9303),
        "user_timeout": ("recv", 9304),
    }
    pids = {}
    for name, (cmd, port, *rest) in guests.items():
        pids[name] = vm.guest.spawn(guest_vmpeer(cmd, PEER_IP, port, *rest),
                                    log=f"/tmp/ka-{name}.log")
    try:
        for p in peers.values():
            p.wait("accepted", 20)
        peers["send"].wait("flowing", 10)
        time.sleep(2.0)
        paused_at = vm.guest.pause()
        time.sleep(5.0)
        vm.peer(["ip", "neigh", "flush", "dev", "eth0"])  # the peer asks for the guest again
        time.sleep(PAUSE_S - 5.0 - 10.0)
        during = ctl(vm, "counters")["services"]["keepalive"]
        time.sleep(max(0.0, paused_at + PAUSE_S - time.monotonic()))
        resumed_at = vm.guest.resume()

        try:
            flowing_again = peers["send"].wait("resumed", 10)
        except AssertionError:
            print(vm.bridge.stderr[-4000:])
            raise
        echoing_again = peers["bidir"].wait("resumed", 10)
        sent = peers["send"].wait("done", 60)
        received = guest_result(vm, "/tmp/ka-send.log", 30)
        bidir = guest_result(vm, "/tmp/ka-bidir.log", 60)
        heartbeat = peers["heartbeat"].wait("dead", 5)
        user_timeout = peers["user_timeout"].wait("dead", 5)
        time.sleep(1.0)
        kept = drained(peers["keepalive"])
        alive = peers["keepalive"].proc.poll() is None
        after = ctl(vm, "counters")["services"]["keepalive"]
    finally:
        for pid in pids.values():
            vm.guest.kill(pid)
    print(f"flowing again {flowing_again['t'] - resumed_at:.3f} s after cont "
          f"(stalled {flowing_again['stalled_s']} s), echo "
          f"{echoing_again['t'] - resumed_at:.3f} s; keepalive during the pause: {during}")
    assert during["state"] == "holding" and during["answered"] > 0, during
    assert during["arp_answered"] >= 1, during
    assert sent["bytes"] == SIZE and received["bytes"] == SIZE
    assert received["sha256"] == expected_sha256(SIZE, 31), "every byte, peer -> guest"
    assert bidir["event"] == "done", bidir
    assert bidir["sha256"] == bidir["echoed"] == expected_sha256(SIZE, 33), bidir
    assert [e["event"] for e in kept] == ["listening", "accepted"], kept
    assert alive, "the keep-alive connection lives"
    assert flowing_again["t"] - resumed_at < 1.0
    assert echoing_again["t"] - resumed_at < 1.0
    assert nstat(vm.peer, "TcpExtPAWSEstab") == paws, "the peer dropped nothing as old"
    assert "heartbeat" in heartbeat["error"] and heartbeat["t"] - paused_at < 10
    assert "timed out" in user_timeout["error"].lower() and user_timeout["t"] - paused_at < 15
    assert after["state"] == "live" and after["releases"] >= 1 and after["holds"] >= 1


def test_vtl_ctl_hold_and_release_do_what_qmp_does(vm: VmNet, tmp_path: Path) -> None:
    """For libvirt hooks and other hypervisors: keepalive without a monitor, held and
    released through the control socket around a 30 s QMP pause."""
    config = tomllib.loads((vm.tmp / "bridge.toml").read_text())
    config["services"] = [{"use": "keepalive"}]
    manual = tmp_path / "manual.toml"
    manual.write_text(to_toml(config))
    reloaded = ctl(vm, "reload", str(manual))
    assert reloaded["replaced"] == [{"name": "keepalive", "changed": ["qmp"]}], reloaded
    peer = vm.peer_proc("stream", 9400, SIZE, 41, RATE)
    peer.wait("listening", 10)
    pid = vm.guest.spawn(guest_vmpeer("recv", PEER_IP, 9400), log="/tmp/ka-manual.log")
    try:
        peer.wait("flowing", 20)
        assert ctl(vm, "hold")["keepalive"]["state"] == "holding"
        vm.guest.pause()
        time.sleep(30.0)
        vm.guest.resume()
        released_at = time.monotonic()
        released = ctl(vm, "release")["keepalive"]
        flowing_again = peer.wait("resumed", 10)
        assert peer.wait("done", 60)["bytes"] == SIZE
        received = guest_result(vm, "/tmp/ka-manual.log", 30)
    finally:
        vm.guest.kill(pid)
    assert released["state"] == "live" and released["held_s"] >= 30
    assert released["custody_delivered"] + released["replayed"] >= 1, released
    assert flowing_again["t"] - released_at < 1.0
    assert received["sha256"] == expected_sha256(SIZE, 41)


def test_a_migration_through_a_file_keeps_the_connection(tmp_path: Path) -> None:
    """A busybox guest (no 9p export, so QEMU can migrate it) on a persistent TAP, saved
    to a file and, 20 s later (a slow transfer), restored by a new QEMU with -incoming on
    the same TAP and VTL monitor path: held from the source's STOP to the restored VM's
    RESUME, the peer's connection to the guest's echo server goes on."""
    require_vm()
    tag = "vtk" + secrets.token_hex(3)
    services = [{"use": "keepalive", "qmp": str(tmp_path / "guest" / "qmp-vtl.sock")}]
    with vm_net(tag, tmp_path, tcp_retries2=5, services=services, persistent_tap=True,
                root9p=False, echo_port=7) as net:
        chat = net.peer_proc("chat", GUEST_IP, 7)
        chat.wait("connected", 15)
        chat.send_line("before")
        assert chat.wait("echo", 10)["data"] == "before\n"
        state = tmp_path / "guest.state"
        net.guest.migrate_to_file(state)
        net.guest.close()
        chat.send_line("during the migration")  # the peer sends to a VM that is gone
        time.sleep(20.0)
        during = ctl(net, "counters")["services"]["keepalive"]
        try:
            with net.guest.restored(tmp_path / "restored", state) as again:
                again.wait_incoming(30)
                again.resume()
                echo = chat.wait("echo", 15)
                chat.send_line("after")
                after = chat.wait("echo", 10)
        except AssertionError:
            print(net.bridge.stderr[-3000:])
            raise
        counters = ctl(net, "counters")["services"]["keepalive"]
    assert during["state"] == "holding" and during["answered"] >= 1, during
    assert echo["data"] == "during the migration\n" and after["data"] == "after\n"
    assert counters["state"] == "live" and counters["releases"] >= 1, counters
