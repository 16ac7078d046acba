"""The service written out in docs/architecture.md ("Writing a service") is real: loaded from a
file the way a config loads it, and driven by the page's own test snippet."""

from __future__ import annotations

import re
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from vtl.bridge import plugins
from vtl.bridge.config import parse_config

from vtl import DROP, PASS, Direction
from vtl.testing import ServiceHarness

PAGE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def example_service() -> str:
    text = PAGE.read_text()
    after = text.split("<!-- example: service -->", 1)[1]
    return BLOCK.search(after).group(1)


def harness_snippet() -> str:
    return next(b for b in BLOCK.findall(PAGE.read_text()) if "ServiceHarness(" in b)


def test_the_example_service_loads_from_a_file_and_validates_in_a_config(tmp_path):
    (tmp_path / "telnetguard.py").write_text(example_service())
    cls = plugins.load_file("telnetguard.py:TelnetGuard", tmp_path)
    assert cls.name == "telnetguard"
    cfg = parse_config({
        "ports": {"guest": {"kind": "tap", "ifname": "vtlx0"},
                  "uplink": {"kind": "packet", "ifname": "eth9"}},
        "services": [{"use": "telnetguard.py:TelnetGuard", "port": 2323}],
    }, tmp_path / "vm.toml")
    assert cfg.services[0].options.port == 2323


def test_the_pages_harness_snippet_runs_against_the_example(tmp_path):
    (tmp_path / "telnetguard.py").write_text(example_service())
    cls = plugins.load_file("telnetguard.py:TelnetGuard", tmp_path)
    scope = {"TelnetGuard": cls, "ServiceHarness": ServiceHarness, "Direction": Direction,
             "DROP": DROP, "Ether": Ether, "IP": IP, "TCP": TCP}
    exec(compile(harness_snippet(), str(PAGE), "exec"), scope)  # noqa: S102 - our own page
    h = scope["h"]
    other = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40001, dport=80, flags="S")
    assert h.send(other, Direction.TO_UPLINK, 121.0) is PASS
    assert h.extra("refused") == 1
