"""Real programs behind the kernel's nftables and behind VTL's firewall behave the same.

Issue 16's application matrix: the same firewall options run as VTL's ``firewall``
service in front of a guest and, compiled by :mod:`fwcompile`, as the forward
chain of a routed namespace (:mod:`fwapps` builds both, with real addresses and
stacks at the ends). From the outside host, curl, ``nc -z``, Python sockets and
ping try an allowed HTTP server, a rejected and a dropped TCP port, an allowed,
a rejected and a dropped UDP echo, and pings from an allowed, a dropped and a
rejected source; from the inside host, curl and ping go out (``default_out``
accept) and their replies come back as established traffic. Every probe runs at
both sides at once; the outcomes must be the expected one on both, a refusal
under 0.5 s on both (the reset or the ICMP error arrives at once) and a drop a
full timeout on both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fwapps import IN4, OUT4, OUT4B, OUT4C, AppNet, Outcome, both, open_appnet

pytestmark = pytest.mark.integration

WAIT = 2.0  # each probe's timeout (connect, answer, ping reply)
FAST = 0.5  # a refusal must come back within this
MB = 1_000_000
HTTP, CLOSED, REJECTED, DROPPED = 8080, 8081, 9000, 7000  # TCP ports on the inside host
UDP_OK, UDP_REJECTED, UDP_DROPPED = 9002, 9001, 7001  # UDP echoes on the inside host
OUTSIDE_HTTP = 8088  # httpsha on the outside host, for the inside's downloads

OPTIONS: dict[str, Any] = {
    "default_in": "drop", "default_out": "accept",
    "rules": [
        {"dir": "in", "proto": "tcp", "dport": [HTTP, CLOSED], "action": "accept"},
        {"dir": "in", "proto": "tcp", "dport": [REJECTED], "action": "reject"},
        {"dir": "in", "proto": "udp", "dport": [UDP_OK], "action": "accept"},
        {"dir": "in", "proto": "udp", "dport": [UDP_REJECTED], "action": "reject"},
        {"dir": "in", "proto": "icmp", "icmp_type": [8], "saddr": [f"{OUT4}/32"],
         "action": "accept"},
        {"dir": "in", "proto": "icmp", "saddr": [f"{OUT4C}/32"], "action": "reject"},
    ],
}

#: (name, from where, probe kind, toward, probe keywords, the outcome expected)
MATRIX: list[tuple[str, str, str, str, dict[str, Any], str]] = [
    ("curl allowed (1 MB body)", "outside", "curl", IN4,
     {"port": HTTP, "size": MB, "seed": 7}, "ok"),
    ("curl rejected", "outside", "curl", IN4, {"port": REJECTED, "size": 10}, "refused"),
    ("curl dropped", "outside", "curl", IN4, {"port": DROPPED, "size": 10}, "timeout"),
    ("nc -z allowed", "outside", "nc", IN4, {"port": HTTP}, "connected"),
    ("nc -z rejected", "outside", "nc", IN4, {"port": REJECTED}, "refused"),
    ("nc -z dropped", "outside", "nc", IN4, {"port": DROPPED}, "timeout"),
    ("connect allowed, no listener", "outside", "tcp", IN4, {"port": CLOSED}, "refused"),
    ("connect rejected", "outside", "tcp", IN4, {"port": REJECTED}, "refused"),
    ("connect dropped", "outside", "tcp", IN4, {"port": DROPPED}, "timeout"),
    ("udp allowed echo", "outside", "udp", IN4, {"port": UDP_OK}, "answered"),
    ("udp rejected echo", "outside", "udp", IN4, {"port": UDP_REJECTED}, "refused"),
    ("udp dropped echo", "outside", "udp", IN4, {"port": UDP_DROPPED}, "timeout"),
    ("ping allowed source", "outside", "ping", IN4, {"src": OUT4}, "replied"),
    ("ping dropped source", "outside", "ping", IN4, {"src": OUT4B}, "timeout"),
    ("ping rejected source", "outside", "ping", IN4, {"src": OUT4C}, "unreachable"),
    ("curl out (1 MB back)", "inside", "curl", OUT4,
     {"port": OUTSIDE_HTTP, "size": MB, "seed": 8}, "ok"),
    ("ping out", "inside", "ping", OUT4, {}, "replied"),
]


@pytest.fixture
def appnet(root: None, tmp_path: Path) -> Iterator[AppNet]:
    with open_appnet(tmp_path, OPTIONS) as net:
        net.serve(HTTP, [REJECTED, DROPPED], [UDP_OK, UDP_REJECTED, UDP_DROPPED],
                  OUTSIDE_HTTP)
        net.start()
        yield net


def judge(expected: str, got: dict[str, Outcome]) -> list[str]:
    """What is wrong with one probe's outcomes (empty when both sides are right)."""
    wrong = []
    for side, o in got.items():
        if o.what != expected:
            wrong.append(f"{side}: {o.what}, expected {expected}")
        elif expected in ("refused", "unreachable") and o.seconds >= FAST:
            wrong.append(f"{side}: refused after {o.seconds:.2f} s, not under {FAST} s")
        elif expected == "timeout" and not WAIT - 0.1 <= o.seconds < WAIT + 1.5:
            wrong.append(f"{side}: timed out after {o.seconds:.2f} s, not at {WAIT} s")
    return wrong


def test_real_programs_behave_the_same_behind_both_firewalls(appnet: AppNet) -> None:
    rows = [f"{'probe':32} {'expected':12} {'kernel (nftables)':34} vtl firewall"]
    problems = []
    for name, where, kind, host, kw, expected in MATRIX:
        got = both(appnet, where, kind, host, wait=WAIT, **kw)
        rows.append(f"{name:32} {expected:12} {got['kernel']!s:34} {got['vtl']!s}")
        problems += [f"{name}: {w}" for w in judge(expected, got)]
    report = "\n".join(rows)
    print(report)
    assert appnet.bridge is not None
    assert appnet.bridge.proc.poll() is None, appnet.bridge.stderr[-2000:]
    assert not problems, "\n".join(problems) + "\n\n" + report
