"""The bridge's egress policy: which destination a stream request names, refusals counted
and logged (rate-limited), the host's own addresses read from the kernel and followed
when they change, and the ``[bridge] deny``/``allow`` config keys."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vtl.bridge.config import parse_config
from vtl.bridge.egress import (
    LOG_EVERY_S,
    RT_TABLE_LOCAL,
    RTM_DELADDR,
    RTM_NEWROUTE,
    RTN_LOCAL,
    EgressPolicy,
    destination,
    relevant,
)

from vtl.errors import ConfigError, SetupError
from vtl.flow import FlowKey
from vtl.stream import StreamFlow, StreamRequest

OWN4 = ipaddress.ip_network("192.0.2.10/32")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def policy(deny=(), allow=(), own=(OWN4,), clock=None) -> EgressPolicy:
    p = EgressPolicy(deny, allow, logging.getLogger("test.egress"), read_own=lambda: own,
                     watch=False, clock=clock or Clock())
    p.start()
    return p


def tcp(host: str, port: int = 80) -> StreamRequest:
    return StreamRequest("tcp", host, port)


def socks(host: str, port: int = 80, command: str = "connect") -> StreamRequest:
    return StreamRequest("socks5", host, port, options={"proxy": ("127.0.0.1", 1080),
                                                       "command": command})


def udt(dst: str | None, dport: int = 80) -> StreamRequest:
    flow = None if dst is None else StreamFlow(FlowKey.tcp("10.0.0.1", 40000, dst, dport))
    return StreamRequest("udt", "127.0.0.1", 9000, flow=flow, options={})


# -- which destination the guest chose -------------------------------------------------

def test_destination_by_kind() -> None:
    assert destination(tcp("127.0.0.1", 7)) == ("127.0.0.1", 7)
    assert destination(socks("10.0.0.1", 443)) == ("10.0.0.1", 443)
    assert destination(socks("example.com", 0, command="resolve")) is None
    assert destination(socks("127.0.0.1", 0, command="resolve_ptr")) is None
    # udt: the peer bridge is the operator's; the guest chose the flow's destination
    assert destination(udt("169.254.169.254", 80)) == ("169.254.169.254", 80)
    assert destination(udt(None)) is None


@pytest.mark.parametrize(("request_", "why"), [
    (tcp("127.0.0.1"), "loopback"),
    (tcp("[::1]"), "loopback"),
    (tcp("::ffff:127.0.0.1"), "loopback"),
    (tcp("127.1"), "loopback"),
    (tcp("169.254.169.254"), "link-local"),
    (tcp("fe80::1"), "link-local"),
    (tcp("224.0.0.1"), "multicast"),
    (tcp("255.255.255.255"), "broadcast"),
    (tcp("240.1.2.3"), "reserved"),
    (tcp("0.0.0.0"), "unspecified"),
    (tcp("192.0.2.10"), "own address"),
    (tcp("10.0.0.5", 0), "port 0"),
    (tcp("localhost"), "localhost name"),
    (socks("127.0.0.1"), "loopback"),
    (socks("192.0.2.10"), "own address"),
    (socks("a.localhost"), "localhost name"),
    (socks("10.199.0.2", 0), "port 0"),
    (udt("127.0.0.1"), "loopback"),
    (udt("10.0.0.2", 0), "port 0"),
])
def test_refused_requests_close_prohibited(request_: StreamRequest, why: str) -> None:
    p = policy()
    verdict = p(request_, None)
    assert verdict is not None
    reason, message = verdict
    assert reason == "prohibited"
    assert f"({why})" in message
    assert p.refused == 1
    assert p.snapshot()["refused_by_class"] == {why: 1}


@pytest.mark.parametrize("request_", [
    tcp("10.0.0.5"), tcp("2001:db8::1", 443), tcp("example.com"), socks("example.com", 443),
    socks("8.8.8.8", 53), udt("10.0.0.2"), udt(None),
    socks("127.0.0.1", 0, command="resolve_ptr"),  # a lookup, no connection to it
    StreamRequest("socks5", "example.com", 0, options={"command": "resolve"}),
])
def test_allowed_requests_pass(request_: StreamRequest) -> None:
    p = policy()
    assert p(request_, None) is None
    assert p.refused == 0


def test_operator_lists() -> None:
    p = policy(deny=["10.0.0.0/8"], allow=["169.254.169.254", "10.9.0.0/16"])
    assert p(tcp("169.254.169.254"), None) is None
    assert p(tcp("10.1.2.3"), None)[1].endswith("(bridge.deny 10.0.0.0/8)")
    assert p(tcp("10.9.2.3"), None) is None
    assert p.snapshot()["refused_by_class"] == {"bridge.deny": 1}


def test_refusals_are_logged_once_per_class_per_interval(caplog) -> None:
    """A guest opening to many distinct addresses is counted, and logged a line per class
    of destination per interval (the malformed flood opened to thousands)."""
    clock = Clock()
    p = policy(clock=clock)
    caplog.set_level(logging.WARNING, "test.egress")
    for port in range(1, 51):
        assert p(tcp("127.0.0.1", port), None) is not None
    assert p(tcp("::1"), None) is not None
    for last in range(1, 40):
        assert p(tcp(f"169.254.0.{last}"), None) is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "127.0.0.1 port 1: loopback" in lines[0]
    assert "169.254.0.1 port 80: link-local" in lines[1]
    clock.t += LOG_EVERY_S - 0.1
    p(tcp("127.0.0.1", 9), None)
    assert len(caplog.records) == 2
    clock.t += 0.2
    p(tcp("127.0.0.1", 10), None)
    assert len(caplog.records) == 3
    assert "(51 more like it since the last line)" in caplog.records[-1].getMessage()
    assert p.refused == 92


def test_a_flood_of_distinct_destinations_keeps_the_log_memory_bounded(caplog) -> None:
    from vtl.bridge import egress

    p = policy()
    caplog.set_level(logging.WARNING, "test.egress")
    for i in range(egress.LOG_MEMORY + 500):
        p(tcp(str(ipaddress.IPv4Address(0x7F000000 + i))), None)
    assert len(p._logged) <= egress.LOG_MEMORY
    assert len(caplog.records) == 1  # one class of destination: one line
    assert p.refused == egress.LOG_MEMORY + 500


def test_a_kernel_that_cannot_be_read_is_a_setup_error() -> None:
    def broken():
        raise OSError("no netlink here")

    p = EgressPolicy(read_own=broken, watch=False)
    with pytest.raises(SetupError, match="cannot read the host's addresses: no netlink here"):
        p.start()


# -- netlink notifications: which ones change the own addresses ------------------------

def _nlmsg(mtype: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body
    return msg + bytes(-len(msg) % 4)


def _rtmsg(table: int, rtype: int) -> bytes:
    return bytes([2, 32, 0, 0, table, 2, 0, rtype]) + bytes(4)


def test_relevant_notifications() -> None:
    addr = _nlmsg(RTM_DELADDR, bytes(8))
    local = _nlmsg(RTM_NEWROUTE, _rtmsg(RT_TABLE_LOCAL, RTN_LOCAL))
    anyip_elsewhere = _nlmsg(RTM_NEWROUTE, _rtmsg(100, RTN_LOCAL))
    unicast = _nlmsg(RTM_NEWROUTE, _rtmsg(254, 1))
    assert relevant(addr)
    assert relevant(local)
    assert relevant(anyip_elsewhere)
    assert not relevant(unicast)
    assert not relevant(unicast * 50)
    assert relevant(unicast * 3 + local)
    assert relevant(struct.pack("=IHHII", 4, RTM_NEWROUTE, 0, 0, 0))  # malformed: dump
    assert not relevant(b"")


# -- the kernel, for real, in a namespace of the test's own ---------------------------

WATCH_SCRIPT = textwrap.dedent("""
    import ipaddress, json, subprocess, time
    from vtl.bridge.egress import EgressPolicy, kernel_addresses
    from vtl.stream import StreamRequest

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def refused(host):
        return p(StreamRequest("tcp", host, 80), None) is not None

    def until(pred, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.01)
        return False

    out = {}
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")  # no dummy module here
    sh("ip", "link", "set", "d0", "up")
    sh("ip", "link", "set", "d1", "up")
    sh("ip", "addr", "add", "192.0.2.5/24", "dev", "d0")
    p = EgressPolicy()
    p.start()
    try:
        out["initial_own"] = refused("192.0.2.5")
        out["initial_broadcast"] = refused("192.0.2.255")
        out["neighbour"] = refused("192.0.2.6")
        sh("ip", "addr", "add", "198.51.100.7/24", "dev", "d0")
        out["added"] = until(lambda: refused("198.51.100.7"))
        sh("ip", "-6", "addr", "add", "2001:db8::7/64", "dev", "d0", "nodad")
        out["added6"] = until(lambda: refused("2001:db8::7"))
        sh("ip", "route", "add", "local", "203.0.113.0/24", "dev", "lo")
        out["anyip"] = until(lambda: refused("203.0.113.99"))
        sh("ip", "addr", "del", "198.51.100.7/24", "dev", "d0")
        out["removed"] = until(lambda: not refused("198.51.100.7"))
        before = p.refreshes
        for i in range(20):  # routing churn outside the local table: no dumps
            sh("ip", "route", "add", f"10.{i}.0.0/16", "via", "192.0.2.1")
        time.sleep(0.2)
        out["unicast_routes_dumps"] = p.refreshes - before
        out["thread_alive"] = p._thread is not None and p._thread.is_alive()
    finally:
        t0 = time.monotonic()
        p.stop()
        out["stop_s"] = time.monotonic() - t0
        out["thread_after_stop"] = p._thread
    print(json.dumps(out))
