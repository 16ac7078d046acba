"""The ``puzzle`` service's client role: a proxy that attaches nonces and solves for its VM.

From the guest (:meth:`Client.outbound`), every IPv4 packet the slot's ``match``
lets in gets the client-info option (a nonce keyed with the proxy's own secret
over source, destination, protocol and a millisecond timestamp, so a puzzle
that echoes it is checked without state), or, while an answer for its
(source, destination, protocol) is held and valid, the client info the answer
was made for and the answer option (32 bytes). A SYN's MSS is clamped by those
32 bytes below ``mtu``; a DF packet (or GSO frame) that no longer fits gets
ICMP fragmentation-needed; a SYN without ACK is kept (``max_pending``) to be sent
again once its puzzle is solved.

From the uplink (:meth:`Client.inbound`), a puzzle (ICMP ``icmp_type``) is
dropped, whatever it says: puzzles never reach the guest. It is solved only when
it came from the address its quoted packet went to, its echoed nonce is this
proxy's and recent (``nonce_window_s``), and its range is no wider than
``max_difficulty`` (else ``abstained``). Solving runs in the bridge's worker
processes (``ctx.compute``), never on a forwarding thread. Once solved, the
answer is held until it may expire (``expiry`` ticks of ``tick_s`` after the
puzzle came, less a margin: the server's ticks are not in phase with ours, so an
``expiry`` of 0 leaves the client no time) and the kept SYN goes out again with
it, at once or when the answer matures.
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

import vtl.services.puzzle.cookie as cookie
import vtl.services.puzzle.wire as wire
from vtl.services.puzzle.cookie import NonceKey, Verdict
from vtl.services.puzzle.options import PuzzleOptions
from vtl.services.puzzle.server import l3_of, shift_offloads

from vtl import CONSUMED, DROP, PASS, Direction, Frame, ServiceContext
from vtl.errors import PacketError
from vtl.flow import FlowTable
from vtl.packet import build
from vtl.packet.checksum import is_partial
from vtl.packet.packet import Packet
from vtl.packet.tcp import clamp_mss

TO_UPLINK, TO_GUEST = Direction.TO_UPLINK, Direction.TO_GUEST
BOTH = wire.INFO_LEN + wire.ANSWER_LEN
MARGIN_S = 0.2  # an answer is given up this long before the server would refuse it
SOLVE_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)  # the solve time histogram's bounds (s)


def _ignore(result: Any, now: float) -> None:
    """The warm-up job's result."""


class Held(NamedTuple):
    """An answer the proxy attaches: its two options, from when until when."""

    options: bytes
    valid_from: float
    valid_until: float


