"""UDT stream transport on loopback: setup time and throughput, per-connection vs mux.

Two stream managers in one process (A opens ``kind="udt"`` streams to B's
listener; B accepts and discards). Prints, per mode: the median and p90 time
from ``open()`` to ``StreamConnected`` (streams opened one after another),
the goodput of one stream, and the total goodput of 20 parallel streams.

    .venv/bin/python benchmarks/udt_transport.py [--mb 200] [--window 8388608]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from vtl.bridge.streams import StreamManager

from vtl.flow import FlowKey
from vtl.stream import (
    ListenRequest,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamFlow,
    StreamRequest,
    StreamWritable,
)

FLOW = StreamFlow(FlowKey.tcp("10.0.0.1", 1, "10.0.0.2", 2))
CHUNK = b"\0" * (256 << 10)


class Side:
    def __init__(self, name: str):
        self.lock = threading.Lock()
        self.mgr = StreamManager(self.lock, None, None, name)
        self.mgr.start()


def run(mux: bool, mb: int, window: int) -> dict[str, float]:
    a, b = Side("A"), Side("B")
    got = [0]
    ended = []

    def on_offer(offer, now):
        def h(ev, now):
            if isinstance(ev, StreamData):
                got[0] += len(ev.data)
            elif isinstance(ev, StreamClosed):
                ended.append(ev)
        offer.accept(h)

    with b.lock:
        lst = b.mgr.listen(ListenRequest("udt", "127.0.0.1", 0, read_chunk=256 << 10,
                                         options={"window": window}), on_offer)
    opts = {"mux": mux, "window": window}

    def open_stream(handler):
        with a.lock:
            return a.mgr.open(StreamRequest("udt", "127.0.0.1", lst.address[1], timeout_s=10,
                                            write_buffer=1 << 20, options=opts, flow=FLOW),
                              handler)

    # setup time, sequential
    setups = []
    for _ in range(30):
        done = threading.Event()
        t0 = time.perf_counter()
        box = []

        def h(ev, now, done=done, box=box):
            if isinstance(ev, StreamConnected):
                box.append(time.perf_counter())
                done.set()
        s = open_stream(h)
        assert done.wait(5), "no connect"
        setups.append(box[0] - t0)
        with a.lock:
            s.close()

    def bulk(n: int) -> float:
        total = mb << 20
        per = total // n
        got[0] = 0
        ended.clear()
        states = []

        def make(state):
            def h(ev, now):
                if isinstance(ev, (StreamConnected, StreamWritable)):
                    s = ev.stream
                    while state["left"] > 0:
                        k = s.write(memoryview(CHUNK)[:min(len(CHUNK), state["left"])])
                        if not k:
                            return
                        state["left"] -= k
                    if not state["shut"]:
                        state["shut"] = True
                        s.shutdown_write()
            return h
        t0 = time.perf_counter()
        for _ in range(n):
            st = {"left": per, "shut": False}
            states.append(st)
            open_stream(make(st))
        end = t0 + 120
        while got[0] < per * n and time.perf_counter() < end:
            time.sleep(0.005)
        dt = time.perf_counter() - t0
        return got[0] * 8 / dt / 1e6

    one = bulk(1)
    twenty = bulk(20)
    a.mgr.stop()
    b.mgr.stop()
    setups.sort()
    return {"setup_median_ms": statistics.median(setups) * 1e3,
            "setup_p90_ms": setups[int(len(setups) * 0.9)] * 1e3,
            "one_mbit": one, "twenty_mbit": twenty}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="MiB per throughput run")
    ap.add_argument("--window", type=int, default=8 << 20)
    args = ap.parse_args()
    print(f"{'mode':8} {'setup median':>13} {'setup p90':>10} {'1 stream':>12} {'20 streams':>12}")
    for mux in (False, True):
        r = run(mux, args.mb, args.window)
        print(f"{'mux' if mux else 'per-conn':8} {r['setup_median_ms']:10.2f} ms "
              f"{r['setup_p90_ms']:7.2f} ms {r['one_mbit']:7.0f} Mbit/s "
              f"{r['twenty_mbit']:7.0f} Mbit/s")


if __name__ == "__main__":
    main()
