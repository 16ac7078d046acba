"""TCP states and one endpoint's control block: negotiation and the options segments carry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vtl.models.tcp_state import (
    DEFAULT_MSS_V4,
    DEFAULT_MSS_V6,
    LEGAL_TRANSITIONS,
    NEXT_STATES,
    HalfState,
    IllegalTransition,
    TcpState,
    check_transition,
    segment_options,
    syn_options,
)

from vtl.errors import VTLError
from vtl.packet.tcp import TcpOptions

S = TcpState


def test_state_names_are_rfc_9293() -> None:
    assert [s.value for s in TcpState] == [
        "CLOSED", "LISTEN", "SYN-SENT", "SYN-RECEIVED", "ESTABLISHED", "FIN-WAIT-1",
        "FIN-WAIT-2", "CLOSE-WAIT", "CLOSING", "LAST-ACK", "TIME-WAIT"]


def test_state_classes() -> None:
    assert {s for s in TcpState if not s.synchronized} == {S.CLOSED, S.LISTEN, S.SYN_SENT,
                                                          S.SYN_RECEIVED}
    assert {s for s in TcpState if s.can_send} == {S.ESTABLISHED, S.CLOSE_WAIT}
    assert {s for s in TcpState if s.can_receive} == {S.ESTABLISHED, S.FIN_WAIT_1,
                                                     S.FIN_WAIT_2}


FULL = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(100, 0))


def test_negotiate_everything() -> None:
    h = HalfState()
    h.negotiate(FULL, TcpOptions(mss=1400, wscale=9, sack_permitted=True,
                                 timestamps=(555, 100)))
    assert (h.mss, h.adv_mss) == (1400, 1460)
    assert (h.rcv_shift, h.snd_shift) == (7, 9)
    assert h.sack_ok and h.ts_ok and h.ts_recent == 555


@pytest.mark.parametrize("ours_ws,theirs_ws", [(None, 7), (7, None), (None, None)])
def test_no_window_scaling_unless_both_offer_it(ours_ws: int | None,
                                                theirs_ws: int | None) -> None:
    h = HalfState(rcv_shift=3, snd_shift=3)
    h.negotiate(TcpOptions(mss=1460, wscale=ours_ws), TcpOptions(mss=1460, wscale=theirs_ws))
    assert (h.rcv_shift, h.snd_shift) == (0, 0)  # RFC 7323 2.2


def test_wscale_capped_at_14() -> None:
    h = HalfState()
    h.negotiate(TcpOptions(wscale=15), TcpOptions(wscale=20))
    assert (h.rcv_shift, h.snd_shift) == (14, 14)  # RFC 7323 2.3


@pytest.mark.parametrize("ours,theirs", [(True, False), (False, True), (False, False)])
def test_sack_and_timestamps_need_both(ours: bool, theirs: bool) -> None:
    h = HalfState()
    h.negotiate(TcpOptions(sack_permitted=ours, timestamps=(1, 0) if ours else None),
                TcpOptions(sack_permitted=theirs, timestamps=(2, 1) if theirs else None))
    assert not h.sack_ok and not h.ts_ok and h.ts_recent == 0


@pytest.mark.parametrize("v6,default", [(False, DEFAULT_MSS_V4), (True, DEFAULT_MSS_V6)])
def test_mss_defaults_without_the_option(v6: bool, default: int) -> None:
    h = HalfState()
    h.negotiate(TcpOptions(mss=1460), TcpOptions(), v6=v6)
    assert h.mss == default  # RFC 9293 3.7.1 / RFC 8200
    h.negotiate(TcpOptions(), TcpOptions(mss=9000), v6=v6)
    assert h.mss == 9000 and h.adv_mss == default


@given(st.integers(0, 1 << 31), st.integers(0, 14))
def test_window_field(window: int, shift: int) -> None:
    h = HalfState(rcv_wnd=window, rcv_shift=shift)
    f = h.window_field()
    assert 0 <= f <= 0xFFFF
    assert f == min(0xFFFF, window >> shift)
    assert f << shift <= window  # never advertises more than it has
    assert h.window_field(-5) == 0


def test_ts_val_is_a_millisecond_clock_with_an_offset() -> None:
    h = HalfState(ts_offset=1000)
    assert h.ts_val(2.5) == 3500
    h.ts_offset = 0xFFFFFFFF
    assert h.ts_val(0.002) == 1  # wraps


def test_syn_options() -> None:
    h = HalfState(ts_offset=7)
    o = syn_options(h, 1.0, mss=1460, wscale=7, sack=True, timestamps=True, echo=9)
    assert o == TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(1007, 9))
    o = syn_options(h, 1.0, mss=536, wscale=None, sack=False, timestamps=False)
    assert o.timestamps is None and o.wscale is None and not o.sack_permitted


def test_segment_options_plain() -> None:
    assert segment_options(HalfState(), 1.0) == b""
    assert segment_options(HalfState(), 1.0, ((1, 2),)) == b""  # SACK not permitted


def test_segment_options_timestamps() -> None:
    h = HalfState(ts_ok=True, ts_recent=4242, ts_offset=10)
    raw = segment_options(h, 2.0)
    assert len(raw) == 12
    assert TcpOptions.decode(raw).timestamps == (2010, 4242)


@pytest.mark.parametrize("ts,limit", [(True, 3), (False, 4)])
def test_segment_options_sack_blocks(ts: bool, limit: int) -> None:
    h = HalfState(ts_ok=ts, sack_ok=True)
    blocks = tuple((i * 100, i * 100 + 50) for i in range(1, 6))
    raw = segment_options(h, 1.0, blocks)
    o = TcpOptions.decode(raw)
    assert o.sack_blocks == blocks[:limit]  # RFC 2018 3
    assert (o.timestamps is not None) is ts
    assert len(raw) <= 40 and len(raw) % 4 == 0


# -- the transition table -----------------------------------------------------------------------

# RFC 9293 3.3.2 figure 5, arrow by arrow (the CLOSE arrows to CLOSED included)
FIGURE_5 = {
    (S.CLOSED, S.LISTEN), (S.CLOSED, S.SYN_SENT), (S.LISTEN, S.SYN_RECEIVED),
    (S.LISTEN, S.SYN_SENT), (S.LISTEN, S.CLOSED), (S.SYN_SENT, S.SYN_RECEIVED),
    (S.SYN_SENT, S.ESTABLISHED), (S.SYN_SENT, S.CLOSED), (S.SYN_RECEIVED, S.ESTABLISHED),
    (S.SYN_RECEIVED, S.FIN_WAIT_1), (S.ESTABLISHED, S.FIN_WAIT_1),
    (S.ESTABLISHED, S.CLOSE_WAIT), (S.FIN_WAIT_1, S.FIN_WAIT_2), (S.FIN_WAIT_1, S.CLOSING),
    (S.FIN_WAIT_2, S.TIME_WAIT), (S.CLOSE_WAIT, S.LAST_ACK), (S.CLOSING, S.TIME_WAIT),
    (S.LAST_ACK, S.CLOSED), (S.TIME_WAIT, S.CLOSED),
}
# what the event processing of RFC 9293 3.10 adds to the figure
SECTION_3_10 = {
    (S.SYN_RECEIVED, S.LISTEN),  # 3.10.7.4 second check: RST after a passive OPEN
    (S.SYN_RECEIVED, S.CLOSE_WAIT),  # 3.10.7.4 eighth check: FIN
    (S.FIN_WAIT_1, S.TIME_WAIT),  # eighth check: FIN whose segment also acks our FIN
    # ABORT (3.10.5), an acceptable RST (3.10.7.4), a user timeout (3.10.8)
    *((s, S.CLOSED) for s in (S.SYN_RECEIVED, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2,
                              S.CLOSE_WAIT, S.CLOSING)),
}


def test_table_is_figure_5_and_section_3_10() -> None:
    assert set(LEGAL_TRANSITIONS) == FIGURE_5 | SECTION_3_10
    assert all(isinstance(why, str) and why for why in LEGAL_TRANSITIONS.values())


def test_table_shape() -> None:
    assert set(NEXT_STATES) == set(TcpState)
    assert {(a, b) for a, nxt in NEXT_STATES.items() for b in nxt} == set(LEGAL_TRANSITIONS)
    assert NEXT_STATES[S.CLOSED] == {S.LISTEN, S.SYN_SENT}  # CLOSED only opens
    assert NEXT_STATES[S.TIME_WAIT] == {S.CLOSED}
    assert all(a is not b for a, b in LEGAL_TRANSITIONS)  # no self-loops
    assert {a for a, b in LEGAL_TRANSITIONS if b is S.CLOSED} == set(TcpState) - {S.CLOSED}
    # every state is reachable from CLOSED
    seen, todo = {S.CLOSED}, [S.CLOSED]
    while todo:
        for b in NEXT_STATES[todo.pop()] - seen:
            seen.add(b)
            todo.append(b)
    assert seen == set(TcpState)


@pytest.mark.parametrize("old", list(TcpState))
@pytest.mark.parametrize("new", list(TcpState))
def test_check_transition_refuses_exactly_what_is_not_in_the_table(old: TcpState,
                                                                  new: TcpState) -> None:
    if (old, new) in LEGAL_TRANSITIONS:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} cannot become {new.value}"):
            check_transition(old, new)


def test_an_illegal_transition_is_a_bug_not_a_network_error() -> None:
    assert issubclass(IllegalTransition, AssertionError)
    assert not issubclass(IllegalTransition, VTLError)  # never swallowed as an expected error
