"""The client side of the control socket: ``vtl ctl`` and ``vtl ls``.

:func:`request` sends one request line to a bridge's socket and returns the
result of its one response line, or raises :class:`CtlError` with a message for
a person (no bridge there, refused, an error the bridge answered).
:func:`render` turns a result into rich tables; ``--json`` prints it as is.
:func:`list_bridges` asks every socket in a directory (``/run/vtl``) for its
status and counters; a socket nobody answers on is reported as not answering.
"""

from __future__ import annotations

import json
import socket
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from vtl.bridge.control import COMMANDS, DEFAULT_DIR, LEVELS, VERSION


class CtlError(Exception):
    """The request could not be made or the bridge refused it."""


def request(path: Path, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Any:
    """Send one request to the bridge at ``path``; its result."""
    line = json.dumps({"v": VERSION, "cmd": cmd, "args": args or {}}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it refused us and closed: its error line is already here
            buf = b""
            while b"\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
    except FileNotFoundError:
        raise CtlError(f"no bridge at {path} (not running, or another name?)") from None
    except ConnectionRefusedError:
        raise CtlError(f"the bridge at {path} is not answering (stale socket)") from None
    except PermissionError:
        raise CtlError(f"{path}: permission denied (root or the bridge's control_group "
                       "only)") from None
    except TimeoutError:
        raise CtlError(f"the bridge at {path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise CtlError(f"{path}: {exc.strerror or exc}") from None
    if b"\n" not in buf:
        raise CtlError(f"the bridge at {path} closed the connection without an answer")
    try:
        response = json.loads(buf[:buf.index(b"\n")])
    except ValueError:
        raise CtlError(f"the bridge at {path} answered something that is not JSON") from None
    if not isinstance(response, dict) or not response.get("ok"):
        message = response.get("error") if isinstance(response, dict) else None
        raise CtlError(f"bridge refused: {message if message else repr(response)}")
    return response.get("result")


def parse_command(words: tuple[str, ...], socket_opt: str | None, service: str | None
                  ) -> tuple[Path, str, dict[str, Any]]:
    """``NAME COMMAND [ARGS]`` (or ``COMMAND [ARGS]`` with ``--socket``) -> request."""
    words_l = list(words)
    if socket_opt is not None:
        path = Path(socket_opt)
    else:
        if not words_l:
            raise CtlError("give the bridge's NAME (or --socket PATH) and a COMMAND")
        path = DEFAULT_DIR / f"{words_l.pop(0)}.sock"
    if not words_l:
        raise CtlError(f"give a COMMAND: {', '.join(COMMANDS)}")
    cmd, rest = words_l[0], words_l[1:]
    args: dict[str, Any] = {}
    if cmd == "log-level":
        if len(rest) != 1:
            raise CtlError(f"log-level takes one LEVEL: {', '.join(LEVELS)}")
        args["level"] = rest[0]
    elif cmd == "set":
        if len(rest) < 2:
            raise CtlError("set takes a SERVICE and KEY=VALUE..., e.g. set netem delay_ms=80")
        args["service"], args["options"] = rest[0], parse_assignments(rest[1:])
    elif cmd == "reload":
        if len(rest) > 1:
            raise CtlError("reload takes at most one CONFIG file")
        if rest:  # the bridge reads it: make it absolute from here
            args["config"] = str(Path(rest[0]).absolute())
    elif rest:  # the other commands, and the services' actions (hold, release...)
        raise CtlError(f"{cmd} takes no arguments, not {' '.join(rest)!r}")
    if service is not None:
        if cmd in COMMANDS and cmd != "connections":
            raise CtlError("--service goes with connections and the services' actions")
        args["service"] = service
    if not cmd or not cmd.replace("-", "").isalnum():
        raise CtlError(f"{cmd!r} is not a command; known: {', '.join(COMMANDS)}, or an "
                       "action of the bridge's services (hold, release...)")
    return path, cmd, args


def parse_value(text: str) -> Any:
    """A value as TOML reads it (``80``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``); anything
    else is the string itself (``path=/tmp/a.pcap``, ``match=tcp port 80``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(words: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` words -> an options object (a key given twice is an error)."""
    out: dict[str, Any] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise CtlError(f"{word!r}: expected KEY=VALUE")
        if key in out:
            raise CtlError(f"{key}: given twice")
        out[key] = parse_value(value)
    return out


# -- rendering ----------------------------------------------------------------------

def _kv_table(title: str, data: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in data.items():
        table.add_row(str(key), json.dumps(value) if isinstance(value, dict | list)
                      else str(value))
    return table


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02}:{m:02}:{s:02}"


def render(cmd: str, result: Any, console: Console | None = None) -> None:
    console = console or Console()
    if cmd == "status":
        info = dict(result)
        ports = info.pop("ports", [])
        services = info.pop("services", [])
        uptime = _uptime(info.pop("uptime_s", 0))
        info = {"name": info.pop("name", None), "uptime": uptime, **info}
        console.print(_kv_table(f"bridge {info.get('name')}", info))
        table = Table("role", "kind", "ifname", "offloads offered", title="ports",
                      title_justify="left")
        for p in ports:
            table.add_row(p["role"], p["kind"], p["ifname"], p.get("offloads") or "-")
        console.print(table)
        table = Table("name", "use", title="services", title_justify="left")
        for s in services:
            table.add_row(s["name"], s["use"])
        console.print(table)
    elif cmd == "counters":
        for section in ("bridge", "streams", "egress"):
            if result.get(section):
                console.print(_kv_table(section, result[section]))
        for group in ("ports", "services", "datagrams"):
            for name, counters in result.get(group, {}).items():
                console.print(_kv_table(f"{group[:-1]} {name}", counters))
    elif cmd == "connections":
        if not result:
            console.print("no service here holds connections")
        for service, rows in result.items():
            table = Table("flow", "state", "age", "up", "down", "buffered", "upstream",
                          title=f"{service}: {len(rows)} connections", title_justify="left")
            for r in rows:
                up = f"{r.get('upstream') or '-'} ({r.get('upstream_state')})"
                table.add_row(r["flow"], r["state"] + (" (closing)" if r.get("closing") else ""),
                              f"{r['age_s']:.1f}s", str(r["bytes_up"]), str(r["bytes_down"]),
                              str(r["buffered"]), up)
            console.print(table)
    elif cmd == "log-level":
        console.print(f"log level {result['was']} -> {result['level']}")
    elif cmd == "set":
        console.print(f"{result['service']}: " + " ".join(
            f"{k}={json.dumps(v)}" for k, v in result["options"].items()))
    elif cmd == "reload":
        table = Table("what", "services", title=f"reloaded {result['config']}",
                      title_justify="left")
        for what in ("added", "removed", "replaced", "retuned", "kept"):
            names = [n if isinstance(n, str) else f"{n['name']} ({', '.join(n['changed'])})"
                     for n in result.get(what, [])]
            table.add_row(what, ", ".join(names) or "-")
        table.add_row("order", " -> ".join(result.get("order", [])) or "empty chain")
        if result.get("bridge"):
            table.add_row("[bridge]", ", ".join(result["bridge"]))
        for name, n in result.get("reset_connections", {}).items():
            table.add_row("reset", f"{name}: {n} connections")
        console.print(table)
    else:
        console.print_json(data=result)


# -- vtl ls -------------------------------------------------------------------------

def list_bridges(directory: Path, timeout: float = 2.0) -> list[dict[str, Any]]:
    """One row per ``*.sock`` in ``directory``: its status and frame counts, or why not."""
    rows = []
    for path in sorted(directory.glob("*.sock")):
        row: dict[str, Any] = {"name": path.stem, "socket": str(path)}
        try:
            status = request(path, "status", timeout=timeout)
            counters = request(path, "counters", timeout=timeout)
        except CtlError as exc:
            row["error"] = "not answering" if "not answering" in str(exc) else str(exc)
        else:
            ports = counters.get("ports", {})
            row.update(
                name=status["name"], pid=status["pid"], uptime_s=status["uptime_s"],
                ports=[f"{p['role']} {p['kind']} {p['ifname']}" for p in status["ports"]],
                services=[s["name"] for s in status["services"]],
                frames_in=sum(p.get("rx_frames", 0) for p in ports.values()),
                frames_out=sum(p.get("tx_frames", 0) for p in ports.values()))
        rows.append(row)
    return rows


def render_ls(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not rows:
        console.print("no bridges (no control sockets found)")
        return
    table = Table("name", "ports", "services", "uptime", "frames in", "frames out")
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], f"[red]{r['error']}[/red]", "", "", "", "")
        else:
            table.add_row(r["name"], "\n".join(r["ports"]), ", ".join(r["services"]) or "-",
                          _uptime(r["uptime_s"]), str(r["frames_in"]), str(r["frames_out"]))
    console.print(table)


__all__ = ["CtlError", "list_bridges", "parse_command", "render", "render_ls",
           "request"]
