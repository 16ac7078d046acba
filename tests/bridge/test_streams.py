"""StreamManager over real loopback sockets: data, flow control, half-close, errors.

Each test drives a manager without a bridge (a lock and an ``after_events``
recorder stand in for it), except the last ones, which go through a real
:class:`Chain` and ``SlotContext.open_stream``. Stream methods are called with
the lock held, as the bridge does. Every wait is bounded.

Handlers run on the manager's I/O thread, where the manager catches what they
raise (a service bug must not stop the bridge). So a :class:`Rec` keeps what
its checks (or the test's ``on`` part) raised, and the test fails with it:
:func:`wait_for` re-raises it at once, the autouse fixture at the end.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from vtl.bridge.chain import Chain
from vtl.bridge.streams import CLOSE_LINGER_S, StreamManager
from vtl.bridge.transports import Handshake, HandshakeStep, TcpTransport, Transport

from vtl import Direction, Frame, LocalProtocolError, Service
from vtl.stream import (
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamRequest,
    StreamWritable,
)

LOG = logging.getLogger("test.streams")

#: what handlers raised on the I/O thread during the current test (see the module)
HANDLER_FAILURES: list[BaseException] = []


@pytest.fixture(autouse=True)
def handler_failures():
    HANDLER_FAILURES.clear()
    yield HANDLER_FAILURES
    failures, HANDLER_FAILURES[:] = list(HANDLER_FAILURES), []
    if failures:
        raise failures[0]


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while True:
        if HANDLER_FAILURES:
            raise HANDLER_FAILURES.pop(0)
        if pred():
            return
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.002)


class Rec:
    """A handler recording events; ``on(event, now)`` runs after recording.

    What it raises is kept for the test to fail with (see the module), except
    an exception of the type ``raises`` names, which the test provokes.
    """

    def __init__(self, on: Callable[[StreamEvent, float], None] | None = None,
                 raises: type[BaseException] | None = None):
        self.events: list[StreamEvent] = []
        self.data = bytearray()
        self.on = on
        self.raises = raises

    def __call__(self, event: StreamEvent, now: float) -> None:
        try:
            assert self.final is None, f"{event!r} after {self.final!r}"
            assert isinstance(now, float)
            assert event.stream.id >= 1
            self.events.append(event)
            if isinstance(event, StreamData):
                self.data += event.data
            if self.on is not None:
                self.on(event, now)
        except BaseException as exc:
            if self.raises is None or not isinstance(exc, self.raises):
                HANDLER_FAILURES.append(exc)
            raise

    @property
    def final(self) -> StreamClosed | None:
        return next((e for e in self.events if isinstance(e, StreamClosed)), None)

    def kinds(self) -> list[str]:
        return [type(e).__name__.removeprefix("Stream") for e in self.events]

    def has(self, cls: type) -> bool:
        return any(isinstance(e, cls) for e in self.events)


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


@pytest.fixture
def mgr(lock: threading.Lock):
    after: list[float] = []
    m = StreamManager(lock, after.append, LOG, "test")
    m.after = after  # type: ignore[attr-defined]
    m.start()
    yield m
    m.stop()


@pytest.fixture
def listener():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(512)
    ls.settimeout(5.0)
    yield ls
    ls.close()


def req(sock_or_port: socket.socket | int, host: str = "127.0.0.1", **kw) -> StreamRequest:
    port = sock_or_port if isinstance(sock_or_port, int) else sock_or_port.getsockname()[1]
    return StreamRequest("tcp", host, port, **kw)


def open_(mgr: StreamManager, lock: threading.Lock, request: StreamRequest, rec: Rec):
    with lock:
        return mgr.open(request, rec)


def accept(ls: socket.socket) -> socket.socket:
    conn, _ = ls.accept()
    conn.settimeout(5.0)
    return conn


def recv_all(conn: socket.socket, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def echo_server(ls: socket.socket, count: int = 1) -> list[threading.Thread]:
    """Echo ``count`` connections until EOF, then half-close back."""

    def serve(conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(1 << 18):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)

    def acceptor() -> None:
        for _ in range(count):
            threading.Thread(target=serve, args=(accept(ls),), daemon=True).start()

    t = threading.Thread(target=acceptor, daemon=True)
    t.start()
    return [t]


def pump(payload: bytes, shut: bool = True) -> Callable[[StreamEvent, float], None]:
    """A handler part that writes ``payload`` as room allows, then half-closes."""
    view = memoryview(payload)
    state = {"off": 0}

    def on(event: StreamEvent, now: float) -> None:
        if not isinstance(event, StreamConnected | StreamWritable):
            return
        s = event.stream
        while state["off"] < len(view):
            n = s.write(view[state["off"]:])
            state["off"] += n
            if not n:
                return
        if shut:
            s.shutdown_write()

    return on


def test_echo_a_few_megabytes_both_ways(mgr, lock, listener):
    payload = os.urandom(6 << 20)
    echo_server(listener)
    rec = Rec(pump(payload))
    s = open_(mgr, lock, req(listener, write_buffer=128 * 1024, read_chunk=64 * 1024), rec)
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "closed", rec.final
    assert bytes(rec.data) == payload
    assert rec.kinds()[0] == "Connected" and rec.kinds()[-2:] == ["Ended", "Closed"]
    assert all(len(e.data) <= 64 * 1024 for e in rec.events if isinstance(e, StreamData))
    connected = rec.events[0]
    assert connected.stream is s and connected.remote == ("127.0.0.1", listener.getsockname()[1])
    snap = mgr.snapshot()
    assert snap["bytes_up"] == snap["bytes_down"] == len(payload)
    assert snap["open"] == 0 and snap["opened_total"] == 1 and snap["failed_total"] == 0
    assert mgr.after, "after_events runs after handlers"
    seen = len(rec.events)
    with lock:  # a dead handle does nothing, and no event follows StreamClosed
        assert s.write(b"x") == 0 and s.write_room == 0
        s.shutdown_write()
        s.pause_reading(True)
        s.close()
        s.abort()
    time.sleep(0.05)
    assert len(rec.events) == seen and rec.events[-1] is rec.final


def test_back_pressure_and_writable(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener, write_buffer=64 * 1024), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    chunk = bytes(64 * 1024)
    total = 0
    with lock:
        assert s.write_room == 64 * 1024
        for _ in range(4000):  # the kernel's buffers, then ours, fill up
            n = s.write(chunk)
            total += n
            if n < len(chunk):
                break
        assert s.write_room == 0 and s.write(b"more") == 0
    time.sleep(0.05)
    assert not rec.has(StreamWritable)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(recv_all(conn, total)), daemon=True)
    reader.start()
    wait_for(lambda: rec.has(StreamWritable))
    with lock:
        assert s.write_room >= 32 * 1024
        s.shutdown_write()
    reader.join(5.0)
    assert len(got) == total and not any(got)
    conn.close()


def test_short_write_with_nothing_queued_still_gets_writable(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener, write_buffer=1000), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    with lock:
        assert s.write(bytes(5000)) == 1000  # the kernel took it all; 4000 were refused
    wait_for(lambda: rec.has(StreamWritable))
    with lock:
        assert s.write_room == 1000
        assert s.write(bytes(500)) == 500
        s.shutdown_write()
        assert s.write_room == 0 and s.write(b"x") == 0
    assert len(recv_all(conn)) == 1500
    conn.close()


def test_shutdown_before_connected_sends_fin_at_connect(mgr, lock, listener):
    rec = Rec()
    with lock:
        s = mgr.open(req(listener), rec)
        s.shutdown_write()
        assert s.write_room == 0
    conn = accept(listener)
    assert recv_all(conn) == b""
    conn.sendall(b"reply")
    conn.close()
    wait_for(lambda: rec.final is not None)
    assert rec.kinds() == ["Connected", "Data", "Ended", "Closed"]
    assert rec.final.reason == "closed" and rec.data == b"reply"


def test_pause_reading_stops_delivery(mgr, lock, listener):
    rec = Rec(lambda e, now: isinstance(e, StreamConnected) and e.stream.pause_reading(True))
    s = open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    conn.sendall(b"hello")
    wait_for(lambda: rec.has(StreamConnected))
    time.sleep(0.1)
    assert not rec.has(StreamData)
    with lock:
        s.pause_reading(False)
    wait_for(lambda: rec.data == b"hello")
    with lock:
        s.pause_reading(True)
    conn.sendall(b"more")
    conn.shutdown(socket.SHUT_WR)
    time.sleep(0.1)
    assert rec.data == b"hello" and not rec.has(StreamEnded)
    with lock:
        s.pause_reading(False)
    wait_for(lambda: rec.has(StreamEnded))
    assert rec.data == b"hellomore"
    conn.close()


def test_half_close_ours_first(mgr, lock, listener):
    def on(event: StreamEvent, now: float) -> None:
        if isinstance(event, StreamConnected):
            event.stream.write(b"ping")
            event.stream.shutdown_write()

    rec = Rec(on)
    open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    assert recv_all(conn) == b"ping"  # up to our FIN
    conn.sendall(b"pong")  # the other way still works
    time.sleep(0.05)
    assert rec.data == b"pong" and rec.final is None
    conn.shutdown(socket.SHUT_WR)
    wait_for(lambda: rec.final is not None)
    assert rec.kinds() == ["Connected", "Data", "Ended", "Closed"]
    assert rec.final.reason == "closed"
    conn.close()


def test_half_close_theirs_first(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    conn.sendall(b"bye")
    conn.shutdown(socket.SHUT_WR)
    wait_for(lambda: rec.has(StreamEnded))
    assert rec.data == b"bye" and rec.final is None
    with lock:
        assert s.write(b"still here") == 10
        s.shutdown_write()
    assert recv_all(conn) == b"still here"
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "closed"
    conn.close()


def test_refused_is_quick(mgr, lock):
    with socket.socket() as bound:  # bound, never listening: the kernel answers RST
        bound.bind(("127.0.0.1", 0))
        rec = Rec()
        t0 = time.monotonic()
        open_(mgr, lock, req(bound), rec)
        wait_for(lambda: rec.final is not None, 2.0)
    assert rec.kinds() == ["Closed"] and rec.final.reason == "refused"
    assert time.monotonic() - t0 < 1.0
    assert mgr.snapshot()["failed_total"] == 1


def test_timeout_is_bounded(mgr, lock):
    with socket.socket() as ls, socket.socket() as filler:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        filler.settimeout(2.0)
        filler.connect(ls.getsockname())  # the accept queue is now full: SYNs are dropped
        rec = Rec()
        t0 = time.monotonic()
        open_(mgr, lock, req(ls, timeout_s=0.3), rec)
        wait_for(lambda: rec.final is not None, 3.0)
    assert rec.final.reason == "timeout", rec.final
    assert 0.25 <= time.monotonic() - t0 < 1.5


def test_abort_resets_and_closes_once(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    with lock:
        s.write(b"x" * 1000)
        s.abort()
        s.abort()
        s.close()
        assert s.write(b"y") == 0
    wait_for(lambda: rec.final is not None)
    with pytest.raises(ConnectionResetError):
        recv_all(conn)
    time.sleep(0.05)
    assert rec.kinds() == ["Connected", "Closed"] and rec.final.reason == "local"
    conn.close()


def test_peer_reset_is_reported(mgr, lock, listener):
    rec = Rec()
    open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    conn.close()
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "reset"


def test_close_flushes_queued_bytes_then_fins(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener, write_buffer=1 << 20), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    payload = os.urandom(3 << 20)
    view, off = memoryview(payload), 0
    with lock:
        while off < len(payload) and (n := s.write(view[off:])):
            off += n
        s.close()
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "local"
    assert recv_all(conn) == payload[:off]  # everything taken arrives, then EOF
    conn.close()
    wait_for(lambda: mgr.snapshot()["open"] == 0)


def test_raising_handler_is_counted_and_aborted(mgr, lock, listener):
    errors: list[float] = []

    def boom(event: StreamEvent, now: float) -> None:
        if isinstance(event, StreamConnected):
            raise RuntimeError("service bug")

    rec = Rec(boom, raises=RuntimeError)
    with lock:
        mgr.open(req(listener), rec, errors.append)
    conn = accept(listener)
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "error" and "service bug" in rec.final.message
    assert len(errors) == 1
    with pytest.raises(ConnectionResetError):
        recv_all(conn)
    conn.close()
    echo_server(listener)  # the manager keeps working
    rec2 = Rec(pump(b"after"))
    open_(mgr, lock, req(listener), rec2)
    wait_for(lambda: rec2.final is not None)
    assert rec2.data == b"after" and rec2.final.reason == "closed"


def test_hostname_is_resolved_off_thread(mgr, lock, listener):
    echo_server(listener)  # "localhost" may try ::1 first: refused, then 127.0.0.1
    rec = Rec(pump(b"by name"))
    open_(mgr, lock, req(listener, host="localhost"), rec)
    wait_for(lambda: rec.final is not None)
    assert rec.data == b"by name" and rec.final.reason == "closed"
    rec = Rec()
    open_(mgr, lock, req(listener, host="no-such-host.invalid", timeout_s=3.0), rec)
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason in ("error", "timeout")


def test_ipv6_literal(mgr, lock):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as ls:
        try:
            ls.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1")
        ls.listen(1)
        ls.settimeout(5.0)
        echo_server(ls)
        rec = Rec(pump(b"six"))
        open_(mgr, lock, req(ls, host="[::1]"), rec)
        wait_for(lambda: rec.final is not None)
    assert rec.data == b"six" and rec.events[0].remote[0] == "::1"


def test_many_parallel_streams(mgr, lock, listener):
    n = 200
    echo_server(listener, n)
    payloads = [os.urandom(20_000 + i) for i in range(n)]
    recs = [Rec(pump(p)) for p in payloads]
    for r in recs:
        open_(mgr, lock, req(listener), r)
    wait_for(lambda: all(r.final is not None for r in recs), 8.0)
    bad = [r.final for r in recs if r.final.reason != "closed"]
    assert not bad, bad[:3]
    assert all(bytes(r.data) == p for r, p in zip(recs, payloads, strict=True))


def test_a_check_failing_on_the_io_thread_fails_the_test(mgr, lock, listener):
    def check(event: StreamEvent, now: float) -> None:
        if isinstance(event, StreamConnected):
            raise AssertionError("checked on the I/O thread")

    rec = Rec(check)
    open_(mgr, lock, req(listener), rec)
    accept(listener).close()
    with pytest.raises(AssertionError, match="checked on the I/O thread"):
        wait_for(lambda: False)
    wait_for(lambda: rec.final is not None)
    assert rec.final.reason == "error" and "checked on the I/O thread" in rec.final.message


class Spy(TcpTransport):
    """The tcp transport, recording the addresses it is asked about."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def endpoint(self, request: StreamRequest) -> tuple[str, int]:
        self.calls.append(f"endpoint {request.host}")
        return super().endpoint(request)

    def connect(self, request: StreamRequest, family: int, sockaddr: tuple) -> socket.socket:
        self.calls.append(f"connect {sockaddr[0]}")
        return super().connect(request, family, sockaddr)


