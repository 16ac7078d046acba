"""The bridge's QMP client: follows one QEMU monitor for a service (``ctx.watch_qmp``).

Theory of operation. A :class:`QmpWatcher` is a daemon thread that connects to the
unix socket QEMU serves with ``-qmp unix:PATH,server=on,wait=off`` (one client per
monitor: the bridge's own), reads the greeting ``{"QMP": {...}}``, negotiates with
``qmp_capabilities``, asks ``query-status`` and hands the service, through the
bridge's ``deliver`` callback, :class:`~vtl.hypervisor.VmEvent` s in this order:
``connected``, ``status`` (``{"running": bool, "status": str}``), then every QEMU
event as it arrives (``STOP``, ``RESUME``, ``MIGRATION``...), and ``disconnected``
once when that connection ends. Events QEMU sends while the watcher waits for
``query-status`` are kept (at most :data:`MAX_EARLY_EVENTS`) and delivered after
``status``. Then it reconnects, with a backoff from 0.2 s doubling to 2 s (the cap
bounds how late a restarted QEMU, a migration's destination, is seen), and starts
again; a new connection always begins with ``connected`` and ``status``, so a
service learns the state even of a VM resumed before the watcher got back.

``data`` is exactly the event's ``data`` object as QEMU sent it (``{}`` when absent);
QEMU's ``timestamp`` is not passed on (a service gets the bridge's ``now``, which is
the clock it reasons in). Events are delivered in the order they arrive, whatever
their names: unknown events and events out of order (a RESUME with no STOP) are
the service's to ignore.

Invariants (a hostile or broken monitor never crashes the bridge or grows memory):

- a line longer than ``max_line`` (1 MiB) drops the connection (then a reconnect);
  the read buffer never holds more than ``max_line`` + one read;
- a line that is not JSON, or JSON that is not an object, or an event that is not
  well-formed (a name that is not a short string, ``data`` not an object), is
  skipped and counted (``bad_lines``);
- a greeting that never comes (QEMU serves one client: a second one gets none), or
  a command never answered, ends the attempt after ``timeout`` (5 s);
- a ``deliver`` that raises is logged (at most once per 10 s) and counted; the
  watcher goes on;
- :meth:`QmpWatcher.close` never waits: the bridge calls it with its lock held,
  maybe while this thread waits for that lock inside ``deliver``. It marks the
  watcher closed and wakes the thread through a pipe; the thread ends by itself
  when ``deliver`` returns False (the bridge checks ``closed``) or at its next wake.

Logging: ``connected to PATH`` and ``lost PATH (why)`` at INFO; an absent monitor
(ENOENT, ECONNREFUSED) once per outage, not per attempt; protocol faults at
WARNING, each kind once until the next good connection.

Why stdlib JSON and not ``qemu.qmp`` (which works here too, REAL-VM.md): QMP is
newline-delimited JSON, and the watcher needs only the greeting, two commands and
the event stream. ``qemu.qmp`` is asyncio-based, so a thread would run an event
loop of its own, and its bounds (line size, negotiation timeout, reconnect policy)
are the library's; here every bound is ours and visible in this module, with no
new dependency for the bridge. Not done: sending commands for a service (``stop``,
``cont``), which nothing needs yet.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from vtl.hypervisor import VmEvent

MAX_LINE = 1 << 20  # bytes in one QMP message (QEMU's are far smaller)
MAX_EARLY_EVENTS = 64  # events kept while waiting for query-status's answer
MAX_EVENT_NAME = 64
_READ = 65536
_ABSENT = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EAGAIN)
_ERROR_LOG_EVERY = 10.0


@dataclass(slots=True)
class QmpCounters:
    """What the watcher did, for the bridge's report."""

    connects: int = 0  # negotiated connections (each delivered "connected")
    events: int = 0  # QEMU events delivered
    bad_lines: int = 0  # lines skipped: not JSON, not an object, a malformed event
    oversized: int = 0  # connections dropped for a line over max_line
    timeouts: int = 0  # attempts ended by a greeting or an answer that never came
    deliver_errors: int = 0  # deliver callbacks that raised