class Client:
    """The client role's state: the nonce key, held answers, kept SYNs, solves."""

    def __init__(self, o: PuzzleOptions, ctx: ServiceContext, now: float):
        self.ctx = ctx
        self.key = NonceKey(window_ms=int(o.nonce_window_s * 1000))
        self.answers: FlowTable[bytes, Held] = FlowTable(o.max_answers, timeout=300.0)
        self.pending: FlowTable[bytes, Frame] = FlowTable(o.max_pending,
                                                          timeout=o.nonce_window_s)
        self.solving: dict[bytes, Any] = {}  # answer key + nonce -> the bridge's job
        self.resend: list[tuple[float, bytes, bytes]] = []  # (due, SYN key, answer key)
        self.solve_times = [0] * (len(SOLVE_BUCKETS) + 1)
        self.configure(o, now)
        # the bridge starts its worker processes on the first job (about 0.25 s): a
        # trivial one now, so the first puzzle does not wait for them
        ctx.compute(cookie.puzzle_hash, (bytes(8), 0), _ignore)

    def configure(self, o: PuzzleOptions, now: float) -> None:
        self.o = o
        self.mss = o.mtu - 40 - BOTH

    # -- from the guest ---------------------------------------------------------------

    def outbound(self, frame: Frame, now: float) -> Any:
        data = frame.data
        if len(data) < 34:
            return PASS
        l3 = l3_of(data)
        if not l3:
            return PASS
        proto = data[l3 + 9]
        akey = bytes(data[l3 + 12:l3 + 20]) + bytes((proto,))
        held = self.answers.lookup(akey)
        if held is not None and held.valid_from <= now < held.valid_until:
            opts = held.options
        else:
            nonce, cts = self.key.make(akey[0:4], akey[4:8], proto, now)
            opts = wire.client_info(nonce, cts)
        if wire.syn_without_ack(data, l3):
            l4 = l3 + ((data[l3] & 15) << 2)
            if len(data) >= l4 + 20:
                if clamp_mss(data, l4, self.mss, is_partial(frame.vnet, l4)):
                    self.ctx.count("mss_clamped")
                self.pending.put(akey[0:8] + bytes(data[l4:l4 + 4]), frame.copy(), now)
        return self._attach(frame, l3, opts)

    def _attach(self, frame: Frame, l3: int, opts: bytes) -> Any:
        data = frame.data
        n = len(opts)
        v = frame.vnet
        if v is not None and v.gso_type:
            size, df = v.hdr_len - l3 + v.gso_size, True
        else:
            size, df = (data[l3 + 2] << 8) | data[l3 + 3], bool(data[l3 + 6] & 0x40)
        if size + n > self.o.mtu:
            if not df:
                self.ctx.count("too_big_passed")
                return PASS
            try:
                reply = build.icmp_error(Packet(frame), 3, 4, rest=self.o.mtu - n)
            except PacketError:
                self.ctx.count("malformed")
                return DROP
            self.ctx.emit(Frame(reply), TO_GUEST)
            self.ctx.count("too_big_sent")
            return CONSUMED
        if not wire.insert_options(data, l3, opts):
            self.ctx.count("no_room")
            return PASS
        shift_offloads(frame, n)
        self.ctx.count("answers_attached" if n == BOTH else "info_attached")
        return PASS

    # -- from the uplink --------------------------------------------------------------

    def inbound(self, frame: Frame, now: float) -> Any:
        data = frame.data
        if len(data) < 34:
            return PASS
        l3 = l3_of(data)
        if not l3 or data[l3 + 9] != 1:
            return PASS
        icmp = l3 + ((data[l3] & 15) << 2)
        if len(data) <= icmp or data[icmp] != self.o.icmp_type:
            return PASS
        msg = wire.parse_puzzle(data, l3, self.o.icmp_type)
        if msg is None:
            self.ctx.count("puzzles_malformed")
            return DROP
        q = msg.quote
        if len(data) < q + 28 or data[q] >> 4 != 4:
            self.ctx.count("puzzles_malformed")
            return DROP
        csrc, cdst = bytes(data[q + 12:q + 16]), bytes(data[q + 16:q + 20])
        if cdst != bytes(data[l3 + 12:l3 + 16]) or csrc != bytes(data[l3 + 16:l3 + 20]):
            self.ctx.count("puzzles_spoofed")  # not from where our packet went
            return DROP
        proto = data[q + 9]
        verdict = self.key.check(csrc, cdst, proto, msg.nonce, msg.client_ts, now)
        if verdict is not Verdict.VALID:
            self.ctx.count("puzzles_stale" if verdict is Verdict.STALE else "puzzles_spoofed")
            return DROP
        p = msg.puzzle
        if p.difficulty > self.o.max_difficulty:
            self.ctx.count("puzzles_abstained")
            return DROP
        akey = csrc + cdst + bytes((proto,))
        job_key = akey + msg.nonce.to_bytes(4, "big")
        if job_key in self.solving:
            self.ctx.count("puzzles_duplicate")
            return DROP
        ql4 = q + ((data[q] & 15) << 2)
        syn_key = csrc + cdst + bytes(data[ql4:ql4 + 4])
        info = wire.client_info(msg.nonce, msg.client_ts)

        def solved(result: Any, done: float) -> None:
            self.solving.pop(job_key, None)
            self._solved(result, p, info, akey, syn_key, now, done)

        job = self.ctx.compute(cookie.solve, (p,), solved)
        if job is None:
            self.ctx.count("puzzles_abstained_busy")
            return DROP
        self.solving[job_key] = job
        self.ctx.count("puzzles_received")
        return DROP

    def _solved(self, result: Any, p: cookie.Puzzle, info: bytes, akey: bytes,
                syn_key: bytes, asked: float, now: float) -> None:
        if not isinstance(result, int):
            self.ctx.count("solve_failed")
            return
        took = now - asked
        self.solve_times[sum(took > b for b in SOLVE_BUCKETS)] += 1
        self.ctx.count("puzzles_solved")
        tick = self.o.tick_s
        held = Held(info + wire.answer_option(result, p.server_ts, p.maturity, p.expiry,
                                              p.cookie),
                    asked + p.maturity * tick, asked + p.expiry * tick - MARGIN_S)
        if held.valid_until <= now:
            self.ctx.count("solved_too_late")
            return
        self.answers.put(akey, held, now, timeout=held.valid_until - now)
        if held.valid_from <= now:
            self._resend(syn_key, akey, now)
        else:
            heapq.heappush(self.resend, (held.valid_from, syn_key, akey))

    def _resend(self, syn_key: bytes, akey: bytes, now: float) -> None:
        """The kept SYN again, with the answer (the connection need not wait for the
        guest's own retransmission)."""
        kept = self.pending.pop(syn_key)
        held = self.answers.lookup(akey)
        if kept is None or held is None:
            return
        l3 = l3_of(kept.data)
        before = len(kept.data)
        if l3 and self._attach(kept, l3, held.options) is PASS and len(kept.data) > before:
            self.ctx.emit(kept, TO_UPLINK)
            self.ctx.count("syn_resent")

    # -- timers -----------------------------------------------------------------------

    def poll_at(self) -> float | None:
        return self.resend[0][0] if self.resend else None

    def on_timer(self, now: float) -> None:
        while self.resend and self.resend[0][0] <= now:
            _, syn_key, akey = heapq.heappop(self.resend)
            self._resend(syn_key, akey, now)

    def stop(self) -> None:
        for job in self.solving.values():
            job.cancel()
        self.solving.clear()

    def report(self) -> dict[str, Any]:
        bounds = [f"<={b}s" for b in SOLVE_BUCKETS] + [f">{SOLVE_BUCKETS[-1]}s"]
        return {"answers_held": len(self.answers), "syns_kept": len(self.pending),
                "solving": len(self.solving),
                "solve_time": dict(zip(bounds, self.solve_times, strict=True))}
