"""The sections of ``benchmarks/puzzle.py`` that need root and namespaces (``bridge``, ``connect``).

Both run on the topology of ``tests/integration/puzzlenet.py`` and return rows of
``(label, microseconds per operation)``, as the other sections do (the table
shows the rate beside it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "integration")]

from puzzlenet import CLIENT, SERVER, PuzzleNet, open_net  # noqa: E402
from tcptools import connect_result, ensure_http_server  # noqa: E402
from vtl.bridge.topology import parse_ping_rtts, require_root  # noqa: E402

FORGE = str(HERE.parent / "tests" / "integration" / "puzzleforge.py")
OPEN_BUDGETS = {"client_rate": 1e9, "client_burst": 1 << 30, "puzzle_rate": 1e9,
                "puzzle_burst": 1 << 30}


def _rate(net: PuzzleNet, kind: str, counter: str, seconds: float) -> tuple[float, float]:
    """Flood ``kind`` packets at the server bridge for ``seconds``; (what it handled per
    second by ``counter`` over the middle of the flood, what was sent per second)."""
    sts = net.counters("server")["server_ts"]
    flood = net.topo.spawn(net.ns["atk"], [sys.executable, FORGE, "-", CLIENT, SERVER,
                                           "flood", str(10**8), str(seconds), kind, str(sts)],
                           stdout=subprocess.PIPE)
    time.sleep(1.0)
    t1 = time.monotonic()
    c1 = net.counters("server").get(counter, 0)
    t1 = (t1 + time.monotonic()) / 2
    time.sleep(seconds - 2.0)
    t2 = time.monotonic()
    c2 = net.counters("server").get(counter, 0)
    t2 = (t2 + time.monotonic()) / 2
    out, _ = flood.communicate(timeout=seconds + 30)
    sent = json.loads(out.strip().splitlines()[-1])
    return (c2 - c1) / (t2 - t1), sent["sent"] / sent["seconds"]


def section_bridge(repeat: int) -> list[tuple[str, float]]:
    require_root("the bridge section")
    with tempfile.TemporaryDirectory() as tmp, open_net(Path(tmp)) as net:
        net.start("server", [{"use": "puzzle", "role": "server", "difficulty": 16,
                              **OPEN_BUDGETS}])
        rows: dict[str, list[float]] = {}
        for _ in range(repeat):
            for kind, counter in (("info", "puzzles_issued"), ("wrong", "answers_invalid")):
                handled, sent = _rate(net, kind, counter, 5.0)
                rows.setdefault(f"bridge: {counter} per second", []).append(handled)
                rows.setdefault(f"  (flood sent per second, {kind})", []).append(sent)
        c = net.counters("server")
        print(f"  server bridge: {json.dumps({k: v for k, v in c.items() if 'answers' in k or 'puzzles' in k})}",  # noqa: E501
              file=sys.stderr)
    return [(label, 1e6 / statistics.median(v)) for label, v in rows.items()]


def section_connect(repeat: int) -> list[tuple[str, float]]:
    require_root("the connect section")
    out: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, open_net(Path(tmp)) as net:
        net.start("client", [{"use": "puzzle", "role": "client"}])
        for exp in (12, 16, 20):
            net.start("server", [{"use": "puzzle", "role": "server",
                                  "difficulty": 1 << exp, "difficulty_max": 1 << 22,
                                  "expiry": 1}])
            ensure_http_server(net, 8080, SERVER)
            rtts = parse_ping_rtts(net.guest(["ping", "-c", "10", "-i", "0.05", SERVER],
                                             timeout=30, check=False).stdout)
            times = []
            for _ in range(max(repeat, 3)):
                time.sleep(1.3)  # the held answer (expiry 1 tick) is gone: a new puzzle
                outcome, seconds = connect_result(net, SERVER, 8080, timeout=30)
                if outcome == "connected":
                    times.append(seconds)
            solved = net.counters("client").get("puzzles_solved", 0)
            print(f"  2^{exp}: connects {times}, ping RTT median "
                  f"{statistics.median(rtts) if rtts else float('nan'):.3f} ms, "
                  f"client solved {solved} so far", file=sys.stderr)
            if rtts:
                out.append((f"connect: ping RTT, at 2^{exp}", statistics.median(rtts) * 1e3))
            out.append((f"connect: connect() at difficulty 2^{exp}",
                        statistics.median(times) * 1e6 if times else float("nan")))
    print(f"  ({CLIENT} -> {SERVER})", file=sys.stderr)
    return out
