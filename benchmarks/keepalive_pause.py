#!/usr/bin/env python3
"""A long pause of a real QEMU guest held by ``keepalive`` (a scenario, run by hand once).

The guest (the real-VM harness of tests/integration, built by ``make guest``) sits behind
``vtl run`` with ``keepalive`` following its own QMP monitor; the peer namespace has
``tcp_retries2 = 5``. Three connections are opened -- the peer sending a paced seeded
stream to the guest, a bidirectional paced stream echoed by the peer, an idle one with
TCP keep-alive 5/2/3 at the peer -- then the guest is paused through QMP for
``--pause-s`` seconds (default 1800: 30 minutes), resumed, and the script reports
whether each connection survived, whether every byte arrived (SHA-256), how soon data
flowed after ``cont``, and what keepalive counted. Needs root.

    .venv/bin/python benchmarks/keepalive_pause.py [--pause-s 1800]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from tcptools import expected_sha256  # noqa: E402
from vmnet import PEER_IP, PeerProc, VmNet, guest_vmpeer, vm_net  # noqa: E402
from vtl.bridge.ctl import request  # noqa: E402
from vtl.bridge.topology import require_root  # noqa: E402

SIZE, RATE = 2_000_000, 200_000


def counters(vm: VmNet) -> dict:
    return request(Path(f"/run/vtl/{vm.tag}.sock"), "counters")["services"]["keepalive"]


def guest_result(vm: VmNet, log: str, timeout: float) -> dict:
    """The guest program's last JSON event once it ended, or what it printed instead
    (a traceback when its socket failed)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = vm.guest.read_file(log).decode(errors="replace").splitlines()
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        if events and events[-1].get("event") in ("done", "closed"):
            return events[-1]
        if lines and not lines[-1].startswith("{"):
            return {"event": "crashed", "output": lines[-4:]}
        time.sleep(0.5)
    return {"event": "no result", "output": lines[-4:]}


def peer_events(peer: PeerProc) -> list[dict]:
    while not peer.events.empty():
        peer.seen.append(peer.events.get())
    return [e for e in peer.seen if e["event"] not in ("listening", "accepted", "flowing")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pause-s", type=float, default=1800.0)
    args = ap.parse_args()
    require_root("the keepalive pause scenario")
    tag = "vkp" + secrets.token_hex(2)
    with tempfile.TemporaryDirectory(prefix="vtl-kapause") as tmp_s:
        tmp = Path(tmp_s)
        services = [{"use": "keepalive", "qmp": str(tmp / "guest" / "qmp-vtl.sock")}]
        with vm_net(tag, tmp, tcp_retries2=5, services=services) as vm:
            report = run(vm, args.pause_s)
    print(json.dumps(report, indent=2))


def run(vm: VmNet, pause_s: float) -> dict:
    send = vm.peer_proc("stream", 9500, SIZE, 51, RATE)
    echo = vm.peer_proc("echo", 9501)
    idle = vm.peer_proc("hold", 9502, "keepalive")
    for p in (send, echo, idle):
        p.wait("listening", 10)
    pids = [vm.guest.spawn(guest_vmpeer("recv", PEER_IP, 9500), log="/tmp/kp-send.log"),
            vm.guest.spawn(guest_vmpeer("bidir", PEER_IP, 9501, SIZE, 52, RATE),
                           log="/tmp/kp-bidir.log"),
            vm.guest.spawn(guest_vmpeer("connect", PEER_IP, 9502), log="/tmp/kp-idle.log")]
    try:
        for p in (send, echo, idle):
            p.wait("accepted", 20)
        send.wait("flowing", 10)
        time.sleep(2.0)
        paused_at = vm.guest.pause()
        print(f"paused for {pause_s:.0f} s ...", file=sys.stderr, flush=True)
        time.sleep(pause_s - 10.0)
        during = counters(vm)
        time.sleep(max(0.0, paused_at + pause_s - time.monotonic()))
        resumed_at = vm.guest.resume()
        report: dict = {"pause_s": pause_s, "keepalive_during": during}
        for name, peer in (("send", send), ("bidir", echo)):
            try:
                report[f"{name}_flowing_after_cont_s"] = round(
                    peer.wait("resumed", 30)["t"] - resumed_at, 3)
            except AssertionError as exc:
                report[f"{name}_flowing_after_cont_s"] = f"never: {str(exc)[-200:]}"
        report["nstat_peer"] = vm.peer(["nstat", "-az", "TcpExtPAWSEstab",
                                        "TcpExtTCPTimeouts", "TcpExtTCPAbortOnTimeout"]).stdout
        received = guest_result(vm, "/tmp/kp-send.log", 60)
        bidir = guest_result(vm, "/tmp/kp-bidir.log", 60)
        report["send_intact"] = received.get("sha256") == expected_sha256(SIZE, 51)
        report["bidir_intact"] = bidir.get("sha256") == bidir.get("echoed") == \
            expected_sha256(SIZE, 52)
        while not idle.events.empty():
            idle.seen.append(idle.events.get())
        report["idle_keepalive_alive"] = idle.proc.poll() is None and not any(
            e["event"] == "dead" for e in idle.seen)
        report["keepalive_after"] = counters(vm)
        report["send_result"], report["bidir_result"] = received, bidir
        report["peer_events"] = {name: peer_events(p) for name, p in
                                 (("send", send), ("bidir", echo), ("idle", idle))}
        report["bridge_log"] = [line for line in vm.bridge.stderr.splitlines()
                                if "keepalive" in line][-12:]
        return report
    finally:
        for pid in pids:
            vm.guest.kill(pid)


if __name__ == "__main__":
    main()
