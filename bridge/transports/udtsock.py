"""Sockets for the UDT hub: the loopback pipe pairs and the UDT socket settings.

Theory of operation. A pipe is a loopback TCP pair (:func:`tcp_pair`) rather
than a ``socketpair()``: closing it with ``SO_LINGER`` 0 is a real reset, so the
stream manager reports ``"reset"``; its kernel buffers are forced up to
:data:`PAIR_BUFFER` so a pipe carries 100+ Mbit/s at 10 ms. The UDT helpers
apply a :class:`~.udtstate.Tuning` (buffers, flow window, rate cap, congestion
control: :mod:`.udtcc`) and switch a
socket to non-blocking. Nothing here keeps state beyond the pairs' listener.
"""

from __future__ import annotations

import socket
import threading

import vtl.bridge.transports.udtcc as udtcc
from udt4py import UDTException, UDTSocket
from vtl.bridge.transports.udtstate import Tuning

PAIR_BUFFER = 1 << 20  # each side of a pipe: kernel buffers (100+ Mbit/s at 10 ms)

_pair_lock = threading.Lock()
_pair_listener: socket.socket | None = None


def tcp_pair(buffer: int = PAIR_BUFFER) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (hub end, manager end), both non-blocking."""
    global _pair_listener
    with _pair_lock:
        if _pair_listener is None:
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            lst.bind(("127.0.0.1", 0))
            lst.listen(512)
            _pair_listener = lst
        lst = _pair_listener
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):
            try:
                a.setsockopt(socket.SOL_SOCKET, force, buffer)  # SO_*BUFFORCE (root)
            except OSError:
                a.setsockopt(socket.SOL_SOCKET, opt, buffer)
        a.connect(lst.getsockname())
        want = a.getsockname()
        while True:
            b, peer = lst.accept()
            if peer == want:
                break
            b.close()  # someone else's connection to our private listener
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return b, a



def set_opts(sock: UDTSocket, tuning: Tuning) -> None:
    mss, window = tuning.mss, tuning.window
    sock.UDT_MSS = mss
    sock.UDT_SNDBUF = window
    sock.UDT_RCVBUF = window
    sock.UDT_FC = max(25600, window // max(mss - 44, 1) + 1)
    if tuning.max_bw > 0:
        # libudt's native control overshoots a rate-limited WAN by far (tail drops of
        # 30-40 % at 0 % loss, measured with benchmarks/udt.py); a cap at the link rate
        # keeps its pacing under the bottleneck. The vtl control finds the rate itself
        # and applies the cap in its own pacing.
        sock.UDT_MAXBW = tuning.max_bw
    # before connect/listen; accepted sockets inherit the listener's control
    udtcc.install(sock.socket, tuning.congestion, tuning.max_bw)


def uclose(sock: UDTSocket) -> None:
    try:
        sock.close()
    except UDTException:
        pass  # libudt already dropped it (broken and collected)


def nonblocking(sock: UDTSocket) -> None:
    sock.UDT_SNDSYN = False
    sock.UDT_RCVSYN = False



__all__ = ["PAIR_BUFFER", "nonblocking", "set_opts", "tcp_pair", "uclose"]
