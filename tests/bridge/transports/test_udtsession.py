"""The UDT hub's session logic without libudt: two sessions over an in-memory link.

A small driver stands in for each hub (it runs the session's commands, moves the
queued bytes into a bounded "kernel" buffer per pipe and onto a link per conn)
and for each stream manager (it writes, reads, pauses, half-closes and aborts
pipes). Hypothesis drives random sequences of opens, connects, deliveries in any
split, answers, writes, reads, aborts, breaks and ticks, and checks after every
step: credit is never exceeded (an honest peer is never reset), what a pipe
buffers is bounded by the window it granted, every pipe ends exactly once, and
the bytes a manager reads are, after the records, what the other manager wrote.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from vtl.bridge.transports import udtwire as wire
from vtl.bridge.transports.udtsession import Session
from vtl.bridge.transports.udtstate import (
    FAIL,
    LIVE,
    RECORD,
    CloseConn,
    ClosePipe,
    Conn,
    Connect,
    ConnState,
    Offer,
    Pipe,
    PipeState,
    ShutPipe,
    Tuning,
)

from vtl.flow import FlowKey
from vtl.stream import StreamFlow

FLOW = StreamFlow(FlowKey.tcp("10.0.0.1", 40000, "10.0.0.2", 80), b"\x02" * 6)
PEER = ("127.0.0.1", 9000)
KERNEL = 3000  # what the pipe's socket pair holds between the hub and the manager
RARELY = st.integers(0, 4).map(lambda n: n == 0)  # destructive rules: one time in five


@dataclass
class Listening:
    window: int
    closed: bool = False


class Manager:
    """The manager's end of one pipe: what it wrote, what it read, whether it reads."""

    def __init__(self) -> None:
        self.wrote = bytearray()
        self.kernel = bytearray()  # written by the hub, not read yet
        self.read = bytearray()
        self.paused = False


class Driver:
    """One hub: runs commands, moves bytes, counts closes."""

    def __init__(self, name: str):
        self.name = name
        self.s = Session()
        self.closes: dict[Pipe, list[bool]] = defaultdict(list)
        self.mgr: dict[Pipe, Manager] = {}
        self.offers: list[Pipe] = []
        self.connects: list[Conn] = []
        self.closed_conns: list[Conn] = []
        self.link: dict[Conn, bytearray] = {}  # bytes sent on a conn, not yet delivered

    def add(self, p: Pipe) -> None:
        p.sock = f"{self.name}-{p.sid}"
        self.mgr[p] = Manager()

    def pump(self) -> None:
        s = self.s
        while s.commands or s.to_write or s.to_flush:
            if s.commands:
                self.do(s.commands.popleft())
            elif s.to_write:
                p = next(iter(s.to_write))
                del s.to_write[p]
                self.write_pipe(p)
            else:
                c = next(iter(s.to_flush))
                del s.to_flush[c]
                if c.state in LIVE:
                    while (chunk := c.sendq.head()) is not None:
                        self.link.setdefault(c, bytearray()).extend(chunk)
                        c.sendq.consume(len(chunk))
                    s.flushed(c)

    def do(self, cmd) -> None:
        if isinstance(cmd, ClosePipe):
            self.closes[cmd.pipe].append(cmd.rst)
        elif isinstance(cmd, Offer):
            self.add(cmd.pipe)
            self.offers.append(cmd.pipe)
        elif isinstance(cmd, ShutPipe):
            self.s.pipe_shut(cmd.pipe)
        elif isinstance(cmd, Connect):
            self.connects.append(cmd.conn)
        elif isinstance(cmd, CloseConn):
            self.closed_conns.append(cmd.conn)

    def write_pipe(self, p: Pipe) -> None:
        if p.state is PipeState.DONE:
            return
        m, total = self.mgr[p], 0
        while (chunk := p.out.head()) is not None and len(m.kernel) < KERNEL:
            n = min(len(chunk), KERNEL - len(m.kernel))
            m.kernel += bytes(chunk[:n])
            p.out.consume(n)
            total += n
        self.s.pipe_wrote(p, total)


def strip_records(raw: bytes) -> tuple[list[int], bytes]:
    """The status codes at the head of what a manager read, and the stream bytes after."""
    codes, off = [], 0
    while len(raw) - off >= RECORD.size:
        magic, code, _, length = RECORD.unpack_from(raw, off)
        if magic != 0x56 or code not in (1, 2, 3):
            break
        codes.append(code)
        off += RECORD.size + length
        if code != 1:
            break
    return codes, raw[off:]