""")


def test_own_addresses_follow_the_kernel(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (a network namespace of its own)")
    script = tmp_path / "watch.py"
    script.write_text(WATCH_SCRIPT)
    # unshare --net: a namespace that disappears with the process, nothing to clean up
    proc = subprocess.run(["unshare", "--net", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["initial_own"] and out["initial_broadcast"], out
    assert not out["neighbour"], out
    assert out["added"] and out["added6"] and out["anyip"] and out["removed"], out
    assert out["unicast_routes_dumps"] == 0, out
    assert out["thread_alive"], out
    assert out["stop_s"] < 1.0 and out["thread_after_stop"] is None, out


# -- [bridge] deny / allow in the config -----------------------------------------------

PORTS = {"guest": {"kind": "tap", "ifname": "x"}, "uplink": {"kind": "pcap", "ifname": "y"}}


def test_config_reads_prefixes() -> None:
    cfg = parse_config({"bridge": {"deny": ["10.0.0.0/8", "fd00::/8"],
                                   "allow": ["169.254.169.254"]}, "ports": PORTS})
    assert cfg.bridge.deny == (ipaddress.ip_network("10.0.0.0/8"),
                               ipaddress.ip_network("fd00::/8"))
    assert cfg.bridge.allow == (ipaddress.ip_network("169.254.169.254/32"),)
    p = EgressPolicy.from_config(cfg.bridge)
    assert p.addresses.deny == cfg.bridge.deny


def test_config_defaults_are_empty() -> None:
    cfg = parse_config({"ports": PORTS})
    assert cfg.bridge.deny == () and cfg.bridge.allow == ()


@pytest.mark.parametrize(("bridge", "problem"), [
    ({"deny": ["10.0.0.0/8", "192.168.0.0/16", "x"]}, "bridge.deny[2]: 'x' is not an IP prefix"),
    ({"allow": ["10.0.0.1/8"]},
     "bridge.allow[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
    ({"deny": [3]}, "bridge.deny[0]: 3 is not an IP prefix"),
    ({"deny": "10.0.0.0/8"}, 'bridge.deny: give a list of IP prefixes, e.g. ["10.0.0.0/8"]'),
    ({"deny": ["10.0.0.0/8"], "allow": ["10.0.0.0/8"]},
     "bridge.allow: 10.0.0.0/8 also in bridge.deny: keep one of the two"),
])
def test_config_problems_name_the_key(bridge: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"bridge": bridge, "ports": PORTS})
    assert any(f": {problem}" in p for p in exc.value.problems), exc.value.problems


def test_vtl_check_reports_bad_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "vtl.toml"
    path.write_text('[bridge]\ndeny = ["10.0.0.0/8", "nope"]\nallow = ["fe80::1/10"]\n'
                    '[ports.guest]\nkind = "tap"\nifname = "t"\n'
                    '[ports.uplink]\nkind = "pcap"\nifname = "u"\n')
    proc = subprocess.run([sys.executable, "-m", "vtl.bridge.cli", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: bridge.deny[1]: 'nope' is not an IP prefix" in proc.stderr
    assert f"{path}: bridge.allow[0]: 'fe80::1/10' has host bits set" in proc.stderr
    assert "Traceback" not in proc.stderr
