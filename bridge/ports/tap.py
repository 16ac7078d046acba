"""TAP port: VTL creates and owns the VM's TAP device, as a hypervisor does.

Theory of operation
-------------------
``open`` opens ``/dev/net/tun`` non-blocking and creates (or attaches to) the
TAP with ``TUNSETIFF``. With ``vnet_hdr`` (the default) it asks for
``IFF_VNET_HDR``, sets ``TUNSETVNETHDRSZ`` to 10 and ``TUNSETOFFLOAD`` to
what :attr:`TapPort.offered` says, at most ``TUN_F_CSUM | TUN_F_TSO4 |
TUN_F_TSO6 | TUN_F_TSO_ECN``: the kernel side then behaves like a virtio-net
NIC with TSO, and the guest hands us whole 64 KB TCP frames with partial
checksums instead of 1,500-byte segments. That is what lifts guest-to-network
throughput from ~2 to ~10 Gbit/s (``FAST-PATH.md``). The bridge narrows the
offer to what the other port can carry (:meth:`TapPort.offer`, the engine's
offload negotiation): toward a pcap uplink the guest's own kernel segments and
checksums, rather than Python.
The ioctls are hand-written: python-pytun exists but does not set the
virtio-net header size or the offloads.

After creation the kernel-side MAC and MTU are set, and the device is either
brought up in the host namespace or, with ``netns``, moved into that existing
named namespace (``ip link set dev X netns NS``) and brought up there
(``ip -n NS link set X up``), the way a VM's NIC appears inside the VM. The fd
stays ours wherever the device lives.

Each ``os.read`` returns one frame, prefixed with the 10-byte virtio-net header
when ``vnet`` is true; each ``os.write`` injects one frame toward the guest in
the same layout. Closing the fd removes the device (wherever it lives) unless
it was made persistent with ``TUNSETPERSIST``.

Pitfalls
--------
- Read buffers must hold 65,536 + 24 bytes plus the 10-byte header, or GSO
  frames are truncated. The TAP's MTU stays 1,500 even so.
- Frames flagged ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` carry a partial checksum that
  the kernel completes; whoever edits them must keep the header consistent.
- ``TUNSETIFF`` on a name that exists as a non-TAP device fails with EINVAL;
  on a TAP another process holds, EBUSY. Both are reported in plain words.
- A persistent TAP left in a namespace is not visible from the host namespace:
  opening the same name again from the host creates a second device, which
  cannot then be moved into that namespace (the name is taken there).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vtl.errors import SetupError

from .base import OFF_ALL, READ_BUF_SIZE, IfName, Port, check_ifname, interface_mac_mtu

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

VNET_HDR_SIZE = 10
NETNS_DIR = "/run/netns"
# entering a named namespace (`ip -n`, setns(2)) needs CAP_SYS_ADMIN besides CAP_NET_ADMIN
NETNS_CAPS = "CAP_NET_ADMIN and CAP_SYS_ADMIN (setns, to enter the network namespace)"
_FATAL_RX = frozenset({errno.EBADF, errno.EBADFD, errno.ENODEV, errno.ENXIO})


class TapPortConfig(BaseModel):
    """A TAP device that VTL creates and owns (the VM's NIC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tap"] = Field(description="Port kind: a TAP device owned by VTL.")
    ifname: IfName = Field(description="Name of the TAP device to create (at most 15 bytes).")
    netns: str | None = Field(
        default=None,
        description="Existing named network namespace (`ip netns`) to move the kernel side "
        "into and bring it up there, as a hypervisor does with a VM's NIC.",
    )
    persist: bool = Field(
        default=False, description="Keep the TAP device after VTL closes it (TUNSETPERSIST)."
    )
    vnet_hdr: bool = Field(
        default=True,
        description="Exchange frames with the 10-byte virtio-net header and enable checksum "
        "and TSO offloads (much faster; the uplink should use it too).",
    )
    mtu: int = Field(default=1500, ge=68, le=65535, description="MTU of the TAP device.")
    mac: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$",
        description="MAC address of the kernel side (the VM's MAC), e.g. 52:54:00:12:34:56.",
    )
    rx_cpus: tuple[int, ...] = Field(
        default=(),
        description="CPUs that process the frames VTL writes toward the guest (receive "
        "packet steering on the TAP's queue, rps_cpus), e.g. [1]. A guest in a network "
        "namespace otherwise runs its TCP/IP stack inside the bridge's own write; steered "
        "to CPUs the bridge does not run on (`[bridge] cpus`), it runs beside the bridge. "
        "Empty: no steering (the kernel's default).",
    )

    @field_validator("rx_cpus")
    @classmethod
    def _valid_rx_cpus(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        n = os.cpu_count() or 1
        bad = sorted(c for c in set(v) if not 0 <= c < n)
        if bad:
            raise ValueError(f"CPU {', '.join(map(str, bad))} does not exist "
                             f"(this machine has CPUs 0-{n - 1})")
        return tuple(sorted(set(v)))

    @field_validator("netns")
    @classmethod
    def _valid_netns(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in (".", "..")):
            raise ValueError(f"network namespace name {v!r} is not valid")
        return v


class TapPort(Port):
    """A TAP device created by VTL. ``mac`` is None: every frame belongs to the guest.

    ``guest_mac`` (bytes or None) is the MAC of the guest behind the TAP when it is
    known: the configured ``mac``, or, when the kernel side lives in ``netns`` (so the
    TAP *is* the guest's NIC), the address the kernel gave it.
    """

    def __init__(self, role: str, cfg: TapPortConfig):
        super().__init__(role, cfg.ifname, vnet=cfg.vnet_hdr, mtu=cfg.mtu)
        self.cfg = cfg
        self.guest_mac: bytes | None = bytes.fromhex(cfg.mac.replace(":", "")) if cfg.mac else None
        self._fd: int | None = None
        self._buf = bytearray(READ_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._hdr = VNET_HDR_SIZE if cfg.vnet_hdr else 0
        #: the offloads offered to the guest (TUNSETOFFLOAD): what it may hand us; the
        #: bridge narrows them to what the other port carries (:meth:`offer`)
        self.offered = OFF_ALL if cfg.vnet_hdr else 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def offer(self, offloads: int) -> None:
        """Offer the guest these offloads (``OFF_*``): without TSO its kernel cuts its
        own segments, without csum it completes its own checksums. Frames toward the
        guest may still be GSO frames. Takes effect at once when open."""
        offloads = offloads if self.cfg.vnet_hdr else 0
        if self._fd is not None:
            try:
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, offloads)
            except OSError as exc:
                raise SetupError(
                    f"cannot set the offloads of TAP device {self.cfg.ifname!r}: {exc.strerror}"
                ) from None
        self.offered = offloads

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"port {self.ifname!r} is not open")
        return self._fd

    # ------------------------------------------------------------------ set-up

    def open(self) -> None:
        if self._fd is not None:
            return
        cfg = self.cfg
        what = f"create TAP device {cfg.ifname!r}"
        check_ifname(cfg.ifname, what)
        if cfg.netns is not None and not os.path.exists(os.path.join(NETNS_DIR, cfg.netns)):
            raise SetupError(
                f"cannot {what}: network namespace {cfg.netns!r} does not exist; "
                f"create it with `ip netns add {cfg.netns}`"
            )
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SetupError(
                f"cannot {what}: /dev/net/tun is missing; load the tun module (`modprobe tun`)"
            ) from None
        except PermissionError:
            raise SetupError(
                f"cannot {what}: operation not permitted; run as root or grant CAP_NET_ADMIN"
            ) from None
        self._fd = fd
        try:
            self._setup(fd, what)
        except BaseException:
            self.close()
            raise

    def _setup(self, fd: int, what: str) -> None:
        cfg = self.cfg
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if cfg.vnet_hdr else 0)
        ifr = struct.pack("16sH22x", cfg.ifname.encode(), flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            raise SetupError(f"cannot {what}: {_tunsetiff_reason(exc, cfg.ifname)}") from None
        try:
            if cfg.vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, self.offered)
        except OSError as exc:
            raise SetupError(
                f"cannot configure TAP device {cfg.ifname!r}: {exc.strerror}"
            ) from None

        link = ["link", "set", "dev", cfg.ifname, "mtu", str(cfg.mtu)]
        if cfg.mac:
            link += ["address", cfg.mac]
        _ip(link, f"set MTU/MAC of TAP device {cfg.ifname!r}")
        if cfg.rx_cpus:  # before the move: sysfs shows the device here, and the map moves with it
            _steer(cfg.ifname, cfg.rx_cpus)
        if self.guest_mac is None and cfg.netns is not None:
            try:
                self.guest_mac = interface_mac_mtu(cfg.ifname)[0]
            except OSError:
                pass
        if cfg.netns is None:
            _ip(["link", "set", "dev", cfg.ifname, "up"], f"bring up TAP device {cfg.ifname!r}")
        else:
            _ip(
                ["link", "set", "dev", cfg.ifname, "netns", cfg.netns],
                f"move TAP device {cfg.ifname!r} into network namespace {cfg.netns!r}",
                exists=f"an interface named {cfg.ifname!r} already exists in network namespace "
                f"{cfg.netns!r} (another bridge, or a persistent TAP left there); remove it with "
                f"`ip -n {cfg.netns} link del {cfg.ifname}` or choose another name",
                caps=NETNS_CAPS,
            )
            _ip(
                ["-n", cfg.netns, "link", "set", "dev", cfg.ifname, "up"],
                f"bring up TAP device {cfg.ifname!r} in network namespace {cfg.netns!r}",
                caps=NETNS_CAPS,
            )
        # Last, so that a failed set-up never leaves a persistent half-made device behind.
        try:
            fcntl.ioctl(fd, TUNSETPERSIST, 1 if cfg.persist else 0)
        except OSError as exc:
            raise SetupError(
                f"cannot make TAP device {cfg.ifname!r} persistent: {exc.strerror}"
            ) from None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # removes the device unless TUNSETPERSIST was set

    # ------------------------------------------------------------------ fast path

    def recv_batch(self, max_frames: int = 64, views: bool = False
                   ) -> list[bytes | bytearray | memoryview]:
        fd = self._fd
        if fd is None:
            return []
        out: list[bytes | bytearray | memoryview] = []
        buf, view, hdr, c = self._buf, self._view, self._hdr, self.counters
        readv = os.readv
        slot = None
        while len(out) < max_frames:
            if views:
                slot = self._slot(len(out))
            try:
                n = readv(fd, (slot or buf,))
            except BlockingIOError:
                break
            except OSError as exc:
                c.rx_errors += 1
                if exc.errno in _FATAL_RX:
                    raise SetupError(
                        f"TAP device {self.ifname!r} went away: {exc.strerror}"
                    ) from None
                break
            if n <= hdr:
                c.rx_errors += 1
                continue
            if slot is None:
                out.append(bytearray(view[:n]))  # the frame takes it over: no 2nd copy
            else:
                out.append(memoryview(slot)[:n])  # valid until the next call
            c.rx_bytes += n - hdr
        c.rx_frames += len(out)
        return out

    def send(self, raw: bytes | bytearray | memoryview) -> bool:
        fd = self._fd
        c = self.counters
        if fd is None:
            c.tx_dropped += 1
            return False
        try:
            os.write(fd, raw)
        except OSError:
            # EAGAIN/ENOBUFS/EMSGSIZE are the usual (TX_DROP_ERRNOS); EIO (link down) and
            # EINVAL (bad virtio header) are per-frame too. Never raise on the fast path.
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(raw) - self._hdr
        return True


    def send_parts(self, head: bytes, body: bytes | bytearray) -> bool:
        """One frame written from two buffers (writev: the body is not copied here)."""
        fd = self._fd
        c = self.counters
        if fd is None:
            c.tx_dropped += 1
            return False
        try:
            os.writev(fd, (head, body))
        except OSError:
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(head) + len(body) - self._hdr
        return True


