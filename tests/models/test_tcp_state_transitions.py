"""Every transition the endpoint and the observer make is in RFC 9293's table.

Both check each transition against :data:`vtl.models.tcp_state.LEGAL_TRANSITIONS` as they
make it, so the whole suite already fails on an illegal one. These tests show that the
check is wired in (a recorder sees every transition go through it), that scripted
scenarios and randomised runs over a lossy link make only legal ones, and that an illegal
one is refused without changing anything.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models_tcplink import (
    LinkParams,
    Peer,
    Sim,
    Sink,
    Source,
    Stalled,
    active_established,
    quick,
    to_state,
)
from vtl.models import tcp_endpoint, tcp_observe
from vtl.models.tcp_connection import TcpConnection
from vtl.models.tcp_endpoint import EndpointConfig, TcpEndpoint
from vtl.models.tcp_observe import TIME_WAIT_SECONDS, TRANSITIONS, Event
from vtl.models.tcp_state import LEGAL_TRANSITIONS, NEXT_STATES, IllegalTransition, TcpState

from vtl.frame import Frame
from vtl.packet.packet import Packet

S = TcpState
Pair = tuple[TcpState, TcpState]
LEGAL = set(LEGAL_TRANSITIONS)

# the table's transitions the endpoint never makes, and why
ENDPOINT_NEVER = {
    (S.LISTEN, S.SYN_SENT): "no SEND before accept(): LISTEN holds one VM's SYN",
    (S.SYN_RECEIVED, S.LISTEN): "a passive open that fails is forgotten, not reopened",
    (S.SYN_RECEIVED, S.FIN_WAIT_1): "shutdown() waits for ESTABLISHED to send the FIN",
    (S.SYN_RECEIVED, S.CLOSE_WAIT): "the ACK that carries a FIN establishes first",
    (S.FIN_WAIT_1, S.TIME_WAIT): "the ACK of our FIN is processed before the VM's FIN",
}


class Recorder:
    """Wraps ``check_transition`` where ``module`` calls it and keeps every pair."""

    def __init__(self, mp: pytest.MonkeyPatch, module: object) -> None:
        self.pairs: list[Pair] = []
        real = module.check_transition  # type: ignore[attr-defined]

        def record(old: TcpState, new: TcpState) -> None:
            self.pairs.append((old, new))
            real(old, new)

        mp.setattr(module, "check_transition", record)


@pytest.fixture
def ep_rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(monkeypatch, tcp_endpoint)


@pytest.fixture
def obs_rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(monkeypatch, tcp_observe)


# -- the endpoint --------------------------------------------------------------------------------


def test_endpoint_makes_exactly_the_tables_transitions_but_the_documented_ones(
        ep_rec: Recorder) -> None:
    now = 100.0
    for state in S:  # every state, and ABORT from it
        ep, peer = to_state(state.name)
        ep.abort(now)
        assert ep.state is S.CLOSED
    ep, peer = to_state("LISTEN")
    ep.receive(peer.rst(seq=peer.snd_nxt), now)  # the VM abandons its SYN
    ep, peer = to_state("TIME_WAIT")
    ep.on_timer(now + EndpointConfig().time_wait)
    ep, peer = to_state("CLOSING")
    ep.receive(peer.ack(), now)  # the ACK of our FIN
    ep, peer = to_state("SYN_SENT")  # simultaneous open: the VM's SYN crosses ours
    ep.receive(peer.syn(), now)
    assert ep.state is S.SYN_RECEIVED
    ep, peer = to_state("ESTABLISHED")
    ep.receive(peer.rst(), now)  # an acceptable RST
    assert ep.state is S.CLOSED
    active_established()  # SYN-SENT, the VM's SYN-ACK
    assert set(ep_rec.pairs) == LEGAL - set(ENDPOINT_NEVER)
    assert set(ENDPOINT_NEVER) <= LEGAL


@pytest.mark.parametrize("state", list(S))
def test_endpoint_refuses_an_illegal_transition(state: TcpState) -> None:
    illegal = [new for new in S if new not in NEXT_STATES[state]]
    assert illegal
    for new in illegal:
        ep, _ = to_state(state.name)
        timer = ep.poll_at()
        with pytest.raises(IllegalTransition, match=f"{state.value} cannot become"):
            ep._enter(new)
        assert ep.state is state and ep.events == [] and ep.outbox == []
        assert ep.poll_at() == timer


class _ObservedSim(Sim):
    """A :class:`Sim` whose delivered frames also go to a two-endpoint observer."""

    conn: TcpConnection | None = None

    def _deliver(self, side: object, frame: Frame) -> None:
        pkt = Packet(frame.copy())
        if self.conn is None:
            self.conn = TcpConnection.from_packet(pkt, self.now)
        else:
            self.conn.observe(pkt, self.now)
        super()._deliver(side, frame)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.05, 0.2]),
       dup=st.sampled_from([0.0, 0.1]), reorder=st.sampled_from([0.0, 0.2]),
       a_bytes=st.integers(0, 30_000), b_bytes=st.integers(0, 30_000),
       ending=st.sampled_from(["both", "a_only", "b_only", "abort_a", "abort_b"]),
       delay=st.floats(0.0, 0.5))
def test_lossy_runs_make_only_legal_transitions(seed: int, loss: float, dup: float,
                                                reorder: float, a_bytes: int, b_bytes: int,
                                                ending: str, delay: float) -> None:
    """Two endpoints, and an observer of every frame either receives, over a link that
    loses, duplicates and reorders; either side closes, both, or one aborts after
    ``delay``: every transition of the three is recorded, and legal."""
    with pytest.MonkeyPatch.context() as mp:
        ep_rec, obs_rec = Recorder(mp, tcp_endpoint), Recorder(mp, tcp_observe)
        link = LinkParams(loss=loss, dup=dup, reorder=reorder)
        sim = _ObservedSim(EndpointConfig(offload=False), ab=link, ba=link, seed=seed)
        sim.a.source = Source(a_bytes, close=ending in ("both", "a_only"))
        sim.a.sink, sim.b.sink = Sink(), Sink()
        sim._collect()
        try:
            sim.run_for(delay)
            sim.run(lambda: sim.b.ep is not None, max_time=60.0)
            sim.b.source = Source(b_bytes, seed=2, close=ending in ("both", "b_only"))
            if ending.startswith("abort"):
                (sim.a if ending == "abort_a" else sim.b).ep.abort(sim.now)
            sim._collect()
            sim.run_for(200.0)
        except Stalled:
            pass  # a stuck run is other tests' business; its transitions count here
    assert ep_rec.pairs[0] == (S.CLOSED, S.SYN_SENT)  # A's active open went through it
    made = set(ep_rec.pairs) | set(obs_rec.pairs)
    assert made <= LEGAL, made - LEGAL


# -- the observer --------------------------------------------------------------------------------


def test_observer_table_is_within_the_rfc_table() -> None:
    for (old, event), new in TRANSITIONS.items():
        assert (old, new) in LEGAL, (old, event, new)


class Watched:
    """The VM (a scripted :class:`Peer`, side ``a``) and a passive endpoint (side ``b``),
    every segment between them also shown to an observer."""

    def __init__(self) -> None:
        self.now = 1.0
        self.peer = Peer()
        syn = self.peer.syn()
        self.conn = TcpConnection.from_packet(Packet(bytearray(syn.data)), self.now)
        self.ep = TcpEndpoint.passive(syn, EndpointConfig(offload=False), self.now, iss=7)
        self.ep.accept(self.now)
        self.held: list[Frame] = []
        self.from_ep()
        self.peer.ts_ok = True
        self.to_ep(self.peer.ack())

    def from_ep(self, hold: bool = False) -> None:
        """The endpoint's segments reach the observer and (unless held) the VM."""
        frames, self.ep.outbox = self.ep.outbox, []
        for f in frames:
            self.conn.observe(Packet(f.copy()), self.now)
            if hold:
                self.held.append(f)
            else:
                self.peer.learn(quick(f))

    def release(self) -> None:
        for f in self.held:
            self.peer.learn(quick(f))
        self.held = []

    def to_ep(self, pkt: Packet) -> None:
        self.conn.observe(Packet(bytearray(pkt.data)), self.now)
        self.ep.receive(pkt, self.now)
        self.from_ep()


