"""The guest agent: runs inside the QEMU test guest and executes the test's requests.

The guest's init (tools/guest/init) starts it with the host's ``python3`` from
the 9p root (``vm.agent=`` on the kernel command line names this file). It
talks JSON lines over the virtio-serial port named ``agent``, not over the
guest's network, so the network under test carries only the test's traffic.
Stdlib only; every request is handled in a thread of its own, so a long
``run`` does not block a ``ping``.

Requests are ``{"id": N, "op": OP, ...}``; every answer carries the same id
and ``ok``, and ``error`` when ``ok`` is false:

- ``ping``: answers ``uptime`` (seconds since boot);
- ``run``: ``argv`` (a list) or ``sh`` (a shell command), ``timeout_s`` (s,
  default 30), optional ``input`` (text): answers ``rc``, ``stdout``,
  ``stderr`` (text, undecodable bytes replaced) and ``timed_out``;
- ``spawn``: ``argv`` or ``sh``, optional ``log`` (path for stdout and
  stderr, default /dev/null): starts it in the background, answers ``pid``;
- ``poll``: ``pid``: answers ``rc`` (null while it runs);
- ``kill``: ``pid``, optional ``sig`` (default 15): signals its process group;
- ``read``: ``path``: answers ``data`` (base64);
- ``write``: ``path``, ``data`` (base64): writes the file.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

PORT_NAME = "agent"


def find_port(name: str = PORT_NAME, timeout: float = 10.0) -> str:
    """The /dev node of the virtio-serial port called ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in glob.glob("/sys/class/virtio-ports/*"):
            try:
                with open(os.path.join(d, "name")) as f:
                    if f.read().strip() == name:
                        return "/dev/" + os.path.basename(d)
            except OSError:
                continue
        time.sleep(0.1)
    raise SystemExit(f"guestagent: no virtio-serial port named {name}")


class Agent:
    """Reads requests from the port, answers them from worker threads."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except OSError:  # the host is not connected: the answer is lost
                    time.sleep(0.1)
                    return
                data = data[n:]

    def serve(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:  # the host end is not connected (yet): wait for it
                time.sleep(0.1)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    threading.Thread(target=self.handle, args=(line,), daemon=True).start()

    def handle(self, line: bytes) -> None:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            answer = getattr(self, "op_" + str(req.get("op")), None)
            if answer is None:
                raise ValueError(f"unknown op {req.get('op')!r}")
            self.send({"id": rid, "ok": True, **answer(req)})
        except Exception as exc:  # every failure goes back to the test
            self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    @staticmethod
    def _argv(req: dict[str, Any]) -> list[str]:
        if "sh" in req:
            return ["/bin/sh", "-c", req["sh"]]
        return [str(a) for a in req["argv"]]

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        with open("/proc/uptime") as f:
            return {"uptime": float(f.read().split()[0])}

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        timeout = float(req.get("timeout_s", 30))
        proc = subprocess.Popen(self._argv(req), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(req.get("input", "").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return {"rc": proc.returncode, "timed_out": timed_out,
                "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        log = open(req.get("log", "/dev/null"), "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(self._argv(req), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
        log.close()
        self.children[proc.pid] = proc
        return {"pid": proc.pid}

    def op_poll(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"rc": self.children[int(req["pid"])].poll()}

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        pid = int(req["pid"])
        try:
            os.killpg(pid, int(req.get("sig", signal.SIGTERM)))
        except ProcessLookupError:
            pass
        return {}

    def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        with open(req["path"], "rb") as f:
            return {"data": base64.b64encode(f.read()).decode()}

    def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        with open(req["path"], "wb") as f:
            f.write(base64.b64decode(req["data"]))
        return {}


def main() -> None:
    port = find_port()
    fd = os.open(port, os.O_RDWR)
    print(f"guestagent: serving on {port}", file=sys.stderr, flush=True)
    Agent(fd).serve()


if __name__ == "__main__":
    main()
