"""The egress policy: destinations a guest may not reach through the bridge's streams.

Theory of operation. Every upstream stream a service opens on the guest's
behalf passes :meth:`EgressPolicy.__call__` in ``StreamManager.open``, before
any socket exists (the manager's ``policy`` hook). The policy finds the
destination the *guest* chose, asks a :class:`vtl.addrclass.AddressPolicy`
(default classes, the host's own addresses, ``[bridge] deny``/``allow``), and
on a refusal returns ``("prohibited", why)``: the stream closes with that
reason and :class:`vtl.models.relay.Relay` answers the guest's SYN with ICMP
administratively prohibited.

Which destination the guest chose, by stream kind:

- ``tcp``: ``request.host``:``request.port`` (pep: the SYN's destination);
- ``socks5`` with ``command = "connect"``: ``request.host``:``request.port``
  (the CONNECT target, not the operator's proxy); ``resolve``/``resolve_ptr``
  open no connection to it and ``probe`` (socks' check of its proxy at start)
  talks only to the operator's proxy: neither is judged;
- ``udt`` and any other kind: the peer is the operator's; only the guest's
  original connection, ``request.flow.key`` (destination and port), when set.

A literal host is judged as an address (also in ``inet_aton``'s legacy forms,
``127.1``); a name only when it is ``localhost`` or under it. Port 0 is
refused too. What a name resolves to is not judged here: a SOCKS proxy must
refuse private destinations itself.

The host's own addresses come from the kernel (pyroute2, in the network
namespace the bridge runs in): every address of every interface plus the
local routing table's ``local``, ``broadcast`` and ``anycast`` routes (which
also covers "AnyIP" prefixes routed to the host). They are kept current by a
netlink subscription (address and route groups) on a thread of its own, not
by a periodic refresh: a new address is refused from the moment the kernel
announces it, with no window in which a guest could reach it, and an idle
host costs nothing. The thread sleeps in ``poll`` on the netlink socket and
an eventfd; a batch of notifications (or an overrun, ENOBUFS) leads to one
fresh dump, so a lost message cannot leave the set stale. Route messages
outside the local table are skipped by reading two header bytes, so a busy
routing table does not make the thread dump. :meth:`EgressPolicy.stop` wakes
and joins it (the bridge calls it at close).

The set in use is one immutable ``AddressPolicy``, swapped whole: readers
(the stream layer, under the bridge's lock) never see a half-built table.

Refusals are counted (:meth:`EgressPolicy.snapshot`: total and per class) and
logged at most once per class of destination (loopback, link-local, own
address, an operator's prefix...) per :data:`LOG_EVERY_S` seconds, with the
number of refusals like it since the last line: a guest opening to thousands
of distinct addresses cannot fill a disk.
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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from vtl.addrclass import AddressPolicy, Prefix, literal
from vtl.errors import SetupError
from vtl.stream import CloseReason, StreamRequest

if TYPE_CHECKING:
    from vtl.bridge.transports import Transport

LOG_EVERY_S = 10.0
LOG_MEMORY = 256  # classes of destination remembered for rate-limited logging

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x40, 0x400
GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 20, 21, 24, 25
RT_TABLE_LOCAL = 255
RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST = 2, 3, 4
_HOST_ROUTES = frozenset({RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST})
_NLMSG = struct.Struct("=IHHII")


def destination(request: StreamRequest) -> tuple[str, int] | None:
    """The (host, port) the guest chose for this stream, or None when the guest chose
    nothing the bridge connects to (a resolve, an operator's peer without a flow)."""
    if request.kind == "tcp":
        return request.host, request.port
    if request.kind == "socks5":
        if request.options.get("command", "connect") != "connect":
            return None
        return request.host, request.port
    flow = request.flow
    if flow is not None:
        return str(ipaddress.ip_address(flow.key.dst)), flow.key.dport
    return None


def relevant(datagram: bytes) -> bool:
    """Does this netlink datagram (one or more messages) change the host's own
    addresses? Address messages do; route messages only in the local table or of
    type local, broadcast or anycast."""
    off = 0
    while off + _NLMSG.size <= len(datagram):
        length, mtype = _NLMSG.unpack_from(datagram, off)[:2]
        if length < _NLMSG.size:
            return True  # malformed: be safe, dump
        if mtype in (RTM_NEWADDR, RTM_DELADDR):
            return True
        if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
            body = off + _NLMSG.size
            if body + 8 > len(datagram):
                return True
            table, rtype = datagram[body + 4], datagram[body + 7]
            if table == RT_TABLE_LOCAL or rtype in _HOST_ROUTES:
                return True
        off += (length + 3) & ~3
    return False


def kernel_addresses() -> list[Prefix]:
    """The host's own addresses and local-table prefixes, from the kernel (pyroute2)."""
    from pyroute2 import IPRoute  # import here: only a running bridge needs it

    out: list[Prefix] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append(ipaddress.ip_network(addr.split("%")[0]))
        for msg in ipr.get_routes(table=RT_TABLE_LOCAL):
            dst = msg.get_attr("RTA_DST")
            if msg["type"] in _HOST_ROUTES and dst:
                out.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
    return out


class EgressPolicy:
    """The stream layer's ``policy``: ``policy(request, transport)`` returns None or
    ``("prohibited", why)``. :meth:`start` reads the host's addresses and starts
    watching them; :meth:`stop` ends the watch.

    ``read_own`` (default :func:`kernel_addresses`) and ``watch`` are for tests.
    """

    def __init__(self, deny: Iterable[Prefix | str] = (), allow: Iterable[Prefix | str] = (),
                 log: logging.Logger | None = None, *,
                 read_own: Callable[[], Iterable[Prefix]] = kernel_addresses,
                 watch: bool = True, clock: Callable[[], float] = time.monotonic):
        self.addresses = AddressPolicy(deny, allow)
        self.log = log or logging.getLogger("vtl.egress")
        self._read_own = read_own
        self._watch = watch
        self._clock = clock
        self.refused = 0
        self.by_class: dict[str, int] = {}
        self.refreshes = 0
        self._logged: dict[str, tuple[float, int]] = {}
        self._thread: threading.Thread | None = None
        self._swap = threading.Lock()  # one writer at a time (watch thread, reload)
        self._nl: socket.socket | None = None
        self._wake_fd = -1

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to address changes, then read the current addresses (in that order,
        so no change falls between). SetupError when the kernel cannot be asked."""
        if self._watch:
            try:
                nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
                nl.bind((0, GROUPS))
            except OSError as exc:
                raise SetupError(f"cannot watch the host's addresses (netlink): {exc}") from None
            self._nl = nl
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.refresh()
        except Exception as exc:
            self.stop()
            raise SetupError(f"cannot read the host's addresses: {exc}") from None
        if self._watch:
            self._thread = threading.Thread(target=self._run, name="egress-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent); the last known addresses stay in force."""
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def refresh(self) -> None:
        """Read the host's own addresses now and put them in force."""
        own = list(self._read_own())
        with self._swap:
            self.addresses = self.addresses.with_own(own)
        self.refreshes += 1

    def set_prefixes(self, deny: Iterable[Prefix | str], allow: Iterable[Prefix | str]) -> None:
        """Put new ``[bridge] deny``/``allow`` lists in force (a reload), keeping the
        host's own addresses."""
        with self._swap:
            self.addresses = AddressPolicy(deny, allow).with_own(self.addresses.own)
        self.log.warning("egress policy: deny %s, allow %s (reload)",
                         [str(p) for p in deny] or "none", [str(p) for p in allow] or "none")

    def _run(self) -> None:
        assert self._nl is not None
        nl, wake = self._nl, self._wake_fd
        poller = select.poll()
        poller.register(nl.fileno(), select.POLLIN)
        poller.register(wake, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if wake in ready:
                    return
                if self._drain(nl):
                    self.refresh()
        except Exception:  # noqa: BLE001 - say so: the set no longer follows the kernel
            self.log.critical("watching the host's addresses failed; the last known %d "
                              "stay refused", len(self.addresses.own), exc_info=True)

    @staticmethod
    def _drain(nl: socket.socket) -> bool:
        """Read every pending notification; True when one changes the own addresses."""
        changed = False
        while True:
            try:
                data = nl.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overrun: messages lost, dump afresh
                    changed = True
                    continue
                raise
            changed = changed or relevant(data)

    # -- the hook ------------------------------------------------------------------------

    def __call__(self, request: StreamRequest,
                 transport: Transport | None = None) -> tuple[CloseReason, str] | None:
        dest = destination(request)
        if dest is None:
            return None
        host, port = dest
        why = self.addresses.refusal(host, port)
        if why is None:
            return None
        self.refused += 1
        key = why.split(" ", 1)[0] if why.startswith("bridge.") else why
        self.by_class[key] = self.by_class.get(key, 0) + 1
        shown = literal(host) or host
        self._log_refusal(str(shown), request, port, why)
        return "prohibited", f"egress policy: {request.kind} stream to {shown}:{port} " \
                             f"refused ({why})"

    def _log_refusal(self, host: str, request: StreamRequest, port: int, why: str) -> None:
        # one line per class of destination (loopback, link-local, own address, an
        # operator's prefix...) every LOG_EVERY_S: a guest opening to a thousand distinct
        # addresses is counted, and logged a few lines at a time
        now = self._clock()
        last = self._logged.get(why)
        if last is not None and now - last[0] < LOG_EVERY_S:
            self._logged[why] = (last[0], last[1] + 1)
            return
        if last is None and len(self._logged) >= LOG_MEMORY:
            self._logged = {w: v for w, v in self._logged.items() if now - v[0] < LOG_EVERY_S}
            if len(self._logged) >= LOG_MEMORY:
                return
        since = f" ({last[1]} more like it since the last line)" if last is not None and last[1] \
            else ""
        self.log.warning("refused a %s stream to %s port %d: %s%s", request.kind, host,
                         port, why, since)
        self._logged[why] = (now, 0)

    def snapshot(self) -> dict[str, Any]:
        return {"refused": self.refused, "refused_by_class": dict(self.by_class),
                "own_prefixes": len(self.addresses.own), "refreshes": self.refreshes}

    @classmethod
    def from_config(cls, bridge: Any, log: logging.Logger | None = None) -> EgressPolicy:
        """From a validated ``[bridge]`` section (its ``deny`` and ``allow``)."""
        return cls(bridge.deny, bridge.allow, log)


__all__ = ["EgressPolicy", "destination", "kernel_addresses", "relevant"]
