"""Every example is exercised: configs validate and run, the topology script builds and
removes its namespaces, the plugin loads by file path and by entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vtl.bridge.config import load_config
from vtl.bridge.topology import parse_ping_rtts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.toml"))


def vtl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtl.bridge.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path):
    proc = vtl("check", str(path))
    assert proc.returncode == 0, proc.stderr


def test_plugin_loads_from_file():
    cfg = load_config(EXAMPLES / "configs" / "plugin.toml")
    assert cfg.services[0].cls.__name__ == "ProtoCount"


def test_plugin_loads_by_entry_point(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLES / "plugins")],
                   check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = vtl("services", env=env)
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith("protocount") and "vtl-protocount" in line
               for line in listed.stdout.splitlines()), listed.stdout
    cfg = tmp_path / "ep.toml"
    cfg.write_text((EXAMPLES / "configs" / "plugin.toml").read_text().replace(
        'use = "../plugins/protocount.py:ProtoCount"', 'use = "protocount"'))
    checked = vtl("check", str(cfg), env=env)
    assert checked.returncode == 0, checked.stderr


@pytest.fixture
def example_topology():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root")
    prefix = "vtx" + os.urandom(2).hex()
    env = {**os.environ, "VTLEX_PREFIX": prefix}
    script = str(EXAMPLES / "topology.sh")
    subprocess.run([script, "up"], check=True, env=env, capture_output=True, timeout=30)
    try:
        yield prefix, env, script
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=30)
        assert not any(prefix in ns for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


@pytest.mark.integration
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_runs_on_the_example_topology(example_topology, path, tmp_path):
    prefix, env, script = example_topology
    text = path.read_text().replace("vtlex", prefix).replace("/tmp/", f"{tmp_path}/")
    text = text.replace('"../plugins/', f'"{EXAMPLES}/plugins/')
    cfg = tmp_path / path.name
    cfg.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "vtl.bridge.cli", "run", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if " ready" in line:
                break
        else:
            pytest.fail("vtl run exited before ready")
        subprocess.run([script, "guest-ip"], check=True, env=env, capture_output=True, timeout=30)
        out = subprocess.run(["ip", "netns", "exec", f"{prefix}-vm", "ping", "-c", "3", "-i",
                              "0.2", "-W", "3", "10.77.0.2"], capture_output=True, text=True,
                             timeout=30).stdout
        if path.name == "socks.toml":  # ICMP admin prohibited: ping says "Packet filtered"
            assert "packet filtered" in out.lower() and not parse_ping_rtts(out), out
        else:
            assert len(parse_ping_rtts(out)) >= 2  # netem.toml loses 1%
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