def test_policy_refuses_before_any_socket_exists(mgr, lock, listener):
    spy = Spy()
    mgr.register(spy)
    refused_port = listener.getsockname()[1]
    asked: list[tuple[str, int, str]] = []

    def policy(request: StreamRequest, transport: Transport) -> tuple[str, str] | None:
        asked.append((request.host, request.port, transport.kind))
        if request.port == refused_port:
            return "prohibited", "egress policy: not that one"
        return None

    mgr.policy = policy
    recs = [Rec(), Rec()]
    with lock:
        refused = [mgr.open(req(listener), recs[0]),
                   mgr.open(req(listener, host="localhost"), recs[1])]  # no resolver either
        assert all(not r.events for r in recs)  # never from inside open()
        assert all(s.write_room == 0 and s.write(b"x") == 0 for s in refused)
    for r, s in zip(recs, refused, strict=True):
        wait_for(lambda r=r: r.final is not None)
        assert r.kinds() == ["Closed"] and r.final.stream is s
        assert r.final.reason == "prohibited" and r.final.message == "egress policy: not that one"
    assert spy.calls == []
    listener.settimeout(0.3)
    with pytest.raises(TimeoutError):
        listener.accept()  # the listener never saw a connection
    snap = mgr.snapshot()
    assert snap["refused_by_policy"] == 2 and snap["failed_total"] == 2 and snap["open"] == 0
    with socket.socket() as other:  # what the policy lets through opens as usual
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        other.settimeout(5.0)
        echo_server(other)
        rec = Rec(pump(b"allowed"))
        open_(mgr, lock, req(other), rec)
        wait_for(lambda: rec.final is not None)
    assert rec.data == b"allowed" and rec.final.reason == "closed"
    assert spy.calls == ["endpoint 127.0.0.1", "connect 127.0.0.1"]
    assert [a[2] for a in asked] == ["tcp"] * 3 and mgr.snapshot()["refused_by_policy"] == 2