def test_observer_transitions_go_through_the_table(obs_rec: Recorder) -> None:
    w = Watched()
    assert (w.conn.a.state, w.conn.b.state) == (S.ESTABLISHED, S.ESTABLISHED)
    w.to_ep(w.peer.data(b"hello"))
    w.to_ep(w.peer.fin())  # the VM closes first
    w.ep.shutdown(w.now)
    w.from_ep()
    w.to_ep(w.peer.ack())
    assert (w.conn.a.state, w.conn.b.state) == (S.TIME_WAIT, S.CLOSED)
    w.conn.on_timer(w.now + TIME_WAIT_SECONDS)
    assert w.conn.closed
    assert obs_rec.pairs == [
        (S.LISTEN, S.SYN_RECEIVED), (S.SYN_SENT, S.ESTABLISHED),  # handshake
        (S.SYN_RECEIVED, S.ESTABLISHED),
        (S.ESTABLISHED, S.FIN_WAIT_1), (S.ESTABLISHED, S.CLOSE_WAIT),  # the VM's FIN
        (S.FIN_WAIT_1, S.FIN_WAIT_2),  # acknowledged
        (S.CLOSE_WAIT, S.LAST_ACK), (S.FIN_WAIT_2, S.TIME_WAIT),  # the endpoint's FIN
        (S.LAST_ACK, S.CLOSED),  # acknowledged
        (S.TIME_WAIT, S.CLOSED),
    ]


