"""A small real HTTP server for transfer tests (run with `python3 httpsha.py ADDR PORT`).

GET /bytes/N?seed=S streams N bytes of a seeded pseudo-random sequence (see
:func:`chunks`, so the test can compute the SHA-256 it expects without a file);
PUT/POST reads the whole body (``Content-Length`` or chunked, as ``curl -T -``
sends a pipe) and answers its SHA-256 in hex. The data are generated at about
500 MB/s and never held whole, so 1 GB transfers are cheap. The listen backlog is
deep enough for hundreds of clients connecting at once.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CHUNK = 1 << 16


def chunks(n: int, seed: int):
    rng = random.Random(seed)
    while n > 0:
        k = min(CHUNK, n)
        yield rng.randbytes(k)
        n -= k


def expected_sha256(n: int, seed: int) -> str:
    h = hashlib.sha256()
    for c in chunks(n, seed):
        h.update(c)
    return h.hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if not url.path.startswith("/bytes/"):
            self.send_error(404)
            return
        n = int(url.path.rsplit("/", 1)[1])
        seed = int(parse_qs(url.query).get("seed", ["0"])[0])
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for c in chunks(n, seed):
            self.wfile.write(c)

    def _read_exactly(self, h, n: int) -> None:
        while n > 0:
            data = self.rfile.read(min(CHUNK, n))
            if not data:
                break
            h.update(data)
            n -= len(data)

    def do_PUT(self) -> None:
        h = hashlib.sha256()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                self._read_exactly(h, size)
                self.rfile.readline(1024)  # CRLF after the chunk
        else:
            self._read_exactly(h, int(self.headers.get("Content-Length", "0")))
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: hundreds of clients may connect at once


if __name__ == "__main__":
    if ":" in sys.argv[1]:
        Server.address_family = socket.AF_INET6
    Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
