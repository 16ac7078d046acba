"""Random and mutated frames through a chain of real services never escape as exceptions."""

from __future__ import annotations

import logging
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from vtl.bridge.chain import Chain
from vtl.bridge.config import parse_config

from vtl import Direction, Frame, VnetHeader
from vtl.errors import VTLError

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "protocount.py"
PORTS = {"guest": {"kind": "tap", "ifname": "fz0"}, "uplink": {"kind": "pcap", "ifname": "fz1"}}
VALID = bytes.fromhex(
    "02000000000102000000000208004500003c1c4640004006b1e6c0a80001c0a80002"
    "0050d4310000000000000000a00272109c3c0000020405b40402080a0000000000000000"
    "01030307")


def chain(tmp_path) -> Chain:
    cfg = parse_config({"ports": PORTS, "services": [
        {"use": "netem", "delay_ms": 1, "loss": 0.1, "duplicate": 0.1, "reorder": 0.1,
         "corrupt": 0.1, "rate_mbit": 10, "seed": 1},
        {"use": "capture", "path": str(tmp_path / "fuzz.pcap"), "match": "tcp or arp"},
        {"use": f"{PLUGIN}:ProtoCount"},
    ]})
    c = Chain(cfg.services, logging.getLogger("fuzz"))
    c.start(0.0)
    return c


frames = st.one_of(
    st.binary(min_size=0, max_size=300),
    st.builds(lambda cut, flips: bytes(
        b ^ flips.get(i, 0) for i, b in enumerate(VALID[:cut])),
        st.integers(0, len(VALID)),
        st.dictionaries(st.integers(0, len(VALID)), st.integers(1, 255))),
)


@given(st.lists(st.tuples(frames, st.booleans(), st.binary(min_size=10, max_size=10)),
                max_size=30))
def test_garbage_through_a_chain(tmp_path_factory, batch):
    c = chain(tmp_path_factory.mktemp("fz"))
    now = 0.0
    for data, up, vnet in batch:
        now += 0.0005
        try:
            f = Frame(data, VnetHeader.unpack(vnet) if vnet[0] & 1 else None)
        except VTLError:
            continue
        c.process(f, Direction.TO_UPLINK if up else Direction.TO_GUEST, now)
        c.run_timers(now)
    c.run_timers(now + 10)
    c.stop(now + 10)
    total_errors = sum(s.counters.errors for s in c.slots)
    assert total_errors == 0  # these services never raise on garbage