def test_observer_corrects_a_crossed_fin_through_legal_steps(obs_rec: Recorder) -> None:
    """The observer takes the endpoint's FIN as delivered (the VM in CLOSE-WAIT), then the
    VM's FIN shows it had not arrived: the VM is put back in ESTABLISHED and goes on
    through FIN-WAIT-1 to CLOSING, each step in the table."""
    w = Watched()
    w.ep.shutdown(w.now)
    w.from_ep(hold=True)  # the endpoint's FIN is on its way to the VM
    assert w.conn.a.state is S.CLOSE_WAIT
    obs_rec.pairs.clear()
    fin = w.peer.fin()  # the VM's FIN crosses it
    w.conn.observe(Packet(bytearray(fin.data)), w.now)
    assert (w.conn.a.state, w.conn.b.state) == (S.CLOSING, S.CLOSING)
    assert obs_rec.pairs == [(S.ESTABLISHED, S.FIN_WAIT_1), (S.FIN_WAIT_1, S.CLOSING),
                             (S.FIN_WAIT_1, S.CLOSING)]
    w.ep.receive(fin, w.now)
    assert w.ep.state is S.CLOSING  # the endpoint agrees
    w.from_ep()  # its ACK of the VM's FIN
    w.release()
    w.to_ep(w.peer.ack())
    assert w.ep.state is S.TIME_WAIT
    assert (w.conn.a.state, w.conn.b.state) == (S.TIME_WAIT, S.TIME_WAIT)
    assert set(obs_rec.pairs) <= LEGAL


def test_observer_refuses_an_illegal_transition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong entry in the observer's table is caught when it fires, and changes nothing."""
    w = Watched()
    bad = dict(TRANSITIONS)
    bad[(S.ESTABLISHED, Event.SEND_FIN)] = S.SYN_SENT
    monkeypatch.setattr(tcp_observe, "TRANSITIONS", bad)
    with pytest.raises(IllegalTransition, match="ESTABLISHED cannot become SYN-SENT"):
        w.conn.observe(w.peer.fin(), w.now)
    assert (w.conn.a.state, w.conn.b.state) == (S.ESTABLISHED, S.ESTABLISHED)


def test_watched_handshake_is_a_real_one() -> None:
    """The harness above: the observer and the endpoint agree on the numbers."""
    w = Watched()
    assert w.conn.b.snd_nxt == w.ep.tcb.snd_nxt and w.conn.a.rcv_nxt == w.ep.tcb.snd_nxt
    assert w.conn.a.snd_nxt == w.ep.tcb.rcv_nxt
