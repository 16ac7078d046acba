"""`vtl demo` runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_vtl_demo(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root")
    before = namespaces()
    pcap = tmp_path / "demo.pcap"
    proc = subprocess.run([sys.executable, "-m", "vtl.bridge.cli", "demo", "--size-mb", "5",
                           "--delay-ms", "15", "--keep-capture", str(pcap)],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"SHA-256 equal\s*│\s*yes", proc.stdout), proc.stdout
    m = re.search(r"netem 15 ms each way \(median\)\s*│\s*([0-9.]+) ms", proc.stdout)
    assert m and 29.0 <= float(m.group(1)) <= 36.0, proc.stdout
    assert pcap.stat().st_size > 5 * 1024 * 1024
    tshark = subprocess.run(["tshark", "-r", str(pcap), "-q", "-z", "io,stat,0"],
                            capture_output=True, text=True, timeout=60)
    assert tshark.returncode == 0, tshark.stderr
    assert namespaces() == before
    assert "Traceback" not in proc.stderr
