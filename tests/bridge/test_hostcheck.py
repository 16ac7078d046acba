"""Host checks: options only the kernel can judge (a TCP congestion control) are refused
when the config is loaded or changed, under the option's key, and change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from vtl.bridge.config import parse_config, tuned
from vtl.bridge.hostcheck import host_problems
from vtl.bridge.transports.tcp import congestion_problem

from vtl import ServiceOptions
from vtl.errors import ConfigError
from vtl.service import HostCheck, TcpCongestion

AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()


def config(**service) -> dict:
    return {"ports": {"guest": {"kind": "tap", "ifname": "a"},
                      "uplink": {"kind": "pcap", "ifname": "b"}},
            "services": [{"use": "pep", **service}]}


def test_what_the_kernel_has_passes_and_what_it_lacks_is_named():
    for name in AVAILABLE:
        assert congestion_problem(name) is None, name
    problem = congestion_problem("nosuchcc")
    assert problem is not None and "'nosuchcc'" in problem
    assert all(name in problem for name in AVAILABLE)  # says what there is instead


@pytest.mark.parametrize("use", ["pep", "socks"])
def test_config_names_the_key_of_a_missing_congestion_control(use):
    extra = {"proxy": "socks5://127.0.0.1:9050"} if use == "socks" else {}
    cfg = parse_config({**config(), "services": [{"use": use, "congestion": AVAILABLE[0],
                                                  **extra}]})
    assert cfg.services[0].options.congestion == AVAILABLE[0]
    with pytest.raises(ConfigError) as info:
        parse_config({**config(), "services": [{"use": use, "congestion": "nosuchcc", **extra}]})
    assert "services[0].congestion: this kernel has no congestion control 'nosuchcc'" in str(
        info.value)
    with pytest.raises(ConfigError) as info:  # the form is the options model's own check
        parse_config({**config(), "services": [{"use": use, "congestion": "BBR", **extra}]})
    assert "services[0].congestion" in str(info.value) and "not a congestion control name" in str(
        info.value)


def test_a_live_change_is_checked_too_and_the_spec_is_left_as_it_was():
    spec = parse_config(config()).services[0]
    assert spec.options.congestion is None
    assert tuned(spec, {"congestion": AVAILABLE[-1]}).options.congestion == AVAILABLE[-1]
    with pytest.raises(ConfigError) as info:
        tuned(spec, {"congestion": "nosuchcc"})
    assert "pep.congestion: this kernel has no congestion control" in str(info.value)
    assert spec.options.congestion is None


def test_a_check_the_bridge_does_not_know_is_a_problem_not_a_pass():
    class Odd(ServiceOptions):
        thing: TcpCongestion = Field(None)
        other: str | None = None

    assert host_problems(Odd(), "x") == []  # None: nothing to check
    assert host_problems(Odd(thing="nosuchcc"), "x")[0].startswith("x.thing: ")

    from typing import Annotated

    class Odder(ServiceOptions):
        gadget: Annotated[str, HostCheck("no-such-check")] = "a"

    assert host_problems(Odder(), "y") == [
        "y.gadget: the bridge has no host check 'no-such-check' for this option"]
