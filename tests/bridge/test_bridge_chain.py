"""Chain semantics, sans-IO: order, direction, verdicts, injection, match, failure policy."""

from __future__ import annotations

import logging

import pytest
from scapy.layers.l2 import Ether
from vtl.bridge.chain import Chain
from vtl.bridge.filter import MatchFilter

from vtl import CONSUMED, DROP, PASS, Direction, Frame, Packet, Service
from vtl.errors import ConfigError

UP, DOWN = Direction.TO_UPLINK, Direction.TO_GUEST
LOG = logging.getLogger("test")


def frame(tag: int = 0, proto: bytes = b"\x08\x06") -> Frame:
    return Frame(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + proto + bytes([tag]) * 46)


class Recorder(Service):
    name = "rec"

    def __init__(self, ctx, label: str, log: list, verdict=PASS):
        super().__init__(None, ctx)
        self.label, self.seen, self.verdict = label, log, verdict

    def process(self, f, direction, now):
        self.seen.append((self.label, direction))
        return self.verdict


def make(*specs) -> tuple[Chain, list]:
    seen: list = []
    chain = Chain.from_services(
        [lambda ctx, s=s: Recorder(ctx, s[0], seen, *s[1:]) for s in specs], LOG)
    return chain, seen


def test_order_follows_direction():
    chain, seen = make(("a",), ("b",), ("c",))
    chain.process(frame(), UP, 0.0)
    assert [s[0] for s in seen] == ["a", "b", "c"]
    assert len(chain.out_uplink) == 1 and not chain.out_guest
    seen.clear()
    chain.process(frame(), DOWN, 0.0)
    assert [s[0] for s in seen] == ["c", "b", "a"]
    assert len(chain.out_guest) == 1


def test_drop_and_consumed_stop_the_walk_and_are_counted():
    chain, seen = make(("a",), ("b", DROP), ("c",))
    chain.process(frame(), UP, 0.0)
    assert [s[0] for s in seen] == ["a", "b"] and not chain.out_uplink
    assert chain.slots[1].counters.dropped == 1
    chain, seen = make(("a", CONSUMED), ("b",))
    chain.process(frame(), UP, 0.0)
    assert [s[0] for s in seen] == ["a"] and chain.slots[0].counters.consumed == 1


class Answerer(Service):
    """Answers every frame toward the side it came from, consuming it."""

    name = "answer"

    def process(self, f, direction, now):
        self.ctx.emit(Frame(bytes(f.data)), direction.reverse)
        return CONSUMED


def test_injection_passes_only_services_between_position_and_side():
    seen: list = []
    chain = Chain.from_services([
        lambda ctx: Recorder(ctx, "a", seen),
        lambda ctx: Recorder(ctx, "b", seen),
        lambda ctx: Answerer(None, ctx),
        lambda ctx: Recorder(ctx, "d", seen),
    ], LOG)
    chain.process(frame(), UP, 0.0)
    # the answer from slot 2 toward the guest passes b then a, never d
    assert seen == [("a", UP), ("b", UP), ("b", DOWN), ("a", DOWN)]
    assert len(chain.out_guest) == 1 and not chain.out_uplink
    assert chain.slots[2].counters.injected == 1


class Boom(Service):
    name = "boom"

    def process(self, f, direction, now):
        raise RuntimeError("bug in a service")


@pytest.mark.parametrize(("fail", "passed"), [("open", True), ("closed", False)])
def test_failure_policy(fail, passed):
    chain = Chain.from_services([lambda ctx: Boom(None, ctx)], LOG)
    chain.slots[0].fail = fail
    for _ in range(3):
        chain.process(frame(), UP, 0.0)
    assert chain.slots[0].counters.errors == 3
    assert len(chain.out_uplink) == (3 if passed else 0)


class Picky(Service):
    name = "picky"

    def process(self, f, direction, now):
        Packet(f).ipv4.ttl  # noqa: B018 - a frame too short for IPv4 raises PacketError
        return PASS


@pytest.mark.parametrize(("fail", "passed"), [("open", True), ("closed", False)])
def test_a_malformed_frame_is_counted_as_malformed_not_as_a_bug(fail, passed, caplog):
    chain = Chain.from_services([lambda ctx: Picky(None, ctx)], LOG)
    chain.slots[0].fail = fail
    short = Frame(bytes(Ether(type=0x0800) / b"\x45\x00"))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            chain.process(short, UP, 0.0)
    c = chain.slots[0].counters
    assert (c.malformed, c.errors) == (3, 0)
    assert len(chain.out_uplink) == (3 if passed else 0)
    assert "malformed frame" in caplog.text and "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


def test_a_flood_of_malformed_frames_never_hides_a_real_failure(caplog):
    class Both(Picky):
        def process(self, f, direction, now):
            if len(f.data) > 20:
                raise RuntimeError("bug")
            return super().process(f, direction, now)

    chain = Chain.from_services([lambda ctx: Both(None, ctx)], LOG)
    short = Frame(bytes(Ether(type=0x0800) / b"\x45\x00"))
    with caplog.at_level(logging.INFO):
        for _ in range(100):
            chain.process(short, UP, 0.5)
        chain.process(frame(), UP, 0.5)
    ours = [r for r in caplog.records if r.name.startswith(LOG.name)]
    assert [r.levelname for r in ours] == ["INFO", "WARNING"], caplog.text
    assert "failed in process" in ours[1].getMessage()


def test_match_scopes_a_service():
    chain, seen = make(("arp-only",))
    chain.slots[0].match = MatchFilter("arp")
    chain.process(frame(proto=b"\x08\x06"), UP, 0.0)
    chain.process(frame(proto=b"\x08\x00"), UP, 0.0)
    assert len(seen) == 1  # the IPv4 frame passed untouched
    assert len(chain.out_uplink) == 2


def test_bad_match_expression_is_a_config_error():
    with pytest.raises(ConfigError, match="bad filter expression"):
        MatchFilter("tcp port nonsense")


class Delayer(Service):
    """Holds frames for one second, then emits them on."""

    name = "delay"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.held: list = []

    def process(self, f, direction, now):
        self.held.append((now + 1.0, f, direction))
        return CONSUMED

    def poll_at(self):
        return self.held[0][0] if self.held else None

    def on_timer(self, now):
        while self.held and self.held[0][0] <= now:
            _, f, d = self.held.pop(0)
            self.ctx.emit(f, d)


def test_timers_release_held_frames():
    chain = Chain.from_services([lambda ctx: Delayer(None, ctx)], LOG)
    chain.process(frame(), UP, 10.0)
    assert chain.next_deadline() == 11.0
    chain.run_timers(10.5)
    assert not chain.out_uplink
    chain.run_timers(11.0)
    assert len(chain.out_uplink) == 1 and chain.next_deadline() is None


def test_service_returning_garbage_is_treated_as_failure():
    chain, _ = make(("a", None))
    chain.process(frame(), UP, 0.0)
    assert chain.slots[0].counters.errors == 1
    assert len(chain.out_uplink) == 1  # fail open by default
