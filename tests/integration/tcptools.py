"""Drive real TCP programs through a bridge and check what came out.

Helpers for integration tests on a :class:`vtlnet.Net`: the client side always
runs in the guest namespace (the VM's own kernel stack), the server side in the
peer namespace. Data are the seeded streams of :mod:`httpsha`, generated and
hashed on the fly, so 1 GB transfers never sit in memory; compare results with
:func:`expected_sha256`. Every helper is bounded by a timeout and raises
(``SetupError`` from the namespace runner, ``AssertionError`` or
``subprocess.TimeoutExpired``) rather than hang.

The guest-side programs live in ``tcpprobe.py`` beside this file.
"""

from __future__ import annotations

import base64
import functools
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from httpsha import expected_sha256 as _expected_sha256
from tcpprobe import halfclose_reply
from vtlnet import PEER_IP, Net

HERE = Path(__file__).parent
HTTPSHA = str(HERE / "httpsha.py")
PROBE = str(HERE / "tcpprobe.py")
HTTP_PORT = 8080

__all__ = [
    "HTTP_PORT", "ParallelResult", "SlowRead", "connect_result", "download",
    "ensure_http_server", "expected_sha256", "half_close", "parallel_downloads", "rss_bytes",
    "slow_reader", "tshark_bad_segments", "upload",
]


