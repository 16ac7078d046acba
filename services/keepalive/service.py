"""keepalive: hold a paused VM's TCP connections open until it runs again.

Synopsis
    [[services]]
    use = "keepalive"
    qmp = "/run/vtl/vm1.qmp"     # QEMU: -qmp unix:/run/vtl/vm1.qmp,server=on,wait=off
    custody = true
    hold_syn = "drop"            # drop | reset

What it does to frames
    Live (the VM runs): every frame passes untouched. The service follows each TCP
    connection of the guest in both directions (also one opened before the bridge
    started), keeping only a copy of the last segment's headers each way, and learns
    the guest's addresses and MAC.

    Hold (the VM is paused: QMP ``STOP``, or ``vtl ctl NAME hold``): nothing is
    forwarded toward the guest, whose paused TAP would only queue it stale. The
    service answers for the guest instead:

    - a TCP segment of a tracked connection: an ACK *as the guest*, with the guest's
      next sequence number, its last acknowledgement, **window 0** and its TCP
      timestamps exactly as it last sent them. The peer enters its persist state,
      which never gives up while its probes are answered (RFC 1122 4.2.2.17). With
      ``custody`` (on by default) the first byte the guest had not acknowledged is
      taken into custody and acknowledged too (one byte more): older peers (Linux
      before 2023) ignore a window-0 ACK that acknowledges nothing new. Keep-alive
      probes are answered the same way;
    - an ARP request or IPv6 neighbour solicitation for a guest address: answered
      with the guest's MAC (else the peer re-probes the address and gives up);
    - a SYN toward the guest: dropped (the peer retries) or, with
      ``hold_syn = "reset"``, refused with RST;
    - anything else toward the guest: dropped and counted (``held_dropped``).

    Frames from the guest still pass (a manual hold may start before the VM stops).
    The guest's MACs are pinned in the bridge for the hold (``ctx.pin_mac``): a paused
    guest sends nothing, and the learning switch would forget it after ``mac_aging_s``
    (300 s) and stop the peers' frames before they reach the service.

    Release (QMP ``RESUME``, or ``vtl ctl NAME release``): each custody byte is
    delivered to the guest as the peer sent it, followed by the peer's last
    retransmission from the guest's next byte on (kept during the hold, at most 16 KiB
    a connection, 16 MiB in all): the guest acknowledges new data at once, which is
    what a peer that was retransmitting waits for (its congestion window is down to
    one segment, whose retransmission the hold answered but never delivered; without
    the replay it would wait for its next backed-off retransmission, seconds later).
    A connection answered without data to replay (keep-alive probes) gets a
    zero-window probe as from the peer, which the guest answers with its real window.
    Then frames flow as before.

Notes
    - QMP: the bridge connects to the monitor as a client (QEMU serves one client per
      monitor: give VTL its own ``-qmp``), follows ``STOP``/``RESUME`` and migration
      events and reconnects when QEMU restarts. A migration on one host (``migrate``
      to a file, then a new QEMU with ``-incoming`` on the same TAP) is held from the
      source's ``STOP`` to the restored VM's ``RESUME``: a new monitor connection
      whose status is not running keeps the hold.
    - What no TCP trick saves: an application heartbeat (SSH ServerAlive) times out,
      and so does a peer with ``TCP_USER_TIMEOUT`` and unacknowledged data.
    - A peer's FIN during a hold is not acknowledged (the guest has not seen it); a
      connection the guest never sent on since the bridge started cannot be answered.
    - Answers are rate-limited per connection (``answers_per_s``); the tracked
      connections are bounded (``max_connections``, least recently used evicted) and
      forgotten after ``idle_timeout_s`` without a segment (``closed_timeout_s`` after
      an RST or both FINs).

See also
    docs/keepalive.md (how to wire QEMU, migration), docs/control.md (``hold``,
    ``release``), Freeze-TCP, RFC 1122 4.2.2.17 (zero-window probing).
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Literal

from pydantic import Field
from vtl.services.keepalive.conn import MASK, Conn

from vtl import (
    CONSUMED,
    DROP,
    PASS,
    Direction,
    FlowKey,
    FlowTable,
    Frame,
    Packet,
    Service,
    ServiceContext,
    ServiceOptions,
    Verdict,
)
from vtl.hypervisor import VmEvent
from vtl.packet import build
from vtl.packet.tcp import ACK, FIN, RST, SYN

TO_UPLINK, TO_GUEST = Direction.TO_UPLINK, Direction.TO_GUEST
_tuple_new = tuple.__new__
ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
ICMP6_RS, ICMP6_NS, ICMP6_NA = 133, 135, 136
MAX_ADDRESSES = 64  # guest addresses answered for (ARP/ND)
TOUCH_EVERY_S = 1.0  # refresh a connection's idle timer at most this often
UNPIN_AFTER_S = 30.0  # a released guest's MACs stay deliverable this long
MAX_PINNED = 16  # guest MACs kept deliverable during a hold, at most
REPLAY_MAX = 16384  # bytes of a peer's retransmission kept per connection for the release
REPLAY_BUDGET = 16 << 20  # and for all connections together


#: (IP version, src, dst, sport, dport, L3 offset, TCP offset, payload length)
Fields = tuple[int, bytes, bytes, int, int, int, int, int]
_ETH_IP4 = struct.Struct("!12xHBxHxxHxB2x4s4s").unpack_from  # type, vihl, total, frag, proto, addrs
_ETH_IP6 = struct.Struct("!12xH4xHBx16s16s").unpack_from  # type, payload len, next, addrs
_TCP = struct.Struct("!HH8xB").unpack_from  # ports, data offset
_HEAD4 = struct.Struct("!12xHBxHxxHxB").unpack_from  # type, vihl, total, frag, proto


def tcp_fields(data: bytearray) -> Fields | None:
    """The fields of an untagged TCP segment over IPv4 (not a fragment) or IPv6 (no
    extension header), read straight from the frame with three ``struct`` calls: every
    segment of every connection passes here while the VM runs, and building a
    :class:`~vtl.Packet` costs several times more. None for anything else (the caller
    takes the :class:`~vtl.Packet` way)."""
    n = len(data)
    if n < 54:
        return None
    et, vihl, total, frag, proto, src, dst = _ETH_IP4(data)
    if et == 0x0800:
        if proto != 6 or frag & 0x3FFF:  # not TCP, or a fragment
            return None
        off = 14 + ((vihl & 15) << 2)
        end = 14 + total if total else n  # a GSO frame may leave it 0
        version = 4
    elif et == 0x86DD:
        if n < 74:
            return None
        _, plen, nxt, src, dst = _ETH_IP6(data)
        if nxt != 6:
            return None
        off, end, version = 54, 54 + plen if plen else n, 6
    else:
        return None
    if off + 20 > n:
        return None
    sport, dport, doff = _TCP(data, off)
    hl = (doff >> 4) << 2
    if hl < 20 or off + hl > n:
        return None
    return version, src, dst, sport, dport, 14, off, max(0, min(end, n) - off - hl)


def packet_fields(pkt: Packet) -> Fields:
    """:func:`tcp_fields` of a parsed TCP packet (tagged frames, extension headers)."""
    ip, t = pkt.ip, pkt.tcp
    assert ip is not None and t is not None
    src, dst = ip.addrs
    sport, dport = t.ports
    return ip.version_number, src, dst, sport, dport, pkt.l3_offset, t.off, t.payload_len


class KeepaliveOptions(ServiceOptions):
    """Options of the ``keepalive`` service."""

    qmp: str | None = Field(
        None, description="QEMU monitor (unix socket) to follow: STOP holds, RESUME releases; "
                          "unset: only vtl ctl NAME hold / release")
    custody: bool = Field(
        True, description="acknowledge one byte more than the guest did, kept and delivered "
                          "at release (older peers ignore a window-0 ACK that advances nothing)")
    hold_syn: Literal["drop", "reset"] = Field(
        "drop", description="a SYN toward the held guest: drop it (the peer retries) or RST")
    answers_per_s: int = Field(
        20, ge=1, le=10_000, description="segments answered per connection and second at most")
    max_connections: int = Field(
        65536, ge=1, le=10_000_000, description="connections tracked at most (least recently "
                                                "used forgotten first)")
    idle_timeout_s: float = Field(
        10800.0, gt=0, description="forget a connection after this long without a segment")
    closed_timeout_s: float = Field(
        10.0, gt=0, description="forget a connection this long after an RST or both FINs")


class Keepalive(Service):
    name = "keepalive"
    summary = "hold a paused VM's TCP connections open (window-0 answers), release on resume"
    Options = KeepaliveOptions
    actions: ClassVar[dict[str, str]] = {
        "hold": "answer for the guest from now on (its VM is paused or about to be)",
        "release": "deliver what was kept and let frames reach the guest again",
    }

    options: KeepaliveOptions

    def __init__(self, options: KeepaliveOptions, ctx: ServiceContext):
        super().__init__(options, ctx)
        self.conns: FlowTable[FlowKey, Conn] = FlowTable(
            options.max_connections, timeout=options.idle_timeout_s, evict="lru",
            on_evict=self._evicted)
        self.addresses: dict[bytes, bytes] = {}  # guest IP -> its MAC
        self.holding: str | None = None  # why, while holding
        self.hold_since = 0.0
        self.qmp_connected = False
        self.vm_status = "unknown"
        self.replay_bytes = 0  # kept for replay at release, all connections together
        #: the hot path's index: the 12 bytes of IPv4 addresses and ports of a segment,
        #: in either direction -> its connection (two entries per connection in the table)
        self.fast: dict[bytes, Conn] = {}

    # -- hooks ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self.options.qmp is not None:
            self.ctx.watch_qmp(self.options.qmp, self.on_vm_event)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        data = frame.data
        to_uplink = direction is TO_UPLINK
        if not to_uplink and self.holding is not None:
            return self._held(Packet(frame), now)
        # The hot path, for a segment of a known connection over IPv4 without options,
        # with no SYN/FIN/RST, its timer fresh: read in place, one dict lookup, copy the
        # TCP header. Everything else takes the general way below.
        if len(data) >= 54:
            et, vihl, total, frag, proto = _HEAD4(data)
            if et == 0x0800 and vihl == 0x45 and proto == 6 and not frag & 0x3FFF:
                conn = self.fast.get(bytes(data[26:38]))
                if conn is not None and not data[47] & 7 and now - conn.touched < TOUCH_EVERY_S \
                        and (conn.g_l2 if to_uplink else conn.p_l2):
                    hl = (data[46] >> 2) & 0x3C
                    hdr = data[34:34 + hl]
                    length = (total if total else len(data) - 14) - 20 - hl
                    if to_uplink:
                        conn.g_hdr, conn.g_len = hdr, max(0, length)
                    else:
                        conn.p_hdr, conn.p_len = hdr, max(0, length)
                    return PASS
        f = tcp_fields(data)
        if f is not None:
            self._track(data, f, 1 if to_uplink else 2, now)
        elif to_uplink:
            if len(data) >= 24 and data[12] == 8 and data[13] == 0 and data[23] != 6:
                return PASS  # IPv4 but not TCP: nothing to learn or track
            self._from_guest(Packet(frame), now)  # ARP, IPv6 (ND), tagged: learn, track
        return PASS

    def poll_at(self) -> float | None:
        return self.conns.poll_at()

    def on_timer(self, now: float) -> None:
        self.conns.expire(now)

    def act(self, action: str, now: float) -> dict[str, Any]:
        if action == "hold":
            return self.hold("vtl ctl", now)
        if action == "release":
            return self.release("vtl ctl", now)
        raise ValueError(f"keepalive has no action {action!r}")

    def stop(self, now: float) -> None:
        if self.holding is not None:
            self.release("stop", now)

    def report(self, now: float) -> dict[str, Any]:
        return {"state": "holding" if self.holding else "live", "tracked": len(self.conns),
                "addresses": len(self.addresses), "vm_status": self.vm_status,
                "qmp_connected": self.qmp_connected,
                "held_for_s": round(now - self.hold_since, 3) if self.holding else 0.0}

    # -- hold and release -------------------------------------------------------------

    def hold(self, why: str, now: float) -> dict[str, Any]:
        if self.holding is not None:
            return {"state": "holding", "since_s": round(now - self.hold_since, 3)}
        self.holding, self.hold_since = why, now
        for conn in self.conns.values():
            conn.custody, conn.replay, conn.answered = None, None, 0
        for mac in self._guest_macs():  # a paused guest sends nothing to keep it learnt
            self.ctx.pin_mac(mac, None)
        self.replay_bytes = 0
        self.ctx.count("holds")
        self.ctx.log.warning("%s: holding %d connections (%s)", self.ctx.name,
                             len(self.conns), why)
        return {"state": "holding", "connections": len(self.conns)}

    def release(self, why: str, now: float) -> dict[str, Any]:
        if self.holding is None:
            return {"state": "live"}
        held = now - self.hold_since
        self.holding = None
        for mac in self._guest_macs():  # until the resumed guest has spoken again
            self.ctx.pin_mac(mac, now + UNPIN_AFTER_S)
        delivered = replayed = probed = 0
        for conn in self.conns.values():
            if conn.closed or not conn.answerable:
                continue
            peer = conn.peer()
            peer_ts = peer.ts[0] if peer is not None and peer.ts else None
            if conn.custody is not None:
                self._emit(conn.custody_segment(peer_ts), TO_GUEST)
                delivered += 1
            if conn.replay is not None:
                self._emit(conn.replay_segment(peer_ts), TO_GUEST)
                replayed += 1
            elif conn.custody is None and conn.answered:
                self._emit(conn.probe(peer_ts), TO_GUEST)
                probed += 1
            conn.custody, conn.replay, conn.answered = None, None, 0
        self.replay_bytes = 0
        self.ctx.count("releases")
        self.ctx.count("custody_delivered", delivered)
        self.ctx.count("replayed", replayed)
        self.ctx.log.warning("%s: released after %.1f s (%s): %d custody bytes delivered, %d "
                             "retransmissions replayed, %d connections woken", self.ctx.name,
                             held, why, delivered, replayed, probed)
        return {"state": "live", "held_s": round(held, 3), "custody_delivered": delivered,
                "replayed": replayed, "woken": probed}

    def on_vm_event(self, event: VmEvent, now: float) -> None:
        """A QMP event (see :mod:`vtl.hypervisor`)."""
        kind = event.kind
        if kind == "connected":
            self.qmp_connected = True
        elif kind == "disconnected":
            self.qmp_connected = False  # a hold stays: the VM may come back (migration)
        elif kind == "status":
            self.vm_status = str(event.data.get("status", "unknown"))
            if event.data.get("running") is True:
                self.release(f"QMP status {self.vm_status}", now)
            elif event.data.get("running") is False:
                self.hold(f"QMP status {self.vm_status}", now)
        elif kind == "STOP":
            self.vm_status = "paused"
            self.hold("QMP STOP", now)
        elif kind == "RESUME":
            self.vm_status = "running"
            self.release("QMP RESUME", now)
        elif kind == "MIGRATION":
            self.ctx.log.info("%s: migration %s", self.ctx.name, event.data.get("status"))

    # -- live -------------------------------------------------------------------------

    def _from_guest(self, pkt: Packet, now: float) -> None:
        """What is not a plain TCP segment from the guest: ARP and IPv6 neighbour
        discovery teach its addresses; a tagged TCP segment is tracked the slow way."""
        et = pkt.ethertype
        if et == ETH_P_ARP:
            a = pkt.arp
            if a is not None and any(a.spa):
                self._learn(bytes(a.spa), bytes(a.sha))
            return
        if pkt.tcp is not None:
            self._track(pkt.data, packet_fields(pkt), 1, now)
        elif et == ETH_P_IPV6:
            i6 = pkt.icmp6
            if i6 is not None and i6.type in (ICMP6_RS, ICMP6_NS, ICMP6_NA):
                src = pkt.ipv6.src  # type: ignore[union-attr]
                if any(src):
                    self._learn(bytes(src), bytes(pkt.eth.src))

    def _from_peer(self, pkt: Packet, now: float) -> Conn | None:
        if pkt.tcp is None:
            return None
        return self._track(pkt.data, packet_fields(pkt), 2, now)

    def _track(self, data: bytearray, f: Fields, side: int, now: float) -> Conn | None:
        """One TCP segment from ``side`` (1: the guest, 2: the peer): keep its headers."""
        version, src, dst, sport, dport, l3, off, length = f
        if side == 1:
            key = _tuple_new(FlowKey, (version, 6, src, sport, dst, dport))
        else:
            key = _tuple_new(FlowKey, (version, 6, dst, dport, src, sport))
        conn = self.conns.lookup(key)
        flags = data[off + 13]
        if conn is None or side == 1 and conn.closed and flags & SYN:  # new, or reused
            if flags & RST:
                return None
            conn = Conn(key)
            if not self.conns.put(key, conn, now):
                return None
            conn.touched = now
            if version == 4:  # the hot path's keys: addresses and ports as each side sends
                g, p = struct.pack("!HH", key.sport, key.dport), \
                    struct.pack("!HH", key.dport, key.sport)
                conn.raw = (key.src + key.dst + g, key.dst + key.src + p)
                self.fast[conn.raw[0]] = self.fast[conn.raw[1]] = conn
            if side == 1:
                self._learn(src, bytes(data[6:12]))
        hdr = data[off:off + ((data[off + 12] >> 4) << 2)]  # a copy: a new bytearray
        if side == 1:
            conn.g_hdr, conn.g_len = hdr, length
        else:
            conn.p_hdr, conn.p_len = hdr, length
        if flags & FIN:
            conn.fins |= side
        if not conn.closed and (flags & RST or conn.fins == 3):
            conn.closed = True
            self.conns.touch(key, now, timeout=self.options.closed_timeout_s)
        elif now - conn.touched >= TOUCH_EVERY_S:  # once a second: the idle timer
            conn.touched = now
            self.conns.touch(key, now)
        elif conn.g_l2 if side == 1 else conn.p_l2:
            return conn
        # the link header (MACs, tags): the first segment from this side, then once a second
        if side == 1:
            conn.g_l2 = bytes(data[:l3])
        else:
            conn.p_l2 = bytes(data[:l3])
        return conn

    def _guest_macs(self) -> set[bytes]:
        macs = set(self.addresses.values())
        macs.update(c.g_l2[6:12] for c in self.conns.values() if c.g_l2)
        return set(sorted(macs)[:MAX_PINNED])

    def _learn(self, ip: bytes, mac: bytes) -> None:
        if ip in self.addresses or len(self.addresses) < MAX_ADDRESSES:
            self.addresses[ip] = mac

    def _evicted(self, key: FlowKey, conn: Conn, reason: object) -> None:
        for raw in conn.raw:
            if self.fast.get(raw) is conn:
                del self.fast[raw]
        if reason != "expired":
            self.ctx.count("evicted")

    # -- hold ---------------------------------------------------------------------------

    def _held(self, pkt: Packet, now: float) -> Verdict:
        et = pkt.ethertype
        if et == ETH_P_ARP:
            a = pkt.arp
            mac = self.addresses.get(bytes(a.tpa)) if a is not None and a.op == 1 else None
            if mac is not None:
                self._emit(build.arp_reply(pkt, mac), TO_UPLINK)
                self.ctx.count("arp_answered")
                return CONSUMED  # answered for the guest
        elif et == ETH_P_IPV6 and pkt.tcp is None:
            i6 = pkt.icmp6
            if i6 is not None and i6.type == ICMP6_NS:
                mac = self.addresses.get(bytes(i6.target))
                if mac is not None:
                    self._emit(build.neighbor_advertisement(pkt, mac), TO_UPLINK)
                    self.ctx.count("nd_answered")
                    return CONSUMED
        t = pkt.tcp
        if t is not None:
            return self._held_tcp(pkt, now)
        self.ctx.count("held_dropped")
        return DROP

    def _held_tcp(self, pkt: Packet, now: float) -> Verdict:
        t = pkt.tcp
        assert t is not None
        flags = t.flags
        if flags & (SYN | ACK) == SYN:
            if self.options.hold_syn == "reset":
                self._emit(build.tcp_reset(pkt), TO_UPLINK)
                self.ctx.count("syn_reset")
            else:
                self.ctx.count("syn_dropped")
            return DROP
        seq, length = t.seq, t.payload_len
        conn = self._from_peer(pkt, now)
        if conn is None or conn.closed or not conn.answerable or flags & RST:
            self.ctx.count("held_dropped")
            return DROP
        g_ack = conn.guest().ack
        if self.options.custody and conn.custody is None and length \
                and (g_ack - seq) & MASK < length:
            conn.custody = bytes(t.payload[(g_ack - seq) & MASK:][:1])
            self.ctx.count("custody_bytes")
        want = conn.ack_for_guest()
        if length and (want - seq) & MASK < length:
            self._keep_replay(conn, want, t.payload[(want - seq) & MASK:][:REPLAY_MAX])
        if not length and not flags & FIN and seq == conn.ack_for_guest():
            return DROP  # a pure ACK: nothing to answer
        if now - conn.window_start >= 1.0:
            conn.window_start, conn.window_count = now, 0
        if conn.window_count >= self.options.answers_per_s:
            self.ctx.count("answers_limited")
            return DROP
        conn.window_count += 1
        conn.answered += 1
        self._emit(conn.answer(), TO_UPLINK)
        self.ctx.count("answered")
        return CONSUMED  # answered for the guest

    def _keep_replay(self, conn: Conn, seq: int, data: memoryview) -> None:
        """Keep the peer's latest retransmission for the release, within the budget."""
        old = len(conn.replay[1]) if conn.replay is not None else 0
        if self.replay_bytes - old + len(data) > REPLAY_BUDGET:
            self.ctx.count("replay_over_budget")
            return
        conn.replay = (seq, bytes(data))
        self.replay_bytes += len(data) - old

    def _emit(self, data: bytearray, direction: Direction) -> None:
        self.ctx.emit(Frame(data), direction)


__all__ = ["Keepalive", "KeepaliveOptions"]
