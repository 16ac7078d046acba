"""Small real TCP programs that :mod:`tcptools` runs inside a test's namespaces.

Run as ``python3 tcpprobe.py COMMAND ARGS``; every command prints one JSON
object on stdout (``slow`` prints the line ``stalled`` first), bounds all its
waiting by a timeout and exits 0 when it could report, whatever the outcome:

- ``gen N SEED``: write :func:`httpsha.chunks` (N bytes) to stdout, for uploads.
- ``parallel HOST PORT COUNT SIZE SEED TIMEOUT``: COUNT concurrent HTTP GETs of
  SIZE bytes (connection i asks seed SEED+i) in one thread with selectors; all
  connects start at once. Reports each body's SHA-256 or an error.
- ``slow HOST PORT SIZE SEED FIRST STALL TIMEOUT RCVBUF``: GET SIZE bytes, read
  FIRST body bytes, print ``stalled``, stop reading for STALL seconds, read the
  rest; reports the body's SHA-256.
- ``halfclose HOST PORT SIZE SEED TIMEOUT``: send SIZE bytes, ``shutdown(SHUT_WR)``,
  read the reply until EOF; reports it (base64).
- ``halfclose-server ADDR PORT DELAY REPLY_SIZE``: for each connection, read until
  EOF, wait DELAY seconds, send :func:`halfclose_reply` of what it read, close.
- ``connect HOST PORT TIMEOUT``: one connect(); reports refused / timeout /
  unreachable / connected / reset / error:NAME and the seconds it took.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import resource
import selectors
import socket
import sys
import threading
import time

from httpsha import chunks

RECV = 1 << 18


def halfclose_reply(request_sha256: str, reply_size: int) -> bytes:
    """What the half-close server answers: the request's SHA-256 line, then data."""
    seed = int(request_sha256[:8], 16)
    return (request_sha256 + "\n").encode() + b"".join(chunks(reply_size, seed))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _request(host: str, port: int, size: int, seed: int) -> bytes:
    h = f"[{host}]" if ":" in host else host
    return (f"GET /bytes/{size}?seed={seed} HTTP/1.1\r\nHost: {h}:{port}\r\n"
            "Connection: close\r\n\r\n").encode()


class Body:
    """Parses one HTTP/1.1 response with Content-Length and hashes its body."""

    def __init__(self) -> None:
        self.head = b""
        self.length: int | None = None
        self.got = 0
        self.sha = hashlib.sha256()
        self.status = 0

    def feed(self, data: bytes) -> None:
        if self.length is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    raise ValueError("response header too long")
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4:]
            self.status = int(head.split(" ", 2)[1])
            self.length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    self.length = int(v)
        self.got += len(data)
        self.sha.update(data)

    @property
    def done(self) -> bool:
        return self.length is not None and self.got >= self.length


def cmd_gen(n: int, seed: int) -> None:
    out = sys.stdout.buffer
    for c in chunks(n, seed):
        out.write(c)
    out.flush()


class Conn:
    def __init__(self, sock: socket.socket, request: bytes):
        self.sock, self.request, self.body = sock, request, Body()
        self.connected = False


