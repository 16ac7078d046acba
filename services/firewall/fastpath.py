"""The firewall's fast path: most packets of a busy flow, read straight off the frame.

:meth:`FastPath.fast` handles, without building a :class:`.parse.Parsed` or a
table key, the packets whose outcome the full path (:meth:`Conntrack.lookup`
then the rules) would decide the same way every time:

- **TCP**: an in-window ACK (PSH, ECE, CWR allowed; no SYN, FIN, RST) of an
  established, answered connection, with no SACK blocks to read: its window
  tracking and timeout updated exactly as :mod:`.tcpct` would; ``established``.
- **UDP**: a packet of an answered flow (``established``: counted, its timeout
  refreshed, ``udp_stream`` and assured after two-way traffic, as the full
  path); or a packet in the original direction of a flow not answered yet
  (``new``) when the rules accepted that flow's first packet through rules that
  look only at the 5-tuple and the state (no ``match``, ``limit`` or ``log``)
  and have not changed since: the same rule accepts it again, and counts it.

Only untagged IPv4 without options, not a fragment, and IPv6 without extension
headers qualify, and only well-formed ones (lengths that the full path would
not call invalid). Anything else returns None with nothing changed, and takes
the full path. A flow enters the fast path's dict (one per protocol, keyed by
the frame's own address-and-ports bytes, both directions) the first time one of
its packets asks; it leaves when its table entry goes (expired, evicted,
replaced), so the dicts are bounded by ``max_entries``.

``tests/services/test_firewall_conntrack.py`` checks, with hypothesis, that
the fast path and the full one leave the same table behind.
"""

from __future__ import annotations

import struct
from typing import Any

from vtl.services.firewall.tcpct import ES, F_MAXACK, F_SACK, F_UNACKED, I_ACK, MAXACKWINCONST

NEW, ESTABLISHED = "new", "established"
# addresses and ports (the key), then for TCP seq, ack, data offset and flags, window:
# the addresses and the L4 header are contiguous without IP options or extension headers
_FAST4 = struct.Struct("!12sIIHH")
_FAST6 = struct.Struct("!36sIIHH")
_TS_ONLY = b"\x01\x01\x08\x0a"  # NOP NOP timestamp: the kernel reads no SACK there