class Greeting(Handshake):
    """Sends ``hello?``, wants ``yes`` back."""

    def start(self) -> HandshakeStep:
        return HandshakeStep(send=b"hello?", want=3)

    def feed(self, data: bytes) -> HandshakeStep:
        return HandshakeStep()


class GreetTransport(TcpTransport):
    kind = "greet"

    def handshake(self, request: StreamRequest) -> Handshake:
        return Greeting()


def test_fin_asked_before_connected_waits_for_the_handshake(mgr, lock, listener):
    mgr.register(GreetTransport())
    rec = Rec()
    with lock:
        s = mgr.open(StreamRequest("greet", "127.0.0.1", listener.getsockname()[1]), rec)
        s.shutdown_write()
    conn = accept(listener)
    got = b""
    while len(got) < 6:
        got += conn.recv(6 - len(got))
    assert got == b"hello?"
    conn.settimeout(0.2)
    with pytest.raises(TimeoutError):
        conn.recv(1)  # no FIN in the middle of the handshake
    conn.settimeout(5.0)
    conn.sendall(b"yes")
    assert recv_all(conn) == b""  # the FIN, once connected
    conn.sendall(b"reply")
    conn.close()
    wait_for(lambda: rec.final is not None)
    assert rec.kinds() == ["Connected", "Data", "Ended", "Closed"]
    assert rec.data == b"reply" and rec.final.reason == "closed"