class _Lost(Exception):
    """The connection ended; ``fault`` when the monitor misbehaved (not a plain EOF)."""

    def __init__(self, reason: str, fault: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.fault = fault


class _Stop(Exception):
    """The watcher was closed, or ``deliver`` said the bridge no longer wants events."""


class QmpWatcher:
    """Follows the QMP monitor at unix socket ``path``; ``deliver(event)`` is called in
    this watcher's thread, and returns False when the watcher must end."""

    def __init__(self, path: str, deliver: Callable[[VmEvent], bool], log: logging.Logger,
                 *, timeout: float = 5.0, max_line: int = MAX_LINE,
                 backoff: tuple[float, float] = (0.2, 2.0)):
        self.path = path
        self.deliver = deliver
        self.log = log
        self.timeout = timeout
        self.max_line = max_line
        self.backoff = backoff
        self.counters = QmpCounters()
        self.closed = False
        self.connected = False
        self._ended = False
        self._fd_lock = threading.Lock()  # guards the pipe's life, held only briefly
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._started = False
        self._thread = threading.Thread(target=self._run, name=f"qmp-{os.path.basename(path)}",
                                        daemon=True)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._start = 0  # where the next line begins in _buf
        self._scan = 0  # where to look for the next newline
        self._warned: set[str] = set()
        self._last_error_log = -_ERROR_LOG_EVERY

    # -- the owner's side -------------------------------------------------------------

    def start(self) -> None:
        """Start following the monitor (a daemon thread)."""
        self._started = True
        self._thread.start()

    def close(self) -> None:
        """Stop following; returns at once (never waits for a delivery in progress)."""
        self.closed = True
        with self._fd_lock:
            if not self._started:
                self._close_pipe()
            elif self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass  # full: a wake is already pending

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (tests); True when it has."""
        if self._started:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """Counters and state for the bridge's report."""
        return {"path": self.path, "connected": self.connected, **asdict(self.counters)}

    def __repr__(self) -> str:
        return f"<QmpWatcher {self.path!r}{' closed' if self.closed else ''}>"

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        low, high = self.backoff
        delay = low
        try:
            while not self._stopping():
                if self._session():
                    delay = low
                self._wait(delay)
                delay = min(delay * 2, high)
        except _Stop:
            pass
        except Exception:  # noqa: BLE001 - a bug here must not take anything else down
            self.log.exception("QMP watcher for %s failed; no longer following it", self.path)
        finally:
            self.connected = False
            with self._fd_lock:
                self._close_pipe()

    def _stopping(self) -> bool:
        return self.closed or self._ended

    def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds unless closed meanwhile (raises _Stop then)."""
        if self._stopping():
            raise _Stop
        poller = select.poll()  # not select(): a bridge may hold over 1024 descriptors
        poller.register(self._wake_r, select.POLLIN)
        if poller.poll(int(delay * 1000)) or self._stopping():
            raise _Stop

    def _session(self) -> bool:
        """One connection, from connect to its end. True when it was a good one (the
        backoff starts again from its minimum)."""
        sock = self._connect()
        if sock is None:
            return False
        self._sock, self._buf, self._start, self._scan = sock, bytearray(), 0, 0
        announced = False
        try:
            early = self._negotiate()
            status = self._command("query-status", 2, early)
            self.connected = True
            self.counters.connects += 1
            self._warned.clear()
            self.log.info("connected to QMP monitor %s (VM %s)", self.path,
                          status.get("status"))
            announced = True
            self._deliver(VmEvent("connected"))
            self._deliver(VmEvent("status", status))
            for event in early:
                self._deliver(event)
            while True:
                event = self._event(self._message(None))
                if event is not None:
                    self._deliver(event)
        except _Lost as lost:
            self._lost(lost, announced)
            if announced:
                self._deliver(VmEvent("disconnected"))
            return announced and lost.fault is None
        finally:
            self.connected = False
            self._sock = None
            self._buf = bytearray()
            sock.close()

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)  # bounds connect() and sendall(); reads use poll
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno in _ABSENT or isinstance(exc, FileNotFoundError):
                self._warn_once("absent", logging.INFO, "no QMP monitor at %s yet (%s); "
                                "retrying every %.1f s at most", self.path,
                                exc.strerror or exc, self.backoff[1])
            else:
                self._warn_once(f"connect:{exc.errno}", logging.WARNING,
                                "cannot connect to QMP monitor %s: %s; retrying", self.path, exc)
            return None
        return sock

    def _negotiate(self) -> list[VmEvent]:
        """Greeting, then capabilities negotiation; returns events that came early."""
        deadline = time.monotonic() + self.timeout
        while "QMP" not in self._message(deadline, "greeting"):
            self.counters.bad_lines += 1  # anything before the greeting is not QMP
        early: list[VmEvent] = []
        self._command("qmp_capabilities", 1, early)
        return early

    def _command(self, name: str, ident: int, early: list[VmEvent]) -> dict[str, Any]:
        """Send ``name`` and wait (bounded) for its answer; events meanwhile go to
        ``early``. Returns what query-status needs from the answer."""
        try:
            self._sock.sendall(json.dumps({"execute": name, "id": ident}).encode() + b"\n")
        except OSError as exc:
            raise _Lost(f"sending {name} failed: {exc}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._message(deadline, f"answer to {name}")
            if "event" in msg:
                event = self._event(msg)
                if event is not None:
                    if len(early) >= MAX_EARLY_EVENTS:
                        raise _Lost(f"over {MAX_EARLY_EVENTS} events before {name} was "
                                    "answered", "flood")
                    early.append(event)
                continue
            if msg.get("id", ident) != ident or not ("return" in msg or "error" in msg):
                self.counters.bad_lines += 1
                continue
            if "error" in msg:
                raise _Lost(f"{name} refused: {str(msg['error'])[:200]}", "refused")
            ret = msg["return"]
            if name != "query-status":
                return {}
            if not isinstance(ret, dict):
                raise _Lost("query-status answered with no object", "refused")
            status = ret.get("status")
            return {"running": ret.get("running") is True,
                    "status": status if isinstance(status, str) else "unknown"}

    def _event(self, msg: dict[str, Any]) -> VmEvent | None:
        """The VmEvent of a QEMU event message, or None (counted) when it is none."""
        name, data = msg.get("event"), msg.get("data", {})
        if (not isinstance(name, str) or not 0 < len(name) <= MAX_EVENT_NAME
                or not isinstance(data, dict)):
            self.counters.bad_lines += 1
            return None
        return VmEvent(name, data)

    def _deliver(self, event: VmEvent) -> None:
        if self._stopping():
            raise _Stop
        if event.kind not in ("connected", "status", "disconnected"):
            self.counters.events += 1
        try:
            ok = self.deliver(event)
        except Exception:  # noqa: BLE001 - a service's fault is not the watcher's end
            self.counters.deliver_errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= _ERROR_LOG_EVERY:
                self._last_error_log = now
                self.log.exception("delivering QMP event %s from %s failed (%d so far)",
                                   event.kind, self.path, self.counters.deliver_errors)
            ok = True
        if ok is False:
            self._ended = True
        if self._stopping():
            raise _Stop

    # -- reading ----------------------------------------------------------------------

    def _message(self, deadline: float | None, waiting: str = "") -> dict[str, Any]:
        """The next JSON object from the monitor; bad lines are skipped and counted."""
        while True:
            line = self._line(deadline, waiting)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, bad UTF-8, nested too deep
                self.counters.bad_lines += 1
                continue
            if isinstance(msg, dict):
                return msg
            self.counters.bad_lines += 1

    def _line(self, deadline: float | None, waiting: str) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\n", self._scan)
            if end >= 0:
                if end - self._start > self.max_line:
                    break
                line = bytes(buf[self._start:end])
                self._start = self._scan = end + 1
                return line
            if len(buf) - self._start > self.max_line:
                break
            del buf[:self._start]
            self._start, self._scan = 0, len(buf)
            self._fill(deadline, waiting)
        self.counters.oversized += 1
        raise _Lost(f"a line over {self.max_line} bytes", "oversized")

    def _fill(self, deadline: float | None, waiting: str) -> None:
        """Read what the monitor sent, waiting until ``deadline`` (None: no limit)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.counters.timeouts += 1
                hint = (" (QEMU serves one client per monitor: is another one connected?)"
                        if waiting == "greeting" else "")
                raise _Lost(f"no {waiting or 'message'} in {self.timeout:g} s{hint}", "timeout")
            ready = poller.poll(None if left is None else max(1, int(left * 1000)))
            if self._stopping() or any(fd == self._wake_r for fd, _ in ready):
                raise _Stop
            if ready:
                break
        try:
            data = self._sock.recv(_READ)
        except OSError as exc:
            raise _Lost(f"read failed: {exc}") from None
        if not data:
            raise _Lost("QEMU closed it")
        self._buf += data

    # -- logging ----------------------------------------------------------------------

    def _lost(self, lost: _Lost, announced: bool) -> None:
        if announced:
            level = logging.INFO if lost.fault is None else logging.WARNING
            self.log.log(level, "lost QMP monitor %s (%s)", self.path, lost.reason)
            self._warned.discard("absent")  # the next outage is logged once again
        else:
            self._warn_once(lost.fault or "lost", logging.WARNING,
                            "QMP monitor %s: %s; retrying", self.path, lost.reason)

    def _warn_once(self, kind: str, level: int, msg: str, *args: object) -> None:
        """Log ``msg`` the first time ``kind`` happens since the last good connection."""
        if kind not in self._warned:
            self._warned.add(kind)
            self.log.log(level, msg, *args)

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1


__all__ = ["MAX_LINE", "QmpCounters", "QmpWatcher"]
