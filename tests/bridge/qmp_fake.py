"""A fake QEMU monitor for the QMP watcher's tests: a unix socket server thread that
speaks QMP as QEMU does (greeting, ``qmp_capabilities``, ``query-status``, events)
and can be told to misbehave.

Like QEMU it serves one client at a time: a second client waits in the listen
backlog and gets no greeting until the first has gone. ``send`` writes raw bytes or
a JSON object to the current client, ``event`` sends a QEMU event with a timestamp.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": ["oob"]}}


class FakeQemu:
    """A QMP monitor at ``path``. ``greet``: send the greeting; ``answer``: answer
    commands; ``status``: what query-status says; ``before_greeting``: bytes sent
    first; ``early_event``: an event sent just before query-status's answer."""

    def __init__(self, path: str, *, status: str = "running", greet: bool = True,
                 answer: bool = True, before_greeting: bytes = b"",
                 early_event: str | None = None, refuse: bool = False):
        self.path = path
        self.status = status
        self.greet = greet
        self.answer = answer
        self.before_greeting = before_greeting
        self.early_event = early_event
        self.refuse = refuse  # answer qmp_capabilities with an error
        self.accepted = 0  # clients accepted
        self.commands: list[str] = []  # commands received, in order, over all clients
        self.ready = threading.Event()  # the current client asked query-status
        self.gone = threading.Event()  # the current client went away
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self.stopped = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-qemu")
        self._thread.start()

    # -- the test's side ---------------------------------------------------------------

    def send(self, what: bytes | dict[str, Any]) -> None:
        """Write to the current client (nothing when there is none or it is gone)."""
        raw = what if isinstance(what, bytes) else json.dumps(what).encode() + b"\r\n"
        with self._send_lock:
            if self._conn is None:
                raise AssertionError("no client to send to")
            with contextlib.suppress(OSError):
                self._conn.sendall(raw)

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        msg: dict[str, Any] = {"event": name, "timestamp": {"seconds": int(now),
                                                            "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            msg["data"] = data
        self.send(msg)

    def wait_ready(self, timeout: float = 3.0) -> None:
        assert self.ready.wait(timeout), "the client did not negotiate"

    def stop(self) -> None:
        """QEMU quits: the client's connection and the socket file go away."""
        self.stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._send_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(3.0)
        assert not self._thread.is_alive(), "fake QEMU did not stop"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def drop_client(self) -> None:
        """Close the current client's connection (the monitor stays)."""
        with self._send_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)

    # -- the server thread -------------------------------------------------------------

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.ready.clear()
            self.gone.clear()
            with self._send_lock:
                self._conn = conn
            try:
                self._talk(conn)
            except OSError:
                pass
            finally:
                with self._send_lock:
                    self._conn = None
                conn.close()
                self.gone.set()

    def _talk(self, conn: socket.socket) -> None:
        if self.before_greeting:
            self.send(self.before_greeting)
        if self.greet:
            self.send(GREETING)
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._command(json.loads(line))

    def _command(self, msg: dict[str, Any]) -> None:
        name = msg["execute"]
        self.commands.append(name)
        if not self.answer:
            return
        reply: dict[str, Any] = {"return": {}}
        if name == "qmp_capabilities" and self.refuse:
            reply = {"error": {"class": "CommandNotFound", "desc": "no"}}
        elif name == "query-status":
            if self.early_event:
                self.event(self.early_event)
            reply = {"return": {"status": self.status, "singlestep": False,
                                "running": self.status == "running"}}
            self.ready.set()
        if "id" in msg:
            reply["id"] = msg["id"]
        self.send(reply)