def paused_and_hung_up(mgr, lock, listener) -> tuple:
    """A stream that is paused, has sent its FIN, and whose peer sent data and hung up."""
    rec = Rec()
    s = open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    with lock:
        s.pause_reading(True)
        s.shutdown_write()
    assert recv_all(conn) == b""
    conn.sendall(b"late")
    conn.close()
    time.sleep(0.1)  # the HUP arrives while nothing reads
    polls = mgr._io.epoch
    time.sleep(0.2)
    assert mgr._io.epoch - polls < 10, "the I/O thread spins on a HUP"
    assert s._rd.value == "parked" and rec.kinds() == ["Connected"]
    return s, rec


def test_a_parked_stream_resumes(mgr, lock, listener):
    s, rec = paused_and_hung_up(mgr, lock, listener)
    with lock:
        s.pause_reading(False)
    wait_for(lambda: rec.final is not None)
    assert rec.kinds() == ["Connected", "Data", "Ended", "Closed"]
    assert rec.data == b"late" and rec.final.reason == "closed"


def test_a_parked_stream_closes(mgr, lock, listener):
    s, rec = paused_and_hung_up(mgr, lock, listener)
    with lock:
        s.close()
    wait_for(lambda: rec.final is not None and mgr.snapshot()["open"] == 0, 2.0)
    assert rec.kinds() == ["Connected", "Closed"] and rec.final.reason == "local"


