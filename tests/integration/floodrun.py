"""The host side of the floods: run :mod:`framefuzz` in the guest, watch the bridge.

:func:`flood` starts ``framefuzz.py`` (the sender) in a namespace, waits for its
"started" line, then pings from that namespace (optional) and samples the bridge
process's VmRSS every 0.1 s until the sender exits; it returns the sender's counts,
the memory before, at its peak and after, and the ping replies. Every wait is
bounded; the sender and the pinger are stopped even when something fails.

:func:`replay` runs the same mutants through one service in-process (the
:class:`vtl.testing.ServiceHarness`, no bridge, an explicit clock), playing the
upstream's part for every stream the service opens (connected, refused,
unreachable, timed out, reset: seeded), and collects every exception with the
index and description of the frame that raised it; what the integration tests
see as a service's ``errors`` counter, with the frame and the traceback::

    python tests/integration/floodrun.py replay vtl.services.pep:Pep --count 100000 \
        --options '{"connect_timeout_s": 2}'
"""

from __future__ import annotations

import json
import random
import re
import select
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FRAMEFUZZ = HERE / "framefuzz.py"


@dataclass
class FloodResult:
    """What :func:`flood` measured around one sender run."""

    sender: dict[str, Any]  # the sender's JSON line (frames, sent, refused, seconds, rate)
    rss_before: int  # VmRSS of the bridge process before the flood, bytes
    rss_peak: int  # the largest VmRSS sampled during the flood and after it
    rss_after: int  # VmRSS a moment after the flood
    ping_rtts: list[float] = field(default_factory=list)  # replies to the ping during it
    ping_sent: int = 0
    ping_inside: bool = False  # the ping ended before the sender did
    rss_series: list[tuple[float, int]] = field(default_factory=list)  # (s, VmRSS) each second

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_before


@dataclass
class Outcome:
    """One scenario run: the bridge (still running), the flood, the checks after it."""

    vtl: Any  # vtlnet.VtlProcess
    flood: FloodResult
    after: dict[str, bool]  # each check made after the flood (real traffic) and its result


def ping_ok(run: Any, host: str) -> bool:
    """Three pings of ``host`` with ``run`` (a namespace's command runner) all answered."""
    out = run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", host], timeout=20,
              check=False).stdout
    return out.count("time=") == 3