def _tunsetiff_reason(exc: OSError, ifname: str) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "operation not permitted; run as root or grant CAP_NET_ADMIN"
    if exc.errno == errno.EBUSY:
        return (
            f"device {ifname!r} is busy: another process already has it open; stop that "
            "process or choose another name"
        )
    if exc.errno == errno.EINVAL:
        return (
            f"an interface named {ifname!r} already exists and is not a TAP device with these "
            "flags; delete it (`ip link del " + ifname + "`) or choose another name"
        )
    return exc.strerror or str(exc)


def cpu_mask(cpus: tuple[int, ...]) -> str:
    """The kernel's CPU-mask text for ``cpus``: hex, in comma-separated 32-bit groups."""
    digits = f"{sum(1 << c for c in cpus):x}"
    digits = "0" * (-len(digits) % 8) + digits
    return ",".join(digits[i:i + 8] for i in range(0, len(digits), 8))


def _steer(ifname: str, cpus: tuple[int, ...]) -> None:
    """Receive packet steering of the TAP's one queue to ``cpus`` (frames VTL writes are
    the kernel side's receive: with RPS they are queued to those CPUs' backlogs, and the
    write returns without running the guest's stack)."""
    path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"
    try:
        with open(path, "w") as f:
            f.write(cpu_mask(cpus))
    except OSError as exc:
        reason = ("the kernel has no receive packet steering (CONFIG_RPS)"
                  if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc))
        raise SetupError(f"cannot steer the receive processing of TAP device {ifname!r} to "
                         f"CPUs {', '.join(map(str, cpus))} (rx_cpus): {reason}") from None


def _ip(args: list[str], what: str, exists: str | None = None,
        caps: str = "CAP_NET_ADMIN") -> None:
    """Run one iproute2 command; a failure becomes a SetupError naming what failed (and,
    when it was not permitted, the capabilities ``caps`` it needs)."""
    try:
        res = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError:
        raise SetupError(f"cannot {what}: the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"cannot {what}: `ip {' '.join(args)}` did not finish in 10 s") from None
    if res.returncode != 0:
        msg = res.stderr.strip() or f"exit status {res.returncode}"
        low = msg.lower()
        if "operation not permitted" in low or "permission denied" in low:
            msg = f"operation not permitted; run as root or grant {caps}"
        elif "exists" in low:
            msg = exists or f"an interface with that name already exists ({msg})"
        raise SetupError(f"cannot {what}: {msg}")
