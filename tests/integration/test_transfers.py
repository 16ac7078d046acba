"""200 MB each way through the bridge, intact, with and without an impaired link."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from httpsha import expected_sha256
from vtlnet import PEER_IP

pytestmark = pytest.mark.integration

SIZE = 200 * 1024 * 1024
SERVER = str(Path(__file__).with_name("httpsha.py"))

# name: (services, uplink port kind). "pcap-uplink" crosses between a port with virtio-net
# headers (the TAP) and one without (libpcap): the guest is offered no offloads, so its
# frames lose their header on the way out, and the peer's (whose checksums libpcap hands
# over unfinished) get a header asking the guest's kernel to finish them; chainless,
# and through a chain ("pcap-firewall").
CHAINS = {
    "empty": ([], "packet"),
    "netem": ([{"use": "netem", "delay_ms": 20, "loss": 0.01, "reorder": 0.01, "seed": 7}],
              "packet"),
    "pcap-uplink": ([], "pcap"),
    "pcap-firewall": ([{"use": "firewall", "default_in": "accept"}], "pcap"),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_200mb_download_and_upload_intact(net, tmp_path, chain):
    net.topo.spawn(net.peer_ns, [sys.executable, SERVER, PEER_IP, "8080"])
    net.topo.wait_tcp(net.peer_ns, PEER_IP, 8080)
    services, uplink_kind = CHAINS[chain]
    vtl = net.start(services, uplink_kind=uplink_kind)

    # download: the guest's kernel receives, curl writes, we hash
    out = tmp_path / "down.bin"
    net.guest(["curl", "-sS", "--fail", "--max-time", "900", "-o", str(out),
               f"http://{PEER_IP}:8080/bytes/{SIZE}?seed=3"], timeout=910)
    got = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    assert got == expected_sha256(SIZE, 3)

    # upload: the guest sends a random file; the peer answers the SHA-256 it received
    src = tmp_path / "up.bin"
    with open(src, "wb") as f:
        for _ in range(SIZE // (1 << 20)):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    reply = net.guest(["curl", "-sS", "--fail", "--max-time", "900", "-T", str(src),
                       f"http://{PEER_IP}:8080/upload"], timeout=910).stdout.strip()
    assert reply == want
    assert vtl.stop() == 0
