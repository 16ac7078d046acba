"""socks checks its proxy at start, and ``-v`` shows each connection: a real danted.

Proxy up: no WARNING, and at debug level one line per connection opened and ended
(flow, outcome, bytes, duration). Proxy down when the bridge starts: the bridge is
ready all the same, one WARNING names the proxy and the problem, and once danted
listens the guest's connections go through without a restart. Topology:
:mod:`socksnet`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from socksnet import HTTP_PORT, SRV_IP, WEB_NAME, SocksNet, socks_counters, socks_net
from vtlnet import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def snet(root: None, tmp_path: Path) -> Iterator[SocksNet]:
    with socks_net("vpp", tmp_path) as s:
        yield s


def warnings_naming(snet: SocksNet) -> list[str]:
    assert snet.vtl is not None
    return [ln for ln in snet.vtl.lines
            if " WARNING " in ln and f"SOCKS proxy {snet.dante.where}" in ln]


def test_proxy_up_no_warning_and_debug_lines_per_connection(snet: SocksNet) -> None:
    vtl = snet.start(snet.socks(), log_level="debug")
    assert wait_for(lambda: any(f"SOCKS proxy {snet.dante.where} answers" in ln
                                for ln in vtl.lines), 5), vtl.stderr[-3000:]
    r = snet.probe("tcp", SRV_IP, HTTP_PORT, 5, "get")
    assert r["outcome"] == "data" and r["bytes"] == 1000, r
    flow = re.escape(f"-> {SRV_IP}:{HTTP_PORT}")
    opened = re.compile(rf"DEBUG .*connection tcp \S+ {flow} opened: socks5 {SRV_IP}:{HTTP_PORT}")
    ended = re.compile(rf"DEBUG .*connection tcp \S+ {flow} ended closed: (\d+) bytes up, "
                       rf"(\d+) bytes down, [\d.]+ s")
    assert wait_for(lambda: any(ended.search(ln) for ln in vtl.lines), 5), vtl.stderr[-3000:]
    assert any(opened.search(ln) for ln in vtl.lines), vtl.stderr[-3000:]
    m = next(m for ln in vtl.lines if (m := ended.search(ln)))
    assert int(m.group(1)) > 0 and int(m.group(2)) > 1000  # a request; headers and body
    assert warnings_naming(snet) == []


def test_proxy_down_at_start_warns_and_the_bridge_runs_on(snet: SocksNet) -> None:
    snet.dante.stop()
    vtl = snet.start(snet.socks(dns="fake-ip"))  # ready although the proxy is down
    assert wait_for(lambda: warnings_naming(snet), 5), vtl.stderr[-3000:]
    [line] = warnings_naming(snet)
    assert "is unreachable" in line and "runs on" in line, line
    assert snet.probe("tcp", SRV_IP, HTTP_PORT, 5)["outcome"] == "refused"
    snet.dante.start()
    r = snet.probe("tcp", WEB_NAME, HTTP_PORT, 5, "get")
    assert r["outcome"] == "data" and r["bytes"] == 1000, r
    assert vtl.proc.poll() is None
    vtl.stop()
    assert socks_counters(vtl)["proxy_probe_failed"] == 1
