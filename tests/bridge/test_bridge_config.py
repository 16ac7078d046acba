"""Config validation and `vtl check`: every problem named by file, key path and what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vtl.bridge.config import load_config, parse_config

from vtl.errors import ConfigError

GOOD = """
[bridge]
name = "vm1"
[ports.guest]
kind = "tap"
ifname = "vtl-vm1"
[ports.uplink]
kind = "pcap"
ifname = "eth1"
[[services]]
use = "netem"
delay_ms = 30
loss = 0.01
[[services]]
use = "capture"
match = "tcp port 80"
path = "/tmp/x.pcap"
"""

BAD = """
[bridge]
name = "vm1"
[ports.guest]
kind = "tap"
ifname = "vtl-vm1"
[[services]]
use = "nosuchservice"
[[services]]
use = "netem"
delay_ms = "thirty"
[[services]]
use = "capture"
path = "/tmp/x.pcap"
match = "tcp port nonsense"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vtl.toml"
    p.write_text(text)
    return p


def vtl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtl.bridge.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_good_config_loads(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert [s.name for s in cfg.services] == ["netem", "capture"]
    assert cfg.services[0].options.delay_ms == 30
    assert cfg.services[1].match is not None
    assert cfg.services[0].fail == "open"


def test_every_problem_is_named(tmp_path):
    path = write(tmp_path, BAD)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert all(line.startswith(f"{path}: ") for line in info.value.problems)
    assert "ports.uplink: missing" in text
    assert "services[0].use: unknown service 'nosuchservice'" in text
    assert "services[1].delay_ms:" in text and "number" in text
    assert "services[2].match: bad filter expression 'tcp port nonsense'" in text


def test_vtl_check_exits_2_naming_each_problem(tmp_path):
    path = write(tmp_path, BAD)
    proc = vtl("check", str(path))
    assert proc.returncode == 2
    for needle in ("ports.uplink", "services[0].use", "services[1].delay_ms",
                   "services[2].match"):
        assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_vtl_check_ok(tmp_path):
    proc = vtl("check", str(write(tmp_path, GOOD)))
    assert proc.returncode == 0, proc.stderr
    assert "ok (2 services)" in proc.stdout


@pytest.mark.parametrize(("text", "needle"), [
    ("[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\nkind='usb'\nifname='b'\n",
     "ports.uplink"),
    ("[ports.guest]\nkind='tap'\nifname='a'\nbogus=1\n[ports.uplink]\nkind='pcap'\nifname='b'\n",
     "ports.guest.bogus: unknown key"),
    ("[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\nkind='pcap'\nifname='b'\n"
     "[[services]]\nuse='netem'\nfail='sideways'\n", "services[0].fail"),
    ("[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\nkind='pcap'\nifname='b'\n"
     "[[services]]\nuse='netem'\nwhatever=3\n", "services[0].whatever: unknown key"),
    ("[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\nkind='pcap'\nifname='b'\n"
     "[[services]]\ndelay_ms=3\n", "services[0].use: missing"),
    ("this is = = not toml", "not valid TOML"),
    ("[bridge]\ncpus=[0, 4096]\n[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\n"
     "kind='pcap'\nifname='b'\n", "bridge.cpus: CPU 4096 is not one this process may run on"),
    ("[bridge]\nbusy_poll_us=-1\n[ports.guest]\nkind='tap'\nifname='a'\n[ports.uplink]\n"
     "kind='pcap'\nifname='b'\n", "bridge.busy_poll_us: Input should be greater than"),
])
def test_single_problems(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value)


def test_duplicate_service_names_are_numbered():
    cfg = parse_config({
        "ports": {"guest": {"kind": "tap", "ifname": "a"},
                  "uplink": {"kind": "pcap", "ifname": "b"}},
        "services": [{"use": "netem"}, {"use": "netem"}],
    })
    assert [s.name for s in cfg.services] == ["netem", "netem#2"]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_vtl_services_lists_builtins():
    proc = vtl("services", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "netem" in proc.stdout and "capture" in proc.stdout
    assert "delay_ms" in proc.stdout