class FastPath:
    """Mixed into :class:`.conntrack.Conntrack` (its table, timeouts and refresh)."""

    table: Any
    t: dict[str, float]
    t_fast: tuple[float, float, float]
    fast_tcp: dict[bytes, tuple[Any, int]]
    fast_udp: dict[bytes, tuple[Any, int]]

    def _refresh(self, conn: Any, now: float, timeout: float) -> None:
        raise NotImplementedError

    def fast(self, data: bytearray | bytes, now: float, generation: int) -> str | None:
        """``established`` or ``new`` (see the module docstring), the packet counted and
        its connection updated as the full path would; None: nothing was changed.
        ``generation``: the rule set's, for the decisions remembered for new UDP flows."""
        n = len(data)
        if data[12] == 8 and data[13] == 0 and n >= 42 and data[14] == 0x45:
            if data[20] & 0x3F or data[21]:
                return None  # a fragment
            ip_len = (data[16] << 8) | data[17]
            if 14 + ip_len > n:
                return None
            proto = data[23]
            if proto == 6:
                if n < 54:
                    return None
                return self._fast_tcp(data, 34, ip_len, _FAST4.unpack_from(data, 26), now)
            if proto == 17 and ip_len >= 28:
                return self._fast_udp(bytes(data[26:38]), ip_len, now, generation)
            return None
        if data[12] == 0x86 and data[13] == 0xDD and n >= 62:
            ip_len = 40 + ((data[18] << 8) | data[19])
            if 14 + ip_len > n:
                return None
            proto = data[20]
            if proto == 6:
                if n < 74:
                    return None
                return self._fast_tcp(data, 54, ip_len, _FAST6.unpack_from(data, 22), now)
            if proto == 17 and ip_len >= 48:
                return self._fast_udp(bytes(data[22:58]), ip_len, now, generation)
        return None

    def _fast_tcp(self, data: bytearray | bytes, l4: int, ip_len: int,
                  fields: tuple[bytes, int, int, int, int], now: float) -> str | None:
        raw, seq, ack, offflags, win = fields
        if offflags & 0x37 != 0x10:  # ACK alone (PSH, ECE, CWR allowed)
            return None
        doff = (offflags >> 12) << 2
        if doff < 20 or ip_len < l4 - 14 + doff:
            return None  # the full path calls it invalid
        hit = self.fast_tcp.get(raw)
        if hit is None:
            conn, d = self._fast_entry(raw, 6, self.fast_tcp)
            if conn is None:
                return None
        else:
            conn, d = hit
            if conn.state != ES:
                return None
        if conn.until <= now:
            return None  # expired, not yet collected: the full path forgets it
        sender, receiver = conn.seen[d], conn.seen[1 - d]
        if doff != 20 and receiver.flags & F_SACK and not (
                doff == 32 and data[l4 + 20:l4 + 24] == _TS_ONLY):
            return None
        end = (seq + ip_len - l4 + 14 - doff) & 0xFFFFFFFF
        # tcpct.in_window then tcpct.update, for an ACK whose sack is its ack, written
        # out: this runs for most frames of a busy flow. A failed check changes nothing
        # and the full path decides what it means.
        s_maxwin, r_maxwin, r_end = sender.td_maxwin, receiver.td_maxwin, receiver.td_end
        if not s_maxwin or not r_maxwin:
            return None
        if not 0 < ((sender.td_maxend + 1 - seq) & 0xFFFFFFFF) <= 0x80000000:
            return None  # over the upper bound
        if not 0 < ((r_end + 1 - ack) & 0xFFFFFFFF) <= 0x80000000:
            return None
        s_end = sender.td_end
        if not 0 < ((end - s_end + r_maxwin + 1) & 0xFFFFFFFF) <= 0x80000000:
            return None
        maxackwin = s_maxwin if s_maxwin > MAXACKWINCONST else MAXACKWINCONST
        if not 0 < ((ack - r_end + maxackwin + 1) & 0xFFFFFFFF) <= 0x80000000:
            return None
        wnd = (win << sender.td_scale) & 0xFFFFFFFF
        if s_maxwin < wnd:
            sender.td_maxwin = wnd
        flags = sender.flags
        if 0 < ((end - s_end) & 0xFFFFFFFF) <= 0x80000000:
            sender.td_end = end
            flags |= F_UNACKED
        if not flags & F_MAXACK:
            sender.td_maxack = ack
            flags |= F_MAXACK
        elif 0 < ((ack - sender.td_maxack) & 0xFFFFFFFF) <= 0x80000000:
            sender.td_maxack = ack
        sender.flags = flags
        over = (end - sender.td_maxend) & 0xFFFFFFFF
        if 0 < over <= 0x80000000:
            receiver.td_maxwin = (r_maxwin + over) & 0xFFFFFFFF
        right = (ack + wnd) & 0xFFFFFFFF
        if 0 < ((right - receiver.td_maxend + 1) & 0xFFFFFFFF) <= 0x80000000:
            receiver.td_maxend = (right + 1) & 0xFFFFFFFF if wnd == 0 else right
        r_flags = receiver.flags
        if ack == r_end:
            r_flags = receiver.flags = r_flags & ~F_UNACKED
        if conn.last_dir == d and conn.last_seq == seq and conn.last_ack == ack \
                and conn.last_end == end and conn.last_win == win:
            conn.retrans += 1
        else:  # the kernel's last_* fields, as tcpct.update keeps them
            conn.last_seq, conn.last_ack, conn.last_end, conn.last_win = seq, ack, end, win
            conn.retrans = 0
        conn.packets[d] += 1
        conn.nbytes[d] += ip_len
        conn.last_index = I_ACK
        conn.last_dir = d
        timeout, t_retrans, t_unack = self.t_fast
        if conn.retrans >= 3 and timeout > t_retrans:
            timeout = t_retrans
        elif (flags | r_flags) & F_UNACKED and timeout > t_unack:
            timeout = t_unack
        if timeout == conn.timeout and conn.assured:
            self.table.touch(conn.key, now)
            conn.until = now + timeout
        else:
            conn.assured = True
            self._refresh(conn, now, timeout)
        return ESTABLISHED

    def _fast_udp(self, raw: bytes, ip_len: int, now: float, generation: int) -> str | None:
        hit = self.fast_udp.get(raw)
        if hit is None:
            conn, d = self._fast_entry(raw, 17, self.fast_udp)
            if conn is None:
                return None
        else:
            conn, d = hit
        if conn.until <= now:
            return None
        if conn.seen_reply:
            state = ESTABLISHED
            t = self.t
            timeout, assured = t["udp"], conn.assured
            if now > conn.stream_at:
                timeout, assured = t["udp_stream"], True
        elif d == 0 and conn.verdict is not None and conn.verdict[0] == generation:
            state, timeout, assured = NEW, self.t["udp"], conn.assured
            rule = conn.verdict[1]
            if rule is not None:
                rule.packets += 1
                rule.nbytes += ip_len
        else:
            return None  # the first answer, or a new flow's packet the rules must see
        conn.packets[d] += 1
        conn.nbytes[d] += ip_len
        if timeout == conn.timeout and assured == conn.assured:
            self.table.touch(conn.key, now)
            conn.until = now + timeout
        else:
            conn.assured = assured
            self._refresh(conn, now, timeout)
        return state

    def _fast_entry(self, raw: bytes, proto: int, fast: dict[bytes, tuple[Any, int]]
                    ) -> tuple[Any, int]:
        """The kept connection of ``raw`` (addresses and ports as in the frame), entered
        in ``fast`` for both directions; or (None, 0). TCP: established and answered."""
        half = (len(raw) - 4) // 2
        src, dst = raw[:half], raw[half:2 * half]
        sport = (raw[-4] << 8) | raw[-3]
        dport = (raw[-2] << 8) | raw[-1]
        a, b = (src, sport), (dst, dport)
        conn = self.table.lookup((proto, a, b) if a < b else (proto, b, a))
        if conn is None or not conn.confirmed or conn.fast_keys is not None or (
                proto == 6 and (conn.state != ES or not conn.seen_reply)):
            return None, 0
        back = dst + src + raw[-2:] + raw[-4:-2]
        conn.fast_keys = (raw, back)
        d = 0 if conn.orig_src == a else 1
        fast[raw] = (conn, d)
        fast[back] = (conn, 1 - d)
        return conn, d