def test_handle_methods_take_the_callers_now(mgr, lock, listener):
    rec = Rec()
    s = open_(mgr, lock, req(listener), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    now = time.monotonic()
    with lock:
        assert s.write(b"abc", now) == 3
        s.pause_reading(True, now)
        s.pause_reading(False, now)
        s.close(now - CLOSE_LINGER_S)  # the linger deadline is already past
    assert recv_all(conn) == b"abc"
    t0 = time.monotonic()
    # the peer never sent its FIN: without the caller's now the close would linger
    # CLOSE_LINGER_S (10 s); half of that leaves room for a loaded machine
    wait_for(lambda: mgr.snapshot()["open"] == 0, CLOSE_LINGER_S / 2)
    assert time.monotonic() - t0 < CLOSE_LINGER_S / 2
    assert rec.kinds() == ["Connected", "Closed"] and rec.final.reason == "local"
    with lock:
        s.abort(now)
        s.shutdown_write(now)
    conn.close()


def test_api_misuse_raises(mgr, lock):
    with lock:
        with pytest.raises(LocalProtocolError, match="no stream kind .quic."):
            mgr.open(StreamRequest("quic", "127.0.0.1", 1), Rec())
        with pytest.raises(LocalProtocolError, match="unknown option"):
            mgr.open(StreamRequest("tcp", "127.0.0.1", 1, options={"proxy": "x"}), Rec())
        with pytest.raises(LocalProtocolError, match="write_buffer"):
            mgr.open(StreamRequest("tcp", "127.0.0.1", 1, write_buffer=0), Rec())


def test_stop_resets_open_streams_without_events(lock, listener):
    m = StreamManager(lock, None, LOG, "test")
    m.start()
    rec = Rec()
    open_(m, lock, req(listener), rec)
    conn = accept(listener)
    wait_for(lambda: rec.has(StreamConnected))
    m.stop()
    m.stop()
    with pytest.raises(ConnectionResetError):
        recv_all(conn)
    conn.close()
    assert rec.kinds() == ["Connected"]
    with lock, pytest.raises(LocalProtocolError, match="stopping"):
        m.open(req(listener), Rec())


# -- through a real chain ----------------------------------------------------------------


class Fetch(Service):
    """Opens a stream at start, sends ``ping``, emits what comes back toward the guest."""

    name = "fetch"

    def __init__(self, ctx, port: int):
        super().__init__(None, ctx)
        self.port = port
        self.stream = None
        self.closed: StreamClosed | None = None

    def start(self, now: float) -> None:
        self.stream = self.ctx.open_stream(StreamRequest("tcp", "127.0.0.1", self.port),
                                           self.on_stream)

    def on_stream(self, event: StreamEvent, now: float) -> None:
        if isinstance(event, StreamConnected):
            event.stream.write(b"ping")
            event.stream.shutdown_write()
        elif isinstance(event, StreamData):
            self.ctx.emit(Frame(bytearray(event.data.ljust(60, b"\0"))), Direction.TO_GUEST)
        elif isinstance(event, StreamClosed):
            self.closed = event


def test_open_stream_through_a_chain(lock, listener):
    echo_server(listener)
    chain = Chain.from_services([lambda ctx: Fetch(ctx, listener.getsockname()[1])], LOG)
    mgr = StreamManager(lock, chain.after_external, LOG, "chain")
    chain.streams = mgr
    mgr.start()
    try:
        with lock:
            chain.start(time.monotonic())
        svc = chain.slots[0].service
        wait_for(lambda: svc.closed is not None)
        assert svc.closed.reason == "closed"
        with lock:
            out = [bytes(f.data[:4]) for f in chain.out_guest]
        assert b"".join(out) == b"ping"
    finally:
        mgr.stop()


class Broken(Service):
    name = "broken"

    def __init__(self, ctx, port: int):
        super().__init__(None, ctx)
        self.port = port
        self.final: StreamClosed | None = None

    def start(self, now: float) -> None:
        self.ctx.open_stream(StreamRequest("tcp", "127.0.0.1", self.port), self.on_stream)

    def on_stream(self, event: StreamEvent, now: float) -> None:
        if isinstance(event, StreamClosed):
            self.final = event
            return
        raise ValueError("oops")


def test_handler_errors_count_on_the_slot(lock, listener):
    chain = Chain.from_services([lambda ctx: Broken(ctx, listener.getsockname()[1])], LOG)
    mgr = StreamManager(lock, chain.after_external, LOG, "chain")
    chain.streams = mgr
    mgr.start()
    try:
        with lock:
            chain.start(time.monotonic())
        accept(listener).close()
        svc = chain.slots[0].service
        wait_for(lambda: svc.final is not None)
        assert svc.final.reason == "error"
        assert chain.slots[0].counters.errors == 1
    finally:
        mgr.stop()


def test_open_stream_without_a_bridge_is_a_clear_error():
    chain = Chain.from_services([lambda ctx: Fetch(ctx, 9)], LOG)
    with pytest.raises(LocalProtocolError, match="needs a bridge"):
        chain.start(0.0)


# -- through a real bridge (TAP ports: root) ---------------------------------------------


class Ticker(Service):
    """Arms a timer from a stream handler: the bridge must wake up for it."""

    name = "ticker"

    def __init__(self, ctx, port: int):
        super().__init__(None, ctx)
        self.port = port
        self.due: float | None = None
        self.fired: list[tuple[float, float]] = []
        self.events: list[StreamEvent] = []

    def start(self, now: float) -> None:
        self.ctx.open_stream(StreamRequest("tcp", "127.0.0.1", self.port), self.on_stream)

    def on_stream(self, event: StreamEvent, now: float) -> None:
        self.events.append(event)
        if isinstance(event, StreamData):
            self.due = now + 0.02

    def poll_at(self) -> float | None:
        return self.due

    def on_timer(self, now: float) -> None:
        self.fired.append((self.due, now))
        self.due = None


@pytest.mark.integration
def test_bridge_runs_streams_and_wakes_for_their_timers(listener):
    import secrets

    from vtl.bridge.config import parse_config
    from vtl.bridge.engine import Bridge

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (TAP ports)")
    tag = secrets.token_hex(3)
    cfg = parse_config({"bridge": {"allow": ["127.0.0.1"]},  # the egress policy denies loopback
                        "ports": {"guest": {"kind": "tap", "ifname": f"vts{tag}g"},
                                  "uplink": {"kind": "tap", "ifname": f"vts{tag}u"}}})
    port = listener.getsockname()[1]
    chain = Chain.from_services([lambda ctx: Ticker(ctx, port)], LOG)
    bridge = Bridge(cfg, LOG, chain=chain)
    with bridge:
        conn = accept(listener)
        svc = chain.slots[0].service
        wait_for(lambda: any(isinstance(e, StreamConnected) for e in svc.events))
        for i in range(1, 4):  # the forwarding threads sleep up to 0.5 s unless woken
            time.sleep(0.13)
            conn.sendall(b"tick")
            wait_for(lambda i=i: len(svc.fired) == i, 2.0)
        late = [ran - due for due, ran in svc.fired]
        assert max(late) < 0.1, f"timers armed by a stream handler ran late: {late}"
        snap = bridge.snapshot()["streams"]
        assert snap["open"] == 1 and snap["bytes_down"] == 12
    assert bridge.streams is None
    assert not any(isinstance(e, StreamClosed) for e in svc.events)  # none after stop
    with pytest.raises(ConnectionResetError):
        recv_all(conn)
    conn.close()
