"""socks probes its proxy at start, sans-IO: one WARNING naming the proxy when it is down
or not SOCKS5, nothing but an INFO line when it answers; ready either way."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, Ether
from vtl.services.socks import Socks, SocksOptions

from vtl import CONSUMED, Direction, Frame
from vtl.testing import FakeContext

PROXY = "socks5://127.0.0.1:1080"


def started(**options: Any) -> tuple[Socks, FakeContext]:
    ctx = FakeContext("socks")
    options = {"proxy": PROXY, "gateway_mac": "02:00:5e:00:00:01", **options}
    s = Socks(SocksOptions(**options), ctx)
    s.start(0.0)
    return s, ctx


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "vtl.test.socks"]


def test_start_probes_the_proxy_with_the_greeting_only() -> None:
    s, ctx = started()
    [probe] = ctx.streams
    r = probe.request
    assert (r.kind, r.host, r.port) == ("socks5", "127.0.0.1", 1080)
    assert r.options == {"proxy": ("127.0.0.1", 1080), "username": None, "password": None,
                         "command": "probe"}
    _, ctx2 = started(proxy="socks5://alice:secret@[::1]:9050")
    opts = ctx2.streams[0].request.options
    assert (opts["proxy"], opts["username"], opts["password"]) == (("::1", 9050), "alice",
                                                                   "secret")


def test_a_proxy_that_answers_gives_no_warning_and_the_probe_is_closed(
        caplog: pytest.LogCaptureFixture) -> None:
    s, ctx = started()
    with caplog.at_level(logging.INFO, logger="vtl.test.socks"):
        ctx.streams[0].connect(reply=("127.0.0.1", 1080), now=0.01)
        ctx.deliver_local_closes()
    assert warnings(caplog) == [] and s.probe_result == "up"
    assert ctx.streams[0].local == "close"
    assert any("127.0.0.1:1080 answers" in r.getMessage() for r in caplog.records)
    assert ctx.extra("proxy_probe_failed") == 0


@pytest.mark.parametrize(("reason", "message", "needle"), [
    ("refused", "SOCKS proxy 127.0.0.1:1080 is unreachable: Connection refused",
     "SOCKS proxy 127.0.0.1:1080 is unreachable: Connection refused"),
    ("error", "SOCKS proxy 127.0.0.1:1080 is not speaking SOCKS5: its method selection has "
              "version 0x48, not 0x05", "not speaking SOCKS5"),
    ("timeout", "", "SOCKS proxy 127.0.0.1:1080: timeout"),
])
def test_a_proxy_that_is_down_gets_one_warning_and_the_service_stays_ready(
        caplog: pytest.LogCaptureFixture, reason: str, message: str, needle: str) -> None:
    s, ctx = started()
    with caplog.at_level(logging.WARNING, logger="vtl.test.socks"):
        ctx.streams[0].closed(reason, message, now=0.02)  # type: ignore[arg-type]
    [line] = warnings(caplog)
    assert needle in line and "runs on" in line
    assert ctx.extra("proxy_probe_failed") == 1
    syn = Frame(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:5e:00:00:01")
                      / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80,
                                                                 flags="S", seq=1)))
    assert s.process(syn, Direction.TO_UPLINK, 0.1) is CONSUMED
    assert ctx.streams[-1].request.options["command"] == "connect"  # still tries the proxy


def test_stop_before_the_answer_aborts_the_probe_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    s, ctx = started()
    with caplog.at_level(logging.WARNING, logger="vtl.test.socks"):
        s.stop(0.5)
        assert ctx.streams[0].local == "abort"
        ctx.deliver_local_closes()
    assert warnings(caplog) == []
