"""The ``puzzle`` service's server role: a stateless firewall that issues and verifies puzzles.

Per frame toward the guest (sans-IO; the service's ``process`` calls
:meth:`Server.inbound`):

1. Not IPv4, or not *required* (``require``: a TCP SYN without ACK; with
   ``udp-new`` also a UDP packet of a flow not yet admitted; with ``all`` every
   IPv4 packet): passed, our options stripped if it carries any (the guest never
   sees them). This is the fast path: a byte test or two.
2. ``mode = "under_load"`` and the rate of required packets is below
   ``load_high`` (until it drops below ``load_low`` again once on): passed,
   stripped.
3. A valid answer (client info + answer option, verified against the secret
   ring without any per-client state): stripped and passed; the flow counts as
   admitted.
4. Client info without a (valid) answer: a puzzle goes back to the sender from
   the protected address (ICMP ``icmp_type``), within the global and the
   per-address budgets; the packet is dropped. An expired, stale or invalid
   answer gets a new puzzle the same way (a client holding an answer from before
   a server restart, made with keys that are gone, is not locked out until it
   expires; a forgery gains nothing a first packet would not); an immature one
   is dropped.
5. No client info (a host without the proxy; IPv6, which has no such option):
   ``legacy`` decides.

Every ``tick_s`` the ring advances one key, ``under_load`` is re-decided and,
with ``target_rate``, the difficulty is doubled or halved toward that rate of
admitted flows (within ``difficulty_min..difficulty_max``).
"""

from __future__ import annotations

from typing import Any

import vtl.services.puzzle.cookie as cookie
import vtl.services.puzzle.wire as wire
from vtl.services.puzzle.cookie import SecretRing, Verdict
from vtl.services.puzzle.options import PuzzleOptions

from vtl import DROP, PASS, Direction, Frame, ServiceContext
from vtl.flow import FlowTable
from vtl.ratelimit import Bucket

TO_UPLINK = Direction.TO_UPLINK
NEEDS_CSUM = 1


def shift_offloads(frame: Frame, delta: int) -> None:
    """The L4 header moved by ``delta`` bytes: so do the virtio-net offsets."""
    v = frame.vnet
    if v is not None:
        if v.flags & NEEDS_CSUM:
            v.csum_start += delta
        if v.hdr_len:
            v.hdr_len += delta


def l3_of(data: bytearray) -> int:
    """The IPv4 header's offset (one VLAN tag allowed), or 0 when not IPv4."""
    if data[12] == 0x08 and data[13] == 0x00:
        return 14
    if data[12] == 0x81 and data[13] == 0x00 and data[16] == 0x08 and data[17] == 0x00:
        return 18
    return 0