def cmd_parallel(host: str, port: int, count: int, size: int, seed: int, timeout: float) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    t0 = time.monotonic()
    deadline = t0 + timeout
    sel = selectors.DefaultSelector()
    results: list[dict] = [{"i": i, "sha256": None, "bytes": 0, "error": None}
                           for i in range(count)]
    conns: dict[int, Conn] = {}
    for i in range(count):
        s = socket.socket(_family(host), socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        conns[i] = Conn(s, _request(host, port, size, seed + i))
        sel.register(s, selectors.EVENT_WRITE, i)
    open_now = max_open = 0

    def finish(i: int, error: str | None) -> None:
        nonlocal open_now
        c = conns.pop(i)
        open_now -= c.connected
        sel.unregister(c.sock)
        c.sock.close()
        results[i].update(bytes=c.body.got, error=error,
                          sha256=None if error else c.body.sha.hexdigest(),
                          seconds=round(time.monotonic() - t0, 3))

    while conns and time.monotonic() < deadline:
        for key, _ in sel.select(min(1.0, max(0.0, deadline - time.monotonic()))):
            i = key.data
            c = conns[i]
            if c.request:  # still connecting or sending the request
                if not c.connected:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(i, f"connect: {errno.errorcode.get(err, err)}")
                        continue
                    c.connected = True
                    open_now += 1
                    max_open = max(max_open, open_now)
                try:
                    sent = c.sock.send(c.request)
                except BlockingIOError:
                    continue
                except OSError as e:
                    finish(i, f"send: {e}")
                    continue
                c.request = c.request[sent:]
                if not c.request:
                    sel.modify(c.sock, selectors.EVENT_READ, i)
                continue
            try:
                data = c.sock.recv(RECV)
                c.body.feed(data)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:
                finish(i, f"recv: {e}")
                continue
            if c.body.done:
                finish(i, None if c.body.status == 200 else f"HTTP status {c.body.status}")
            elif not data:
                finish(i, f"EOF after {c.body.got} body bytes")
    for i in list(conns):
        finish(i, "timeout")
    return {"results": results, "max_open": max_open,
            "seconds": round(time.monotonic() - t0, 3)}


def cmd_slow(host: str, port: int, size: int, seed: int, first: int, stall: float,
             timeout: float, rcvbuf: int) -> dict:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    if rcvbuf > 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((host, port))
    s.sendall(_request(host, port, size, seed))
    body = Body()
    while not body.done and (body.length is None or body.got < first):
        data = s.recv(RECV)
        if not data:
            break
        body.feed(data)
    before = body.got
    print("stalled", flush=True)
    time.sleep(stall)
    t = time.monotonic()
    while not body.done:
        data = s.recv(RECV)
        if not data:
            break
        body.feed(data)
    s.close()
    return {"sha256": body.sha.hexdigest(), "bytes": body.got, "before_stall": before,
            "status": body.status, "after_stall_seconds": round(time.monotonic() - t, 3)}


def cmd_halfclose(host: str, port: int, size: int, seed: int, timeout: float) -> dict:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    for c in chunks(size, seed):
        s.sendall(c)
    s.shutdown(socket.SHUT_WR)
    reply = bytearray()
    error = None
    try:
        while True:
            data = s.recv(RECV)
            if not data:
                break
            reply += data
    except OSError as e:
        error = str(e)
    s.close()
    return {"reply": base64.b64encode(bytes(reply)).decode(), "error": error}


def cmd_halfclose_server(addr: str, port: int, delay: float, reply_size: int) -> None:
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)

    def serve(c: socket.socket) -> None:
        with c:
            c.settimeout(120)
            h = hashlib.sha256()
            while data := c.recv(RECV):
                h.update(data)
            time.sleep(delay)
            c.sendall(halfclose_reply(h.hexdigest(), reply_size))

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def cmd_connect(host: str, port: int, timeout: float) -> dict:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    t = time.monotonic()
    try:
        s.connect((host, port))
        outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except TimeoutError:
        outcome = "timeout"
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
            outcome = "unreachable"
        else:
            outcome = "error:" + errno.errorcode.get(e.errno or 0, str(e.errno))
    seconds = time.monotonic() - t
    s.close()
    return {"outcome": outcome, "seconds": round(seconds, 4)}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    out: dict | None
    if cmd == "gen":
        cmd_gen(int(args[0]), int(args[1]))
        return
    if cmd == "parallel":
        out = cmd_parallel(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]),
                           float(args[5]))
    elif cmd == "slow":
        out = cmd_slow(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]),
                       float(args[5]), float(args[6]), int(args[7]))
    elif cmd == "halfclose":
        out = cmd_halfclose(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
    elif cmd == "halfclose-server":
        cmd_halfclose_server(args[0], int(args[1]), float(args[2]), int(args[3]))
        return
    elif cmd == "connect":
        out = cmd_connect(args[0], int(args[1]), float(args[2]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