@functools.lru_cache(maxsize=64)
def expected_sha256(size: int, seed: int) -> str:
    """SHA-256 hex of the ``size``-byte stream ``seed`` that httpsha serves (cached)."""
    return _expected_sha256(size, seed)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _probe(net: Net, args: list[Any], timeout: float) -> dict[str, Any]:
    proc = net.guest([sys.executable, PROBE, *map(str, args)], timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_http_server(net: Net, port: int = HTTP_PORT, host: str = PEER_IP) -> None:
    """Start httpsha in the peer namespace on ``host:port`` unless something listens there."""
    out = net.peer(["ss", "-ltnH"], check=False).stdout
    if f"{_url_host(host)}:{port} " in out or f"*:{port} " in out:
        return
    net.topo.spawn(net.peer_ns, [sys.executable, HTTPSHA, host, str(port)])
    net.topo.wait_tcp(net.peer_ns, _url_host(host), port)


def download(net: Net, size: int, seed: int = 0, port: int = HTTP_PORT, host: str = PEER_IP,
             timeout: float = 120) -> str:
    """curl in the guest GETs ``size`` bytes of stream ``seed``, piped into sha256sum.

    Returns the SHA-256 hex of what curl received (compare with
    ``expected_sha256(size, seed)``). Starts the peer's HTTP server if needed.
    """
    ensure_http_server(net, port, host)
    url = f"http://{_url_host(host)}:{port}/bytes/{size}?seed={seed}"
    script = f"curl -sS --fail --max-time {timeout:g} '{url}' | sha256sum"
    out = net.guest(["bash", "-o", "pipefail", "-c", script], timeout=timeout + 10).stdout
    return out.split()[0]


def upload(net: Net, size: int, seed: int = 0, port: int = HTTP_PORT, host: str = PEER_IP,
           timeout: float = 120) -> str:
    """curl in the guest PUTs ``size`` bytes of stream ``seed`` (from a pipe, chunked).

    Returns the SHA-256 hex the peer's server computed over what it received
    (compare with ``expected_sha256(size, seed)``).
    """
    ensure_http_server(net, port, host)
    url = f"http://{_url_host(host)}:{port}/upload"
    script = (f"'{sys.executable}' '{PROBE}' gen {size} {seed} | "
              f"curl -sS --fail --max-time {timeout:g} -H 'Expect:' -T - '{url}'")
    out = net.guest(["bash", "-o", "pipefail", "-c", script], timeout=timeout + 10).stdout
    return out.strip()


@dataclass(frozen=True)
class ParallelResult:
    """What :func:`parallel_downloads` saw.

    ``digests[i]`` is the SHA-256 hex of connection i's body (it asked for seed
    ``seed + i``) or ``"error: ..."``; ``expected[i]`` what it should be;
    ``max_open`` the most connections established at the same time.
    """

    digests: list[str]
    expected: list[str]
    max_open: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.digests == self.expected

    def failures(self) -> list[str]:
        pairs = zip(self.digests, self.expected, strict=True)
        return [f"#{i}: {d}" for i, (d, e) in enumerate(pairs) if d != e]


def parallel_downloads(net: Net, count: int = 200, size: int = 1_000_000, seed: int = 1000,
                       port: int = HTTP_PORT, host: str = PEER_IP,
                       timeout: float = 120) -> ParallelResult:
    """``count`` concurrent HTTP GETs of ``size`` bytes from one client process in the guest."""
    ensure_http_server(net, port, host)
    out = _probe(net, ["parallel", host, port, count, size, seed, timeout], timeout + 15)
    digests = [r["sha256"] or f"error: {r['error']}" for r in out["results"]]
    expected = [expected_sha256(size, seed + i) for i in range(count)]
    return ParallelResult(digests, expected, out["max_open"], out["seconds"])


@dataclass(frozen=True)
class SlowRead:
    """What :func:`slow_reader` saw: ``sha256`` of the whole body (vs ``expected``),
    ``bytes`` received in all, ``before_stall`` body bytes read before the stall,
    ``stall_value`` what ``during_stall()`` returned, ``after_stall_seconds`` how
    long reading the rest took."""

    sha256: str
    expected: str
    bytes: int
    before_stall: int
    stall_value: Any
    after_stall_seconds: float

    @property
    def ok(self) -> bool:
        return self.sha256 == self.expected


def slow_reader(net: Net, size: int, stall_s: float, during_stall: Callable[[], Any] | None = None,
                first: int = 1 << 20, seed: int = 7, port: int = HTTP_PORT, host: str = PEER_IP,
                rcvbuf: int = 0, timeout: float = 120) -> SlowRead:
    """A guest client GETs ``size`` bytes, reads ``first`` of them, stops reading for
    ``stall_s`` seconds, then reads the rest.

    ``during_stall()`` runs in the test process as soon as the client says it
    stopped reading (while it sleeps: keep it shorter than ``stall_s``, e.g.
    sample the bridge's memory a few times); its return value comes back in
    ``SlowRead.stall_value``. ``rcvbuf`` > 0 sets the client's SO_RCVBUF.
    """
    ensure_http_server(net, port, host)
    argv = [sys.executable, PROBE, "slow", host, port, size, seed, first, stall_s, timeout,
            rcvbuf]
    proc = net.topo.spawn(net.guest_ns, [str(a) for a in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        line: str | None = ""
        while line is not None and line.strip() != "stalled":
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if line is None:
            raise AssertionError("slow reader ended before its stall: " + _stderr(proc))
        value = during_stall() if during_stall is not None else None
        last: str | None = None
        while (line := lines.get(timeout=max(0.01, deadline + stall_s - time.monotonic()))):
            last = line
        proc.wait(10)
        if proc.returncode != 0 or last is None:
            raise AssertionError(f"slow reader exited {proc.returncode}: " + _stderr(proc))
        out = json.loads(last)
    except queue.Empty:
        raise AssertionError("slow reader timed out") from None
    finally:
        net.topo.stop_proc(proc)
        reader.join(5)
    return SlowRead(out["sha256"], expected_sha256(size, seed), out["bytes"],
                    out["before_stall"], value, out["after_stall_seconds"])


def _stderr(proc: subprocess.Popen) -> str:
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        return "(still running)"
    return proc.stderr.read()[-2000:] if proc.stderr else ""


def half_close(net: Net, port: int = 9090, size: int = 100_000, seed: int = 5,
               reply_size: int = 65536, delay_s: float = 0.2, host: str = PEER_IP,
               timeout: float = 30) -> tuple[bytes, bytes]:
    """``nc -N`` style: the guest sends ``size`` bytes, shuts its sending side, reads to EOF.

    A server started in the peer namespace (on ``host:port``, stopped on return)
    reads until EOF, waits ``delay_s`` (the connection stays half-closed), then
    answers the SHA-256 line of what it read plus ``reply_size`` bytes derived
    from it, and closes. Returns ``(got, expected)``: what the client read and
    what it should have read.
    """
    srv = net.topo.spawn(net.peer_ns, [sys.executable, PROBE, "halfclose-server", host,
                                       str(port), str(delay_s), str(reply_size)])
    try:
        net.topo.wait_tcp(net.peer_ns, _url_host(host), port)
        out = _probe(net, ["halfclose", host, port, size, seed, timeout], timeout + 15)
    finally:
        net.topo.stop_proc(srv)
    got = base64.b64decode(out["reply"])
    if out["error"]:
        got += f"\n[client error: {out['error']}]".encode()
    return got, halfclose_reply(expected_sha256(size, seed), reply_size)


def connect_result(net: Net, host: str, port: int, timeout: float = 5.0) -> tuple[str, float]:
    """One TCP connect() from the guest: ``(outcome, seconds)``.

    ``outcome`` is ``"connected"``, ``"refused"`` (RST to the SYN), ``"timeout"``,
    ``"unreachable"`` (ICMP host/net unreachable), ``"reset"`` or ``"error:ERRNO"``.
    """
    out = _probe(net, ["connect", host, port, timeout], timeout + 15)
    return out["outcome"], float(out["seconds"])


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid} (a zombie?)")


BAD_FILTER = ("_ws.malformed || tcp.checksum.status == 0 || ip.checksum.status == 0"
              " || udp.checksum.status == 0 || _ws.expert.severity >= error")
_FIELDS = ["frame.number", "ip.src", "ipv6.src", "tcp.srcport", "udp.srcport", "ip.dst",
           "ipv6.dst", "tcp.dstport", "udp.dstport", "tcp.seq_raw", "tcp.len",
           "_ws.expert.message"]


def tshark_bad_segments(pcap_path: str | Path, timeout: float = 600) -> list[str]:
    """Frames of a pcap that tshark finds malformed or with a wrong IP/TCP/UDP checksum.

    Checksum validation on; the filter is :data:`BAD_FILTER` (tshark 4.0 field
    names; an expert item of severity error covers bad checksums, bogus header
    lengths and IP lengths beyond the frame). One line per offending frame:
    ``"frame N: SRC:PORT -> DST:PORT seq=S len=L: expert messages"``; empty when
    all is well. Raises AssertionError when tshark fails.
    """
    proc = subprocess.run(
        ["tshark", "-n", "-r", str(pcap_path), "-o", "tcp.check_checksum:TRUE",
         "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-Y", BAD_FILTER,
         "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=;",
         *[a for f in _FIELDS for a in ("-e", f)]],
        capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tshark failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    bad = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        values = (line.split("\t") + [""] * len(_FIELDS))[: len(_FIELDS)]
        f = dict(zip(_FIELDS, values, strict=True))
        src = f["ip.src"] or f["ipv6.src"]
        dst = f["ip.dst"] or f["ipv6.dst"]
        sport = f["tcp.srcport"] or f["udp.srcport"]
        dport = f["tcp.dstport"] or f["udp.dstport"]
        desc = f"frame {f['frame.number']}: {src}:{sport} -> {dst}:{dport}"
        if f["tcp.seq_raw"]:
            desc += f" seq={f['tcp.seq_raw']} len={f['tcp.len']}"
        bad.append(f"{desc}: {f['_ws.expert.message'] or 'malformed'}")
    return bad
