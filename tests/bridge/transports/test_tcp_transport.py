"""The tcp transport (options, socket settings) and the handshake hook, on loopback."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from vtl.bridge.streams import StreamManager
from vtl.bridge.transports import (
    Handshake,
    HandshakeStep,
    TcpTransport,
    TransportError,
    builtin_transports,
)

from vtl import LocalProtocolError
from vtl.stream import StreamClosed, StreamConnected, StreamData, StreamEvent, StreamRequest

LOG = logging.getLogger("test.tcp")


def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.002)


@pytest.fixture
def listener():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    ls.settimeout(5.0)
    yield ls
    ls.close()


@pytest.fixture
def lock() -> threading.Lock:
    return threading.Lock()


def events_of(mgr: StreamManager, lock: threading.Lock, request: StreamRequest):
    events: list[StreamEvent] = []
    with lock:
        stream = mgr.open(request, lambda e, now: events.append(e))
    return stream, events


def test_builtins_and_option_checks():
    assert set(builtin_transports()) == {"tcp", "socks5", "udt"}
    tcp = TcpTransport()
    tcp.check(StreamRequest("tcp", "::1", 1, options={"bind": ("::1", 0), "mark": 3}))
    for bad in ({"bind": 5}, {"mark": -1}, {"mark": True}, {"mark": "1"}, {"via": 1},
                {"congestion": 5}, {"congestion": ""}):
        with pytest.raises(LocalProtocolError):
            tcp.check(StreamRequest("tcp", "127.0.0.1", 1, options=bad))


def test_socket_is_nonblocking_nodelay_and_keeps_kernel_buffers(listener):
    tcp = TcpTransport()
    sock = tcp.connect(StreamRequest("tcp", "127.0.0.1", 1), socket.AF_INET,
                       listener.getsockname())
    with sock, socket.socket() as plain:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            assert sock.getsockopt(socket.SOL_SOCKET, opt) >= plain.getsockopt(
                socket.SOL_SOCKET, opt)
        listener.accept()[0].close()


def test_congestion_is_set_on_the_socket(listener):
    tcp = TcpTransport()
    names = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    assert len(names) >= 2  # reno is always there; bbr or cubic besides
    for name in names:
        sock = tcp.connect(StreamRequest("tcp", "127.0.0.1", 1, options={"congestion": name}),
                           socket.AF_INET, listener.getsockname())
        with sock:
            got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert got.rstrip(b"\0").decode() == name
            listener.accept()[0].close()


def test_bind_sets_the_source_address(lock, listener):
    mgr = StreamManager(lock, None, LOG)
    mgr.start()
    try:
        _, events = events_of(mgr, lock, StreamRequest(
            "tcp", "127.0.0.1", listener.getsockname()[1], options={"bind": "127.0.0.2"}))
        conn, peer = listener.accept()
        conn.close()
        assert peer[0] == "127.0.0.2"
        wait_for(lambda: events and isinstance(events[0], StreamConnected))
        assert events[0].local[0] == "127.0.0.2"
        _, events = events_of(mgr, lock, StreamRequest(
            "tcp", "127.0.0.1", listener.getsockname()[1], options={"bind": "192.0.2.1"}))
        wait_for(lambda: events)  # not a local address: the stream closes at once
        assert isinstance(events[0], StreamClosed) and events[0].reason == "error"
        assert "192.0.2.1" in events[0].message or "assign" in events[0].message
    finally:
        mgr.stop()


def test_mark_needs_privilege(lock, listener):
    mgr = StreamManager(lock, None, LOG)
    mgr.start()
    try:
        _, events = events_of(mgr, lock, StreamRequest(
            "tcp", "127.0.0.1", listener.getsockname()[1], options={"mark": 7}))
        if os.geteuid() == 0:
            listener.accept()[0].close()
            wait_for(lambda: events)
            assert isinstance(events[0], StreamConnected)
        else:
            wait_for(lambda: events)
            assert isinstance(events[0], StreamClosed) and events[0].reason == "error"
    finally:
        mgr.stop()


class Hello(Handshake):
    """A toy handshake: send HELLO, expect a 1-byte length, then that many bytes."""

    def __init__(self):
        self.seen: list[bytes] = []

    def start(self) -> HandshakeStep:
        return HandshakeStep(b"HELLO", 1)

    def feed(self, data: bytes) -> HandshakeStep:
        self.seen.append(data)
        if len(self.seen) == 1:
            return HandshakeStep(b"", data[0])
        if data != b"OK":
            raise TransportError("refused", f"server said {data!r}")
        return HandshakeStep(b"GO", 0)


class HelloTransport(TcpTransport):
    kind = "hello"

    def handshake(self, request: StreamRequest) -> Handshake:
        return Hello()


@pytest.mark.parametrize("answer", [b"OK", b"NO"])
def test_handshake_hook(lock, listener, answer):
    mgr = StreamManager(lock, None, LOG)
    mgr.register(HelloTransport())
    mgr.start()
    try:
        _, events = events_of(mgr, lock, StreamRequest(
            "hello", "127.0.0.1", listener.getsockname()[1]))
        conn, _ = listener.accept()
        conn.settimeout(5.0)
        assert conn.recv(5) == b"HELLO"
        conn.sendall(b"\x02")
        time.sleep(0.02)  # split on purpose: the handshake must wait for exactly 2 bytes
        conn.sendall(answer + b"app data")  # application bytes right behind the reply
        wait_for(lambda: events and (isinstance(events[-1], StreamClosed)
                                     or b"".join(e.data for e in events
                                                 if isinstance(e, StreamData)) == b"app data"))
        if answer == b"OK":
            assert isinstance(events[0], StreamConnected)
            assert events[0].remote == ("127.0.0.1", listener.getsockname()[1])
            assert conn.recv(2) == b"GO"
        else:
            assert [type(e) for e in events] == [StreamClosed]
            assert events[0].reason == "refused" and "NO" in events[0].message
        conn.close()
    finally:
        mgr.stop()


def test_handshake_timeout_covers_the_exchange(lock, listener):
    mgr = StreamManager(lock, None, LOG)
    mgr.register(HelloTransport())
    mgr.start()
    try:
        _, events = events_of(mgr, lock, StreamRequest(
            "hello", "127.0.0.1", listener.getsockname()[1], timeout_s=0.2))
        conn, _ = listener.accept()  # connected, but never answers the greeting
        wait_for(lambda: events, 2.0)
        assert [type(e) for e in events] == [StreamClosed] and events[0].reason == "timeout"
        conn.close()
    finally:
        mgr.stop()
