"""netem: sans-IO tests with an explicit clock."""

from __future__ import annotations

import statistics

import pytest
from pydantic import ValidationError
from vtl.services.netem import Netem, NetemOptions, _wire_bytes

from vtl import CONSUMED, DROP, PASS, Direction, Frame, VnetHeader
from vtl.frame import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4
from vtl.testing import FakeContext, ServiceHarness, tag_of, tagged_frame, udp_frame

UP = Direction.TO_UPLINK
DOWN = Direction.TO_GUEST


def make(ctx: FakeContext | None = None, **opts: object) -> tuple[Netem, FakeContext]:
    ctx = ctx or FakeContext("netem")
    svc = Netem(NetemOptions(**opts), ctx)
    svc.start(0.0)
    return svc, ctx


def harness(**opts: object) -> ServiceHarness[Netem]:
    h = ServiceHarness(Netem, NetemOptions(**opts))
    h.start(0.0)
    return h


def drive(h: ServiceHarness[Netem], n: int, dt: float, size: int = 100,
          direction: Direction = UP, t0: float = 0.0, flush: float = 10.0):
    """Offer ``n`` tagged frames ``dt`` apart (the harness runs due timers before each);
    return the verdicts and what left the link, in delivery order, as (tag, time, frame)."""
    verdicts = [h.send(tagged_frame(i, size), direction, t0 + i * dt) for i in range(n)]
    h.advance(to=t0 + n * dt + flush)
    out = h.take()
    assert all(o.direction is direction for o in out)
    return verdicts, [(tag_of(o.frame), o.at, o.frame) for o in out]


# -- basics -------------------------------------------------------------------------------


def test_no_impairment_passes_straight_through():
    svc, ctx = make()
    f = udp_frame()
    before = bytes(f.data)
    assert svc.process(f, UP, 1.0) is PASS
    assert svc.process(f, DOWN, 1.0) is PASS
    assert bytes(f.data) == before
    assert svc.poll_at() is None and ctx.emitted == []


def test_delay_is_exact_and_never_early():
    svc, ctx = make(delay_ms=50)
    f = udp_frame()
    assert svc.process(f, UP, 1.0) is CONSUMED
    due = 1.0 + 50 / 1000.0
    assert svc.poll_at() == due
    svc.on_timer(due - 1e-9)
    assert ctx.emitted == []
    svc.on_timer(due)
    assert ctx.emitted == [(f, UP)]
    assert svc.poll_at() is None
    assert ctx.extra("delayed") == 1


def test_delay_keeps_frames_consumed_while_queue_nonempty():
    h = harness(delay_ms=10)
    verdicts, out = drive(h, 100, 0.001)
    assert set(verdicts) == {CONSUMED}
    assert [tag for tag, _, _ in out] == list(range(100))
    for tag, at, _ in out:
        assert at == pytest.approx(tag * 0.001 + 0.010)


def test_poll_at_is_earliest_over_both_directions():
    svc, ctx = make(delay_ms=100)
    assert svc.poll_at() is None
    svc.process(udp_frame(), UP, 2.0)
    svc.process(udp_frame(), DOWN, 1.5)
    assert svc.poll_at() == pytest.approx(1.6)
    svc.on_timer(1.6)
    assert ctx.emitted[0][1] is DOWN
    assert svc.poll_at() == pytest.approx(2.1)
    svc.on_timer(2.1)
    assert [d for _, d in ctx.emitted] == [DOWN, UP]
    assert svc.poll_at() is None


def test_late_timer_releases_all_due_frames_in_order():
    svc, ctx = make(delay_ms=5)
    for i in range(10):
        svc.process(tagged_frame(i), UP, i * 0.001)
    svc.on_timer(1.0)
    assert [tag_of(f) for f, _ in ctx.emitted] == list(range(10))


def test_direction_scoping():
    svc, ctx = make(direction="to_uplink", loss=1.0, delay_ms=10)
    f = udp_frame()
    before = bytes(f.data)
    for _ in range(100):
        assert svc.process(f, DOWN, 0.0) is PASS
    assert bytes(f.data) == before
    assert svc.process(udp_frame(), UP, 0.0) is DROP
    assert ctx.extra("lost") == 1


