"""The log lines of split-TCP connections: per connection at DEBUG, failures at WARNING,
both bounded per service however many connections the guest opens (real logging,
captured with caplog; the table driven sans-IO with FakeContext and FakeStream)."""

from __future__ import annotations

import logging
import re

import pytest
from vtl.models.split import SplitTable
from vtl.models.splitlog import FAILURE_LINES, LINES_PER_S, LOG_EVERY_S, SplitLog, Window
from vtl.models.tcp_endpoint import EndpointConfig

from vtl.flow import FlowKey
from vtl.frame import Frame
from vtl.packet import build
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, SYN
from vtl.stream import StreamRequest
from vtl.testing import FakeContext, FakeStream

G_MAC, R_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
G_IP = "10.0.0.1"


def syn(dst: str = "10.9.0.1", sport: int = 40000, dport: int = 80) -> Packet:
    return Packet(Frame(build.tcp_segment(G_MAC, R_MAC, G_IP, dst, sport, dport, 1000, 0, SYN,
                                          options=[("MSS", 1460)])))


def table(name: str = "svc", max_connections: int = 64) -> tuple[SplitTable, FakeContext]:
    ctx = FakeContext(name)
    return SplitTable(ctx, EndpointConfig(), max_connections=max_connections), ctx


def open_one(t: SplitTable, ctx: FakeContext, pkt: Packet, now: float) -> FakeStream:
    key = FlowKey.of(pkt)
    assert key is not None
    request = StreamRequest("tcp", key.dst_ip, key.dport)
    ctx.now = now
    t.open(key, pkt, now, lambda handler: ctx.open_stream(request, handler))
    return ctx.streams[-1]


def messages(caplog: pytest.LogCaptureFixture, level: int, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == logger]


def test_window_allows_limit_per_period_and_counts_the_rest() -> None:
    w = Window(3, 1.0)
    assert [w.take(0.1 * i) for i in range(5)] == [True, True, True, False, False]
    assert w.suppressed == 2 and w.ends() == pytest.approx(1.0)
    assert w.take(1.0) and w.start == 1.0
    assert w.take(0.5) and w.take(1.9) and not w.take(0.2)  # an earlier now counts here too


def test_open_and_end_lines_at_debug_with_bytes_and_duration(
        caplog: pytest.LogCaptureFixture) -> None:
    t, ctx = table("pep")
    with caplog.at_level(logging.DEBUG, logger=ctx.log.name):
        stream = open_one(t, ctx, syn(), 1.0)
        stream.connect(now=1.01)
        [synack] = [Packet(f) for f, _ in ctx.emitted]
        assert synack.tcp is not None
        isn = synack.tcp.seq
        key = FlowKey.of(syn())
        assert key is not None

        def seg(flags: int, data: bytes, now: float) -> None:
            pkt = Packet(Frame(build.tcp_segment(G_MAC, R_MAC, G_IP, "10.9.0.1", 40000, 80,
                                                 1001, isn + 1, flags, payload=data)))
            t.segment(key, pkt, now)

        seg(ACK, b"", 1.02)
        seg(ACK, b"x" * 300, 1.03)
        stream.data(b"y" * 1200, now=1.04)
        stream.closed("reset", "connection reset by peer", now=3.5)
    lines = messages(caplog, logging.DEBUG, ctx.log.name)
    assert lines[0] == "connection tcp 10.0.0.1:40000 -> 10.9.0.1:80 opened: tcp 10.9.0.1:80"
    assert lines[1] == ("connection tcp 10.0.0.1:40000 -> 10.9.0.1:80 ended reset "
                        "(connection reset by peer): 300 bytes up, 1200 bytes down, 2.500 s")
    assert len(lines) == 2
    [warning] = messages(caplog, logging.WARNING, ctx.log.name)
    assert "ended: reset: connection reset by peer" in warning


def test_no_connection_lines_without_debug(caplog: pytest.LogCaptureFixture) -> None:
    t, ctx = table()
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        for i in range(50):
            open_one(t, ctx, syn(sport=30000 + i), 0.01 * i).closed("closed", now=0.01 * i)
    assert messages(caplog, logging.DEBUG, ctx.log.name) == []
    assert t.lines.lines.suppressed == 0 and t.poll_at() is None


def test_a_flood_of_10000_connections_in_one_second_gives_a_bounded_number_of_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    t, ctx = table("socks", max_connections=16)
    n = 10_000
    with caplog.at_level(logging.DEBUG, logger=ctx.log.name):
        for i in range(n):
            now = i / n  # all within one second
            pkt = syn(dst=f"10.{9 + i // 65000}.{i // 250 % 250}.{i % 250 + 1}",
                      sport=1024 + i % 60000)
            open_one(t, ctx, pkt, now).closed("closed", now=now)
        during = messages(caplog, logging.DEBUG, ctx.log.name)
        assert len(during) == LINES_PER_S  # both kinds together, per second
        due = t.poll_at()
        assert due == pytest.approx(1.0)  # the summary is due when the second ends
        t.on_timer(due)
    assert ctx.extra("connections_opened") == n and ctx.extra("connections_closed") == n
    lines = messages(caplog, logging.DEBUG, ctx.log.name)
    assert lines[-1] == f"{2 * n - LINES_PER_S} connection lines suppressed (over 20 a second)"
    assert len(lines) == LINES_PER_S + 1 and t.poll_at() is None


def test_failure_lines_for_thousands_of_distinct_addresses_are_bounded_overall(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every outcome, a message naming each address, and outcomes no table knows
    (a service's own): over a minute, a few lines per LOG_EVERY_S in all."""
    t, ctx = table("socks", max_connections=16)
    n, span = 6000, 60.0
    outcomes = ["refused", "timeout", "unreachable", "reset", "error"]
    with caplog.at_level(logging.WARNING, logger=ctx.log.name):
        for i in range(n):
            now = span * i / n
            dst = f"10.{9 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
            pkt = syn(dst=dst, sport=1024 + i)
            stream = open_one(t, ctx, pkt, now)
            if i % 3 == 2:  # an outcome the table never heard of, one per connection
                key = FlowKey.of(pkt)
                assert key is not None
                t.release(key, f"odd-{i}", now)
            else:
                stream.closed(outcomes[i % 5], f"SOCKS proxy: {dst} port 80 is dead", now=now)  # type: ignore[arg-type]
    lines = messages(caplog, logging.WARNING, ctx.log.name)
    windows = int(span // LOG_EVERY_S)
    assert 0 < len(lines) <= FAILURE_LINES * windows
    assert sum(ctx.extra(f"connections_{o}") for o in outcomes) == n - n // 3
    more = [int(m.group(1)) for ln in lines if (m := re.search(r"\((\d+) more", ln))]
    assert more and sum(more) > n // 2  # the lines say how many they stand for
    assert len(t.lines._outcomes) <= 33  # memory: the outcomes seen are bounded too


def test_split_log_failure_is_per_outcome_first() -> None:
    log = logging.getLogger("vtl.test.splitlog")
    lines = SplitLog(log, failure_lines=100)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    h = Keep()
    log.addHandler(h)
    try:
        for i in range(30):
            lines.failed(f"flow{i}", "timeout", f"no answer from 10.0.0.{i}", i * 0.1)
        lines.failed("late", "timeout", "no answer", LOG_EVERY_S + 0.5)
    finally:
        log.removeHandler(h)
    assert records == ["connection flow0 ended: timeout: no answer from 10.0.0.0",
                       "connection late ended: timeout: no answer (29 more connections "
                       "ended timeout since the last line)"]
