"""The UDT congestion controls: the native extension, its Python wrapper, the option path."""

from __future__ import annotations

import pytest
from udt4py import UDTSocket
from vtl.bridge.transports import udtcc
from vtl.bridge.transports.udt import UdtTransport
from vtl.bridge.transports.udtsock import set_opts
from vtl.bridge.transports.udtstate import Tuning

from vtl.errors import LocalProtocolError


def test_the_extension_is_built_and_loads() -> None:
    assert udtcc.available() == ""
    from vtl.bridge.transports import _udtcc

    assert callable(_udtcc.install)


@pytest.mark.parametrize("kind", ["vtl", "native"])
def test_install_before_connect(kind: str) -> None:
    sock = UDTSocket()
    try:
        udtcc.install(sock.socket, kind, 0)
        udtcc.install(sock.socket, kind, 12_500_000)  # again, with a cap: replaces it
    finally:
        sock.close()


def test_unknown_kind_and_bad_socket_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown UDT congestion control 'bbr'"):
        udtcc.install(0, "bbr")
    from vtl.bridge.transports import _udtcc

    with pytest.raises(ValueError, match="known: vtl, native"):
        _udtcc.install(0, "cubic", 0)
    with pytest.raises(ValueError, match="max_bw"):
        _udtcc.install(0, "vtl", -1)
    with pytest.raises(OSError, match="UDT_CC on UDT socket 123456789"):
        udtcc.install(123456789, "vtl")


def test_set_opts_applies_the_tunings_control() -> None:
    sock = UDTSocket()
    try:
        set_opts(sock, Tuning(1500, 1 << 20, 0, "vtl"))
        set_opts(sock, Tuning(1500, 1 << 20, 1_000_000, "native"))
    finally:
        sock.close()


def test_transport_option_congestion() -> None:
    t = UdtTransport()
    assert t._settings({}).congestion == "vtl"
    assert t._settings({"congestion": "native"}).congestion == "native"
    with pytest.raises(LocalProtocolError, match="congestion='reno'"):
        t._settings({"congestion": "reno"})
    assert "congestion" in t.options


# Each end of a loopback transfer with the vtl control is a process of its own
# (VTL_UDTCC_DEBUG is read once per process, and udt4py's blocking calls keep Python's
# GIL: one process's reader thread starved while its writer blocked).
_RECEIVER = """
from udt4py import UDTSocket
from vtl.bridge.transports import udtcc

srv = UDTSocket()
udtcc.install(srv.socket, "vtl", 0)
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.address[1], flush=True)
conn, _ = srv.accept()
buf, n = bytearray(1 << 16), 0
try:
    while (k := conn.recv(buf)) > 0:
        n += k
except Exception:  # the sender closed
    pass
print(n, flush=True)
"""

_CONNECT = """
import sys, time
from udt4py import UDTSocket
from vtl.bridge.transports import udtcc

cli = UDTSocket()
udtcc.install(cli.socket, "vtl", 0)
cli.connect(("127.0.0.1", int(sys.argv[1])))
"""

# argv[2] seconds at 640 KB/s: a steady stream, whatever the machine
_STREAM = _CONNECT + """
sent, end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sent += cli.send(b"x" * 32768)
    time.sleep(0.05)
cli.close()  # lingers until the peer has it all
print(sent, flush=True)
"""

# argv[2] bytes as fast as it goes; prints them and the seconds it took
_BULK = _CONNECT + """
t0, sent, chunk = time.monotonic(), 0, b"x" * 65536
while sent < int(sys.argv[2]):
    sent += cli.send(chunk)
cli.close()  # lingers until the peer has it all
print(sent, time.monotonic() - t0, flush=True)
"""


def _loopback(sender: str, arg: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> tuple[list[str], int, str]:
    """Run _RECEIVER, then ``sender`` against it: (sender's printed words, bytes received,
    both processes' stderr)."""
    import subprocess
    import sys

    rx = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert rx.stdout is not None
        port = rx.stdout.readline().strip()
        tx = subprocess.run([sys.executable, "-c", sender, port, arg], capture_output=True,
                            text=True, timeout=timeout, env=env)
        assert tx.returncode == 0, tx.stderr[-2000:]
        received, err = rx.communicate(timeout=30)
    finally:
        rx.kill()
    return tx.stdout.split(), int(received), tx.stderr + err


def test_debug_file_shows_the_model_and_the_receivers_queue_delay(tmp_path) -> None:
    """VTL_UDTCC_DEBUG=<path> appends each connection's model twice a second; the sender's
    lines carry the forward queue delay its peer reported (the 7-word delivery report)."""
    import os
    import re

    log = tmp_path / "udtcc.log"
    out, received, err = _loopback(_STREAM, "2.5", {**os.environ, "VTL_UDTCC_DEBUG": str(log)},
                                   timeout=60)
    sent = int(out[0])
    assert sent > 1_000_000 and received == sent, err[-2000:]
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("udtcc ") for line in lines)
    assert "udtcc" not in err  # to the file, not stderr
    sender = [line for line in lines if re.search(r" send=[1-9]", line)]
    assert sender, lines[-5:]
    shown = [m for line in sender for m in re.findall(r" qd=(-?[0-9.]+)ms", line)]
    # "-0.0" (-1 us) until the first report; then the receiver's figure: a loopback queue
    # of milliseconds, never negative (the one-way delay less its own minimum)
    reported = [float(m) for m in shown if not m.startswith("-")]
    assert reported, sender[-3:]
    assert all(m == "-0.0" or 0 <= float(m) < 1000 for m in shown), shown


def test_vtl_is_not_stalled_by_libudts_ack_clock_on_a_short_path() -> None:
    """40 MB over loopback (RTT ~0.1 ms) with the vtl control on both ends. libudt opens
    its window on full ACKs every 10 ms: a window sized from the RTT alone held 32
    packets per ACK, 0.9 MB/s (this took 45 s); it takes about 0.2 s. The bound is a
    stall guard with a wide margin, not a speed claim (benchmarks/udt.py measures)."""
    (sent, seconds), received, err = _loopback(_BULK, str(40 << 20))
    assert received == int(sent) >= 40 << 20, err[-2000:]
    assert float(seconds) < 10, f"40 MB took {float(seconds):.1f} s over loopback"