def summary(res: FloodResult, final: dict[str, Any], service: str | None = None,
            ) -> dict[str, Any]:
    """The numbers a reader of a failure wants (the bridge's final counters ``final``
    and, with ``service``, that service's main ones), as one dict."""
    mb = 1 << 20
    out = {"sender": res.sender, "rss_before_mb": round(res.rss_before / mb, 1),
           "rss_peak_mb": round(res.rss_peak / mb, 1),
           "rss_growth_mb": round(res.rss_growth / mb, 1),
           "ping_during": f"{len(res.ping_rtts)}/{res.ping_sent}",
           "ping_inside": res.ping_inside, "bridge": final.get("bridge"),
           "guest_rx": final.get("ports", {}).get("guest", {}).get("rx_frames")}
    if service is not None:
        svc = final.get("services", {}).get(service, {})
        keep = ("frames_in", "dropped", "consumed", "injected", "errors", "malformed",
                "connections_active", "tombstones")
        out[service] = {k: svc[k] for k in keep if k in svc}
    return out


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def flood(topo: Any, netns: str, pid: int, args: list[str], ping: str | None = None,
          ping_seconds: float = 0.0, timeout: float = 120.0,
          settle_s: float = 1.0) -> FloodResult:
    """Run ``framefuzz.py ARGS`` in ``netns`` (a :class:`vtl.bridge.topology.Topology`'s
    namespace) while sampling the VmRSS of process ``pid`` (the bridge) every 0.1 s;
    with ``ping``, ping that address from ``netns`` (5 a second for ``ping_seconds``)
    once the sender has started. Everything is bounded by ``timeout``."""
    rss_before = _rss(pid)
    deadline = time.monotonic() + timeout
    sender = topo.spawn(netns, [sys.executable, str(FRAMEFUZZ), *args], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    pinger = None
    peak = rss_before
    try:
        assert sender.stdout is not None
        ready, _, _ = select.select([sender.stdout], [], [], 30)
        first = sender.stdout.readline() if ready else b""
        if first.strip() != b"started":
            err = sender.stderr.read().decode(errors="replace") if sender.stderr else ""
            raise AssertionError(f"framefuzz did not start: {first!r} {err[-2000:]}")
        if ping:
            count = max(3, int(ping_seconds * 5))
            pinger = topo.spawn(netns, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2",
                                        ping], stdout=subprocess.PIPE)
        ping_inside = False
        t0 = time.monotonic()
        series: list[tuple[float, int]] = []
        while sender.poll() is None and time.monotonic() < deadline:
            rss = _rss(pid)
            peak = max(peak, rss)
            if not series or time.monotonic() - t0 >= series[-1][0] + 1.0:
                series.append((round(time.monotonic() - t0, 1), rss))
            if pinger is not None and not ping_inside and pinger.poll() is not None:
                ping_inside = True
            time.sleep(0.1)
        if sender.poll() is None:
            raise AssertionError(f"framefuzz still running after {timeout:g} s")
        out, err = sender.communicate(timeout=10)
        lines = out.decode().strip().splitlines()
        if sender.returncode or not lines:
            raise AssertionError(f"framefuzz exited {sender.returncode}: "
                                 f"{err.decode(errors='replace')[-2000:]}")
        result = FloodResult(json.loads(lines[-1]), rss_before, peak, rss_before,
                             rss_series=series)
        if pinger is not None:
            pout, _ = pinger.communicate(timeout=max(5.0, deadline - time.monotonic()))
            text = pout.decode(errors="replace")
            result.ping_rtts = [float(m) for m in re.findall(r"time=([0-9.]+) ms", text)]
            result.ping_sent = count
            result.ping_inside = ping_inside
        time.sleep(settle_s)
        result.rss_after = _rss(pid)
        result.rss_peak = max(peak, result.rss_after)
        return result
    finally:
        for proc in (sender, pinger):
            if proc is not None:
                topo.stop_proc(proc)


# ---------------------------------------------------------------- in-process replay

STREAM_FATES = ("connect", "connect", "answer", "refused", "unreachable", "timeout",
                "reset", "prohibited", "error")


@dataclass
class Failure:
    """One exception that would have reached a service's failure policy."""

    index: int  # the frame's index in the mutant stream
    desc: str  # its base and mutations (framefuzz.Mutator explain)
    frame: str  # hex
    where: str  # "process", "timer", or "stream <fate>"
    error: str  # "Type: message"
    trace: str  # the traceback's last frames


@dataclass
class Replay:
    """What :func:`replay` saw: errors grouped by type and place, the first few in full."""

    frames: int = 0
    malformed: int = 0  # remote-error types from process(): counted as malformed
    errors: Counter[str] = field(default_factory=Counter)
    first: list[Failure] = field(default_factory=list)
    streams: int = 0
    report: dict[str, Any] = field(default_factory=dict)


def _answer(rng: random.Random, stream: Any, now: float) -> None:
    """Play an upstream that answers: what the service wrote, with DNS's QR bit set
    after the 2-byte length prefix of DNS over TCP (so a resolver's query comes back
    as a plausible response), often mutated; or random bytes. Delivered in one to
    three pieces, then the end of the stream."""
    data = bytearray(stream.written)
    if len(data) > 4 and rng.random() < 0.7:
        data[4] |= 0x80
        for _ in range(rng.randint(0, 3)):
            p = rng.randrange(len(data))
            data[p] ^= 1 << rng.randrange(8)
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)):]
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 2)))
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        if b > a and stream.final is None and not stream.paused:
            stream.data(bytes(data[a:b]), now=now)
    if stream.final is None:
        stream.end(now=now)


