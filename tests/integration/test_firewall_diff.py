"""The firewall, verdict for verdict against the kernel's nftables (issue 16).

One topology (:mod:`fwnet`) holds both setups: a router namespace with the rule set
compiled to an nft ``inet`` forward chain (:mod:`fwcompile`), and a ``vtl run``
bridge with ``[[services]] use = "firewall"`` and the same options. Each trace
(:mod:`fwscript`) is replayed at both at once with raw frames (:mod:`fwtrace`);
per step, whether the packet came out at the other end and what came back to
the sender (RST, ICMP type/code) must agree, except the steps of an explicit
allowlist, each with its reason.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from fwnet import FwNet, open_fwnet
from fwscript import (
    KERNEL_LANDMARKS,
    RANDOM_OPTIONS,
    SCRIPTED_ALLOWLIST,
    SCRIPTED_OPTIONS,
    build_trace,
    random_traces,
    scripted_trace,
)
from fwtrace import divergences, replay, table
from hypothesis import HealthCheck, Phase, given, settings

assert RANDOM_OPTIONS is SCRIPTED_OPTIONS  # one bridge serves both tests

RANDOM_EXAMPLES = 22
RANDOM_STEPS = 20


@pytest.fixture(scope="module")
def fwnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FwNet]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("integration tests need root, and CI runs as root")
        pytest.skip("needs root")
    with open_fwnet(tmp_path_factory.mktemp("fwdiff"), SCRIPTED_OPTIONS) as net:
        net.start_vtl()
        yield net


def test_scripted_trace_gets_the_kernels_verdicts(fwnet: FwNet) -> None:
    steps = scripted_trace()
    res = replay([fwnet.kernel, fwnet.vtl], steps, wait=0.25)
    report = table(steps, res)
    print(report)
    kernel = {s.name: str(o) for s, o in zip(steps, res["kernel"], strict=True)}
    wrong = {k: (v, kernel[k]) for k, v in KERNEL_LANDMARKS.items() if kernel[k] != v}
    assert not wrong, f"the kernel reference itself (expected, got): {wrong}\n{report}"
    divs = divergences(steps, res["kernel"], res["vtl"], SCRIPTED_ALLOWLIST)
    assert not divs, "\n".join(divs) + "\n\n" + report


def test_random_traces_get_the_kernels_verdicts(fwnet: FwNet) -> None:
    """Random segments of a few flows (hypothesis; no shrinking: each example costs a
    replay); every divergence of every example is reported, with its spec."""
    found: list[str] = []
    ports = itertools.count(20000, 10)
    ran = []

    @settings(max_examples=RANDOM_EXAMPLES, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(spec=random_traces(RANDOM_STEPS))
    def run(spec: tuple) -> None:
        steps = build_trace(spec, next(ports))
        res = replay([fwnet.kernel, fwnet.vtl], steps, wait=0.1)
        ran.append(len(steps))
        for d in divergences(steps, res["kernel"], res["vtl"]):
            found.append(f"{d}\n    in spec {spec!r} (base port {steps[0].pkt.sport})")

    run()
    assert len(ran) >= RANDOM_EXAMPLES // 2, ran
    assert not found, f"{len(found)} divergences:\n" + "\n".join(found)
