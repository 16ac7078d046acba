"""netem: link emulation per direction (delay, jitter, loss, duplication, reordering,
corruption, rate limit with a bounded queue).

Synopsis
    [[services]]
    use = "netem"
    delay_ms = 30        # one-way, per direction
    jitter_ms = 5
    loss = 0.01
    rate_mbit = 10
    queue_packets = 100

What it does to frames
    Each covered direction has its own link model (own state, own queue, own random
    stream). For every frame, in this order:

    1. loss: dropped with probability ``loss`` (verdict DROP, counter ``lost``), or by
       the Gilbert-Elliott model when ``ge_p > 0`` (then ``loss`` must be 0);
    2. duplication: with probability ``duplicate`` a copy is made; the copy crosses the
       link model after the original (it can itself be lost or corrupted, never
       duplicated again), as netem re-enqueues its clone;
    3. corruption: with probability ``corrupt`` one random bit beyond the 14-byte
       Ethernet header is flipped, so checksums catch it (see notes on offloads);
    4. rate: with ``rate_mbit > 0`` the frame waits for a transmitter that sends
       ``wire_bytes * 8 / rate`` seconds per frame; departure = max(now, previous
       departure) + transmission time. A frame that finds ``queue_packets`` frames
       waiting for (or on) the transmitter is tail-dropped (counter ``queue_drops``);
    5. delay: it is released at departure + ``delay_ms`` + jitter;
    6. reordering: with probability ``reorder`` the frame skips the delay and jitter
       (not the transmitter) and so overtakes the frames still in the delay line, as
       netem's ``reorder`` sends a frame at once, ahead of the queue.

    A held frame is CONSUMED and later injected from this position in its direction
    (``poll_at``/``on_timer``). A frame that would leave at once, with nothing held
    before it in its direction, simply PASSes: with no delay, no jitter and no rate the
    service costs a few comparisons per frame.

Notes
    - FIFO: jitter never reorders frames. A frame's release time is clamped to be no
      earlier than the previous (non-reordered) frame's, like netem with a rate or a
      real link with a variable-latency but order-keeping path. The mean delay under
      jitter is therefore slightly above ``delay_ms`` at high frame rates. Only
      ``reorder`` (and duplication) puts frames out of order.
    - Jitter is uniform in ±``jitter_ms`` (``jitter_dist = "normal"``: gaussian with
      that standard deviation); the total delay is clipped at 0.
    - Wire size for the rate: frame length + ``overhead_bytes`` (default 24: preamble 8,
      FCS 4, inter-frame gap 12, as on real Ethernet; set 0 to match ``tc netem rate``).
      A GSO frame (``frame.vnet.is_gso``) counts as the segments the kernel will cut it
      into: its full length, plus its headers (``hdr_len``) repeated for every extra
      segment, plus the overhead once per segment.
    - Decisions (loss, duplicate, corrupt, reorder) are per frame: a GSO frame is lost
      or kept whole, as with netem on a qdisc.
    - Corruption and offloads: when the frame's checksum is left to the kernel
      (``vnet.needs_csum``) a flip beyond ``csum_start`` would be covered by the checksum
      computed later, so the bit is picked in the headers before ``csum_start``
      (IPv4 header checksum, or the pseudo-header sum already in the L4 checksum).
    - Gilbert-Elliott: on each frame the state first moves (good->bad with ``ge_p``,
      bad->good with ``ge_r``), then the frame is lost with the new state's loss
      probability. With ``ge_loss_bad = 1`` loss bursts last 1/``ge_r`` frames on average.
    - Memory is bounded: besides ``queue_packets`` for the transmitter, at most
      ``limit_packets`` frames and ``limit_bytes`` bytes are held per direction (delay
      line included); beyond that frames are tail-dropped (counter ``limit_drops``).
    - ``seed`` makes runs reproducible: each direction draws from its own
      ``random.Random`` seeded from it, so traffic in one direction never changes the
      decisions in the other.
    - On stop, frames still held are discarded (reported as ``discarded_at_stop``);
      taken out of a running chain by ``reload`` they go on at once, in order.
    - Every option can change while the bridge runs (``vtl ctl NAME set netem
      delay_ms=80``, or a reload): held frames keep their release times and order, the
      new values apply from the next frame.

See also
    ``shaper`` (hierarchical bandwidth control), ``capture`` (see what netem did),
    tc-netem(8), Dummynet, VDE wirefilter.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Any, Literal

from pydantic import Field, model_validator

from vtl import (
    CONSUMED,
    DROP,
    PASS,
    Direction,
    Frame,
    Service,
    ServiceContext,
    ServiceOptions,
    Verdict,
)

ETH_HLEN = 14
_COVERED = {
    "both": (Direction.TO_UPLINK, Direction.TO_GUEST),
    "to_uplink": (Direction.TO_UPLINK,),
    "to_guest": (Direction.TO_GUEST,),
}


class NetemOptions(ServiceOptions):
    """Options of the ``netem`` service (each applies per covered direction)."""

    direction: Literal["both", "to_uplink", "to_guest"] = Field(
        "both", description="which direction(s) to impair; the other passes untouched")
    delay_ms: float = Field(0.0, ge=0, description="one-way delay in milliseconds")
    jitter_ms: float = Field(
        0.0, ge=0, description="delay variation in ms (never reorders frames)")
    jitter_dist: Literal["uniform", "normal"] = Field(
        "uniform", description="jitter distribution: uniform ±jitter or normal (sigma=jitter)")
    loss: float = Field(0.0, ge=0, le=1, description="random loss probability per frame")
    ge_p: float = Field(
        0.0, ge=0, le=1,
        description="Gilbert-Elliott good->bad transition probability (GE loss when > 0)")
    ge_r: float = Field(
        1.0, ge=0, le=1,
        description="Gilbert-Elliott bad->good transition probability (mean burst 1/ge_r)")
    ge_loss_bad: float = Field(
        1.0, ge=0, le=1, description="Gilbert-Elliott loss probability in the bad state")
    ge_loss_good: float = Field(
        0.0, ge=0, le=1, description="Gilbert-Elliott loss probability in the good state")
    duplicate: float = Field(0.0, ge=0, le=1, description="duplication probability per frame")
    reorder: float = Field(
        0.0, ge=0, le=1,
        description="probability that a frame skips the delay and overtakes held frames")
    corrupt: float = Field(
        0.0, ge=0, le=1,
        description="probability of flipping one random bit beyond the Ethernet header")
    rate_mbit: float = Field(0.0, ge=0, description="link rate in Mbit/s (0 = unlimited)")
    overhead_bytes: int = Field(
        24, ge=0, le=1000,
        description="bytes added per frame for the rate (Ethernet preamble+FCS+gap = 24)")
    queue_packets: int = Field(
        1000, ge=1, description="frames the rate queue holds before tail drop")
    limit_packets: int = Field(
        100_000, ge=1, description="most frames held per direction (delay line included)")
    limit_bytes: int = Field(
        256 * 2**20, ge=65536, description="most bytes held per direction")
    seed: int | None = Field(None, description="random seed for reproducible runs")

    @model_validator(mode="after")
    def _check(self) -> NetemOptions:
        if self.ge_p > 0 and self.loss > 0:
            raise ValueError("loss and ge_p are exclusive: use one loss model")
        if self.ge_p > 0 and self.ge_r == 0:
            raise ValueError("ge_r must be > 0 when ge_p > 0 (the bad state would never end)")
        return self


class _Link:
    """The link model of one direction: random stream, GE state, transmitter, delay line."""

    __slots__ = ("direction", "rng", "ge_bad", "busy_until", "tx_queue", "held",
                 "held_bytes", "last_release", "seq", "stats")

    def __init__(self, direction: Direction, seed: int | None):
        self.direction = direction
        self.rng = random.Random(None if seed is None else f"netem:{seed}:{direction.value}")
        self.ge_bad = False
        self.busy_until = -math.inf  # when the transmitter finishes the last frame
        self.tx_queue: deque[float] = deque()  # departure times of frames not yet sent
        self.held: list[tuple[float, int, Frame]] = []  # heap of (release, seq, frame)
        self.held_bytes = 0
        self.last_release = -math.inf  # release time of the last in-order frame
        self.seq = 0
        self.stats: dict[str, int] = {}


class Netem(Service):
    name = "netem"
    summary = "link emulation per direction: delay, jitter, loss, duplicate, reorder, corrupt, rate"
    Options = NetemOptions

    options: NetemOptions

    tunable = frozenset(NetemOptions.model_fields)  # every option, as tc qdisc change

    def __init__(self, options: NetemOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self._links: dict[Direction, _Link] = {
            d: _Link(d, options.seed) for d in _COVERED[options.direction]}
        self._derive(options)

    def _derive(self, o: NetemOptions) -> None:
        self.options = o
        self._delay = o.delay_ms / 1000.0
        self._jitter = o.jitter_ms / 1000.0
        self._bps = o.rate_mbit * 1e6
        self._noop = not any((o.delay_ms, o.jitter_ms, o.loss, o.ge_p, o.duplicate, o.reorder,
                              o.corrupt, o.rate_mbit))

    # -- hooks ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        o = self.options
        if o.reorder > 0 and not (o.delay_ms or o.jitter_ms):
            self.ctx.log.warning("%s: reorder has no effect without delay_ms or jitter_ms",
                                 self.ctx.name)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        link = self._links.get(direction)
        if link is None or self._noop:
            return PASS
        if self._lost(link):
            self._count(link, "lost")
            return DROP
        dup = None
        if self.options.duplicate and link.rng.random() < self.options.duplicate:
            dup = frame.copy()
            self._count(link, "duplicated")
        verdict = self._admit(link, frame, now, may_pass=True)
        if dup is not None and not self._lost(link):
            self._admit(link, dup, now, may_pass=False)
        return verdict

    def retune(self, options: NetemOptions, now: float) -> None:
        """New options while running (``vtl ctl NAME set netem delay_ms=80``). Frames
        already held keep their release times and their order; the new delay, rate and
        probabilities apply from the next frame (a shorter delay waits behind them, as
        FIFO demands). A direction no longer covered releases what it holds at once; a
        new ``seed`` restarts every random stream from it."""
        old = self.options
        links = {}
        for d in _COVERED[options.direction]:
            link = self._links.get(d) or _Link(d, options.seed)
            if options.seed != old.seed:
                link.rng = _Link(d, options.seed).rng
            if options.ge_p == 0:
                link.ge_bad = False
            links[d] = link
        for d, link in self._links.items():
            if d not in links:
                self._release(link, math.inf)
        self._links = links
        self._derive(options)

    def drain(self, now: float) -> None:
        """Taken out of the chain by a reload: what it holds goes on at once, in order."""
        for link in self._links.values():
            self._release(link, math.inf)

    def poll_at(self) -> float | None:
        times = [link.held[0][0] for link in self._links.values() if link.held]
        return min(times) if times else None

    def on_timer(self, now: float) -> None:
        for link in self._links.values():
            self._release(link, now)

    def _release(self, link: _Link, until: float) -> None:
        held = link.held
        while held and held[0][0] <= until:
            _, _, frame = heapq.heappop(held)
            link.held_bytes -= len(frame.data)
            self.ctx.emit(frame, link.direction)

    def stop(self, now: float) -> None:
        for link in self._links.values():
            if link.held:
                self._count(link, "discarded_at_stop", len(link.held))
            link.held.clear()
            link.held_bytes = 0
            link.tx_queue.clear()

    def report(self, now: float) -> dict[str, Any]:
        o = self.options
        config = {"direction": o.direction, **o.model_dump(exclude_defaults=True)}
        per_dir = {
            d.value: {"held": len(link.held), "held_bytes": link.held_bytes,
                      "ge_state": "bad" if link.ge_bad else "good", **link.stats}
            for d, link in self._links.items()
        }
        return {"config": config, "directions": per_dir}

    # -- the link model ------------------------------------------------------------------

    def _count(self, link: _Link, key: str, n: int = 1) -> None:
        link.stats[key] = link.stats.get(key, 0) + n
        self.ctx.count(key, n)

    def _lost(self, link: _Link) -> bool:
        o = self.options
        rng = link.rng
        if o.ge_p > 0:
            if link.ge_bad:
                if rng.random() < o.ge_r:
                    link.ge_bad = False
            elif rng.random() < o.ge_p:
                link.ge_bad = True
            p = o.ge_loss_bad if link.ge_bad else o.ge_loss_good
            return p > 0 and rng.random() < p
        return o.loss > 0 and rng.random() < o.loss

    def _admit(self, link: _Link, frame: Frame, now: float, may_pass: bool) -> Verdict:
        """Corrupt, schedule and hold (or pass) one frame that was not lost."""
        o = self.options
        rng = link.rng
        if o.corrupt and rng.random() < o.corrupt and _flip_bit(frame, rng):
            self._count(link, "corrupted")
        reordered = bool(o.reorder) and rng.random() < o.reorder

        departure = now
        if self._bps:
            txq = link.tx_queue
            while txq and txq[0] <= now:
                txq.popleft()
            if len(txq) >= o.queue_packets:
                self._count(link, "queue_drops")
                return DROP
            departure = max(now, link.busy_until) + _wire_bytes(frame, o.overhead_bytes) * 8 \
                / self._bps

        delay = self._delay
        if self._jitter:
            j = (rng.uniform(-self._jitter, self._jitter) if o.jitter_dist == "uniform"
                 else rng.gauss(0.0, self._jitter))
            delay = max(0.0, delay + j)
        in_order_release = max(departure + delay, link.last_release)
        release = departure if reordered else in_order_release
        if reordered and release < in_order_release:
            self._count(link, "reordered")

        if may_pass and release <= now and (reordered or not link.held):
            self._commit(link, departure, release, reordered)
            return PASS
        size = len(frame.data)
        if len(link.held) >= o.limit_packets or link.held_bytes + size > o.limit_bytes:
            self._count(link, "limit_drops")
            return DROP
        self._commit(link, departure, release, reordered)
        link.seq += 1
        heapq.heappush(link.held, (release, link.seq, frame))
        link.held_bytes += size
        self._count(link, "delayed")
        return CONSUMED

    def _commit(self, link: _Link, departure: float, release: float, reordered: bool) -> None:
        if self._bps:
            link.busy_until = departure
            link.tx_queue.append(departure)
        if not reordered:
            link.last_release = release


def _wire_bytes(frame: Frame, overhead: int) -> int:
    """Bytes the frame takes on the wire, GSO frames as the segments they stand for."""
    length = len(frame.data)
    vnet = frame.vnet
    if vnet is None or not vnet.is_gso or vnet.gso_size <= 0:
        return length + overhead
    hdr = min(vnet.hdr_len, length)
    segments = max(1, -(-(length - hdr) // vnet.gso_size))
    return length + (segments - 1) * hdr + segments * overhead


def _flip_bit(frame: Frame, rng: random.Random) -> bool:
    """Flip one random bit beyond the Ethernet header; False if there is none."""
    end = len(frame.data)
    vnet = frame.vnet
    if vnet is not None and vnet.needs_csum and ETH_HLEN < vnet.csum_start < end:
        end = vnet.csum_start
    if end <= ETH_HLEN:
        return False
    bit = rng.randrange((end - ETH_HLEN) * 8)
    frame.data[ETH_HLEN + bit // 8] ^= 1 << (bit % 8)
    return True
