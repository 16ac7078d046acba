"""The systemd template unit ``examples/systemd/vtl@.service`` checks out.

Two checks, neither skipped: a parse of the unit's sections and keys (always), asserting the
keys that matter (Type=notify, ``vtl run /etc/vtl/%i.toml``, the capabilities, the restart
policy, the shared runtime directory), and ``systemd-analyze verify`` of an instance when that
tool is installed and works here; without it, the same test checks every key against the
directives systemd knows for its section (the list below: the ones this unit may use).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples" / "systemd" / "vtl@.service"
VTL = Path(sys.executable).with_name("vtl")

KNOWN = {
    "Unit": {
        "Description", "Documentation", "After", "Wants", "Requires", "Before",
        "StartLimitIntervalSec", "StartLimitBurst",
    },
    "Service": {
        "Type", "NotifyAccess", "ExecStart", "ExecReload", "Restart", "RestartSec",
        "TimeoutStopSec", "CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges",
        "DeviceAllow", "ProtectSystem", "ReadWritePaths", "RuntimeDirectory",
        "RuntimeDirectoryPreserve", "StateDirectory", "ProtectHome", "PrivateTmp",
        "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
        "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures", "UMask",
    },
    "Install": {"WantedBy"},
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → values (a key may repeat); comments and blank lines skipped."""
    unit: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"line {n}: not `key=value` in a section: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def working_analyze() -> str | None:
    analyze = shutil.which("systemd-analyze")
    if analyze and subprocess.run([analyze, "--version"], capture_output=True).returncode == 0:
        return analyze
    return None


def unit_problems(text: str) -> list[str]:
    """What ``systemd-analyze verify`` (or, without it, the known-keys check) reports."""
    analyze = working_analyze()
    if analyze is None:
        return known_key_problems(text)
    with tempfile.TemporaryDirectory() as tmp:
        # The installed path may not exist here: verify checks ExecStart is executable,
        # so point it at this venv's vtl (what docs/operating.md tells a venv user to do).
        (Path(tmp) / UNIT.name).write_text(text.replace("/usr/local/bin/vtl", str(VTL)))
        res = subprocess.run(
            [analyze, "verify", "--man=no", "./vtl@vm1.service"],
            cwd=tmp, capture_output=True, text=True, timeout=60,
        )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return lines or ([f"exit {res.returncode}"] if res.returncode else [])


def known_key_problems(text: str) -> list[str]:
    """Every section and key of ``text`` is one systemd knows there (the list above)."""
    out = []
    for name, keys in parse_unit(text).items():
        known = KNOWN.get(name)
        if known is None:
            out.append(f"unknown section [{name}]")
            continue
        out += [f"unknown key {k!r} in [{name}]" for k in keys if k not in known]
    return out


def test_unit_has_the_keys_that_matter():
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["ExecStart"] == ["/usr/local/bin/vtl run /etc/vtl/%i.toml"]
    assert svc["ExecReload"] == ["/usr/local/bin/vtl ctl %i reload"]
    assert svc["Restart"] == ["on-failure"] and svc["RestartSec"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        caps = " ".join(svc[key]).split()
        assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set(caps), key
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert "/run/vtl" in " ".join(svc["ReadWritePaths"]).split()
    assert svc["RuntimeDirectory"] == ["vtl"] and svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert svc["StateDirectory"] == ["vtl"]  # /var/lib/vtl, writable, for captures
    # Nothing that would break TAP creation or namespace moves.
    for key in ("PrivateNetwork", "PrivateDevices", "ProtectKernelTunables", "InaccessiblePaths"):
        assert key not in svc, key
    assert "/dev/net/tun rw" in svc["DeviceAllow"]
    assert "AF_PACKET" in svc["RestrictAddressFamilies"][0].split()
    assert "net" in svc["RestrictNamespaces"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_verifies():
    assert unit_problems(UNIT.read_text()) == []


def test_unit_keys_are_known_for_their_sections():
    assert known_key_problems(UNIT.read_text()) == []


def test_both_checks_catch_a_broken_unit():
    broken = UNIT.read_text().replace("[Install]", "Restrat=always\n[Install]")
    misplaced = UNIT.read_text().replace("Type=notify", "Type=notify\nWantedBy=x.target")
    for text in (broken, misplaced):
        assert unit_problems(text)
        assert known_key_problems(text)