def test_to_guest_only():
    svc, ctx = make(direction="to_guest", delay_ms=10)
    assert svc.process(udp_frame(), UP, 0.0) is PASS
    assert svc.process(udp_frame(), DOWN, 0.0) is CONSUMED


# -- jitter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_jitter_keeps_fifo_order(dist):
    h = harness(delay_ms=20, jitter_ms=15, jitter_dist=dist, seed=3)
    _, out = drive(h, 5000, 0.0002)
    tags = [tag for tag, _, _ in out]
    assert tags == list(range(5000))
    times = [at for _, at, _ in out]
    assert times == sorted(times)
    delays = [at - tag * 0.0002 for tag, at, _ in out]
    assert min(delays) >= -1e-12
    assert statistics.pstdev(delays) > 0.001  # jitter is there


def test_jitter_sparse_traffic_varies_around_delay():
    h = harness(delay_ms=50, jitter_ms=10, seed=5)
    _, out = drive(h, 2000, 0.1)  # far apart: the FIFO clamp never binds
    delays = [at - tag * 0.1 for tag, at, _ in out]
    assert min(delays) >= 0.040 - 1e-9 and max(delays) <= 0.060 + 1e-9
    assert statistics.mean(delays) == pytest.approx(0.050, abs=0.001)


# -- loss -------------------------------------------------------------------------------------


