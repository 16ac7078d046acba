"""The bridge engine: two ports, a chain, two forwarding threads and timers.

Theory of operation. One thread per direction reads a batch from its input
port, applies the learning-switch rule, runs the chain (under one lock, since
services are not thread-safe) and writes what comes out to the ports after
releasing that lock (each port has a write lock, taken before the chain lock is
released, so frames leave in the order the chain made them while the other
direction runs its chain during the send syscalls). The
threads release the GIL in every syscall, which is where the time goes on the
fast path (FAST-PATH.md: two syscalls and two copies per frame). Timers are
run by whichever thread wakes first after the earliest ``poll_at`` of the
chain; each thread sleeps in ``poll`` until its port is readable, the next
deadline passes, or the stop pipe is written. Each direction (a lane) has a
lock so only one thread reads its input at a time; after forwarding a batch,
a thread also drains the other lane if it is free, which forwards answers that
arrived during its own send() without waiting for the other thread to wake.

Learning switch: a frame from the guest teaches its source MAC; a frame from
the uplink reaches the guest only if its destination is broadcast/multicast
or a MAC seen behind the guest port in the last ``mac_aging_s`` seconds.
Frames to other MACs (the host's own included) are left to the host. The MAC
table is a bounded :class:`~vtl.flow.FlowTable` (``max_macs``, policy
"refuse"): a guest sending from ever new source MACs cannot grow the bridge's
memory; when the table is full a new MAC is not learnt (its frame still goes
out) and ``mac_overflow`` counts it, while the MACs already learnt keep
working. The configured guest MAC never ages. Only the to-uplink thread writes
the table; the to-guest thread reads it with ``expires_at`` (atomic reads).

Offloads: when both ports carry virtio-net headers, frames cross with their
header untouched (64 KB GSO frames stay whole). A TAP offers its guest only the
offloads the other port carries (:func:`~vtl.bridge.lanes.negotiate_offloads`),
so toward a pcap uplink the guest's kernel cuts and checksums its own frames.
When only the output port has headers, oversized frames get GSO metadata and
TCP/UDP ones a partial checksum for the kernel to finish (``prepare_offloads``);
when only the input has them, a GSO frame (a service made one) is segmented and
its checksums completed in software (``complete_offloads``), correct but slow.

With an empty chain the per-frame work is a slice, a dict operation and a write
(:func:`~vtl.bridge.lanes.forward_plain`): no Frame object is built. Otherwise the frame takes over
the bytearray the port read (no copy of a 64 KB GSO frame), and toward a guest port with
virtio-net headers the in-order TCP segments of one flow that a batch produced leave as
one GSO frame (:mod:`vtl.packet.gro`).

Upstream streams: :meth:`Bridge.open` starts a
:class:`~vtl.bridge.streams.StreamManager` (its own I/O thread) before the
services start. Its handlers run under the same lock; after them the bridge
walks injected frames, flushes them to the ports and re-reads the chain's
deadline, waking the forwarding threads (the tick pipe) when it moved earlier.
At close the manager is halted before the services stop (no handler is called
after that) and stopped after, resetting whatever streams remain.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from vtl.bridge import compute, datagram, reconfig, vxlan
from vtl.bridge.chain import Chain
from vtl.bridge.config import BridgeConfig
from vtl.bridge.egress import EgressPolicy
from vtl.bridge.lanes import (
    Lane,
    admit,
    forward_plain,
    negotiate_offloads,
    pin_threads,
    precise_timers,
)
from vtl.bridge.ports import Port, make_port
from vtl.bridge.streams import StreamManager

from vtl.errors import ConfigError, SetupError, VTLError
from vtl.flow import FlowTable
from vtl.frame import NO_OFFLOAD, Frame
from vtl.hypervisor import VmEvent, VmEventHandler, Watch
from vtl.packet.gro import coalesce
from vtl.service import Direction, Service

TO_UPLINK = Direction.TO_UPLINK
TO_GUEST = Direction.TO_GUEST
_MAX_SLEEP = 0.5
# a timer's last 0.6 ms are waited for awake (select without a timeout, again and again):
# a CPU that went idle for tens of milliseconds takes up to 0.5 ms to come back (a VM's vCPU)
_SPIN = 0.0006
MAX_PINS = 64  # MAC addresses services may pin at once (ctx.pin_mac)
# to the uplink, to the guest, to the services' VXLAN links (their queued frames)
_Output = tuple[list[Frame] | None, list[Frame] | None, list[tuple[Any, list[Any]]] | None]


@dataclass(slots=True)
class BridgeCounters:
    """Frames the bridge itself decided about (ports and services count their own)."""

    not_for_guest: int = 0  # unicast from the uplink to a MAC not behind the guest port
    malformed: int = 0  # frames too short for an Ethernet header, or bad offload metadata
    segmented: int = 0  # GSO frames cut in software for a port without virtio headers
    mac_overflow: int = 0  # frames from a new guest MAC not learnt: the MAC table was full

    def as_dict(self) -> dict[str, int]:
        return {"not_for_guest": self.not_for_guest, "malformed": self.malformed,
                "segmented": self.segmented, "mac_overflow": self.mac_overflow}


class Bridge:
    """One bridge: build it from a config, :meth:`open`, :meth:`run`, :meth:`close`."""

    def __init__(self, config: BridgeConfig, log: logging.Logger | None = None,
                 chain: Chain | None = None):
        self.config = config
        self.name = config.bridge.name
        self.log = log or logging.getLogger(f"vtl.{self.name}")
        self.guest: Port = make_port("guest", config.ports.guest)
        self.uplink: Port = make_port("uplink", config.ports.uplink)
        self.chain = chain if chain is not None else Chain(config.services, self.log)
        self.counters = BridgeCounters()
        self.batch = config.bridge.batch
        self.macs: FlowTable[bytes, bool] = FlowTable(
            config.bridge.max_macs, timeout=config.bridge.mac_aging_s, evict="refuse")
        self._lock = threading.Lock()
        # one lock per output port, taken while the chain lock is held and released
        # after the writes: frames leave in the order the chain produced them, but the
        # send() syscalls run outside the chain lock (the other direction goes on)
        self._wlocks = {id(self.guest): threading.Lock(), id(self.uplink): threading.Lock()}
        self._links: list[vxlan.VxlanEndpoint] = []  # written after the chain lock, too
        self.compute = compute.ComputePool(config.bridge.compute_workers, self.log, self.name)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._tick_r, self._tick_w = os.pipe()  # "the deadline moved earlier"
        os.set_blocking(self._tick_r, False)
        os.set_blocking(self._tick_w, False)
        self.streams: StreamManager | None = None
        self.egress: EgressPolicy | None = None
        self._pins: dict[bytes, float] = {}  # MAC -> until: see _pin_mac
        self._deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._lanes: dict[Direction, Lane] = {}
        self._opened: list[Port] = []
        self._started = False
        self.error: BaseException | None = None

    # -- life cycle -----------------------------------------------------------------

    def open(self) -> None:
        """Open both ports and start every service; on failure undo what was done."""
        if self.config.bridge.cpus:
            pin_threads(self.config.bridge.cpus)  # before the threads it starts
        try:
            for port in (self.guest, self.uplink):
                port.open()
                self._opened.append(port)
            negotiate_offloads(self.guest, self.uplink, self.log)
            # what stream events produce is written after the lock is released
            self.streams = StreamManager(self._lock, self._after_external,
                                         self.log.getChild("streams"), self.name,
                                         send_output=self._send_output)
            self.egress = EgressPolicy.from_config(self.config.bridge, self.log.getChild("egress"))
            self.egress.start()  # the host's own addresses, followed while the bridge runs
            self.streams.policy = self.egress
            self.chain.streams = self.streams
            self.chain.watch_qmp = self._watch_qmp
            run = (self._lock, lambda: self._started, self._after_external, self._send_output)
            self.chain.open_datagram = datagram.opener(*run)
            self.chain.open_vxlan = vxlan.opener(*run, self._links)
            self.chain.compute = self.compute.opener(*run)
            self.chain.pin_mac = self._pin_mac
            self.streams.start()
            now = time.monotonic()
            with self._lock:
                self.chain.start(now)
                self._started = True
                self._flush()
                self._deadline = self.chain.next_deadline()
        except BaseException:
            self.close()
            raise
        guest_mac = getattr(self.guest, "guest_mac", None)
        if guest_mac:  # the VM's configured MAC is always behind the guest port
            self.macs.put(bytes(guest_mac), True, time.monotonic(), timeout=None, rank=1)

    def start(self) -> None:
        """Start the forwarding threads (the bridge must be open)."""
        empty = len(self.chain) == 0
        self._lanes = {
            TO_UPLINK: Lane(self.guest, self.uplink, TO_UPLINK, empty),
            TO_GUEST: Lane(self.uplink, self.guest, TO_GUEST, empty),
        }
        self._threads = [
            threading.Thread(target=self._pump_guarded, args=(self.guest, self.uplink, TO_UPLINK),
                             name=f"{self.name}-to-uplink", daemon=True),
            threading.Thread(target=self._pump_guarded, args=(self.uplink, self.guest, TO_GUEST),
                             name=f"{self.name}-to-guest", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def request_stop(self) -> None:
        """Ask the threads to stop (safe from a signal handler or another thread)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop is requested (or ``timeout``); True when stopping."""
        return self._stop.wait(timeout)

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        """Stop threads, stop services, close ports. Idempotent."""
        self.request_stop()
        self.join()
        streams = self.streams
        if self._started:
            with self._lock:
                if streams is not None:
                    streams.halt()
                self.chain.stop(time.monotonic())
                self._flush()
            self._started = False
        self.compute.close()  # after the services' jobs were withdrawn; ~1 s at most
        if streams is not None:
            streams.stop()
            self.streams = self.chain.streams = None
        if self.egress is not None:
            self.egress.stop()
        for port in reversed(self._opened):
            try:
                port.close()
            except Exception:  # noqa: BLE001 - keep closing the others
                self.log.exception("closing %s port failed", port.role)
        self._opened.clear()
        for fd in (self._wake_r, self._wake_w, self._tick_r, self._tick_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = self._tick_r = self._tick_w = -1

    def __enter__(self) -> Bridge:
        self.open()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forwarding -----------------------------------------------------------------

    def _pump_guarded(self, src: Port, dst: Port, direction: Direction) -> None:
        try:
            self._pump(src, dst, direction)
        except BaseException as exc:  # noqa: BLE001 - a dead thread must stop the bridge
            if not self._stop.is_set():
                self.error = exc
                msg = str(exc) if isinstance(exc, VTLError | OSError) else repr(exc)
                self.log.error("%s port failed: %s; stopping", src.role, msg,
                               exc_info=not isinstance(exc, VTLError | OSError))
                self.request_stop()

    def _sleep(self, fds: list[int]) -> None:
        """Until a port is readable, the stop or tick pipe written, or the chain's next
        deadline: ``select`` takes microseconds where ``poll`` rounds up to the next
        millisecond (a netem delay of 50 ms became 51), the thread's timer slack is
        1 us (:func:`precise_timers`), and the last ``_SPIN`` before a deadline is spent
        awake, so a timer fires within tens of microseconds (``benchmarks/netem.py``)."""
        timeout = _MAX_SLEEP
        deadline = self._deadline
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
            if timeout < _SPIN:  # the last stretch: a woken idle CPU comes back late
                timeout = 0.0
            elif timeout < _MAX_SLEEP:
                timeout -= _SPIN  # wake a little early, then the line above spins
        ready, _, _ = select.select(fds, (), (), timeout)
        if self._tick_r in ready:
            try:
                os.read(self._tick_r, 512)
            except OSError:
                pass

    def _pump(self, src: Port, dst: Port, direction: Direction) -> None:
        lane = self._lanes[direction]
        other = self._lanes[direction.reverse]
        fds = [src.fileno(), self._wake_r, self._tick_r]  # opened first: all under 1024
        precise_timers()
        stop = self._stop
        forward = self._forward
        # busy polling (see vtl.bridge.lanes): this thread only, serving both lanes
        spin = self.config.bridge.busy_poll_us / 1e6 if lane.to_uplink else 0.0
        idle_since = 0.0
        while not stop.is_set():
            with lane.lock:
                busy = forward(lane)
            if spin and not busy:
                if other.lock.acquire(blocking=False):
                    try:
                        busy = forward(other)
                    finally:
                        other.lock.release()
                now = time.monotonic()
                deadline = self._deadline
                if not busy and now - idle_since < spin and (deadline is None or deadline > now):
                    continue
            if busy:
                if spin:
                    idle_since = time.monotonic()
                # What we just sent has often been answered before send() returned (the
                # peer's stack runs in our softirq): forward the answer now rather than
                # wait for the other thread to wake up. Saves a wake-up per round trip.
                if other.lock.acquire(blocking=False):
                    try:
                        forward(other)
                    finally:
                        other.lock.release()
                continue
            deadline = self._deadline
            if deadline is not None and deadline <= time.monotonic():
                with self._lock:
                    self.chain.run_timers(time.monotonic())
                    self._flush()
                    self._deadline = self.chain.next_deadline()
                continue
            self._sleep(fds)

    def _forward(self, lane: Lane) -> bool:
        """Read one batch from the lane's input and forward it; False when nothing came."""
        batch = lane.src.recv_batch(self.batch, True)  # views: copied only if kept
        if not batch:
            return False
        now = time.monotonic()
        counters = self.counters
        good = admit(lane, batch, now, self.macs, self._pins, counters)
        if lane.mode is not None:  # an empty chain
            good = forward_plain(lane, good, self._wlocks[id(lane.dst)])
            if not good:
                return True
        vnet = lane.src.vnet
        direction = lane.direction
        with self._lock:
            process = self.chain.process
            for raw in good:
                try:
                    frame = Frame.from_wire(raw, vnet)
                except VTLError:
                    counters.malformed += 1
                    continue
                process(frame, direction, now)
            if self._deadline is not None and self._deadline <= now:
                self.chain.run_timers(now)
            output = self._take_output()
            self._deadline = self.chain.next_deadline()
        self._send_output(output)
        return True

    def _pin_mac(self, mac: bytes, until: float | None) -> None:
        """Frames for ``mac`` reach the guest until ``until`` (None: until pinned again),
        however long the guest has been silent (``ctx.pin_mac``; chain lock held). The
        map is replaced whole: the to-guest thread reads it without the lock."""
        now = time.monotonic()
        pins = {m: t for m, t in self._pins.items() if t > now}
        if len(pins) >= MAX_PINS and mac not in pins:
            raise ValueError(f"at most {MAX_PINS} pinned MAC addresses per bridge")
        pins[bytes(mac)] = float("inf") if until is None else until
        self._pins = pins

    def _watch_qmp(self, path: str, handler: VmEventHandler, log: logging.Logger) -> Watch:
        """Follow a QEMU monitor for a service (``ctx.watch_qmp``): its events are handed
        to ``handler`` under the lock, like stream events."""
        from vtl.bridge.qmp import QmpWatcher  # only bridges with a QMP-following service

        def deliver(event: VmEvent) -> bool:
            """False once the watch was closed or the bridge stopped (it then ends)."""
            with self._lock:
                if not self._started or watcher.closed:
                    return False
                now = time.monotonic()
                handler(event, now)
                self._after_stream_events(now)
                return True

        watcher = QmpWatcher(path, deliver, log.getChild("qmp"))
        watcher.start()
        return watcher

    def _after_stream_events(self, now: float) -> None:
        """After stream handlers ran (lock held): forward what they injected, re-arm."""
        self._send_output(self._after_external(now))

    def _after_external(self, now: float) -> _Output:
        """After handlers outside ``process`` ran (lock held): walk what they injected and
        re-arm the timers; returns the output for :meth:`_send_output`."""
        self.chain.after_external(now)
        output = self._take_output()
        before = self._deadline
        after = self._deadline = self.chain.next_deadline()
        if after is not None and (before is None or after < before):
            try:
                os.write(self._tick_w, b"t")
            except OSError:
                pass  # full: a tick is already pending
        return output

    def _flush(self) -> None:
        """Write what the chain produced to the ports (called with the lock held)."""
        self._send_output(self._take_output())

    def _take_output(self) -> _Output:
        """What the chain produced, with the write lock of each port it goes to held
        (called with the chain lock held; :meth:`_send_output` may run after it is
        released, and releases the write locks)."""
        chain = self.chain
        up = gu = None
        if chain.out_uplink:
            up, chain.out_uplink = chain.out_uplink, []
            self._wlocks[id(self.uplink)].acquire()
        if chain.out_guest:
            gu, chain.out_guest = chain.out_guest, []
            self._wlocks[id(self.guest)].acquire()
        links = None
        if self._links:
            links = [(link, q) for link in self._links if (q := link.take())] or None
            if any(link.closed for link in self._links):
                self._links[:] = [link for link in self._links if not link.closed]
        return up, gu, links

    def _send_output(self, output: _Output) -> None:
        up, gu, links = output
        if links is not None:
            for link, queued in links:
                link.flush(queued)
        if up is not None:
            try:
                for frame in up:
                    self._write(self.uplink, frame)
            finally:
                self._wlocks[id(self.uplink)].release()
        if gu is not None:
            try:
                if len(gu) > 1 and self.guest.vnet_tx:
                    gu = coalesce(gu)  # one write and one pass of the guest's stack per run
                for frame in gu:
                    self._write(self.guest, frame)
            finally:
                self._wlocks[id(self.guest)].release()

    def _write(self, port: Port, frame: Frame) -> None:
        try:
            if port.vnet_tx:
                head = frame.vnet_bytes()
                if head is None:
                    # from a port without virtio headers: its checksums may be unfinished
                    # (libpcap on an interface with checksum offload) and its frames
                    # oversized (GRO/TSO); let the kernel finish them
                    other = self.uplink if port is self.guest else self.guest
                    if not other.vnet or len(frame.data) > port.mtu + 18:
                        from vtl.packet.offload import prepare_offloads  # rare: kinds differ

                        prepare_offloads(frame, port.mtu, csum=not other.vnet)
                    head = frame.vnet_bytes() or NO_OFFLOAD
                port.send_parts(head, frame.data)
            elif frame.vnet is not None and not frame.vnet.is_plain:
                from vtl.packet.offload import complete_offloads  # rare: port kinds differ

                segments = complete_offloads(frame)
                if len(segments) > 1:
                    self.counters.segmented += 1
                for seg in segments:
                    port.send(seg.data)
            else:
                port.send(frame.data)
        except VTLError:
            self.counters.malformed += 1

    # -- changing a running bridge ---------------------------------------------------

    def set_options(self, service: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Retune one service's run-time options (``vtl ctl NAME set``); ConfigError, and
        nothing changed, when a key is unknown, not tunable or its value invalid."""
        return reconfig.set_options(self, service, changes)

    def reload(self, config: BridgeConfig) -> dict[str, Any]:
        """Apply ``config`` to the running bridge without closing its ports (see
        :mod:`vtl.bridge.reconfig`); ConfigError, and nothing changed, when it cannot."""
        return reconfig.reload(self, config)

    def actions(self) -> dict[str, list[str]]:
        """The actions the chain's services offer (``vtl ctl NAME ACTION``): name -> the
        services that have it."""
        out: dict[str, list[str]] = {}
        for slot in list(self.chain.slots):
            for action in type(slot.service).actions:
                out.setdefault(action, []).append(slot.ctx.name)
        return out

    def act(self, action: str, service: str | None = None) -> dict[str, Any]:
        """Carry out ``action`` in every service that has it (or in ``service``); what each
        did, by name. ConfigError when none has it, or one refused."""
        with self._lock:
            slots = [s for s in self.chain.slots if action in type(s.service).actions
                     and (service is None or s.ctx.name == service)]
            if not slots:
                raise ConfigError(f"service: no service{f' named {service!r}' if service else ''}"
                                  f" has the action {action!r}")
            now = time.monotonic()
            results = {}
            try:
                for slot in slots:
                    results[slot.ctx.name] = slot.service.act(action, now)
            except Exception as exc:  # noqa: BLE001 - the service refused: the request's error
                raise ConfigError(f"{slot.ctx.name}: {action} failed: {exc}") from None
            finally:
                self._after_stream_events(now)
        self.log.info("%s (control socket): %s", action, ", ".join(results))
        return results

    def _chain_changed(self, now: float) -> None:
        """After a retune or reload (lock held): forward what it sent, re-arm the timers,
        keep the config in step with the chain, and leave or take the empty-chain path."""
        self.chain.drain(now)
        self._flush()
        specs = tuple(s.spec for s in self.chain.slots if s.spec is not None)
        if specs != self.config.services:
            self.config = replace(self.config, services=specs)
        empty = len(self.chain) == 0
        for lane in self._lanes.values():
            lane.chain_is(empty)
        self._deadline = self.chain.next_deadline()
        try:
            os.write(self._tick_w, b"t")  # the deadline may have moved earlier
        except OSError:
            pass

    # -- reporting ------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Counters of the ports, the bridge and every service, as plain data."""
        with self._lock:
            now = time.monotonic()
            services = {
                slot.ctx.name: {**slot.counters.as_dict(), **slot.report(now)}
                for slot in self.chain.slots
            }
            streams = self.streams.snapshot() if self.streams is not None else {}
            datagrams = datagram.snapshot(self.chain)
            links = vxlan.links(self.chain)
        for key, link in links.items():  # runs nft: not under the chain lock
            datagrams[key] = {**link.counters(), **link.filter_counters()}
        return {
            "bridge": {**self.counters.as_dict(), "macs": len(self.macs)},
            "ports": {p.role: _port_counters(p) for p in (self.guest, self.uplink)},
            "services": services,
            "streams": streams,
            "datagrams": datagrams,
            "compute": self.compute.snapshot(),
            "egress": self.egress.snapshot() if self.egress is not None else {},
        }

    def connections(self, service: str | None = None) -> dict[str, list[dict[str, object]]]:
        """The connections each service that lists them (overrides
        :meth:`Service.connections`) holds, by service name; ``service`` keeps one."""
        with self._lock:
            now = time.monotonic()
            return {slot.ctx.name: slot.service.connections(now) for slot in self.chain.slots
                    if type(slot.service).connections is not Service.connections
                    and (service is None or slot.ctx.name == service)}


def _port_counters(port: Port) -> dict[str, int]:
    c = port.counters
    return {k: getattr(c, k) for k in ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes",
                                       "tx_dropped", "rx_errors")}


__all__ = ["Bridge", "BridgeCounters", "SetupError"]
