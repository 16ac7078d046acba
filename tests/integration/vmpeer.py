"""TCP end programs for the real-VM tests: the peer side and the guest side.

Run with ``python3 vmpeer.py COMMAND ARGS``; stdlib only, so the guest runs it
with the host's python3 over 9p. Every program prints JSON lines on stdout,
each with ``event`` and ``t`` (``time.monotonic()``, which is the host's
CLOCK_MONOTONIC for the peer side, so a test compares it with its own clock).

Peer side (in the peer namespace), each serving one connection:
- ``hold PORT send|keepalive``: ``accepted``, then in ``send`` mode sends
  about 1 MB/s (``flowing`` once 256 KB went out), in ``keepalive`` mode sets
  TCP keep-alive 5/2/3 (TCP_KEEPIDLE/INTVL/CNT) and waits; ``dead`` with the
  ``error`` when the socket fails (``eof`` if the guest closes instead);
- ``sink PORT``: reads to EOF, ``done`` with ``bytes`` and ``sha256``;
- ``source PORT SIZE SEED``: sends the seeded stream of :mod:`httpsha`, closes;
- ``chat HOST PORT``: connects to an echo server (the busybox guest's), sends each
  line of its stdin and reads the echo (``echo`` with ``data`` and ``ms``);
- ``stream PORT SIZE SEED RATE [USER_TIMEOUT_MS]``: sends the seeded stream at RATE
  bytes/s through a 64 KB send buffer (``resumed`` when sending goes on after a stall
  of 2 s or more), half-closes, ``done``;
- ``echo PORT``: echoes until EOF (``resumed`` after a stall), ``done`` with ``bytes``;
- ``heartbeat PORT``: ``ping`` every 2 s, ``dead`` when 3 go without ``pong``.

Guest side:
- ``connect HOST PORT``: connects, ``connected``, reads and discards until EOF
  or an error (``closed``);
- ``send HOST PORT SIZE SEED``: sends the seeded stream, half-closes, waits for
  EOF, ``done`` with ``bytes`` and ``sha256`` of what it sent;
- ``recv HOST PORT``: reads to EOF, ``done`` with ``bytes`` and ``sha256``;
- ``bidir HOST PORT SIZE SEED RATE``: sends the seeded stream at RATE bytes/s to an
  ``echo`` peer while reading the echo; ``done`` with both SHA-256s;
- ``pong HOST PORT``: answers each ``ping`` with ``pong``.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import sys
import time
from typing import Any

from httpsha import chunks


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def accept_one(port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    emit("listening", port=port)
    conn, addr = srv.accept()
    srv.close()
    emit("accepted", peer=addr[0])
    return conn


def hold(port: int, mode: str) -> None:
    conn = accept_one(port)
    if mode == "keepalive":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    conn.setblocking(False)
    block = b"x" * 16384
    sent, flowing = 0, False
    next_send = time.monotonic()
    try:
        while True:
            want_write = mode == "send" and time.monotonic() >= next_send
            r, w, _ = select.select([conn], [conn] if want_write else [], [], 0.02)
            if r and not conn.recv(65536):
                emit("eof", sent=sent)
                return
            if w:
                try:
                    sent += conn.send(block)
                except BlockingIOError:
                    continue
                next_send = time.monotonic() + 0.016
                if not flowing and sent >= 256 * 1024:
                    flowing = True
                    emit("flowing", sent=sent)
    except OSError as exc:
        emit("dead", error=f"{type(exc).__name__}: {exc}", sent=sent)


def sink(port: int) -> None:
    conn = accept_one(port)
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        h.update(data)
        n += len(data)
    conn.close()
    emit("done", bytes=n, sha256=h.hexdigest())


def source(port: int, size: int, seed: int) -> None:
    conn = accept_one(port)
    for c in chunks(size, seed):
        conn.sendall(c)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass
    conn.close()
    emit("done", bytes=size)


class Pacer:
    """Sends at ``rate`` bytes/s at most and notices a stall: ``resumed`` (with how long
    nothing could be sent) when a send succeeds after ``STALL_S`` without one."""

    STALL_S = 2.0

    def __init__(self, rate: int):
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0
        self.last = self.start

    def due(self) -> bool:
        return self.sent < (time.monotonic() - self.start) * self.rate

    def sent_some(self, n: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.STALL_S:
            emit("resumed", stalled_s=round(now - self.last, 3), sent=self.sent)
        self.sent += n
        self.last = now


def stream(port: int, size: int, seed: int, rate: int, user_timeout_ms: int = 0) -> None:
    """Send the seeded stream at ``rate`` bytes/s through a small send buffer (so what
    the program sends follows the wire), half-close, wait for EOF: ``done`` with
    ``bytes``; ``resumed`` after a stall; ``dead`` with the error if the socket fails.
    ``user_timeout_ms`` sets TCP_USER_TIMEOUT."""
    conn = accept_one(port)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    if user_timeout_ms:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    conn.setblocking(False)
    data = b"".join(chunks(size, seed))
    pacer, flowing = Pacer(rate), False
    try:
        while pacer.sent < size:
            _, w, _ = select.select([], [conn] if pacer.due() else [], [], 0.01)
            if not w:
                continue
            try:
                n = conn.send(data[pacer.sent:pacer.sent + 16384])
            except BlockingIOError:
                continue
            pacer.sent_some(n)
            if not flowing and pacer.sent >= 128 * 1024:
                flowing = True
                emit("flowing", sent=pacer.sent)
        conn.setblocking(True)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
        emit("done", bytes=pacer.sent)
    except OSError as exc:
        emit("dead", error=f"{type(exc).__name__}: {exc}", sent=pacer.sent)


def echo(port: int) -> None:
    """Echo everything back until EOF through small buffers, then half-close: ``done``
    with ``bytes``; ``resumed`` after a stall; ``dead`` if the socket fails."""
    conn = accept_one(port)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    conn.setblocking(False)
    pending, eof, pacer = b"", False, Pacer(1 << 40)
    try:
        while not eof or pending:
            r, w, _ = select.select([] if eof or len(pending) > 1 << 20 else [conn],
                                    [conn] if pending else [], [], 0.05)
            if r:
                data = conn.recv(65536)
                eof, pending = not data, pending + data
            if w and pending:
                try:
                    n = conn.send(pending[:65536])
                except BlockingIOError:
                    continue
                pending = pending[n:]
                pacer.sent_some(n)
        conn.setblocking(True)
        conn.shutdown(socket.SHUT_WR)
        emit("done", bytes=pacer.sent)
    except OSError as exc:
        emit("dead", error=f"{type(exc).__name__}: {exc}", sent=pacer.sent)


def heartbeat(port: int, every_s: float = 2.0, missed: int = 3) -> None:
    """An application heartbeat (SSH's ServerAlive): ``ping`` every ``every_s``; no
    ``pong`` for ``missed`` of them -> ``dead`` (heartbeat timed out)."""
    conn = accept_one(port)
    last_pong = time.monotonic()
    try:
        while True:
            conn.sendall(b"ping\n")
            deadline = time.monotonic() + every_s
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                try:
                    data = conn.recv(64)
                except TimeoutError:
                    break
                if not data:
                    emit("dead", error="eof")
                    return
                if b"pong" in data:
                    last_pong = time.monotonic()
            if time.monotonic() - last_pong > every_s * missed:
                emit("dead", error="heartbeat timed out")
                return
    except OSError as exc:
        emit("dead", error=f"{type(exc).__name__}: {exc}")


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    emit("connected")
    return sock


def guest_connect(host: str, port: int) -> None:
    sock = connect(host, port)
    try:
        while sock.recv(1 << 16):
            pass
        emit("closed", error="eof")
    except OSError as exc:
        emit("closed", error=f"{type(exc).__name__}: {exc}")


def guest_send(host: str, port: int, size: int, seed: int) -> None:
    sock = connect(host, port)
    h = hashlib.sha256()
    for c in chunks(size, seed):
        sock.sendall(c)
        h.update(c)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    emit("done", bytes=size, sha256=h.hexdigest())


def guest_recv(host: str, port: int) -> None:
    sock = connect(host, port)
    h, n = hashlib.sha256(), 0
    while data := sock.recv(1 << 16):
        h.update(data)
        n += len(data)
    emit("done", bytes=n, sha256=h.hexdigest())


def guest_bidir(host: str, port: int, size: int, seed: int, rate: int) -> None:
    """Send the seeded stream at ``rate`` bytes/s and read its echo, half-close, read to
    EOF: ``done`` with the SHA-256 of what was sent and of what came back."""
    sock = connect(host, port)
    data = b"".join(chunks(size, seed))
    back, sent, start = hashlib.sha256(), 0, time.monotonic()
    got = 0
    try:
        while True:
            want = sent < size and sent < (time.monotonic() - start) * rate
            r, w, _ = select.select([sock], [sock] if want else [], [], 0.01)
            if r:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                back.update(chunk)
                got += len(chunk)
            if w:
                sent += sock.send(data[sent:sent + 16384])
                if sent == size:
                    sock.shutdown(socket.SHUT_WR)
        emit("done", bytes=sent, received=got, sha256=hashlib.sha256(data).hexdigest(),
             echoed=back.hexdigest())
    except OSError as exc:
        emit("closed", error=f"{type(exc).__name__}: {exc}", sent=sent, received=got)


def guest_pong(host: str, port: int) -> None:
    """Answer each ``ping`` with ``pong`` until the connection ends."""
    sock = connect(host, port)
    try:
        while data := sock.recv(64):
            sock.sendall(b"pong\n" * data.count(b"ping"))
        emit("closed", error="eof")
    except OSError as exc:
        emit("closed", error=f"{type(exc).__name__}: {exc}")


def chat(host: str, port: int) -> None:
    """Connect (``connected``), then for each line on stdin send it and read its echo
    (``echo`` with ``data`` and ``ms``); ``closed`` with the error if the socket fails."""
    sock = connect(host, port)
    sock.settimeout(30)
    try:
        for line in sys.stdin:
            data, t0 = line.encode(), time.monotonic()
            sock.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = sock.recv(len(data) - len(got))
                if not chunk:
                    raise ConnectionError("EOF")
                got += chunk
            emit("echo", data=got.decode(), ms=round((time.monotonic() - t0) * 1000, 1))
        emit("closed", error="stdin closed")
    except OSError as exc:
        emit("closed", error=f"{type(exc).__name__}: {exc}")


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "hold":
        hold(int(args[0]), args[1])
    elif cmd == "sink":
        sink(int(args[0]))
    elif cmd == "source":
        source(int(args[0]), int(args[1]), int(args[2]))
    elif cmd == "connect":
        guest_connect(args[0], int(args[1]))
    elif cmd == "send":
        guest_send(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "chat":
        chat(args[0], int(args[1]))
    elif cmd == "recv":
        guest_recv(args[0], int(args[1]))
    elif cmd == "stream":
        stream(*map(int, args))
    elif cmd == "echo":
        echo(int(args[0]))
    elif cmd == "heartbeat":
        heartbeat(int(args[0]))
    elif cmd == "bidir":
        guest_bidir(args[0], *map(int, args[1:]))
    elif cmd == "pong":
        guest_pong(args[0], int(args[1]))
    else:
        raise SystemExit(f"vmpeer: unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