def test_random_loss_rate():
    n, p = 100_000, 0.1
    svc, ctx = make(loss=p, seed=1)
    f = tagged_frame(0)
    drops = sum(svc.process(f, UP, 0.0) is DROP for _ in range(n))
    # 5 standard deviations of a binomial(n, p)
    assert abs(drops - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    assert ctx.extra("lost") == drops


def test_gilbert_elliott_burst_length_and_rate():
    n, p, r = 100_000, 0.01, 0.25
    svc, ctx = make(ge_p=p, ge_r=r, seed=7)
    f = tagged_frame(0)
    lost = [svc.process(f, UP, 0.0) is DROP for _ in range(n)]
    bursts = []
    run = 0
    for x in lost:
        if x:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert statistics.mean(bursts) == pytest.approx(1 / r, rel=0.1)
    assert sum(lost) / n == pytest.approx(p / (p + r), rel=0.1)
    # bursty: much longer runs than independent loss at the same rate would give
    assert max(bursts) >= 10


def test_gilbert_elliott_good_state_loss():
    svc, _ = make(ge_p=0.001, ge_r=0.5, ge_loss_bad=0.0, ge_loss_good=0.2, seed=2)
    f = tagged_frame(0)
    lost = sum(svc.process(f, UP, 0.0) is DROP for _ in range(50_000))
    assert lost / 50_000 == pytest.approx(0.2 * (0.5 / 0.501), rel=0.05)


# -- duplicate, reorder, corrupt ---------------------------------------------------------------


def test_duplicate_rate_and_copies():
    n = 100_000
    h = harness(duplicate=0.05, seed=11)
    verdicts, out = drive(h, n, 0.0001)
    assert all(v is PASS for v in verdicts)
    dups = h.extra("duplicated")
    assert abs(dups - n * 0.05) < 5 * (n * 0.05 * 0.95) ** 0.5
    assert len(out) == n + dups
    assert {tag for tag, _, _ in out} == set(range(n))
    # a copy is a different object with the same bytes, and follows its original
    by_tag: dict[int, list[Frame]] = {}
    for tag, _, f in out:
        by_tag.setdefault(tag, []).append(f)
    pairs = [fs for fs in by_tag.values() if len(fs) == 2]
    assert len(pairs) == dups
    assert all(a is not b and a.data == b.data for a, b in pairs)


def test_reorder_sends_ahead_of_delayed_frames():
    n = 20_000
    h = harness(delay_ms=10, reorder=0.1, seed=13)
    verdicts, out = drive(h, n, 0.001)
    reordered = h.extra("reordered")
    assert abs(reordered - n * 0.1) < 5 * (n * 0.1 * 0.9) ** 0.5
    assert verdicts.count(PASS) == reordered  # sent at once, without delay
    assert sorted(tag for tag, _, _ in out) == list(range(n))
    tags = [tag for tag, _, _ in out]
    assert tags != sorted(tags)
    # the frames not reordered keep their order and their delay
    passed = {i for i, v in enumerate(verdicts) if v is PASS}
    in_order = [(tag, at) for tag, at, _ in out if tag not in passed]
    assert [t for t, _ in in_order] == sorted(t for t, _ in in_order)
    assert all(at == pytest.approx(tag * 0.001 + 0.010) for tag, at in in_order)


def test_reorder_without_delay_counts_nothing():
    svc, ctx = make(reorder=0.5, seed=1)
    for _ in range(100):
        assert svc.process(udp_frame(), UP, 0.0) is PASS
    assert ctx.extra("reordered") == 0


def _bit_diff(a: bytes, b: bytes) -> list[tuple[int, int]]:
    return [(i, x ^ y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def test_corrupt_flips_exactly_one_bit_beyond_ethernet_header():
    svc, ctx = make(corrupt=1.0, seed=17)
    positions = set()
    for size in (15, 60, 1514):
        for _ in range(300):
            f = udp_frame(size) if size >= 42 else tagged_frame(0, size)
            before = bytes(f.data)
            assert svc.process(f, UP, 0.0) is PASS
            diff = _bit_diff(before, bytes(f.data))
            assert len(diff) == 1
            index, xor = diff[0]
            assert index >= 14 and xor & (xor - 1) == 0  # one bit
            positions.add(index)
    assert ctx.extra("corrupted") == 900
    assert max(positions) > 1000  # spread over the whole payload


def test_corrupt_rate():
    n = 50_000
    svc, ctx = make(corrupt=0.02, seed=19)
    f = tagged_frame(0, 64)
    for _ in range(n):
        svc.process(f, UP, 0.0)
    assert abs(ctx.extra("corrupted") - n * 0.02) < 5 * (n * 0.02 * 0.98) ** 0.5


def test_corrupt_header_only_frame_is_left_alone():
    svc, ctx = make(corrupt=1.0)
    f = Frame(bytes(14))
    assert svc.process(f, UP, 0.0) is PASS
    assert f.data == bytes(14) and ctx.extra("corrupted") == 0


def test_corrupt_partial_checksum_stays_before_csum_start():
    svc, _ = make(corrupt=1.0, seed=23)
    for _ in range(500):
        f = udp_frame(1000)
        f.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
        before = bytes(f.data)
        svc.process(f, UP, 0.0)
        [(index, _)] = _bit_diff(before, bytes(f.data))
        assert 14 <= index < 34


# -- rate and queues -----------------------------------------------------------------------------


@pytest.mark.parametrize("overhead", [0, 24])
def test_rate_limits_throughput(overhead):
    rate, size = 10.0, 1500
    h = harness(rate_mbit=rate, overhead_bytes=overhead, queue_packets=100_000)
    # offer twice the rate for 2 s
    dt = size * 8 / (2 * rate * 1e6)
    n = int(2.0 / dt)
    verdicts, out = drive(h, n, dt, size=size)
    assert DROP not in verdicts
    assert [tag for tag, _, _ in out] == list(range(n))
    times = [at for _, at, _ in out]
    # wire bytes after the first release, over the time they took
    wire = (len(out) - 1) * (size + overhead) * 8
    assert wire / (times[-1] - times[0]) == pytest.approx(rate * 1e6, rel=0.01)


def test_rate_with_delay_releases_at_departure_plus_delay():
    h = harness(rate_mbit=8, delay_ms=100, overhead_bytes=0)
    for i in range(3):
        h.send(tagged_frame(i, 1000), UP, 0.0)  # 1 ms each at 8 Mbit/s
    h.advance(to=1.0)
    assert [o.at for o in h.take(UP)] == pytest.approx([0.101, 0.102, 0.103])
    assert h.timers == pytest.approx([0.101, 0.102, 0.103])


def test_rate_queue_tail_drop_and_recovery():
    h = harness(rate_mbit=1, queue_packets=10, overhead_bytes=0)
    verdicts = [h.send(tagged_frame(i, 1250), UP, 0.0) for i in range(50)]  # 10 ms each
    assert verdicts[:10] == [CONSUMED] * 10 and verdicts[10:] == [DROP] * 40
    assert h.extra("queue_drops") == 40 and h.counters.dropped == 40
    h.advance(to=0.035)  # three frames sent, room for three more
    assert len(h.emitted(UP)) == 3
    verdicts = [h.send(tagged_frame(100 + i, 1250), UP, 0.035) for i in range(5)]
    assert verdicts == [CONSUMED] * 3 + [DROP] * 2
    h.advance(to=10.0)
    assert [tag_of(o.frame) for o in h.take(UP)] == list(range(10)) + [100, 101, 102]
    assert h.poll_at() is None


def test_held_limit_bounds_memory():
    svc, ctx = make(delay_ms=1000, limit_packets=5)
    verdicts = [svc.process(tagged_frame(i), UP, 0.0) for i in range(8)]
    assert verdicts == [CONSUMED] * 5 + [DROP] * 3
    assert ctx.extra("limit_drops") == 3
    svc2, ctx2 = make(delay_ms=1000, limit_bytes=65536)
    verdicts = [svc2.process(tagged_frame(i, 10_000), UP, 0.0) for i in range(8)]
    assert verdicts.count(CONSUMED) == 6 and ctx2.extra("limit_drops") == 2


def test_gso_frames_count_as_their_segments():
    f = Frame(bytes(14 + 20 + 20 + 3000))
    assert _wire_bytes(f, 24) == 3054 + 24
    f.vnet = VnetHeader(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1000)
    assert _wire_bytes(f, 24) == 3054 + 2 * 54 + 3 * 24
    f.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM)  # not GSO: one frame
    assert _wire_bytes(f, 0) == 3054


# -- reproducibility and independence ------------------------------------------------------------

IMPAIRED = dict(delay_ms=5, jitter_ms=3, loss=0.05, duplicate=0.05, reorder=0.05, corrupt=0.05)


def _run(seed, n=3000, other_direction_traffic=False):
    h = harness(seed=seed, **IMPAIRED)
    if other_direction_traffic:
        for i in range(500):  # their releases are filtered out below
            h.send(tagged_frame(i), DOWN, 0.0)
    verdicts = [h.send(tagged_frame(i, 80), UP, i * 0.0005) for i in range(n)]
    h.advance(to=100.0)
    out = [(bytes(o.frame.data), o.at) for o in h.take(UP) if o.injected]
    return verdicts, out, dict(h.counters.extra)


def test_same_seed_same_decisions():
    a = _run(42)
    b = _run(42)
    assert a[0] == b[0] and a[1] == b[1]
    c = _run(43)
    assert (a[0], a[1]) != (c[0], c[1])


def test_directions_are_independent():
    a = _run(42)
    b = _run(42, other_direction_traffic=True)
    assert a[0] == b[0] and a[1] == b[1]


# -- lifecycle, report, options ------------------------------------------------------------------


def test_stop_discards_held_frames_and_report():
    svc, ctx = make(delay_ms=100, loss=0.5, seed=1)
    for i in range(100):
        svc.process(tagged_frame(i), UP, 0.0)
    rep = svc.report(0.0)
    assert rep["config"] == {"direction": "both", "delay_ms": 100, "loss": 0.5, "seed": 1}
    held = rep["directions"]["to_uplink"]["held"]
    assert held == ctx.extra("delayed") and held + ctx.extra("lost") == 100
    svc.stop(1.0)
    assert svc.poll_at() is None
    assert ctx.extra("discarded_at_stop") == held
    assert svc.report(0.0)["directions"]["to_uplink"]["held"] == 0


@pytest.mark.parametrize("bad", [
    {"loss": 2}, {"loss": -0.1}, {"delay_ms": -1}, {"jitter_ms": -5}, {"rate_mbit": -1},
    {"duplicate": 1.5}, {"ge_p": 0.1, "loss": 0.1}, {"ge_p": 0.1, "ge_r": 0},
    {"queue_packets": 0}, {"direction": "sideways"}, {"no_such_option": 1},
])
def test_invalid_options_rejected(bad):
    with pytest.raises(ValidationError):
        NetemOptions(**bad)


def test_options_have_descriptions_and_class_attributes():
    for name, fld in NetemOptions.model_fields.items():
        assert fld.description, name
    assert Netem.name == "netem" and "\n" not in Netem.summary and Netem.Options is NetemOptions


def test_in_the_bridge_chain_keeps_order():
    import logging

    from vtl.bridge.chain import Chain

    opts = NetemOptions(delay_ms=10, rate_mbit=100, duplicate=0.1, seed=1)
    chain = Chain.from_services([lambda c: Netem(opts, c)], logging.getLogger("t"))
    chain.start(0.0)
    for i in range(100):
        now = i * 0.0001
        if (d := chain.next_deadline()) is not None and d <= now:
            chain.run_timers(now)
        chain.process(tagged_frame(i), UP, now)
    while (d := chain.next_deadline()) is not None:
        chain.run_timers(d)
    tags = [tag_of(f) for f in chain.out_uplink]
    assert tags == sorted(tags) and set(tags) == set(range(100))
    assert len(tags) == 100 + chain.slots[0].counters.extra["duplicated"]


# -- changed while running (vtl ctl NAME set netem ..., reload) ------------------------------


def test_retune_applies_from_the_next_frame_and_keeps_held_frames():
    h = harness(delay_ms=20, seed=1)
    h.send(tagged_frame(1), UP, 0.0)
    h.service.retune(NetemOptions(delay_ms=80, seed=1), 0.005)
    h.send(tagged_frame(2), UP, 0.010)
    h.advance(to=1.0)
    out = [(tag_of(o.frame), round(o.at, 3)) for o in h.take()]
    assert out == [(1, 0.02), (2, 0.09)]
    h.service.retune(NetemOptions(delay_ms=0, seed=1), 1.0)
    assert h.send(tagged_frame(3), UP, 1.0) is PASS, "no impairment left: frames pass at once"


def test_retune_to_one_direction_releases_the_other_at_once():
    h = harness(delay_ms=100)
    h.send(tagged_frame(1), DOWN, 0.0)
    h.send(tagged_frame(2), UP, 0.0)
    h.service.retune(NetemOptions(delay_ms=100, direction="to_uplink"), 0.01)
    assert [(tag_of(o.frame), o.direction) for o in h.take()] == [(1, DOWN)]
    assert h.send(tagged_frame(3), DOWN, 0.02) is PASS
    assert h.send(tagged_frame(4), UP, 0.02) is CONSUMED


def test_retune_with_a_new_seed_restarts_the_random_streams():
    a = make(loss=0.5, seed=3)[0]
    b = make(loss=0.5, seed=4)[0]
    b.retune(NetemOptions(loss=0.5, seed=3), 0.0)
    for i in range(200):
        assert a.process(tagged_frame(i), UP, 0.0) is b.process(tagged_frame(i), UP, 0.0)


def test_drain_sends_what_it_holds_in_order():
    netem, ctx = make(delay_ms=500, jitter_ms=100, seed=2)
    for i in range(5):
        netem.process(tagged_frame(i), UP, i * 0.001)
    netem.drain(0.01)
    assert [tag_of(f) for f, _ in ctx.emitted] == [0, 1, 2, 3, 4]
    assert netem.poll_at() is None


def test_every_option_is_tunable():
    assert Netem.tunable == frozenset(NetemOptions.model_fields)
