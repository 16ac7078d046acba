"""The firewall's connection tracker: one bounded table of flows, states as the kernel's.

:meth:`Conntrack.lookup` takes a parsed packet (:mod:`.parse`) and says what
nftables' ``ct state`` would say of it: ``new``, ``established``, ``related``,
``invalid`` or ``untracked``, with the connection it belongs to. Like the
kernel, a new connection is *unconfirmed* until the packet that made it is
accepted: the service calls :meth:`Conntrack.confirm` then, so a SYN the rules
drop leaves nothing behind.

- **Keys**: one entry per connection, under a key that is the same for both
  directions (protocol and the two endpoints in a fixed order); the connection
  remembers which endpoint opened it (its *original* direction).
- **TCP**: :mod:`.tcpct` (states, window tracking, ``liberal``, ``loose``).
- **UDP** and other protocols: new on the first packet, established once the
  other side answered; a UDP flow that saw both directions gets the longer
  ``udp_stream`` timeout and becomes *assured* when it is still busy 2 s later.
- **ICMP / ICMPv6 echo** (and timestamp, information, address mask): the
  request opens, the reply with the same identifier answers; a reply without a
  request is invalid.
- **Errors** (ICMP destination unreachable, time exceeded, ...; ICMPv6 1-4) are
  ``related`` when the packet they quote belongs to a tracked connection and the
  error goes back toward that packet's sender; else ``invalid``.
- **Untracked**: IPv6 neighbour discovery and MLD, as the kernel's tracker
  leaves them alone.
- **Fragments**: the first fragment is tracked by its ports; later ones follow
  it through a small table of fragment ids (the kernel reassembles first).
- **Bounds**: ``max_entries`` connections; when full, the connection idle the
  longest among the non-assured goes first (assured ones only when nothing else
  is left), counted in ``evicted``. Fragment ids: 1024, the oldest dropped.

Timeouts are the kernel's names and defaults (``options.TIMEOUTS``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import vtl.services.firewall.tcpct as tcpct
from vtl.services.firewall.fastpath import ESTABLISHED, NEW, FastPath
from vtl.services.firewall.options import TIMEOUTS
from vtl.services.firewall.parse import Parsed

from vtl.flow import FlowTable
from vtl.packet.addr import ip_str

RELATED, INVALID, UNTRACKED = "related", "invalid", "untracked"
ICMP4_PAIRS = {8: (0, 0), 0: (0, 1), 13: (1, 0), 14: (1, 1), 15: (2, 0), 16: (2, 1),
               17: (3, 0), 18: (3, 1)}  # type -> (pair, 0 request / 1 reply)
ICMP6_PAIRS = {128: (0, 0), 129: (0, 1), 139: (1, 0), 140: (1, 1)}
ICMP6_UNTRACKED = frozenset((130, 131, 132, 133, 134, 135, 136, 143))
MAX_FRAGMENTS = 1024
_NEVER = float("inf")
UDP_STREAM_AFTER = 2.0


class Conn:
    """One tracked connection."""

    __slots__ = ("key", "proto", "version", "orig_src", "orig", "state", "seen", "seen_reply",
                 "assured", "confirmed", "dead", "last_index", "last_dir", "last_seq", "last_end",
                 "last_win", "last_ack", "last_flags", "last_wscale", "retrans",
                 "packets", "nbytes", "created", "stream_at", "timeout", "until", "fast_keys",
                 "verdict")

    def __init__(self, key: Any, p: Parsed, orig: tuple[bytes, int, bytes, int], now: float):
        self.key = key
        self.proto = p.proto
        self.version = p.version
        self.orig = orig  # (src, sport, dst, dport) of the original direction
        self.orig_src = (orig[0], orig[1])
        self.state = tcpct.NO
        self.seen = (tcpct.Side(), tcpct.Side())
        self.seen_reply = self.assured = self.confirmed = self.dead = False
        self.last_index = tcpct.I_NONE
        self.last_dir = 0
        self.last_seq = self.last_end = self.last_win = self.last_ack = 0
        self.last_flags = self.last_wscale = 0
        self.retrans = 0
        self.packets = [0, 0]
        self.nbytes = [0, 0]
        self.created = now
        self.stream_at = now + UDP_STREAM_AFTER
        self.timeout = 30.0
        self.until = 0.0  # when it expires, once kept (the table's deadline, for the fast path)
        self.fast_keys: tuple[bytes, bytes] | None = None  # FastPath's entries
        #: (rule set generation, accepting rule or None for the default): how the rules
        #: decided this UDP flow's first packet, when that decision holds for the next
        #: ones (see .fastpath)
        self.verdict: tuple[int, Any] | None = None

    def describe(self, now: float) -> dict[str, Any]:
        src, sport, dst, dport = self.orig
        names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
        return {"proto": names.get(self.proto, str(self.proto)),
                "src": ip_str(src), "sport": sport, "dst": ip_str(dst), "dport": dport,
                "state": tcpct.NAMES[self.state] if self.proto == 6 else (
                    "ASSURED" if self.assured else "REPLIED" if self.seen_reply
                    else "UNREPLIED"),
                "assured": self.assured, "packets": list(self.packets),
                "bytes": list(self.nbytes), "age_s": round(now - self.created, 3),
                "timeout_s": self.timeout}


class Conntrack(FastPath):
    """The table and the per-protocol trackers (see the module docstring)."""

    def __init__(self, max_entries: int, timeouts: dict[str, float], liberal: bool = False,
                 loose: bool = True):
        self.table: FlowTable[Any, Conn] = FlowTable(max_entries, timeout=30.0, evict="lru",
                                                     on_evict=self._evicted)
        #: established TCP connections by their raw address-and-ports bytes, both
        #: directions (the fast path: one slice of the frame, one dict lookup)
        self.fast_tcp: dict[bytes, tuple[Conn, int]] = {}
        self.fast_udp: dict[bytes, tuple[Conn, int]] = {}  # the same for answered UDP
        #: no entry is due before this (a lower bound, kept without walking the table:
        #: the bridge asks after every batch of frames, and a refresh only moves a
        #: deadline later; exact again after each :meth:`expire`)
        self.due = _NEVER
        self.configure(timeouts, liberal, loose)
        self.fragments: OrderedDict[Any, Conn | None] = OrderedDict()
        self.by_state: dict[str, int] = {}

    def configure(self, timeouts: dict[str, float], liberal: bool, loose: bool) -> None:
        self.t = {**TIMEOUTS, **timeouts}
        self.t_fast = (self.t["tcp_established"], self.t["tcp_retrans"], self.t["tcp_unack"])
        self.liberal, self.loose = liberal, loose

    # -- the lookup ---------------------------------------------------------------------

    def lookup(self, data: bytearray | bytes, p: Parsed, now: float
               ) -> tuple[str, Conn | None, int]:
        """(ct state, connection, direction) of the packet ``p`` of ``data``."""
        if p.bad:
            return INVALID, None, 0
        if p.frag == 2:
            return self._later_fragment(p)
        proto = p.proto
        if proto == 6:
            state, conn, d = self._tcp(data, p, now)
        elif proto == 1 or proto == 58:
            state, conn, d = self._icmp(p, now)
        else:
            state, conn, d = self._other(p, now)
        if p.frag == 1 and state != INVALID:
            self._remember_fragment(p, conn)
        return state, conn, d

    def _evicted(self, key: Any, conn: Conn, reason: str) -> None:
        self._unfast(conn)

    def _unfast(self, conn: Conn) -> None:
        keys = conn.fast_keys
        if keys is not None:
            conn.fast_keys = None
            fast = self.fast_tcp if conn.proto == 6 else self.fast_udp
            fast.pop(keys[0], None)
            fast.pop(keys[1], None)

    def pop(self, key: Any) -> None:
        """Forget a connection now (every way it can be found)."""
        conn = self.table.pop(key)
        if conn is not None:
            self._unfast(conn)

    def clear(self) -> int:
        n = len(self.table)
        self.table.clear()
        self.fast_tcp.clear()
        self.fast_udp.clear()
        self.due = _NEVER
        self.fragments.clear()
        return n

    def confirm(self, conn: Conn, now: float) -> None:
        """The packet that created ``conn`` was accepted: keep it."""
        if not conn.confirmed and not conn.dead:
            conn.confirmed = True
            self.table.put(conn.key, conn, now, timeout=conn.timeout, rank=0)
            self._due(conn, now + conn.timeout)

    def _live(self, key: Any, now: float) -> Conn | None:
        """The connection under ``key``, unless it expired (and was not yet collected)."""
        conn = self.table.lookup(key)
        if conn is None:
            return None
        due = self.table.deadline(key)
        if due is not None and due <= now:
            self.pop(key)
            return None
        return conn

    def _find(self, key: Any, src: tuple[bytes, int], now: float) -> tuple[Conn | None, int]:
        conn = self._live(key, now)
        if conn is None:
            return None, 0
        return conn, 0 if conn.orig_src == src else 1

    def _refresh(self, conn: Conn, now: float, timeout: float) -> None:
        conn.timeout = timeout
        if conn.confirmed:
            self.table.touch(conn.key, now, timeout=timeout, rank=1 if conn.assured else 0)
            self._due(conn, now + timeout)

    def _due(self, conn: Conn, until: float) -> None:
        """``conn`` (kept) was placed in the table to expire at ``until``."""
        conn.until = until
        if until < self.due:
            self.due = until

    @staticmethod
    def _ctinfo(conn: Conn, d: int) -> str:
        return ESTABLISHED if d == 1 or conn.seen_reply else NEW

    def _count(self, conn: Conn, d: int, p: Parsed) -> None:
        conn.packets[d] += 1
        conn.nbytes[d] += p.end - p.l3

    # -- TCP -----------------------------------------------------------------------------

    def _tcp(self, data: bytearray | bytes, p: Parsed, now: float
             ) -> tuple[str, Conn | None, int]:
        if not tcpct.valid_flags(p.flags):
            return INVALID, None, 0
        a, b = (p.src, p.sport), (p.dst, p.dport)
        key = (6, a, b) if a < b else (6, b, a)
        for _ in range(2):  # a second time after a reopening SYN deleted the old entry
            conn, d = self._find(key, a, now)
            if conn is None:
                conn = Conn(key, p, (p.src, p.sport, p.dst, p.dport), now)
                if not tcpct.new(conn, data, p, self.loose):
                    return INVALID, None, 0
                d = 0
            info = self._ctinfo(conn, d)
            res = self._tcp_packet(conn, d, data, p, now)
            if res == tcpct.REOPEN:
                self.pop(key)
                continue
            if res == tcpct.INVALID:
                return INVALID, None, 0
            if d == 1:
                conn.seen_reply = True
            self._count(conn, d, p)
            return info, conn, d
        return INVALID, None, 0

    def _tcp_packet(self, conn: Conn, d: int, data: bytearray | bytes, p: Parsed,
                    now: float) -> str:
        flags = p.flags
        old = conn.state
        index = tcpct.index_of(flags)
        new = tcpct.TABLE[d][index][old]
        if new == tcpct.SS and old >= tcpct.TW:
            if (conn.seen[d].flags | conn.seen[1 - d].flags) & tcpct.F_CLOSE_INIT or (
                    conn.last_dir == d and conn.last_index == tcpct.I_RST):
                return tcpct.REOPEN
            new = tcpct.IG
        if new == tcpct.IG:
            if index == tcpct.I_SYNACK and conn.last_index == tcpct.I_SYN and \
                    conn.last_dir != d and p.ack == conn.last_end:
                # this SYN/ACK answers a SYN we ignored: both ends are in sync, we were not
                old, new = tcpct.SS, tcpct.SR
                last = conn.seen[conn.last_dir]
                last.td_end = last.td_maxend = conn.last_end
                last.td_maxwin = conn.last_win or 1
                last.td_scale = conn.last_wscale
                conn.last_flags &= ~tcpct.L_CHALLENGE
                last.flags = conn.last_flags & (tcpct.F_WSCALE | tcpct.F_SACK)
                conn.seen[d].reset()
            else:
                conn.last_index, conn.last_dir = index, d
                conn.last_seq = p.seq
                conn.last_end = tcpct.seg_end(p)
                conn.last_win = p.win
                if index == tcpct.I_SYN and d == 0:
                    seen, scale = tcpct.tcp_options(data, p)
                    conn.last_flags = (tcpct.F_WSCALE if seen & 1 else 0) | \
                        (tcpct.F_SACK if seen & 2 else 0)
                    conn.last_wscale = scale or 0 if seen & 1 else 0
                    if old == tcpct.LA:
                        conn.last_flags |= tcpct.L_CHALLENGE
                if old == tcpct.SS and index == tcpct.I_ACK and d == 1:
                    conn.last_ack = p.ack
                return tcpct.IGNORE
        elif new == tcpct.IV:
            return tcpct.INVALID
        elif new == tcpct.TW:
            if old == tcpct.LA and index == tcpct.I_ACK and conn.last_dir != d and \
                    conn.last_index == tcpct.I_SYN and conn.last_flags & tcpct.L_CHALLENGE:
                conn.last_flags &= ~tcpct.L_CHALLENGE
                return tcpct.IGNORE  # an RFC 5961 challenge ACK, not the last ACK
        elif new == tcpct.S2:
            conn.last_flags |= tcpct.L_SIMOPEN
        elif new == tcpct.SR:
            if d == 1 and index == tcpct.I_ACK and conn.last_flags & tcpct.L_SIMOPEN:
                new = tcpct.ES
        elif new == tcpct.CL and index == tcpct.I_RST:
            skip = self._rst_checks(conn, d, p, old)
            if skip is tcpct.INVALID:
                return tcpct.INVALID
            if skip == "keep":
                new = old
            if skip == "in_window":
                return self._advance(conn, d, index, p, old, new, now)
        res = tcpct.in_window(conn, d, index, data, p, self.liberal)
        if res == tcpct.IGNORE:
            return tcpct.IGNORE
        if res == tcpct.INVALID:
            return tcpct.INVALID
        return self._advance(conn, d, index, p, old, new, now)

    def _kill(self, conn: Conn) -> None:
        conn.dead = True
        if conn.confirmed:
            self.pop(conn.key)

    def _rst_checks(self, conn: Conn, d: int, p: Parsed, old: int) -> str | None:
        """The kernel's checks of a RST: INVALID, "keep" (the state stays: a challenge
        ACK may follow), "in_window" (skip the window checks) or None (go on)."""
        if old in (tcpct.FW, tcpct.LA, tcpct.TW, tcpct.CL, tcpct.CW):
            return "in_window"
        other = conn.seen[1 - d]
        if other.flags & tcpct.F_MAXACK and conn.last_index != tcpct.I_SYN:
            established = old == tcpct.ES
            if not (p.seq == 0 and not established):
                if tcpct.before(p.seq, other.td_maxack):
                    return tcpct.INVALID
                if established and p.seq != other.td_maxack and not (
                        conn.last_index == tcpct.I_ACK and conn.last_dir == d
                        and p.seq == conn.last_end):
                    return "keep"
        if ((conn.seen_reply and conn.last_index == tcpct.I_SYN)
                or (not conn.assured and conn.last_index == tcpct.I_ACK)) \
                and p.ack == conn.last_end:
            return "in_window"
        if old == tcpct.SS and conn.last_index == tcpct.I_ACK and conn.last_dir == 1 and \
                p.seq == conn.last_ack:
            return "in_window"
        return None

    def _advance(self, conn: Conn, d: int, index: int, p: Parsed, old: int, new: int,
                 now: float) -> str:
        """An in-window packet: the new state and its timeout."""
        conn.last_index, conn.last_dir = index, d
        conn.state = new
        if old != new and new == tcpct.FW:
            conn.seen[d].flags |= tcpct.F_CLOSE_INIT
        t = self.t
        state_t = t[tcpct.TIMEOUT_OF[new]]
        if conn.retrans >= 3 and state_t > t["tcp_retrans"]:
            timeout = t["tcp_retrans"]
        elif index == tcpct.I_RST:
            timeout = t["tcp_close"]
        elif (conn.seen[0].flags | conn.seen[1].flags) & tcpct.F_UNACKED and \
                state_t > t["tcp_unack"]:
            timeout = t["tcp_unack"]
        else:
            timeout = state_t
        if not conn.seen_reply:  # (set after this packet, for a reply)
            if p.flags & tcpct.RST:  # nothing answered but a RST: no connection to keep
                self._kill(conn)
                return tcpct.ACCEPT
            if index == tcpct.I_SYN and old == tcpct.SS:
                return tcpct.ACCEPT  # a retransmitted SYN does not renew the timeout
            if new == tcpct.ES and timeout > t["tcp_unack"]:
                timeout = t["tcp_unack"]  # picked up mid-stream, no answer yet
        elif not conn.assured and old in (tcpct.SR, tcpct.ES) and new == tcpct.ES:
            conn.assured = True
        self._refresh(conn, now, timeout)
        return tcpct.ACCEPT

    # -- ICMP ------------------------------------------------------------------------------

    def _icmp(self, p: Parsed, now: float) -> tuple[str, Conn | None, int]:
        if p.inner is not None:
            return self._error(p, now)
        if p.proto == 58 and p.itype in ICMP6_UNTRACKED:
            return UNTRACKED, None, 0
        pair = (ICMP4_PAIRS if p.proto == 1 else ICMP6_PAIRS).get(p.itype)
        if pair is None or p.iid < 0:
            return INVALID, None, 0  # the kernel tracks nothing else (icmp_new refuses it)
        kind, is_reply = pair
        requester, responder = (p.dst, p.src) if is_reply else (p.src, p.dst)
        key = (p.proto, requester, responder, p.iid, kind)
        conn = self._live(key, now)
        if conn is None:
            if is_reply:
                return INVALID, None, 0
            conn = Conn(key, p, (p.src, p.iid, p.dst, p.iid), now)
            conn.orig_src = (p.src, 0)
        d = is_reply
        info = self._ctinfo(conn, d)
        if d:
            conn.seen_reply = True
        self._count(conn, d, p)
        self._refresh(conn, now, self.t["icmp" if p.proto == 1 else "icmpv6"])
        return info, conn, d

    def _error(self, p: Parsed, now: float) -> tuple[str, Conn | None, int]:
        """An ICMP error: related to the connection of the packet it quotes, if any."""
        q = p.inner
        assert q is not None
        if q.bad or not q.src:
            return INVALID, None, 0
        if q.proto == 6 or q.proto == 17 or q.proto not in (1, 58):
            a, b = (q.src, q.sport), (q.dst, q.dport)
            key = (q.proto, a, b) if a < b else (q.proto, b, a)
            conn, d = self._find(key, a, now)
        else:
            pair = (ICMP4_PAIRS if q.proto == 1 else ICMP6_PAIRS).get(q.itype)
            if pair is None:
                return INVALID, None, 0
            requester, responder = (q.dst, q.src) if pair[1] else (q.src, q.dst)
            conn = self.table.lookup((q.proto, requester, responder, q.iid, pair[0]))
            d = pair[1]
        if conn is None or p.dst != q.src:
            return INVALID, None, 0
        return RELATED, conn, 1 - d

    # -- UDP and the rest --------------------------------------------------------------

    def _other(self, p: Parsed, now: float) -> tuple[str, Conn | None, int]:
        a, b = (p.src, p.sport), (p.dst, p.dport)
        key = (p.proto, a, b) if a < b else (p.proto, b, a)
        conn, d = self._find(key, a, now)
        if conn is None:
            conn, d = Conn(key, p, (p.src, p.sport, p.dst, p.dport), now), 0
        info = self._ctinfo(conn, d)
        replied = conn.seen_reply  # as it was before this packet
        if d == 1:
            conn.seen_reply = True
        self._count(conn, d, p)
        t = self.t
        if p.proto != 17:
            self._refresh(conn, now, t["generic"])
        elif replied:
            timeout = t["udp"]
            if now > conn.stream_at:
                timeout = t["udp_stream"]
                conn.assured = True
            self._refresh(conn, now, timeout)
        else:
            self._refresh(conn, now, t["udp"])
        return info, conn, d

    # -- fragments ---------------------------------------------------------------------

    def _remember_fragment(self, p: Parsed, conn: Conn | None) -> None:
        key = (p.src, p.dst, p.proto, p.frag_id)
        self.fragments[key] = conn
        self.fragments.move_to_end(key)
        while len(self.fragments) > MAX_FRAGMENTS:
            self.fragments.popitem(last=False)

    def _later_fragment(self, p: Parsed) -> tuple[str, Conn | None, int]:
        conn = self.fragments.get((p.src, p.dst, p.proto, p.frag_id))
        if conn is None:
            return INVALID, None, 0
        d = 0 if conn.orig_src[0] == p.src else 1
        return (ESTABLISHED if d == 1 or conn.seen_reply else NEW), conn, d

    # -- time and reports --------------------------------------------------------------

    def poll_at(self) -> float | None:
        return None if self.due == _NEVER else self.due

    def expire(self, now: float) -> int:
        n = self.table.expire(now, 4096)
        due = self.table.poll_at()
        self.due = _NEVER if due is None else due
        return n

    def connections(self, now: float, limit: int = 1000) -> list[dict[str, Any]]:
        return [c.describe(now) for _, c in self.table.items()[:limit]]

    def stats(self) -> dict[str, int]:
        return self.table.stats()