class TwoBridges(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Driver("a"), Driver("b")
        self.pairs: dict[Conn, Conn] = {}  # both directions
        self.listener = Listening(window=4096)
        self.now = 0.0
        self.all_pipes: list[tuple[Driver, Pipe]] = []

    # -- helpers ------------------------------------------------------------------------

    def pipes(self) -> list[tuple[Driver, Pipe]]:
        return [(d, p) for d, p in self.all_pipes if p.state is not PipeState.DONE]

    def pick(self, data, want=None) -> tuple[Driver, Pipe] | None:
        live = [(d, p) for d, p in self.pipes() if want is None or p.state in want]
        return data.draw(st.sampled_from(live)) if live else None

    def partner(self, d: Driver, p: Pipe) -> tuple[Driver, Pipe] | None:
        other = self.b if d is self.a else self.a
        c = self.pairs.get(p.conn)
        if c is None:
            return None
        for q in other.mgr:
            if q.conn is c and q.sid == p.sid:
                return other, q
        return None

    def settle(self) -> None:
        self.a.pump()
        self.b.pump()

    # -- rules --------------------------------------------------------------------------

    @rule(mux=st.booleans(), window=st.sampled_from([1024, 4096, 9000]),
          connect=st.sampled_from(["now", "later"]))
    def open_stream(self, mux: bool, window: int, connect: str) -> None:
        p = self.a.s.open(PEER, FLOW, Tuning(1500, window), mux)
        self.a.add(p)
        self.all_pipes.append((self.a, p))
        self.settle()
        while connect == "now" and self.a.connects:
            self._connect(self.a.connects.pop(0), True)

    def _connect(self, c: Conn, ok: bool) -> None:
        if not ok:
            self.a.s.connect_failed(c, "no answer")
        elif self.a.s.connected(c):
            bc = self.b.s.accepted(("127.0.0.1", 50000), self.listener)
            self.pairs[c], self.pairs[bc] = bc, c
        self.settle()

    @precondition(lambda self: self.a.connects)
    @rule(data=st.data(), ok=st.booleans())
    def finish_connect(self, data, ok: bool) -> None:
        self._connect(self.a.connects.pop(data.draw(st.integers(0, len(self.a.connects) - 1))),
                      ok)

    @rule(data=st.data(), size=st.integers(1, 5000), everything=st.booleans(),
          answer=st.sampled_from(["accept", "accept", "refuse", "hold"]))
    def network(self, data, size: int, everything: bool, answer: str) -> None:
        """Bytes in flight reach the other side in pieces of ``size``: on one conn, or
        everywhere until nothing moves; the far service answers new offers."""
        while True:
            moving = [(d, c) for d in (self.a, self.b) for c, buf in d.link.items() if buf]
            if not moving:
                return
            d, c = moving[0] if everything else data.draw(st.sampled_from(moving))
            buf = d.link[c]
            receiver = self.b if d is self.a else self.a
            while buf:
                chunk = bytes(buf[:size])
                del buf[:size]
                err = receiver.s.received(self.pairs[c], chunk)
                assert err is None, f"an honest peer was reset: {err}"
                receiver.pump()
            for p in self.b.offers:
                if p.state is PipeState.OFFERED and answer != "hold":
                    if (self.b, p) not in self.all_pipes:
                        self.all_pipes.append((self.b, p))
                    self.b.s.answer(p, None if answer == "accept" else "refused", "no")
            self.settle()
            if not everything:
                return

    @precondition(lambda self: any(p.state is PipeState.OFFERED for p in self.b.offers))
    @rule(data=st.data(), accept=st.booleans())
    def answer(self, data, accept: bool) -> None:
        waiting = [p for p in self.b.offers if p.state is PipeState.OFFERED]
        p = data.draw(st.sampled_from(waiting))
        if (self.b, p) not in self.all_pipes:
            self.all_pipes.append((self.b, p))
        self.b.s.answer(p, None if accept else "refused", "no")
        self.settle()

    @rule(data=st.data(), size=st.integers(1, 3000))
    def manager_writes(self, data, size: int) -> None:
        got = self.pick(data, {PipeState.OPEN})
        if got is None:
            return
        d, p = got
        room = d.s.read_room(p)
        if room <= 0 or not d.s.pipe_readable(p):
            return
        m = d.mgr[p]
        start = len(m.wrote)
        chunk = bytes((start + i) * 7 % 251 for i in range(min(size, room)))
        m.wrote += chunk
        d.s.pipe_data(p, chunk)
        self.settle()

    @rule(data=st.data(), size=st.integers(1, 4000))
    def manager_reads(self, data, size: int) -> None:
        got = self.pick(data)
        if got is None:
            return
        d, p = got
        m = d.mgr[p]
        if m.paused:
            return
        m.read += m.kernel[:size]
        del m.kernel[:size]
        d.write_pipe(p)  # room again: the hub writes more
        self.settle()

    @rule(data=st.data())
    def manager_pauses_or_resumes(self, data) -> None:
        got = self.pick(data)
        if got is not None:
            m = got[0].mgr[got[1]]
            m.paused = not m.paused

    @rule(data=st.data())
    def manager_half_closes(self, data) -> None:
        got = self.pick(data, {PipeState.OPEN})
        if got is not None and got[0].s.pipe_readable(got[1]):
            got[0].s.pipe_eof(got[1])
            self.settle()

    @rule(data=st.data(), how=st.sampled_from(["readable", "error"]), go=RARELY)
    def manager_aborts(self, data, how: str, go: bool) -> None:
        got = self.pick(data) if go else None
        if got is None:
            return
        d, p = got
        if how == "readable" and p.state is PipeState.OPENING:
            d.s.pipe_readable(p)  # EOF/RST on an opening pipe: the manager gave up
        else:
            d.s.pipe_error(p)
        self.settle()

    @precondition(lambda self: self.pairs)
    @rule(data=st.data(), go=RARELY)
    def udt_breaks(self, data, go: bool) -> None:
        if not go:
            return
        c = data.draw(st.sampled_from(list(self.pairs)))
        for d in (self.a, self.b):
            for x in (c, self.pairs[c]):
                if x in d.s.conns:
                    d.s.conn_broken(x, "UDT connection broken")
        self.settle()

    @rule(dt=st.sampled_from([0.25, 0.25, 0.25, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.a.s.tick(self.now)
        self.b.s.tick(self.now)
        self.settle()

    @rule()
    def everything_settles(self) -> None:
        """Nobody paused and the network delivers: every byte written to a stream that is
        open at both ends reaches the other manager (credit comes back as WINDOW)."""
        for d in (self.a, self.b):
            for m in d.mgr.values():
                m.paused = False
        for _ in range(200):
            moved = any(buf for d in (self.a, self.b) for buf in d.link.values())
            for d in (self.a, self.b):
                for p, m in d.mgr.items():
                    if m.kernel:
                        moved = True
                        m.read += m.kernel
                        m.kernel.clear()
                        d.write_pipe(p)
            self.settle()  # what the reads let go (WINDOW) reaches the link
            self.network(None, 1 << 20, True, "hold")
            if not moved:
                break
        for d, p in self.pipes():
            far = self.partner(d, p)
            if p.state is PipeState.OPEN and far is not None and \
                    far[1].state is PipeState.OPEN and p.conn.state in LIVE:
                _, data = strip_records(bytes(d.mgr[p].read))
                assert data == bytes(far[0].mgr[far[1]].wrote), "bytes stuck: no credit back"
                q = far[1]  # what it may send is its window less what we have not returned
                assert q.credit == p.window - p.consumed, (q.credit, p.window, p.consumed)
                assert p.consumed < max(1, p.window // 4), "credit not returned"

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def credit_and_buffers_are_bounded(self) -> None:
        for _, p in self.pipes():
            assert p.credit >= 0 and p.allowed >= 0
            assert 0 <= p.buffered <= p.window, (p.buffered, p.window)

    @invariant()
    def each_pipe_ends_at_most_once_and_done_ones_exactly_once(self) -> None:
        for d in (self.a, self.b):
            for p in d.mgr:
                n = len(d.closes[p])
                assert n == (1 if p.state is PipeState.DONE else 0), (p.state, n)
            assert all(p.state is not PipeState.DONE for p in d.s.pipes)
            assert all(c.state is not ConnState.DEAD for c in d.s.conns)

    @invariant()
    def managers_read_what_the_other_side_wrote(self) -> None:
        for d in (self.a, self.b):
            for p, m in d.mgr.items():
                codes, data = strip_records(bytes(m.read) + bytes(m.kernel))
                if FAIL in codes:
                    assert data == b"", "bytes after a FAIL record"
                far = self.partner(d, p)
                if far is not None:
                    sent = bytes(far[0].mgr[far[1]].wrote)
                    assert sent.startswith(data), "stream bytes out of order or invented"

    def teardown(self) -> None:
        self.a.s.stop()
        self.b.s.stop()
        self.settle()
        for d in (self.a, self.b):
            for p in d.mgr:
                assert p.state is PipeState.DONE
                assert len(d.closes[p]) == 1, f"{d.name} pipe {p.sid} closed {d.closes[p]}"
            assert not d.s.pipes and not d.s.conns


TwoBridges.TestCase.settings = settings(max_examples=150, stateful_step_count=80,
                                        deadline=None)
test_two_bridges = TwoBridges.TestCase


# -- a bad peer resets only its own conn -----------------------------------------------------


def _message(sid: int, kind: wire.Type, data: bytes, win: int) -> bytes:
    if kind is wire.Type.OPEN:
        return wire.encode_open(sid, FLOW, win)
    if kind is wire.Type.DATA:
        return wire.encode_data(sid, data)
    if kind in (wire.Type.OPEN_OK, wire.Type.WINDOW):
        enc = wire.encode_open_ok if kind is wire.Type.OPEN_OK else wire.encode_window
        return enc(sid, win)
    if kind is wire.Type.REFUSE:
        return wire.encode_refuse(sid, "refused", "no")
    return (wire.encode_fin if kind is wire.Type.FIN else wire.encode_rst)(sid)


MESSAGES = st.builds(_message, st.integers(1, 4), st.sampled_from(list(wire.Type)),
                     st.binary(min_size=1, max_size=5000), st.integers(1, 10000))


def accepted_stream(d: Driver, port: int = 50000, answer: bool = True) -> tuple[Conn, Pipe]:
    """A peer connects and opens stream 1 on ``d``; the service accepts it (``answer``)."""
    c = d.s.accepted(("127.0.0.1", port), Listening(window=4096))
    assert d.s.received(c, wire.encode_open(1, FLOW, 4096)) is None
    d.pump()
    p = d.offers[-1]
    if answer:
        d.s.answer(p, None)
        d.pump()
    return c, p


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=12), st.booleans())
def test_a_bad_peer_resets_only_its_conn(msgs: list[bytes], garbage: bool) -> None:
    d = Driver("b")
    (victim, _), (bystander, _) = accepted_stream(d), accepted_stream(d, 50001)
    keep = dict(bystander.pipes)
    stream = b"".join(msgs) + (b"\xff" * 12 if garbage else b"")
    err = d.s.received(victim, stream)
    d.pump()
    assert bystander.state is ConnState.OPEN and bystander.pipes == keep
    assert all(p.state is PipeState.OPEN and not d.closes[p] for p in keep.values())
    if err is not None:
        assert victim.state is ConnState.DEAD and not victim.pipes
        assert d.closed_conns == [victim]
        for p in d.mgr:
            if p.conn is victim:
                assert len(d.closes[p]) == 1
    else:
        assert victim.state is ConnState.OPEN and not d.closed_conns


@pytest.mark.parametrize("raw, what", [
    (wire.encode_data(1, b"x" * 5000), "beyond the window"),
    (wire.encode_fin(1) + wire.encode_fin(1), "after its FIN"),
    (wire.encode_open_ok(1, 10), "OPEN_OK on stream 1"),
    (wire.encode_open(1, FLOW, 10), "OPEN of stream 1 not allowed"),
    (wire.encode_window(9, 10), "unknown stream 9"),
])
def test_each_rule_names_what_was_broken(raw: bytes, what: str) -> None:
    d = Driver("b")
    c, _ = accepted_stream(d)
    err = d.s.received(c, raw)
    assert err is not None and what in str(err)
    d.pump()
    assert d.closes[d.offers[0]] == [True]  # the open stream is reset
    [close] = d.closed_conns
    assert close is c


def test_a_conn_that_breaks_after_both_fins_still_delivers_what_it_got() -> None:
    """The peer closes its UDT connection once its stream is done; our end may not have
    written everything to the manager yet: that is flushed and the pipe ends orderly."""
    d = Driver("b")
    c, p = accepted_stream(d)
    m = d.mgr[p]
    m.read += m.kernel  # the OK record
    m.kernel.clear()
    d.s.pipe_readable(p)
    d.s.pipe_eof(p)  # our manager is done: our FIN leaves
    d.pump()
    d.s.received(c, wire.encode_data(1, b"y" * 4000) + wire.encode_fin(1))
    d.pump()  # 3000 bytes fit the kernel buffer, 1000 wait in the session
    d.s.conn_broken(c, "UDT connection broken")  # the peer closed after our FIN
    d.pump()
    assert not d.closes[p] and p.state is PipeState.OPEN
    m.read += m.kernel
    m.kernel.clear()
    d.write_pipe(p)
    d.pump()
    m.read += m.kernel
    assert strip_records(bytes(m.read))[1] == b"y" * 4000
    assert d.closes[p] == [False] and p.state is PipeState.DONE


def test_a_conn_that_breaks_before_our_fin_left_resets() -> None:
    d = Driver("b")
    c, p = accepted_stream(d, answer=False)
    d.s.answer(p, None)  # OPEN_OK queued, not sent
    d.s.received(c, wire.encode_fin(1))
    d.s.pipe_readable(p)
    d.s.pipe_eof(p)  # FIN queued, but the conn breaks before it is sent
    d.s.conn_broken(c, "UDT connection broken")
    d.pump()
    assert d.closes[p] == [True]
