"""The bridge's UDP sockets for services (``ctx.open_datagram``, see :mod:`vtl.datagram`).

Theory of operation. A :class:`DatagramEndpoint` is one non-blocking UDP socket
bound at once to the request's address (the literal's family decides AF_INET or
AF_INET6; a bind failure is a :class:`~vtl.errors.SetupError` naming the address
and the reason), and one reader thread. The thread sleeps in ``poll`` on the
socket and a stop pipe; when the socket is readable it reads up to
``request.batch`` datagrams with ``recvfrom_into`` into one buffer of
``max_size + 1`` bytes (a datagram that fills it was longer than ``max_size``:
dropped, ``rx_oversize``), copies each into a fresh ``bytearray`` (the handler
owns it) and hands the batch to ``deliver``. The bridge's ``deliver``
(:func:`opener`) takes the chain lock, calls the service's handler for each
datagram, walks what the handlers emitted, re-arms the timers, releases the
lock and then writes the frames to the ports, exactly like a forwarding thread.

:meth:`DatagramEndpoint.send` is ``sendmsg`` of the parts to ``dest`` on the
non-blocking socket, from the caller's thread (a service's ``process``, under
the chain lock): one syscall, no copy, no queue. A datagram the kernel does not
take is counted (``tx_dropped``, and by kind: ``tx_full`` for a full socket
buffer, ``tx_unreachable`` for no route, ``tx_too_big`` for EMSGSIZE,
``tx_other``) and ``False`` is returned; it never raises OSError. ``dest`` must
be an IP literal (a name would be resolved by the kernel call, blocking the chain).

:meth:`DatagramEndpoint.send_train` sends many datagrams to one destination with
UDP GSO (``UDP_SEGMENT``, Linux 4.18): a run of units of one size (the last of a
run may be shorter) goes out in one ``sendmsg`` of all their parts with a
``UDP_SEGMENT`` control message of that size, and the kernel (or the NIC) cuts it
into the datagrams, each with its own UDP header and checksum. A run holds at
most :data:`GSO_MAX_UNITS` units and :data:`GSO_MAX_BYTES` (IPv4) or
:data:`GSO_MAX_BYTES_V6` bytes. Support is probed at bind (``getsockopt``
``UDP_SEGMENT``: an older kernel would ignore the control message and send one
big datagram); when the kernel refuses a GSO send (EINVAL: a unit longer than the
path MTU allows, or checksums off; EIO: no checksum offload on the route, or
xfrm; ENOPROTOOPT, EOPNOTSUPP) the endpoint logs it once, sends that run one
``sendmsg`` per unit and never tries GSO again. Sending stops at the first
failure: the units not sent are counted as dropped of that kind, so the units
sent are always the first ``n``. ``tx`` and ``tx_bytes`` count datagrams.

Closing. :meth:`DatagramEndpoint.close` is called with the chain lock held (at
chain stop) or without it, from any thread, the reader's own included (a handler
closing its socket). It marks the endpoint closed and closes the socket under a
small lock the reader holds only while reading a batch (never while waiting for
the chain lock), wakes the reader through the pipe and joins it (bounded). The
reader waits for the chain lock in short slices, checking ``closed``, so a close
with the chain lock held never waits for it long; once it has the lock it
checks ``closed`` before each datagram, so no handler runs after close returns.
The stop pipe is closed by whichever of the two ends last, under the same small
lock, so a wake never lands on a reused descriptor.

Not done: reading the kernel's own drop count for the socket (``SO_RXQ_OVFL``,
which needs ``recvmsg`` and its ancillary data on every read).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vtl.datagram import Address, Buffer, DatagramHandler, DatagramRequest
from vtl.errors import SetupError

if TYPE_CHECKING:
    from vtl.bridge.chain import Chain

Batch = list[tuple[bytearray, Address]]
Deliver = Callable[[Batch], bool]  # False: end the reader
ErrorHandler = Callable[[float], None]  # a handler raised (the slot's failure policy)
UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size, a socket option and a cmsg
GSO_MAX_UNITS = 64  # UDP_MAX_SEGMENTS of Linux before 6.9 (later 128)
GSO_MAX_BYTES = 65535 - 20 - 8  # the UDP payload of one IPv4 datagram at most
GSO_MAX_BYTES_V6 = 65535 - 8  # IPv6: the payload length field covers the UDP header
_GSO_REFUSED = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_LOCK_SLICE = 0.02  # the reader waits for the chain lock in slices this long
_JOIN_TIMEOUT = 1.0

_TX_KIND = {
    errno.EAGAIN: "tx_full", errno.ENOBUFS: "tx_full",
    errno.ENETUNREACH: "tx_unreachable", errno.EHOSTUNREACH: "tx_unreachable",
    errno.ENETDOWN: "tx_unreachable", errno.EHOSTDOWN: "tx_unreachable",
    errno.EADDRNOTAVAIL: "tx_unreachable", errno.ECONNREFUSED: "tx_unreachable",
    errno.EMSGSIZE: "tx_too_big",
}
_BIND_HINT = {
    errno.EADDRNOTAVAIL: " (is the address on an interface of this host?)",
    errno.EADDRINUSE: " (another socket holds it: another bridge or service?)",
    errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


@dataclass(slots=True)
class DatagramCounters:
    """What one endpoint did (``counters()`` and the bridge's snapshot)."""

    rx: int = 0  # datagrams read and handed to the service
    rx_bytes: int = 0
    rx_oversize: int = 0  # longer than max_size: dropped
    rx_errors: int = 0  # errors reading the socket
    tx: int = 0  # datagrams the kernel took
    tx_bytes: int = 0
    tx_dropped: int = 0  # datagrams not sent, by kind below
    tx_full: int = 0  # socket buffer full (EAGAIN, ENOBUFS)
    tx_unreachable: int = 0  # no route, network down, address not available
    tx_too_big: int = 0  # EMSGSIZE: longer than the path allows
    tx_other: int = 0  # any other error (a closed socket included)


class DatagramEndpoint:
    """A :class:`vtl.datagram.DatagramSocket`: one bound UDP socket and its reader thread.
    ``deliver(batch)`` is called in the reader thread; :meth:`start` starts it."""

    def __init__(self, request: DatagramRequest, deliver: Deliver, log: logging.Logger):
        self.request = request
        self.log = log
        self.closed = False
        self._deliver = deliver
        self._c = DatagramCounters()
        self._tx_logged: set[str] = set()
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(request.host).version == 6 \
                else socket.AF_INET
        except ValueError:
            raise SetupError(f"cannot bind UDP {request.host!r}: not an IPv4 or IPv6 "
                             "address literal") from None
        where = _show((request.host, request.port))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            _set_buffer(sock, socket.SO_RCVBUF, 33, request.rcvbuf)  # 33: SO_RCVBUFFORCE
            _set_buffer(sock, socket.SO_SNDBUF, 32, request.sndbuf)  # 32: SO_SNDBUFFORCE
            sock.bind((request.host, request.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise SetupError(f"cannot bind UDP {where}: {reason}"
                             f"{_BIND_HINT.get(exc.errno or 0, '')}") from None
        self._sock = sock
        self._sendmsg = sock.sendmsg
        self.gso = _probe_gso(sock)  # UDP GSO for send_train (False once refused)
        self._gso_max = GSO_MAX_BYTES_V6 if family == socket.AF_INET6 else GSO_MAX_BYTES
        self._local: Address = tuple(sock.getsockname()[:2])  # type: ignore[assignment]
        self._io_lock = threading.Lock()  # the socket's and the pipe's life; held briefly
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"udp-{_show(self._local)}")
        self._started = False

    # -- the service's side (vtl.datagram.DatagramSocket) ----------------------------------

    @property
    def local(self) -> Address:
        return self._local

    def send(self, parts: Sequence[Buffer], dest: Address) -> bool:
        try:
            n = self._sendmsg(parts, (), 0, dest)
        except (OSError, OverflowError) as exc:
            self._tx_failed(exc, dest)
            return False
        c = self._c
        c.tx += 1
        c.tx_bytes += n
        return True

    def send_train(self, units: Sequence[Sequence[Buffer]], dest: Address) -> int:
        c = self._c
        sendmsg = self._sendmsg
        total = len(units)
        i = 0
        while i < total:
            parts = units[i]
            size = sum(map(len, parts))
            j = i + 1
            if self.gso:
                # the run: units of ``size`` (the last may be shorter), bounded
                room = self._gso_max - size
                end = min(total, i + GSO_MAX_UNITS)
                while j < end:
                    n = sum(map(len, units[j]))
                    if n > size or n > room or n == 0:
                        break
                    room -= n
                    j += 1
                    if n < size:
                        break
            if j - i == 1:
                try:
                    n = sendmsg(parts, (), 0, dest)
                except (OSError, OverflowError) as exc:
                    self._tx_failed(exc, dest, total - i)
                    return i
                c.tx += 1
                c.tx_bytes += n
                i = j
                continue
            flat = [p for u in units[i:j] for p in u]
            try:
                n = sendmsg(flat, [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                            0, dest)
            except (OSError, OverflowError) as exc:
                if isinstance(exc, OSError) and exc.errno in _GSO_REFUSED:
                    self.gso = False
                    self.log.info("udp %s: the kernel refused UDP GSO (%s); sending one "
                                  "datagram per syscall from now on", _show(self._local), exc)
                    continue  # the same run again, unit by unit
                self._tx_failed(exc, dest, total - i)
                return i
            c.tx += j - i
            c.tx_bytes += n
            i = j
        return total

    def counters(self) -> dict[str, int]:
        return asdict(self._c)

    def snapshot(self) -> dict[str, int]:
        """The counters, the socket buffers the kernel gave (``rcvbuf``, ``sndbuf``) and
        the datagrams it dropped because the receive buffer was full
        (``rx_kernel_drops``, from ``/proc/net/udp``; -1 when not found)."""
        out = self.counters()
        with self._io_lock:
            if self.closed:
                return out
            sock = self._sock
            out["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            out["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            inode = str(os.fstat(sock.fileno()).st_ino)
        out["rx_kernel_drops"] = _kernel_drops(sock.family, inode)
        return out

    def close(self) -> None:
        with self._io_lock:
            if self.closed:
                return
            self.closed = True
            self._sock.close()
            if self._started:
                try:
                    os.write(self._stop_w, b"x")
                except OSError:
                    pass  # full: a wake is already pending
            else:
                self._close_pipe()
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT)

    # -- the bridge's side -----------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread."""
        self._started = True
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader to end (tests); True when it has."""
        if self._started:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def __repr__(self) -> str:
        return f"<DatagramEndpoint udp {_show(self._local)}{' closed' if self.closed else ''}>"

    def _tx_failed(self, exc: BaseException, dest: Address, count: int = 1) -> None:
        """``count`` datagrams to ``dest`` were not sent because of ``exc``."""
        code = exc.errno if isinstance(exc, OSError) else None
        kind = _TX_KIND.get(code or 0, "tx_other")
        c = self._c
        c.tx_dropped += count
        setattr(c, kind, getattr(c, kind) + count)
        if kind not in self._tx_logged:  # the first of each kind; the counters say the rest
            self._tx_logged.add(kind)
            self.log.info("udp %s: a datagram to %s was not sent: %s (counted as %s)",
                          _show(self._local), dest, exc, kind)

    def _run(self) -> None:
        try:
            self._read_loop()
        except Exception:  # noqa: BLE001 - a reader must not die silently
            if not self.closed:
                self.log.exception("udp %s: the reader failed; no more datagrams are read",
                                   _show(self._local))
        finally:
            with self._io_lock:
                self._close_pipe()

    def _read_loop(self) -> None:
        req = self.request
        size_max = req.max_size
        buf = bytearray(size_max + 1)
        view = memoryview(buf)
        c = self._c
        sock = self._sock
        recv = sock.recvfrom_into
        v6 = sock.family == socket.AF_INET6
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poll = poller.poll
        io_lock = self._io_lock
        deliver = self._deliver
        rng = range(req.batch)
        while not self.closed:
            poll()
            batch: Batch = []
            with io_lock:
                if self.closed:
                    return
                for _ in rng:
                    try:
                        n, source = recv(buf)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # e.g. a queued ICMP error
                        c.rx_errors += 1
                        if c.rx_errors == 1:
                            self.log.info("udp %s: read error: %s", _show(self._local), exc)
                        break
                    if n > size_max:
                        c.rx_oversize += 1
                        continue
                    c.rx += 1
                    c.rx_bytes += n
                    host, port = source[0], source[1]
                    if v6 and "%" in host:
                        host = host.partition("%")[0]
                    batch.append((bytearray(view[:n]), (host, port)))
            if batch and not deliver(batch):
                return

    def _close_pipe(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1


def _set_buffer(sock: socket.socket, opt: int, force: int, size: int) -> None:
    """Ask for a socket buffer of ``size``: beyond the system's cap when privileged."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _probe_gso(sock: socket.socket) -> bool:
    """Whether the kernel knows ``UDP_SEGMENT`` (Linux 4.18 and later)."""
    try:
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _kernel_drops(family: int, inode: str) -> int:
    """The ``drops`` column of the socket with ``inode`` in /proc/net/udp(6); -1 if absent."""
    name = "/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp"
    try:
        with open(name) as f:
            for line in f:
                cols = line.split()
                if len(cols) > 12 and cols[9] == inode:
                    return int(cols[12])
    except (OSError, ValueError):
        pass
    return -1


def _show(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the bridge's factory --------------------------------------------------------------------

def run_locked(lock: threading.Lock, started: Callable[[], bool],
               after_external: Callable[[float], Any], send_output: Callable[[Any], None],
               closed: Callable[[], bool], work: Callable[[float], None]) -> bool:
    """Run ``work(now)`` for a reader thread of the bridge (a service's socket or link)
    as a forwarding thread runs ``process``: with the chain ``lock`` held while
    ``started()``, then ``after_external(now)`` walks what it emitted and re-arms the
    timers, and ``send_output`` writes that to the ports once the lock is released. The
    lock is waited for in short slices, so a ``closed()`` resource gives up at once
    (closed by someone holding the lock). Returns False once ``closed()``."""
    while not lock.acquire(timeout=_LOCK_SLICE):
        if closed():
            return False
    try:
        if not started():
            return not closed()
        now = time.monotonic()
        work(now)
        output = after_external(now)
    finally:
        lock.release()
    send_output(output)
    return not closed()


def batch_runner(lock: threading.Lock, started: Callable[[], bool],
                 after_external: Callable[[float], Any], send_output: Callable[[Any], None],
                 closed: Callable[[], bool], handler: Callable[..., None],
                 on_error: ErrorHandler) -> Callable[[Sequence[tuple[Any, ...]]], bool]:
    """``deliver(batch)`` for a reader thread: ``handler(*item, now)`` for each item of
    the batch through :func:`run_locked` (``on_error(now)`` when it raises; nothing more
    once ``closed()``); False once ``closed()``."""

    def deliver(batch: Sequence[tuple[Any, ...]]) -> bool:
        def work(now: float) -> None:
            for item in batch:
                if closed():
                    break
                try:
                    handler(*item, now)
                except Exception:  # noqa: BLE001 - the slot's failure policy counts it
                    on_error(now)

        return run_locked(lock, started, after_external, send_output, closed, work)

    return deliver


def opener(lock: threading.Lock, started: Callable[[], bool],
           after_external: Callable[[float], Any], send_output: Callable[[Any], None]
           ) -> Callable[[DatagramRequest, DatagramHandler, ErrorHandler, logging.Logger],
                         DatagramEndpoint]:
    """``chain.open_datagram`` for a bridge: binds an endpoint whose datagrams are handed
    to ``handler`` through :func:`batch_runner`."""

    def open_datagram(request: DatagramRequest, handler: DatagramHandler,
                      on_error: ErrorHandler, log: logging.Logger) -> DatagramEndpoint:
        endpoint = DatagramEndpoint(request, lambda batch: deliver(batch), log)
        deliver = batch_runner(lock, started, after_external, send_output,
                               lambda: endpoint.closed, handler, on_error)
        endpoint.start()
        return endpoint

    return open_datagram


def snapshot(chain: Chain) -> dict[str, dict[str, int]]:
    """The counters of every open endpoint of ``chain``'s services, keyed
    ``"SERVICE HOST:PORT"`` (chain lock held)."""
    return {f"{slot.ctx.name} {_show(r.local)}": r.snapshot()
            for slot in chain.slots for r in slot.ctx.resources
            if isinstance(r, DatagramEndpoint) and not r.closed}
