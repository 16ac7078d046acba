"""keepalive with real kernel stacks in namespaces (the real paused VM is in test_vm_*):
a peer with ``tcp_retries2 = 5`` sends to the guest; `vtl ctl NAME hold` for 20 s, longer
than the 13 s that peer would last unanswered, then `release`: the connection lives, every
byte arrives intact, the peer saw no PAWS drop, and its ARP for the guest was answered."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tcpprobe import halfclose_reply
from tcptools import PROBE, expected_sha256
from vtlnet import GUEST_IP, Net, nstat, wait_for
from vtlnet import ctl_json as ctl

pytestmark = pytest.mark.integration

SIZE = 60 << 20  # at 100 Mbit/s: about 5 s of sending, with a 20 s hold in the middle
HOLD_S = 20.0


def test_a_held_guest_keeps_a_sending_peer(net: Net, tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    net.topo.sysctl("net.ipv4.tcp_retries2", "5", net.peer_ns)
    net.start([{"use": "netem", "rate_mbit": 100}, {"use": "keepalive"}], control=str(sock))
    port = 9191
    server = net.topo.spawn(net.guest_ns, [sys.executable, PROBE, "halfclose-server", GUEST_IP,
                                           str(port), "0", "65536"])
    net.topo.wait_tcp(net.guest_ns, GUEST_IP, port)
    paws = nstat(net.peer, "TcpExtPAWSEstab")
    client = net.topo.spawn(net.peer_ns, [sys.executable, PROBE, "halfclose", GUEST_IP,
                                          str(port), str(SIZE), "3", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: ctl(sock, "counters")["services"]["keepalive"]["tracked"] >= 1,
                        10)
        time.sleep(1.0)  # under way: a few MB sent
        held = ctl(sock, "hold")["keepalive"]
        assert held["state"] == "holding" and held["connections"] >= 1
        time.sleep(3.0)
        net.peer(["ip", "neigh", "flush", "dev", "eth0"])  # the peer asks for the guest again
        time.sleep(HOLD_S - 3.0)
        during = ctl(sock, "counters")["services"]["keepalive"]
        released = ctl(sock, "release")["keepalive"]
        out, err = client.communicate(timeout=90)
    finally:
        net.topo.stop_proc(client)
        net.topo.stop_proc(server)
    result = json.loads(out.strip().splitlines()[-1])
    assert result.get("error") in (None, ""), (result, err[-500:])
    got = base64.b64decode(result["reply"])
    assert got == halfclose_reply(expected_sha256(SIZE, 3), 65536), "every byte, both ways"
    assert during["state"] == "holding" and during["answered"] >= 3, during
    assert during["custody_bytes"] >= 1 and during["arp_answered"] >= 1, during
    assert released["state"] == "live" and released["held_s"] >= HOLD_S - 0.5
    assert released["custody_delivered"] + released["woken"] >= 1, released
    assert nstat(net.peer, "TcpExtPAWSEstab") == paws, "the peer dropped nothing as old (PAWS)"
