"""A small real HTTP server for transfer tests (run with `python3 httpsha.py ADDR PORT`).

GET /bytes/N?seed=S streams N bytes of a seeded pseudo-random sequence (see
:func:`chunks`, so the test can compute the SHA-256 it expects without a file);
PUT/POST reads the whole body and answers its SHA-256 in hex.
"""

from __future__ import annotations

import hashlib
import random
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

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n > 0:
            data = self.rfile.read(min(CHUNK, n))
            if not data:
                break
            h.update(data)
            n -= len(data)
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
