"""The control socket of a real `vtl run`: `vtl ctl` status, counters, a live pep connection
whose byte counts grow while it transfers, `vtl ls`, and the socket gone at stop."""

from __future__ import annotations

import json
import random
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tcptools import download, half_close, slow_reader
from tcptools import expected_sha256 as expected
from vtl.bridge.topology import Topology
from vtlnet import PEER_IP, Net, wait_for
from vtlnet import ctl_json as ctl
from vtlnet import vtl_cli as vtl

from tests.bridge.test_control import hostile_lines

pytestmark = pytest.mark.integration

SIZE = 60 << 20  # at 80 Mbit/s: about 6 s


def test_ctl_and_ls_on_a_running_bridge(net: Net, tmp_path: Path) -> None:
    sockdir = tmp_path / "run"
    sock = sockdir / f"{net.tag}.sock"
    net.host_path()
    bridge = net.start([{"use": "netem", "rate_mbit": 80}, {"use": "pep"}], control=str(sock))

    status = ctl(sock, "status")
    assert status["name"] == net.tag and status["pid"] == bridge.pid
    assert [(p["role"], p["kind"]) for p in status["ports"]] == [("guest", "tap"),
                                                                ("uplink", "packet")]
    assert [s["name"] for s in status["services"]] == ["netem", "pep"]
    assert ctl(sock, "connections") == {"pep": []}

    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.update(sha=download(net, SIZE, seed=21,
                                                                   timeout=120)))
    t.start()
    try:
        assert wait_for(lambda: ctl(sock, "connections", "--service", "pep")["pep"], 20)
        first = ctl(sock, "connections", "--service", "pep")["pep"][0]
        time.sleep(1.5)
        rows = ctl(sock, "connections", "--service", "pep")["pep"]
        counters = ctl(sock, "counters")
    finally:
        t.join(150)
    assert result.get("sha") == expected(SIZE, 21), "the download completes intact"
    [second] = [r for r in rows if r["flow"] == first["flow"]]
    assert first["state"] == "ESTABLISHED" and first["upstream"].startswith("tcp ")
    assert first["upstream_state"] == "connected"
    assert 0 < first["bytes_down"] < second["bytes_down"] < SIZE + 4096, (first, second)
    assert second["age_s"] >= first["age_s"] + 1.0
    assert counters["services"]["pep"]["bytes_down"] >= second["bytes_down"], \
        "the service's byte counter is live too"

    text = vtl("ctl", "--socket", str(sock), "connections").stdout
    assert "pep:" in text
    assert "log level info -> debug" in vtl("ctl", "--socket", str(sock), "log-level",
                                            "debug").stdout

    rows = json.loads(vtl("ls", "--dir", str(sockdir), "--json").stdout)
    [row] = rows
    assert row["name"] == net.tag and row["services"] == ["netem", "pep"]
    assert row["frames_in"] > 0 and row["frames_out"] > 0
    assert net.tag in vtl("ls", "--dir", str(sockdir)).stdout

    bad = vtl("ctl", "--socket", str(sock), "connections", "--service", "nope", check=False)
    assert bad.returncode == 1 and "args.service" in bad.stderr

    # hostile requests while the bridge forwards: each gets an error, nothing changes
    before = ctl(sock, "status")
    lines = hostile_lines(random.Random(7))
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(sock))
        answers = raw.makefile("rb")
        for _ in range(2000):
            raw.sendall(next(lines) + b"\n")
            assert json.loads(answers.readline())["ok"] is False
    after = ctl(sock, "status")
    assert {**after, "uptime_s": 0} == {**before, "uptime_s": 0}
    assert download(net, 1 << 20, seed=22, timeout=60) == expected(1 << 20, 22)

    # a second bridge on the same socket path is refused before it opens anything
    second_cfg = tmp_path / "second.toml"
    second_cfg.write_text(f'[bridge]\nname = "x"\ncontrol = "{sock}"\n[ports.guest]\n'
                          f'kind = "tap"\nifname = "{net.tag}z"\n[ports.uplink]\n'
                          f'kind = "tap"\nifname = "{net.tag}y"\n')
    refused = vtl("run", str(second_cfg), check=False)
    assert refused.returncode == 1 and "another bridge is running" in refused.stderr

    assert bridge.stop() == 0
    assert not sock.exists(), "the socket is removed at stop"
    gone = vtl("ctl", "--socket", str(sock), "status", check=False)
    assert gone.returncode == 1 and "no bridge" in gone.stderr


