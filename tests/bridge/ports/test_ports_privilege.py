"""Without CAP_NET_ADMIN/CAP_NET_RAW every port says so in plain words."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from portsnet import suffix

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
from pydantic import TypeAdapter
from vtl.bridge.ports import PortConfig, make_port
from vtl.errors import SetupError
cfg = TypeAdapter(PortConfig).validate_python({"kind": sys.argv[1], "ifname": sys.argv[2]})
try:
    make_port("guest", cfg).open()
except SetupError as exc:
    print(exc)
else:
    print("opened")
"""


@pytest.mark.parametrize(
    "kind, ifname, cap",
    [("tap", "vtpt" + suffix() + "t", "CAP_NET_ADMIN"), ("packet", "lo", "CAP_NET_RAW"),
     ("pcap", "lo", "CAP_NET_RAW")],
)
def test_not_permitted(kind, ifname, cap):
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop capabilities"
    res = subprocess.run(
        [setpriv, "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw",
         sys.executable, "-c", SCRIPT, kind, ifname],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "operation not permitted; run as root or grant " + cap in res.stdout, res.stdout


NETNS_SCRIPT = """
import sys
from pydantic import TypeAdapter
from vtl.bridge.ports import PortConfig, make_port
from vtl.errors import SetupError
cfg = TypeAdapter(PortConfig).validate_python(
    {"kind": "tap", "ifname": sys.argv[1], "netns": sys.argv[2]})
try:
    make_port("guest", cfg).open()
except SetupError as exc:
    print(exc)
else:
    print("opened")
"""


def test_tap_into_a_netns_without_cap_sys_admin_says_it_needs_setns():
    """CAP_NET_ADMIN creates the TAP; entering the namespace (setns) needs CAP_SYS_ADMIN."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop capabilities"
    tag = "vtpn" + suffix()
    subprocess.run(["ip", "netns", "add", tag], check=True, capture_output=True, timeout=10)
    try:
        res = subprocess.run(
            [setpriv, "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
             sys.executable, "-c", NETNS_SCRIPT, tag + "t", tag],
            capture_output=True, text=True, timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert "operation not permitted; run as root or grant CAP_NET_ADMIN and " \
               "CAP_SYS_ADMIN (setns" in res.stdout, res.stdout
        assert tag + "t" not in subprocess.run(["ip", "-n", tag, "link"], capture_output=True,
                                               text=True, timeout=10).stdout
    finally:
        subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=10)
