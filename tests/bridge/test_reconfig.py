"""Changing a running chain, sans-IO: `set` retunes in place, `reload` keeps, retunes,
replaces, adds, removes and reorders, and a change that cannot be made changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from scapy.utils import rdpcap
from vtl.bridge import reconfig
from vtl.bridge.chain import Chain
from vtl.bridge.config import BridgeConfig, parse_config
from vtl.bridge.engine import Bridge

from vtl import Direction, Frame
from vtl.errors import ConfigError

HERE = Path(__file__).parent
PLUGINS = HERE / "reconf_services.py"
PORTS = {"guest": {"kind": "tap", "ifname": "rc0"}, "uplink": {"kind": "pcap", "ifname": "rc1"}}
LOG = logging.getLogger("vtl.reconftest")
UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST


def svc(cls: str, **options: Any) -> dict[str, Any]:
    return {"use": f"{PLUGINS}:{cls}", **options}


def config(*services: dict[str, Any], **bridge: Any) -> BridgeConfig:
    return parse_config({"bridge": {"name": "rc", "control": False, **bridge}, "ports": PORTS,
                         "services": list(services)})


def frame(tag: int = 0) -> Frame:
    return Frame(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes([tag]) * 46)


def started(cfg: BridgeConfig) -> Chain:
    chain = Chain(cfg.services, LOG)
    chain.start(0.0)
    return chain


def labels(chain: Chain, direction: Direction = UP) -> list[str]:
    tag = next(s.service for s in chain.slots if type(s.service).__name__ == "Tag")
    tag.seen.clear()
    chain.process(frame(), direction, 1.0)
    return list(tag.seen)


def reload(chain: Chain, old: BridgeConfig, new: BridgeConfig) -> dict[str, Any]:
    return reconfig.apply(chain, reconfig.plan(chain, old, new), 2.0, LOG)


# -- set ------------------------------------------------------------------------------------

def test_set_retunes_netem_in_place_and_keeps_what_it_holds():
    cfg = config({"use": "netem", "delay_ms": 20, "loss": 0.0})
    chain = started(cfg)
    netem = chain.slots[0].service
    chain.process(frame(1), UP, 0.0)  # held until 0.020
    spec = reconfig.check_set(chain.slots[0], {"delay_ms": 80, "jitter_ms": 1.5})
    reconfig.apply_set(chain.slots[0], spec, 0.001)
    assert chain.slots[0].service is netem, "the same instance, state kept"
    assert (netem.options.delay_ms, netem.options.jitter_ms) == (80, 1.5)
    assert chain.slots[0].spec.raw == {"delay_ms": 80, "loss": 0.0, "jitter_ms": 1.5}
    assert netem.poll_at() == pytest.approx(0.020), "a held frame keeps its release time"
    chain.run_timers(0.020)
    assert len(chain.out_uplink) == 1
    chain.out_uplink.clear()
    chain.process(frame(2), UP, 1.0)
    assert 1.0785 <= netem.poll_at() <= 1.0815, "the next frame gets the new delay"


@pytest.mark.parametrize(("changes", "names"), [
    ({"delay_ms": -1}, "netem.delay_ms"),
    ({"delay_ms": "slow"}, "netem.delay_ms"),
    ({"loss": 0.1, "ge_p": 0.2}, "exclusive"),
    ({"nonsense": 1}, "netem.nonsense: unknown option"),
    ({}, "at least one"),
])
def test_set_refuses_bad_values_and_changes_nothing(changes, names):
    cfg = config({"use": "netem", "delay_ms": 20})
    chain = started(cfg)
    before = chain.slots[0].service.options
    with pytest.raises(ConfigError, match=names):
        reconfig.check_set(chain.slots[0], changes)
    assert chain.slots[0].service.options is before and chain.slots[0].spec is cfg.services[0]


def test_set_refuses_options_that_are_not_tunable():
    chain = started(config({"use": "pep"}, svc("Tag", label="a")))
    with pytest.raises(ConfigError, match=r"pep.max_connections: cannot change while the "
                                          r"bridge runs \(tunable: congestion\)"):
        reconfig.check_set(chain.slots[0], {"max_connections": 5})
    with pytest.raises(ConfigError, match=r"tag.weight: cannot change.*tunable: label"):
        reconfig.check_set(chain.slots[1], {"weight": 5, "label": "b"})
    assert chain.slots[1].service.options.label == "a"


def test_set_starts_stops_and_moves_a_capture(tmp_path: Path):
    first, second = tmp_path / "a.pcap", tmp_path / "b.pcap"
    chain = started(config({"use": "capture", "path": str(first), "active": False}))
    slot = chain.slots[0]
    chain.process(frame(1), UP, 0.0)
    assert not first.exists(), "configured stopped: nothing written, no file"

    def set_(**changes: Any) -> None:
        reconfig.apply_set(slot, reconfig.check_set(slot, changes), 0.0)

    set_(active=True)
    chain.process(frame(2), UP, 0.0)
    chain.process(frame(3), DOWN, 0.0)
    set_(path=str(second), direction="to_guest")  # moved: the first file is closed, complete
    assert [bytes(p)[14] for p in rdpcap(str(first))] == [2, 3]
    chain.process(frame(4), UP, 0.0)
    chain.process(frame(5), DOWN, 0.0)
    set_(match="ip[14] == 7")  # the filter of the slot changes too
    chain.process(frame(6), DOWN, 0.0)
    chain.process(frame(7), DOWN, 0.0)
    set_(active=False)
    assert [bytes(p)[14] for p in rdpcap(str(second))] == [5, 7]
    set_(match="")
    assert slot.match is None
    with pytest.raises(ConfigError, match="capture.match: bad filter"):
        reconfig.check_set(slot, {"match": "not a (filter"})
    with pytest.raises(ConfigError, match="could not apply"):  # a path it cannot write
        reconfig.apply_set(slot, reconfig.check_set(
            slot, {"active": True, "path": "/proc/nope/x.pcap"}), 0.0)
    assert slot.service.options.active is False and slot.spec.options.active is False
    chain.stop(1.0)


# -- reload ---------------------------------------------------------------------------------

def test_reload_keeps_retunes_replaces_adds_removes_and_reorders(caplog):
    old = config(svc("Tag", label="a"), {"use": "netem", "delay_ms": 0},
                 svc("Holder", held=2), svc("Tag", name="second", label="b", weight=1))
    chain = started(old)
    tag_a, netem, holder, tag_b = (s.service for s in chain.slots)
    assert labels(chain) == ["a", "b"]
    new = config({"use": "netem", "delay_ms": 50},            # retuned, moved first
                 svc("Tag", name="second", label="b", weight=2),  # weight is not tunable
                 svc("Tag", label="a"),                        # kept
                 svc("Tag", name="third", label="c"))          # added
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        summary = reload(chain, old, new)
    assert summary["kept"] == ["tag"]
    assert summary["retuned"] == [{"name": "netem", "changed": ["delay_ms"]}]
    assert summary["replaced"] == [{"name": "second", "changed": ["weight"]}]
    assert summary["added"] == ["third"] and summary["removed"] == ["holder"]
    assert summary["order"] == ["netem", "second", "tag", "third"]
    assert summary["reset_connections"] == {"holder": 2}
    assert "holder taken out of the chain; reset the 2 connections it held" in caplog.text
    assert [s.ctx.name for s in chain.slots] == summary["order"]
    assert chain.slots[0].service is netem and netem.options.delay_ms == 50
    assert chain.slots[2].service is tag_a
    assert chain.slots[1].service is not tag_b and chain.slots[1].service.options.weight == 2
    assert [s.ctx._index for s in chain.slots] == [0, 1, 2, 3]
    # what the removed service sent at stop went toward the guest through the old layout:
    # the retuned netem between it and the guest holds it for the new 50 ms
    assert not chain.out_guest
    chain.run_timers(2.05)
    assert [bytes(f.data)[14] for f in chain.out_guest] == [0, 1]
    assert labels(chain, DOWN) == ["c", "a", "b"]


def test_reload_delivers_what_a_removed_netem_holds():
    old = config(svc("Tag", label="a"), {"use": "netem", "delay_ms": 500})
    chain = started(old)
    for i in range(3):
        chain.process(frame(i), UP, 0.1 * i)
    assert not chain.out_uplink
    reload(chain, old, config(svc("Tag", label="a")))
    assert [bytes(f.data)[14] for f in chain.out_uplink] == [0, 1, 2]


def test_frames_a_retune_releases_walk_from_the_old_position():
    old = config({"use": "netem", "delay_ms": 500, "direction": "both"}, svc("Tag", label="a"),
                 svc("Holder", held=0))
    chain = started(old)
    tag = chain.slots[1].service
    chain.process(frame(9), DOWN, 0.0)  # held by netem (first slot), after the tag
    tag.seen.clear()
    reload(chain, old, config(svc("Tag", label="a"),
                              {"use": "netem", "delay_ms": 500, "direction": "to_uplink"}))
    assert [bytes(f.data)[14] for f in chain.out_guest] == [9]
    assert tag.seen == [], "released from netem's old position, which was past the tag"


def test_a_service_that_cannot_start_fails_the_reload_and_nothing_changes():
    old = config(svc("Tag", label="a"), svc("Holder", held=1), svc("Fragile"))
    chain = started(old)
    slots = list(chain.slots)
    fragile = type(chain.slots[2].service)
    fragile.started = fragile.stopped = 0
    holder_cls = type(chain.slots[1].service)
    holder_cls.stopped = 0
    new = config(svc("Tag", label="z"), svc("Fragile", name="new1"),
                 svc("Fragile", name="new2", broken=True))
    with pytest.raises(ConfigError, match=r"services\[2\] \(new2\): could not start: address "
                                          "already in use"):
        reload(chain, old, new)
    assert chain.slots == slots and chain.slots[0].service.options.label == "a"
    assert (fragile.started, fragile.stopped) == (2, 2), "what started is stopped again"
    assert holder_cls.stopped == 0 and not chain.out_guest and not chain.pending
    assert labels(chain) == ["a"]


def test_a_retune_that_fails_undoes_the_others():
    old = config(svc("Tag", label="a"), svc("Fragile"))
    chain = started(old)
    new = config(svc("Tag", label="b"), svc("Fragile", mood="angry"), svc("Holder"))
    with pytest.raises(ConfigError, match="fragile: could not apply mood: will not"):
        reload(chain, old, new)
    assert chain.slots[0].service.options.label == "a" and chain.slots[0].spec.raw == {
        "label": "a"}
    assert len(chain) == 2 and labels(chain) == ["a"]


def test_reload_refuses_what_needs_a_restart_naming_each_key():
    chain = started(config())
    old = config()
    new = parse_config({"bridge": {"name": "other", "control": False, "batch": 8},
                        "ports": {**PORTS, "uplink": {"kind": "pcap", "ifname": "rc9"}}})
    with pytest.raises(ConfigError) as exc:
        reconfig.plan(chain, old, new)
    text = str(exc.value)
    assert "ports.uplink: cannot change" in text and "bridge.name: cannot change" in text
    assert "bridge.batch: cannot change" in text and "ports.guest" not in text
    plan = reconfig.plan(chain, old, config(log_level="debug", deny=["192.0.2.0/24"]))
    assert set(plan.bridge_changes) == {"log_level", "deny"}


def test_bridge_reload_and_set_keep_the_config_in_step():
    old = config({"use": "netem", "delay_ms": 5}, svc("Tag", label="a"))
    bridge = Bridge(old, LOG)
    bridge.log.setLevel(logging.NOTSET)
    bridge.set_options("netem", {"delay_ms": 7})
    assert bridge.config.services[0].options.delay_ms == 7
    with pytest.raises(ConfigError, match="no service named 'nope'"):
        bridge.set_options("nope", {"x": 1})
    result = bridge.reload(config(svc("Tag", label="a"), log_level="error"))
    assert result["removed"] == ["netem"] and result["bridge"] == ["log_level"]
    assert [s.name for s in bridge.config.services] == ["tag"]
    assert bridge.log.level == logging.ERROR
    bridge.log.setLevel(logging.NOTSET)
