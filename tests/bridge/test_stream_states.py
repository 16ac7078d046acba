"""The stream lifecycle tables (:mod:`vtl.bridge.stream_states`): shape and enforcement."""

from __future__ import annotations

import pytest
from vtl.bridge.stream_states import (
    BEFORE_OPEN,
    PHASES,
    READ_SIDE,
    TOLD,
    WRITE_SIDE,
    IllegalTransition,
    Phase,
    ReadSide,
    WriteSide,
    move,
)


def reachable(table, start) -> set:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("table, enum", [(PHASES, Phase), (READ_SIDE, ReadSide),
                                         (WRITE_SIDE, WriteSide)])
def test_every_state_has_a_row_and_no_self_moves(table, enum):
    assert set(table) == set(enum)
    assert all(state not in table[state] for state in enum)


def test_phases_run_one_way_and_every_phase_can_end():
    assert reachable(PHASES, Phase.RESOLVING) == set(Phase)
    assert PHASES[Phase.DONE] == frozenset()
    assert all(Phase.DONE in reachable(PHASES, p) for p in Phase)
    order = list(Phase)
    assert all(order.index(b) > order.index(a) for a in Phase for b in PHASES[a])
    assert {Phase.RESOLVING, Phase.CONNECTING, Phase.HANDSHAKE} == BEFORE_OPEN
    assert {Phase.CLOSING, Phase.DONE} == TOLD
    assert PHASES[Phase.CLOSING] == {Phase.DONE}  # told once: nothing back to OPEN


def test_half_states():
    assert reachable(READ_SIDE, ReadSide.READING) == set(ReadSide)
    assert {s for s in ReadSide if ReadSide.PARKED in READ_SIDE[s]} == {ReadSide.PAUSED}
    assert READ_SIDE[ReadSide.EOF] == frozenset()
    assert reachable(WRITE_SIDE, WriteSide.WRITING) == set(WriteSide)
    assert WRITE_SIDE[WriteSide.FIN_SENT] == frozenset()
    assert WriteSide.FIN_SENT not in WRITE_SIDE[WriteSide.WRITING]  # the FIN is asked first


@pytest.mark.parametrize("table, old, new", [
    (PHASES, Phase.OPEN, Phase.CONNECTING),
    (PHASES, Phase.DONE, Phase.DONE),
    (PHASES, Phase.RESOLVING, Phase.OPEN),
    (READ_SIDE, ReadSide.EOF, ReadSide.READING),
    (READ_SIDE, ReadSide.READING, ReadSide.PARKED),
    (WRITE_SIDE, WriteSide.FIN_PENDING, WriteSide.WRITING),
])
def test_illegal_moves_raise(table, old, new):
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
        move(table, old, new)


def test_legal_moves_return_the_new_state():
    assert move(PHASES, Phase.HANDSHAKE, Phase.OPEN) is Phase.OPEN
    assert move(READ_SIDE, ReadSide.PARKED, ReadSide.READING) is ReadSide.READING
    assert move(WRITE_SIDE, WriteSide.BLOCKED, WriteSide.FIN_PENDING) is WriteSide.FIN_PENDING
