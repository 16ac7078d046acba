"""The control socket of a running bridge: a unix socket that answers JSON lines.

Theory of operation. :class:`ControlServer` binds a unix stream socket
(``[bridge] control``, by default ``/run/vtl/NAME.sock``) before the bridge
forwards and serves it from one thread with :mod:`selectors`. Each client sends
requests, one JSON object per line, and gets one JSON line back per request, in
order (the protocol is in ``docs/control.md``)::

    {"v": 1, "cmd": "status", "args": {}}
    {"v": 1, "ok": true, "result": {...}}

Safety. The socket is created mode 0600 (0660 and owned by ``control_group``
when that is set) and every peer is checked with ``SO_PEERCRED``: uid 0 or a
member of ``control_group``; anyone else gets one error line and is closed.
A request is parsed and checked completely before anything happens, so a bad
one (not JSON, over :data:`MAX_LINE` bytes, wrong types, unknown command or
version) gets an error naming the field and changes nothing. The server holds
at most :data:`MAX_CLIENTS` clients, each with a bounded input buffer, and stops
reading a client while its answer is not yet sent. Every call into the bridge
goes through its public, locking methods (:meth:`Bridge.snapshot`,
:meth:`Bridge.connections`), so the forwarding threads only ever wait for one
such call.

Start-up refuses (:class:`SetupError`) a path on which another live bridge
answers, and removes a stale socket file left by one that died.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtl.bridge.config import load_config
from vtl.bridge.ports.base import offload_names

from vtl.errors import ConfigError, SetupError

if TYPE_CHECKING:
    from vtl.bridge.engine import Bridge

VERSION = 1
MAX_LINE = 64 * 1024  # bytes in one request line, newline excluded
MAX_CLIENTS = 16
DEFAULT_DIR = Path("/run/vtl")
LEVELS = ("debug", "info", "warning", "error")
COMMANDS = ("status", "counters", "connections", "set", "reload", "log-level")
MAX_SET_KEYS = 64


class RequestError(Exception):
    """A request the bridge will not carry out; the message names the field."""


def socket_path(setting: str | bool, name: str) -> Path | None:
    """Where the control socket of bridge ``name`` lives (None: disabled)."""
    if setting is False:
        return None
    if setting is True or setting == "":
        return DEFAULT_DIR / f"{name}.sock"
    return Path(setting)


def error(message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": message}


def encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, default=str, separators=(",", ":")).encode() + b"\n"


def peer_groups(pid: int, gid: int) -> set[int]:
    """The groups of process ``pid`` (its primary ``gid`` and supplementary ones)."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return groups


def _vtl_version() -> str:
    try:
        return metadata.version("vtl")
    except metadata.PackageNotFoundError:
        return "unknown"