class Server:
    """The server role's state: the ring, the budgets, the admitted UDP flows."""

    def __init__(self, o: PuzzleOptions, ctx: ServiceContext, now: float):
        self.ctx = ctx
        self.ring = SecretRing(o.ring, o.tick_s)
        self.ring.advance(now)
        self.difficulty = o.difficulty
        self.flows: FlowTable[bytes, bool] = FlowTable(o.max_flows, timeout=o.flow_timeout_s)
        self.clients: FlowTable[bytes, Bucket] = FlowTable(o.max_clients, timeout=60.0)
        self.active = o.mode == "always"
        self.next_tick = self.ring.next_at() or now + o.tick_s
        self.required = 0  # in the current tick
        self.admitted = 0
        self.configure(o, now)

    def configure(self, o: PuzzleOptions, now: float) -> None:
        self.o = o
        self.syn_only = o.require == "syn"
        self.bucket = Bucket(o.puzzle_rate, o.puzzle_burst, now)
        self.difficulty = min(max(self.difficulty, o.difficulty_min), o.difficulty_max)
        if o.mode == "always":
            self.active = True

    # -- per frame ------------------------------------------------------------------

    def process(self, frame: Frame, direction: Direction, now: float) -> Any:
        """The service's ``process`` in this role (the service binds it in place of its
        own, one call less per frame). The fast path, inlined: with ``require = "syn"``
        an untagged IPv4 packet without options needs no check unless it is a
        first-fragment TCP SYN without ACK."""
        if direction is TO_UPLINK:
            return PASS
        data = frame.data
        if self.syn_only and len(data) >= 54 and data[14] == 0x45 and data[12] == 8 \
                and data[13] == 0 and (data[23] != 6 or data[47] & 0x12 != 2
                                       or data[20] & 0x1F or data[21]):
            return PASS
        return self.inbound(frame, now)

    def inbound(self, frame: Frame, now: float) -> Any:
        data = frame.data
        if len(data) < 34:
            return PASS
        l3 = l3_of(data)
        if not l3:
            if data[12] == 0x86 and data[13] == 0xDD and self._v6_required(data):
                return self._legacy(now)
            return PASS
        o = self.o
        req = o.require
        if req == "all" or wire.syn_without_ack(data, l3):
            required = True
        elif req == "udp-new" and data[l3 + 9] == 17 and not (data[l3 + 6] & 0x1F or
                                                               data[l3 + 7]):
            required = not self._admitted_flow(data, l3, now)
        else:
            required = False
        if not required:
            if data[l3] & 15 != 5:
                self._strip(frame, l3)
            return PASS
        self.required += 1
        if not self.active:
            if data[l3] & 15 != 5:
                self._strip(frame, l3)
            self.ctx.count("passed_not_under_load")
            return PASS
        opts = wire.parse_options(data, l3) if data[l3] & 15 != 5 else None
        if opts is wire.MALFORMED:
            self.ctx.count("answers_invalid")
            return DROP
        if opts is None or opts.nonce is None:
            return self._legacy(now)
        proto = data[l3 + 9]
        src, dst = bytes(data[l3 + 12:l3 + 16]), bytes(data[l3 + 16:l3 + 20])
        if opts.answer is not None:
            verdict = cookie.verify(self.ring, src, dst, proto, opts.nonce, opts.client_ts,
                                    opts.answer, opts.server_ts, opts.maturity, opts.expiry,
                                    opts.cookie)
            self.ctx.count(f"answers_{verdict}")
            if verdict is Verdict.VALID:
                self._strip(frame, l3)
                self.admitted += 1
                if proto == 17 and req == "udp-new":
                    self.flows.put(_udp_key(data, l3), True, now)
                return PASS
            if verdict is Verdict.IMMATURE:
                return DROP  # it will be good soon: the client sends it again then
            # expired, stale or invalid (a forgery, or an answer to a server that restarted
            # with new keys): a fresh puzzle, within the same budgets as any first packet

        self._puzzle(frame, l3, src, opts.nonce, opts.client_ts, proto, now)
        return DROP

    def _v6_required(self, data: bytearray) -> bool:
        """An IPv6 packet the options cannot protect: required like its IPv4 twin."""
        if self.o.require == "all":
            return True
        nh = data[20]
        if nh == 6 and len(data) >= 68:
            return data[67] & 0x12 == 0x02
        return nh == 17 and self.o.require == "udp-new"

    def _legacy(self, now: float) -> Any:
        if self.o.legacy == "pass":
            self.ctx.count("legacy_passed")
            return PASS
        self.ctx.count("legacy_dropped")
        return DROP

    def _admitted_flow(self, data: bytearray, l3: int, now: float) -> bool:
        key = _udp_key(data, l3)
        if key in self.flows:
            self.flows.touch(key, now)
            return True
        return False

    def _strip(self, frame: Frame, l3: int) -> None:
        data = frame.data
        before = len(data)
        if wire.strip_options(frame.data, l3) and len(data) != before:
            shift_offloads(frame, len(data) - before)
            self.ctx.count("stripped")

    def _puzzle(self, frame: Frame, l3: int, src: bytes, nonce: int, client_ts: int,
                proto: int, now: float) -> None:
        """A puzzle for the sender of ``frame``, if the budgets allow."""
        per = self.clients.get(src, now)
        if per is None:
            per = Bucket(self.o.client_rate, self.o.client_burst, now)
            self.clients.put(src, per, now)
        else:
            self.clients.touch(src, now)
        if not per.take(now):
            self.ctx.count("puzzles_limited_client")
            return
        if not self.bucket.take(now):
            self.ctx.count("puzzles_limited")
            return
        data = frame.data
        p = cookie.make_puzzle(self.ring, src, bytes(data[l3 + 16:l3 + 20]), proto, nonce,
                               client_ts, self.o.maturity, self.o.expiry,
                               2 * self.difficulty - 1)
        out = wire.build_puzzle(data, l3, p, nonce, client_ts, icmp_type=self.o.icmp_type)
        self.ctx.emit(Frame(out), TO_UPLINK)
        self.ctx.count("puzzles_issued")

    # -- per tick ---------------------------------------------------------------------

    def on_tick(self, now: float) -> None:
        o = self.o
        ticks = self.ring.advance(now)
        self.next_tick = self.ring.next_at() or now + o.tick_s
        if ticks <= 0:
            return
        period = ticks * o.tick_s
        rate, admitted = self.required / period, self.admitted / period
        self.required = self.admitted = 0
        if o.mode == "under_load":
            if not self.active and rate > o.load_high:
                self.active = True
                self.ctx.count("load_on")
            elif self.active and rate < o.load_low:
                self.active = False
                self.ctx.count("load_off")
        if o.target_rate > 0 and self.active:
            if admitted > o.target_rate and self.difficulty < o.difficulty_max:
                self.difficulty = min(o.difficulty_max, self.difficulty * 2)
            elif admitted < o.target_rate / 2 and self.difficulty > o.difficulty_min:
                self.difficulty = max(o.difficulty_min, self.difficulty // 2)
        self.flows.expire(now, 1024)
        self.clients.expire(now, 1024)

    def report(self) -> dict[str, Any]:
        return {"difficulty": self.difficulty, "active": self.active,
                "server_ts": self.ring.now, "clients": len(self.clients),
                "udp_flows": len(self.flows)}


def _udp_key(data: bytearray, l3: int) -> bytes:
    """src, dst and the two ports of the UDP packet at ``l3``."""
    l4 = l3 + ((data[l3] & 15) << 2)
    return bytes(data[l3 + 12:l3 + 20]) + bytes(data[l4:l4 + 4])