def test_ls_lists_three_bridges_and_a_stale_socket(root: None, tmp_path: Path) -> None:
    tag = "vtc" + secrets.token_hex(2)
    topo = Topology(tag)
    sockdir = tmp_path / "run"
    nets: list[Net] = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            n = Net(topo, f"{tag}{i}", tmp_path / str(i))
            nets.append(n)
            n.start([{"use": "netem", "delay_ms": 1}] * i, control=str(sockdir / f"{n.tag}.sock"))
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(sockdir / "gone.sock"))
        stale.close()
        rows = json.loads(vtl("ls", "--dir", str(sockdir), "--json").stdout)
        by_name = {r["name"]: r for r in rows}
        assert [r["name"] for r in rows] == sorted(by_name) == sorted([n.tag for n in nets]
                                                                     + ["gone"])
        assert [len(by_name[n.tag]["services"]) for n in nets] == [0, 1, 2]
        assert by_name["gone"]["error"] == "not answering"
        text = vtl("ls", "--dir", str(sockdir)).stdout
        assert all(n.tag in text for n in nets) and "not answering" in text
    finally:
        for n in nets:
            n.stop_all()
        topo.close()


def final_snapshot(stderr: str) -> dict[str, Any]:
    """The counters a bridge logged when it stopped (its ``stopped; {...}`` line)."""
    [line] = [ln for ln in stderr.splitlines() if "stopped; {" in ln]
    return json.loads(line.split("stopped; ", 1)[1])


def test_pep_byte_counters_are_exact_when_a_connection_ends_and_at_stop(net: Net,
                                                                        tmp_path: Path) -> None:
    """bytes_up/bytes_down equal what moved: after a connection ended (a half-closed
    exchange of known sizes), and at stop for a connection still open."""
    net.host_path()
    sock = tmp_path / "ctl.sock"
    bridge = net.start([{"use": "pep"}], control=str(sock))
    got, want = half_close(net, size=300_000, reply_size=200_000)
    assert got == want
    assert wait_for(lambda: ctl(sock, "counters")["services"]["pep"].get(
        "connections_closed", 0) >= 1, 10)
    pep = ctl(sock, "counters")["services"]["pep"]
    assert (pep["bytes_up"], pep["bytes_down"]) == (300_000, len(want)), pep

    request = len(f"GET /bytes/{64 << 20}?seed=9 HTTP/1.1\r\nHost: {PEER_IP}:8080\r\n"
                  "Connection: close\r\n\r\n")
    seen: dict[str, Any] = {}

    def stop_while_open() -> None:
        # the guest stopped reading: once its window is shut, nothing moves; stop then
        def still() -> bool:
            rows = ctl(sock, "connections")["pep"]
            before = rows[0]["bytes_down"] if rows else -1
            time.sleep(0.5)
            rows = ctl(sock, "connections")["pep"]
            seen.update(rows[0] if rows else {})
            return bool(rows) and rows[0]["bytes_down"] == before
        assert wait_for(still, 15)
        bridge.stop()

    with pytest.raises(AssertionError):  # the bridge is gone: the client cannot finish
        slow_reader(net, 64 << 20, 6.0, during_stall=stop_while_open, seed=9,
                    first=1 << 20, rcvbuf=1 << 16, timeout=10)
    pep = final_snapshot(bridge.stderr)["services"]["pep"]
    assert seen["bytes_up"] == request and seen["bytes_down"] > 1 << 20, seen
    assert pep["bytes_up"] == 300_000 + request
    assert pep["bytes_down"] == len(want) + seen["bytes_down"], (pep, seen)