def replay(service_cls: type, options: dict[str, Any], bases: list[Any], seed: int,
           count: int, rate: float = 100_000.0, keep: int = 3) -> Replay:
    """Offer ``count`` mutants (seed ``seed``) of ``bases`` to one ``service_cls`` in a
    :class:`vtl.testing.ServiceHarness`, as frames from the guest ``1/rate`` s apart;
    every stream it opens gets a seeded fate (connected; connected and answered, see
    :func:`_answer`; or closed with a reason) at once. Exceptions a chain would count as
    the service's ``errors`` are collected (the first ``keep`` of each kind with their
    frame); remote-error types from ``process`` count as ``malformed``, as the chain
    counts them."""
    from framefuzz import Mutator

    from vtl.errors import RemoteProtocolError
    from vtl.service import Direction
    from vtl.testing import ServiceHarness

    h = ServiceHarness(service_cls, options)
    h.start(0.0)
    fates = random.Random(seed ^ 0x5EED)
    out = Replay()
    seen = 0

    def failed(where: str, i: int, desc: str, frame: bytes, exc: Exception) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        place = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
        key = f"{where}: {type(exc).__name__} at {place}"
        out.errors[key] += 1
        if out.errors[key] <= keep:
            out.first.append(Failure(i, desc, frame.hex(), where,
                                     f"{type(exc).__name__}: {exc}",
                                     "".join(traceback.format_list(tb[-4:]))))

    for i, (frame, desc) in enumerate(Mutator(bases, seed).frames(count, explain=True)):
        now = i / rate
        out.frames += 1
        try:
            h.send(frame, Direction.TO_UPLINK, now)
        except RemoteProtocolError:
            out.malformed += 1
        except Exception as exc:  # noqa: BLE001 - collected, that is the point
            failed("process", i, desc, frame, exc)
        streams = h.ctx.streams
        while seen < len(streams):
            stream = streams[seen]
            seen += 1
            fate = fates.choice(STREAM_FATES)
            try:
                if stream.final is None:
                    if fate == "connect":
                        stream.connect(now=now)
                    elif fate == "answer":
                        stream.connect(now=now)
                        _answer(fates, stream, now)
                    else:
                        stream.closed(fate, "replayed", now=now)
            except Exception as exc:  # noqa: BLE001
                failed(f"stream {fate}", i, desc, frame, exc)
        try:
            h.ctx.deliver_local_closes()
        except Exception as exc:  # noqa: BLE001
            failed("stream local close", i, desc, frame, exc)
    try:
        for step in range(1, 11):  # every timer, every table aged out
            h.advance(count / rate + 60.0 * step)
            h.ctx.deliver_local_closes()
    except Exception as exc:  # noqa: BLE001
        failed("timer", count, "", b"", exc)
    out.streams = seen
    out.report = h.report()
    return out


def main(argv: list[str]) -> None:
    """``floodrun.py replay MODULE:CLASS [--options JSON] [--count N] [--seed S]
    [framefuzz address options]``: :func:`replay`, printed (counts, then the first
    frames of each kind with their tracebacks)."""
    import argparse
    import importlib
    import logging

    from framefuzz import Addrs, base_frames

    p = argparse.ArgumentParser(description="replay mutants through one service in-process")
    p.add_argument("cmd", choices=["replay"])
    p.add_argument("service", help="module:Class, e.g. vtl.services.pep:Pep")
    p.add_argument("--options", default="{}", help="the service's options, as JSON")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--addrs", default="02:00:00:c6:00:01,02:00:00:c6:00:02,10.198.0.1,"
                   "10.198.0.2,fd00:198::1,fd00:198::2,10.198.0.2,fd00:198::2",
                   help="src_mac,dst_mac,src_ip,dst_ip,src_ip6,dst_ip6,dns_ip,dns_ip6")
    ns = p.parse_args(argv)
    logging.disable(logging.CRITICAL)
    module, _, name = ns.service.partition(":")
    cls = getattr(importlib.import_module(module), name)
    t = time.monotonic()
    r = replay(cls, json.loads(ns.options), base_frames(Addrs(*ns.addrs.split(","))),
               ns.seed, ns.count)
    print(f"{r.frames} frames in {time.monotonic() - t:.1f} s: malformed {r.malformed}, "
          f"streams {r.streams}, errors {sum(r.errors.values())}")
    for key, n in r.errors.most_common():
        print(f"{n:8d}  {key}")
    for f in r.first:
        print(f"--- frame {f.index} [{f.where}] {f.error}\n    {f.desc}\n    {f.frame}\n"
              f"{f.trace}")
    print("report:", json.dumps(r.report, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
