"""The ``tcp`` stream transport: a plain host TCP connection.

Theory of operation. ``StreamRequest(kind="tcp", host, port)`` connects a
non-blocking TCP socket to ``(host, port)``. ``host`` is an IPv4 or IPv6
literal (``"[::1]"`` brackets and ``%scope`` suffixes are accepted) or a host
name, which the stream manager resolves with ``getaddrinfo`` on a worker
thread and tries address by address within ``timeout_s``. Sockets get
``TCP_NODELAY`` (services write whole segments; Nagle would only add delay);
send and receive buffers are left to the kernel's autotuning, never shrunk.

Options (``StreamRequest.options``):

- ``bind``: source address, ``"10.0.0.5"`` (any port) or ``("10.0.0.5", 4000)``;
  with port 0 the kernel picks the port at connect time
  (``IP_BIND_ADDRESS_NO_PORT``), so many streams from one address do not run
  out of ports early;
- ``mark``: an integer ``SO_MARK`` for policy routing (needs CAP_NET_ADMIN;
  without it the stream closes with reason ``"error"``);
- ``congestion``: the socket's congestion control (``TCP_CONGESTION``), e.g.
  ``"bbr"``; the kernel loads its module ``tcp_NAME`` when the bridge may (root).
  :func:`congestion_problem` is the check the bridge runs on a config's
  ``congestion`` options, so a name this kernel lacks is a config error rather
  than a stream that fails later.

Not done here: TCP Fast Open, keep-alive tuning, IP_TRANSPARENT.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from vtl.bridge.transports.base import Transport

from vtl.errors import LocalProtocolError
from vtl.stream import StreamRequest

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux value
_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def congestion_problem(name: str) -> str | None:
    """What is wrong with giving this host's TCP sockets congestion control ``name``, or
    None. It is tried on a throw-away socket, as a stream's socket would be, so a module
    the kernel loads on demand counts as there."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        try:
            with open(_AVAILABLE) as f:
                have = f.read().split()
        except OSError:
            have = []
        listed = f" (this kernel has: {', '.join(have)})" if have else ""
        if exc.errno == errno.EPERM:
            return (f"{name!r} is not allowed to this process{listed}; run as root or add it "
                    "to net.ipv4.tcp_allowed_congestion_control")
        return f"this kernel has no congestion control {name!r}{listed}; modprobe tcp_{name}?"
    finally:
        sock.close()
    return None


def _bind_address(value: object) -> tuple[str, int]:
    if isinstance(value, str):
        return value.strip("[]"), 0
    if (isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int)):
        return value[0].strip("[]"), value[1]
    raise LocalProtocolError(f"tcp stream option bind={value!r}: give an address or (addr, port)")


class TcpTransport(Transport):
    """Connects straight to the request's (host, port)."""

    kind = "tcp"
    options = frozenset({"bind", "mark", "congestion"})

    def check(self, request: StreamRequest) -> None:
        super().check(request)
        opts = request.options
        if opts.get("bind") is not None:
            _bind_address(opts["bind"])
        mark = opts.get("mark")
        if mark is not None and (not isinstance(mark, int) or isinstance(mark, bool)
                                 or not 0 <= mark < 2**32):
            raise LocalProtocolError(f"tcp stream option mark={mark!r}: give a 32-bit integer")
        cc = opts.get("congestion")
        if cc is not None and (not isinstance(cc, str) or not 1 <= len(cc) <= 15):
            raise LocalProtocolError(f"tcp stream option congestion={cc!r}: give a name "
                                     "such as \"bbr\"")

    def connect(self, request: StreamRequest, family: int, sockaddr: tuple) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.prepare(sock, request)
            err = sock.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock

    def prepare(self, sock: socket.socket, request: StreamRequest) -> None:
        """Apply ``mark``, ``congestion`` and ``bind`` before the connect (subclasses may
        add more)."""
        opts = request.options
        mark = opts.get("mark")
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        cc = opts.get("congestion")
        if cc is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        bind = opts.get("bind")
        if bind is not None:
            addr, port = _bind_address(bind)
            if port == 0:
                try:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                except OSError:
                    pass
            sock.bind((addr, port))


__all__ = ["TcpTransport", "congestion_problem"]