class Handler:
    """Turns one request line into one response (no I/O: testable on its own)."""

    def __init__(self, bridge: Bridge, started: float):
        self.bridge = bridge
        self.started = started  # time.monotonic() when the bridge started
        self.first_config = bridge.config.path  # what `reload` reads by default

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return error(f"not a JSON object: {str(exc)[:80]}")
        try:
            cmd, args = self._check(req, self.bridge.actions())
            if cmd in COMMANDS:
                result = getattr(self, "cmd_" + cmd.replace("-", "_"))(args)
            else:
                result = self.action(cmd, args)
        except RequestError as exc:
            return error(str(exc))
        except Exception as exc:  # a bug: answer it, keep the bridge running
            self.bridge.log.exception("control request %.80r failed", line)
            return error(f"internal error: {type(exc).__name__}: {exc}")
        return {"v": VERSION, "ok": True, "result": result}

    @staticmethod
    def _check(req: object, actions: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
        if not isinstance(req, dict):
            raise RequestError("a request is a JSON object: {\"v\": 1, \"cmd\": ...}")
        unknown = sorted(set(req) - {"v", "cmd", "args"})
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown key (a request has v, cmd, args)")
        v = req.get("v")
        if type(v) is not int or v != VERSION:
            raise RequestError(f"v: protocol version {v!r} is not spoken here (only {VERSION})")
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            raise RequestError("cmd: missing or not a string")
        if cmd not in COMMANDS and cmd not in actions:
            known = ", ".join(COMMANDS)
            if actions:
                known += "; actions of this bridge's services: " + ", ".join(sorted(actions))
            raise RequestError(f"cmd: unknown command {cmd[:40]!r}; known: {known}")
        args = req.get("args", {})
        if not isinstance(args, dict):
            raise RequestError("args: must be a JSON object")
        return cmd, args

    @staticmethod
    def _args(args: dict[str, Any], allowed: tuple[str, ...]) -> None:
        for key in args:
            if key not in allowed:
                hint = ", ".join(allowed) if allowed else "none"
                raise RequestError(f"args.{str(key)[:40]}: unknown argument (allowed: {hint})")

    def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ())
        cfg = self.bridge.config
        return {
            "name": self.bridge.name,
            "version": _vtl_version(),
            "protocol": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "config": str(cfg.path) if cfg.path is not None else None,
            "log_level": logging.getLevelName(self.bridge.log.getEffectiveLevel()).lower(),
            "ports": [{"role": role, "kind": p.kind, "ifname": p.ifname,
                       "offloads": _offered(getattr(self.bridge, role, None))}
                      for role, p in (("guest", cfg.ports.guest), ("uplink", cfg.ports.uplink))],
            "services": [{"name": s.name, "use": s.use} for s in cfg.services],
        }

    def cmd_counters(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ())
        return self.bridge.snapshot()

    def cmd_connections(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ("service",))
        service = args.get("service")
        if "service" in args:
            if not isinstance(service, str):
                raise RequestError("args.service: must be a string (a service's name)")
            names = [s.name for s in self.bridge.config.services]
            if service not in names:
                raise RequestError(f"args.service: no service named {service[:40]!r} "
                                   f"(services: {', '.join(names) or 'none'})")
        return self.bridge.connections(service)

    def cmd_set(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ("service", "options"))
        service, options = args.get("service"), args.get("options")
        if not isinstance(service, str):
            raise RequestError("args.service: missing or not a string (a service's name)")
        if not isinstance(options, dict) or not options:
            raise RequestError("args.options: give a JSON object of at least one option, "
                               'e.g. {"delay_ms": 80}')
        if len(options) > MAX_SET_KEYS:
            raise RequestError(f"args.options: at most {MAX_SET_KEYS} options at once")
        try:
            return self.bridge.set_options(service, options)
        except ConfigError as exc:
            raise RequestError("; ".join(exc.problems)) from None

    def cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ("config",))
        path = args.get("config", self.first_config)
        if path is None:
            raise RequestError("args.config: this bridge was not started from a file; "
                               "give the config file to apply")
        if not isinstance(path, str | Path) or not str(path) or not Path(path).is_absolute():
            raise RequestError("args.config: must be an absolute path to a config file")
        try:
            config = load_config(path)
            result = self.bridge.reload(config)
        except ConfigError as exc:
            raise RequestError("reload refused, nothing changed: "
                               + "; ".join(exc.problems)) from None
        return {"config": str(path), **result}

    def action(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """A service's action (``hold``, ``release`` of keepalive...): every service that
        has it, or ``args.service``."""
        self._args(args, ("service",))
        service = args.get("service")
        if "service" in args and not isinstance(service, str):
            raise RequestError("args.service: must be a string (a service's name)")
        try:
            return self.bridge.act(action, service)
        except ConfigError as exc:
            raise RequestError("; ".join(exc.problems)) from None

    def cmd_log_level(self, args: dict[str, Any]) -> dict[str, Any]:
        self._args(args, ("level",))
        level = args.get("level")
        if not isinstance(level, str) or level.lower() not in LEVELS:
            raise RequestError(f"args.level: must be one of {', '.join(LEVELS)}")
        old = logging.getLevelName(self.bridge.log.getEffectiveLevel()).lower()
        self.bridge.log.setLevel(level.upper())
        self.bridge.log.warning("log level %s -> %s (control socket)", old, level.lower())
        return {"level": level.lower(), "was": old}


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # inside an over-long line: drop bytes up to its newline
    closing: bool = False  # close once outbuf is sent


class ControlServer:
    """Serves the control socket of ``bridge`` from a thread (:meth:`start`, :meth:`stop`)."""

    def __init__(self, bridge: Bridge, path: Path, group: str | None = None):
        self.bridge = bridge
        self.path = path
        self.group = group
        self.gid: int | None = None
        self.handler = Handler(bridge, time.monotonic())
        self.log = bridge.log.getChild("control")
        self._sock: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        if self.group is not None:
            try:
                self.gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise SetupError(f"bridge.control_group: no group named {self.group!r}") from None
        self._clear_path()
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise SetupError(f"control socket {self.path}: cannot bind: {exc.strerror}") from None
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
            os.chmod(self.path, 0o660)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        self._sock = sock
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, name=f"{self.bridge.name}-control",
                                        daemon=True)
        self._thread.start()
        self.log.info("control socket %s", self.path)

    def _clear_path(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise SetupError(f"control socket {self.path}: exists and is not a socket; "
                             "remove it or set [bridge] control to another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SetupError(f"control socket {self.path}: {exc.strerror}") from None
            self.path.unlink(missing_ok=True)  # stale: its bridge is gone
            self.log.info("removed stale control socket %s", self.path)
            return
        finally:
            probe.close()
        raise SetupError(f"control socket {self.path}: another bridge is running and answers "
                         "there; stop it, or give this one another name or [bridge] control")

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5.0)
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sock is not None:
            self._sel.unregister(self._sock)
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, events in self._sel.select():
                if key.fileobj is self._sock:
                    self._accept()
                elif key.data is not None:
                    client: _Client = key.data
                    try:
                        if events & selectors.EVENT_WRITE:
                            self._send(client)
                        if events & selectors.EVENT_READ and client.sock.fileno() >= 0:
                            self._receive(client)
                    except Exception:  # a bug: lose this client, keep serving the others
                        self.log.exception("control socket: dropping a client")
                        self._drop(client)

    def _accept(self) -> None:
        try:
            sock, _ = self._sock.accept()  # type: ignore[union-attr]
        except OSError:
            return
        sock.setblocking(False)
        client = _Client(sock)
        refusal = self._refusal(sock)
        if refusal is None and len(self._clients) >= MAX_CLIENTS:
            refusal = f"too many control clients (at most {MAX_CLIENTS}); try again later"
        self._clients[sock.fileno()] = client
        self._sel.register(sock, selectors.EVENT_READ, client)
        if refusal is not None:
            client.outbuf += encode(error(refusal))
            client.closing = True
            self._update(client)

    def _refusal(self, sock: socket.socket) -> str | None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid == 0 or (self.gid is not None and self.gid in peer_groups(pid, gid)):
            return None
        self.log.warning("control socket: refused uid %d (pid %d)", uid, pid)
        who = f"members of group {self.group!r}" if self.group else "root"
        return f"permission denied: uid {uid} may not control this bridge (only {who})"

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        self._lines(client)

    def _lines(self, client: _Client) -> None:
        """Answer the complete lines buffered, until an answer waits to be sent."""
        while not client.outbuf and not client.closing:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                if len(client.inbuf) > MAX_LINE:
                    if not client.skipping:
                        client.outbuf += encode(error(
                            f"request line over {MAX_LINE} bytes; nothing done"))
                    client.skipping = True
                    client.inbuf.clear()
                break
            line = bytes(client.inbuf[:nl])
            del client.inbuf[:nl + 1]
            if client.skipping:  # the end of an over-long line, already answered
                client.skipping = False
            elif len(line) > MAX_LINE:
                client.outbuf += encode(error(f"request line over {MAX_LINE} bytes; nothing done"))
            elif line.strip():
                client.outbuf += encode(self.handler.handle(line))
        self._update(client)

    def _send(self, client: _Client) -> None:
        try:
            n = client.sock.send(client.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        del client.outbuf[:n]
        if not client.outbuf:
            if client.closing:
                self._drop(client)
                return
            if client.inbuf:  # requests that arrived while the answer was being sent
                self._lines(client)
                return
        self._update(client)

    def _update(self, client: _Client) -> None:
        if client.sock.fileno() < 0:
            return
        events = selectors.EVENT_WRITE if client.outbuf else selectors.EVENT_READ
        self._sel.modify(client.sock, events, client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            self._sel.unregister(client.sock)
            self._clients.pop(fd, None)
            client.sock.close()


def start_control(bridge: Bridge) -> ControlServer | None:
    """Start the control socket ``bridge``'s config asks for (None when disabled)."""
    section = bridge.config.bridge
    path = socket_path(section.control, bridge.name)
    if path is None:
        return None
    server = ControlServer(bridge, path, section.control_group)
    server.start()
    return server


__all__ = ["COMMANDS", "ControlServer", "Handler", "MAX_CLIENTS", "MAX_LINE", "VERSION",
           "socket_path", "start_control"]


def _offered(port: object) -> str | None:
    """The offloads a TAP port offers its guest (``bridge/lanes.py``); None otherwise."""
    offered = getattr(port, "offered", None)
    return None if offered is None else offload_names(offered)
