"""The bridge's VXLAN links for services (``ctx.open_vxlan``, see :mod:`vtl.vxlan`).

Theory of operation. A :class:`VxlanEndpoint` is a Linux ``vxlan`` device that
the bridge creates for the service, a filter in front of it, and a packet port
on it with the virtio-net header (:class:`~vtl.bridge.ports.packet.PacketPort`):

- **The device** ``vtlvx<VNI>`` (pyroute2): ``vxlan id VNI local LOCAL dstport
  PORT nolearning``, MTU the request's, IPv6 off on it (no link-local address,
  no router solicitations of its own), no default destination. So the device
  sends a frame only where the service bound its destination MAC
  (:meth:`VxlanEndpoint.send`: ``bridge fdb replace MAC dev vtlvx42 dst REMOTE
  self permanent``, one netlink request per new or moved MAC, at most
  ``max_macs`` of them, the least recently used unbound), and never floods.
  It learns nothing itself: the service decides. A device of that name left
  behind by a bridge that was killed is removed first.
- **The filter**: an nftables table ``inet vtl_vtlvx<VNI>`` with one input chain
  ahead of the kernel's UDP delivery, with named counters. It drops datagrams to
  ``LOCAL:PORT`` without the I flag (``bad_flags``), and datagrams of this VNI to
  ``PORT`` on *any* address of the host from an address outside the set of remotes
  (``unknown_peer``): the kernel's vxlan socket is bound to the wildcard address,
  so the device would take them from any local address. It counts datagrams to
  ``LOCAL:PORT`` of another VNI (``bad_vni``) and leaves them to the kernel, which
  drops them unless another vxlan device of the host has that VNI. The set is
  replaced in one transaction when the service's peers change. It needs the
  ``nft`` program (Debian's ``nftables``).
- **The port** reads the inner frames the kernel decapsulated, coalesced by the
  device's GRO into frames of up to 64 KB, in a reader thread of its own, and
  hands each batch to ``deliver`` (the bridge runs the handler under the chain
  lock, :func:`vtl.bridge.datagram.batch_runner`). ``send`` (a service's
  ``process``, under the chain lock) checks the frame, binds its MAC and queues it
  with its virtio-net header; the bridge takes the queue with the chain lock held
  (:meth:`VxlanEndpoint.take`, which also takes the link's write lock, so frames
  keep their order) and writes it after releasing the chain lock
  (:meth:`VxlanEndpoint.flush`), as it writes its ports: the kernel encapsulates
  each frame, segments a GSO frame and fills the checksums within that system
  call (and, over a veth, often runs the receiver too), which must not hold up
  the other direction. A frame the kernel refuses then is counted in
  ``tx_dropped``; ``send`` has already returned True for it. Without a bridge
  engine to flush it (``deferred = False``), ``send`` writes at once.

Reading the filter's counters runs ``nft``, a process: :meth:`filter_counters` is
called by the bridge's snapshot outside the chain lock, never by a service.

Closing (at chain stop, or the service's ``close``): the reader is woken
through a pipe and joined (bounded), then the port, the device (and with it
its bindings) and the filter are removed.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import select
import shutil
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from vtl.bridge.datagram import ErrorHandler, batch_runner
from vtl.bridge.ports.packet import PacketPort, PacketPortConfig

from vtl.errors import SetupError
from vtl.frame import NO_OFFLOAD, Frame
from vtl.vxlan import FrameHandler, VxlanRequest

DEVICE_PREFIX = "vtlvx"
FILTER_COUNTERS = ("unknown_peer", "bad_flags", "bad_vni")
AF_BRIDGE = 7
NTF_SELF = 0x02
NUD_PERMANENT_NOARP = 0x80 | 0x40
_JOIN_TIMEOUT = 1.0
_NFT_TIMEOUT = 5.0

Deliver = Callable[[list[Frame]], bool]  # False: end the reader


class VxlanEndpoint:
    """A :class:`vtl.vxlan.VxlanLink`: the device, its filter, a port and a reader."""

    def __init__(self, request: VxlanRequest, deliver: Deliver, log: logging.Logger,
                 deferred: bool = False):
        self.request = request
        self.deferred = deferred
        self._queue: list[tuple[bytes, bytearray]] = []
        self._wlock = threading.Lock()
        self.log = log
        self.closed = False
        self._deliver = deliver
        self.v6 = _family(request.local, "local") == 6
        for r in request.remotes:
            if (_family(r, "remote") == 6) != self.v6:
                raise SetupError(f"vxlan: remote {r} is not of the family of local "
                                 f"{request.local}")
        self._nft = shutil.which("nft")
        if self._nft is None:
            raise SetupError("vxlan: the kernel datapath needs the nft program (Debian "
                             "package nftables) to filter the tunnel's senders; install it, "
                             "or use the socket datapath")
        self.device = f"{DEVICE_PREFIX}{request.vni}"
        self.table = f"vtl_{self.device}"
        self.remotes: tuple[str, ...] = tuple(request.remotes)
        self.c: dict[str, int] = {"tx_dropped": 0, "tx_multicast": 0, "mac_updates": 0,
                                  "mac_errors": 0}
        self._macs: OrderedDict[bytes, str] = OrderedDict()  # bound MAC -> remote (LRU)
        self._ipr = IPRoute()
        self._ifindex = 0
        self.port: PacketPort | None = None
        try:
            self._create_device()
            self._nft_run(self._ruleset(create=True))
            port = PacketPort("link", PacketPortConfig(kind="packet", ifname=self.device,
                                                        promisc=False))
            port.open()
            self.port = port
        except BaseException:
            self._remove()
            raise
        self._send_parts = port.send_parts
        self._io_lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"{self.device}")
        self._started = False

    # -- the service's side (vtl.vxlan.VxlanLink) ---------------------------------------

    def send(self, frame: Frame, remote: str) -> bool:
        data = frame.data
        if len(data) < 14 or data[0] & 1:
            self.c["tx_multicast" if len(data) >= 14 else "tx_dropped"] += 1
            return False
        mac = bytes(data[0:6])
        macs = self._macs
        if macs.get(mac) == remote:
            macs.move_to_end(mac)
        elif not self._bind(mac, remote):
            self.c["tx_dropped"] += 1
            return False
        hdr = frame.vnet_bytes() or NO_OFFLOAD
        if self.deferred:
            self._queue.append((hdr, data))
            return True
        return self._send_parts(hdr, data)

    def take(self) -> list[tuple[bytes, bytearray]]:
        """The frames queued since the last call (chain lock held); when there are any,
        the write lock is taken too, and :meth:`flush` releases it."""
        if not self._queue:
            return []
        queued, self._queue = self._queue, []
        self._wlock.acquire()
        return queued

    def flush(self, queued: list[tuple[bytes, bytearray]]) -> None:
        """Write what :meth:`take` returned (chain lock released), then release the
        write lock."""
        try:
            if self.closed:  # a port closed meanwhile fails its sends: counted too
                self.c["tx_dropped"] += len(queued)
                return
            send = self._send_parts
            for hdr, data in queued:
                send(hdr, data)
        finally:
            self._wlock.release()

    def set_remotes(self, remotes: Sequence[str]) -> None:
        remotes = tuple(remotes)
        if remotes == self.remotes:
            return
        self.remotes = remotes
        try:
            self._nft_run(self._ruleset(create=False))
        except SetupError as exc:
            self.log.warning("vxlan %s: cannot update the senders' filter: %s", self.device,
                             exc)
        for mac, remote in list(self._macs.items()):
            if remote not in remotes:
                self._unbind(mac)

    def counters(self) -> dict[str, int]:
        out = dict(self.c)
        out["macs"] = len(self._macs)
        if self.port is not None:
            pc = self.port.counters
            out.update(rx=pc.rx_frames, rx_bytes=pc.rx_bytes, tx=pc.tx_frames,
                       tx_bytes=pc.tx_bytes, rx_errors=pc.rx_errors)
            out["tx_dropped"] += pc.tx_dropped
        return out

    def filter_counters(self) -> dict[str, int]:
        """The filter's drops by reason (-1 each when they cannot be read); runs ``nft``:
        never under the chain lock."""
        out = dict.fromkeys(FILTER_COUNTERS, -1)
        if self.closed or self._nft is None:
            return out
        try:
            res = subprocess.run([self._nft, "-j", "list", "counters", "table", "inet",
                                  self.table], capture_output=True, text=True,
                                 timeout=_NFT_TIMEOUT, check=False)
            for item in json.loads(res.stdout or "{}").get("nftables", []):
                counter = item.get("counter")
                if counter and counter.get("name") in out:
                    out[counter["name"]] = int(counter.get("packets", 0))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        return out

    def close(self) -> None:
        with self._io_lock:
            if self.closed:
                return
            self.closed = True
            try:
                os.write(self._stop_w, b"x")
            except OSError:
                pass
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT)
        with self._io_lock:
            self._remove()
            if not self._started or not self._thread.is_alive():
                self._close_pipe()

    # -- the bridge's side -----------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def __repr__(self) -> str:
        return f"<VxlanEndpoint {self.device}{' closed' if self.closed else ''}>"

    def _create_device(self) -> None:
        req = self.request
        kw: dict[str, Any] = {"ifname": self.device, "kind": "vxlan", "vxlan_id": req.vni,
                              "vxlan_port": req.port, "vxlan_learning": 0, "mtu": req.mtu,
                              ("vxlan_local6" if self.v6 else "vxlan_local"): req.local}
        ipr = self._ipr
        stale = ipr.link_lookup(ifname=self.device)
        if stale:
            self.log.warning("vxlan: removing %s, left behind by a bridge that did not stop",
                             self.device)
            ipr.link("del", index=stale[0])
        try:
            ipr.link("add", **kw)
        except NetlinkError as exc:
            hint = {errno.EEXIST: " (another vxlan device has this VNI and port)",
                    errno.EOPNOTSUPP: " (this kernel has no vxlan: CONFIG_VXLAN)"}
            raise SetupError(f"vxlan: cannot create {self.device}: {exc.args[1]}"
                             f"{hint.get(exc.code, '')}") from None
        self._ifindex = ipr.link_lookup(ifname=self.device)[0]
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.device}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass  # no IPv6 in this kernel: nothing to turn off
        try:
            ipr.link("set", index=self._ifindex, state="up")
        except NetlinkError as exc:
            hint = " (is UDP port taken by another socket?)" if exc.code == errno.EADDRINUSE \
                else ""
            raise SetupError(f"vxlan: cannot bring {self.device} up on "
                             f"{req.local}:{req.port}: {exc.args[1]}{hint}") from None

    def _ruleset(self, *, create: bool) -> str:
        req = self.request
        ip, kind = ("ip6", "ipv6_addr") if self.v6 else ("ip", "ipv4_addr")
        elements = f" elements = {{ {', '.join(self.remotes)} }};" if self.remotes else ""
        if not create:
            return (f"flush set inet {self.table} peers\n" +
                    (f"add element inet {self.table} peers {{ {', '.join(self.remotes)} }}\n"
                     if self.remotes else ""))
        here = f"{ip} daddr {req.local} udp dport {req.port}"
        ours = f"udp dport {req.port} @th,96,24 == {req.vni}"
        # "table; delete table; table {...}": one transaction that also replaces a table
        # a killed bridge left behind
        return f"""table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
  counter unknown_peer {{}}
  counter bad_flags {{}}
  counter bad_vni {{}}
  set peers {{ type {kind};{elements} }}
  chain input {{
    type filter hook input priority -150; policy accept;
    {here} @th,64,8 & 0x08 != 0x08 counter name "bad_flags" drop
    {ours} {ip} saddr != @peers counter name "unknown_peer" drop
    {here} @th,96,24 != {req.vni} counter name "bad_vni"
  }}
}}
"""

    def _nft_run(self, script: str) -> None:
        assert self._nft is not None
        try:
            res = subprocess.run([self._nft, "-f", "-"], input=script, capture_output=True,
                                 text=True, timeout=_NFT_TIMEOUT, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SetupError(f"vxlan: nft failed: {exc}") from None
        if res.returncode != 0:
            raise SetupError(f"vxlan: nft refused the filter for {self.device}: "
                             f"{res.stderr.strip()[:300]}")

    def _bind(self, mac: bytes, remote: str) -> bool:
        """``mac`` is behind ``remote`` from now on (the device's forwarding table)."""
        try:
            self._ipr.fdb("replace", ifindex=self._ifindex, family=AF_BRIDGE, flags=NTF_SELF,
                          state=NUD_PERMANENT_NOARP, lladdr=_mac(mac), dst=remote)
        except (NetlinkError, OSError) as exc:
            self.c["mac_errors"] += 1
            if self.c["mac_errors"] == 1:
                self.log.warning("vxlan %s: cannot bind %s to %s: %s", self.device, _mac(mac),
                                 remote, exc)
            return False
        self.c["mac_updates"] += 1
        self._macs[mac] = remote
        self._macs.move_to_end(mac)
        while len(self._macs) > self.request.max_macs:
            self._unbind(next(iter(self._macs)))
        return True

    def _unbind(self, mac: bytes) -> None:
        remote = self._macs.pop(mac)
        try:
            self._ipr.fdb("del", ifindex=self._ifindex, family=AF_BRIDGE, flags=NTF_SELF,
                          lladdr=_mac(mac), dst=remote)
        except (NetlinkError, OSError):
            self.c["mac_errors"] += 1

    def _remove(self) -> None:
        """Remove the port, the device and the filter (whatever of them exists)."""
        if self.port is not None:
            self.port.close()
        try:
            if self._ifindex or self._ipr.link_lookup(ifname=self.device):
                self._ipr.link("del", ifname=self.device)
        except (NetlinkError, OSError):
            pass
        finally:
            self._ifindex = 0
            self._macs.clear()
        if self._nft is not None:
            subprocess.run([self._nft, "delete", "table", "inet", self.table],
                           capture_output=True, timeout=_NFT_TIMEOUT, check=False)
        self._ipr.close()

    def _run(self) -> None:
        try:
            self._read_loop()
        except Exception:  # noqa: BLE001 - a reader must not die silently
            if not self.closed:
                self.log.exception("vxlan %s: the reader failed; no more frames are read",
                                   self.device)
        finally:
            with self._io_lock:
                if self.closed:
                    self._close_pipe()

    def _read_loop(self) -> None:
        port = self.port
        assert port is not None
        poller = select.poll()
        poller.register(port.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        batch, deliver = self.request.batch, self._deliver
        while not self.closed:
            poller.poll()
            with self._io_lock:
                if self.closed:
                    return
                raws = port.recv_batch(batch)
            if raws and not deliver([Frame.from_wire(r, True) for r in raws]):
                return

    def _close_pipe(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1


def _family(addr: str, what: str) -> int:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        raise SetupError(f"vxlan: {what} {addr!r} is not an IPv4 or IPv6 address") from None


def _mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# -- the bridge's factory --------------------------------------------------------------------

def opener(lock: threading.Lock, started: Callable[[], bool],
           after_external: Callable[[float], Any], send_output: Callable[[Any], None],
           registry: list[VxlanEndpoint]
           ) -> Callable[[VxlanRequest, FrameHandler, ErrorHandler, logging.Logger],
                         VxlanEndpoint]:
    """``chain.open_vxlan`` for a bridge: creates a link whose frames are handed to
    ``handler`` through :func:`~vtl.bridge.datagram.batch_runner`."""

    def open_vxlan(request: VxlanRequest, handler: FrameHandler, on_error: ErrorHandler,
                   log: logging.Logger) -> VxlanEndpoint:
        link = VxlanEndpoint(request, lambda frames: deliver([(f,) for f in frames]), log,
                             deferred=True)
        registry.append(link)  # the bridge takes and flushes its queue (chain lock held)
        deliver = batch_runner(lock, started, after_external, send_output,
                               lambda: link.closed, handler, on_error)
        link.start()
        return link

    return open_vxlan


def links(chain: Any) -> dict[str, VxlanEndpoint]:
    """The open links of ``chain``'s services, keyed ``"SERVICE DEVICE"`` (chain lock
    held; their :meth:`~VxlanEndpoint.filter_counters` are read after it is released)."""
    return {f"{slot.ctx.name} {r.device}": r for slot in chain.slots
            for r in slot.ctx.resources if isinstance(r, VxlanEndpoint) and not r.closed}
