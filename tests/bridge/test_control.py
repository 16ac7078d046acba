"""The control socket: protocol handling, hostile input, peer credentials, `vtl ctl`/`vtl ls`."""

from __future__ import annotations

import grp
import io
import json
import logging
import os
import pwd
import random
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from vtl.bridge.config import parse_config
from vtl.bridge.control import MAX_LINE, ControlServer, Handler, socket_path, start_control
from vtl.bridge.ctl import CtlError, list_bridges, parse_command, render, render_ls, request
from vtl.bridge.engine import Bridge

from vtl.errors import ConfigError, SetupError

PORTS = {"guest": {"kind": "tap", "ifname": "ctl0"}, "uplink": {"kind": "pcap", "ifname": "ctl1"}}
ROOT = os.geteuid() == 0


def make_bridge(**bridge: object) -> Bridge:
    cfg = parse_config({"bridge": {"name": "ctltest", **bridge}, "ports": PORTS,
                        "services": [{"use": "netem", "delay_ms": 1}, {"use": "pep"}]})
    log = logging.getLogger("vtl.ctltest")
    log.setLevel(logging.NOTSET)
    return Bridge(cfg, log)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory anyone may enter (tmp_path is 0700: no other user could reach a socket)."""
    d = Path(tempfile.mkdtemp(prefix="vtlctl"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[Bridge, ControlServer]]:
    bridge = make_bridge()
    server = ControlServer(bridge, sockdir / "ctltest.sock")
    server.start()
    yield bridge, server
    server.stop()


def call(handler: Handler, obj: object) -> dict:
    return handler.handle(json.dumps(obj).encode())


# -- the protocol, without sockets ----------------------------------------------------

def test_every_command_answers():
    handler = Handler(make_bridge(), time.monotonic())
    status = call(handler, {"v": 1, "cmd": "status"})
    assert status["ok"] and status["v"] == 1
    r = status["result"]
    assert r["name"] == "ctltest" and r["pid"] == os.getpid() and r["protocol"] == 1
    assert [p["role"] for p in r["ports"]] == ["guest", "uplink"]
    assert r["ports"][0] == {"role": "guest", "kind": "tap", "ifname": "ctl0",
                             "offloads": r["ports"][0]["offloads"]}
    assert r["ports"][0]["offloads"] in ("csum+tso4+tso6+tso-ecn", "csum", "none")
    assert [(s["name"], s["use"]) for s in r["services"]] == [("netem", "netem"), ("pep", "pep")]
    counters = call(handler, {"v": 1, "cmd": "counters", "args": {}})["result"]
    assert set(counters) >= {"bridge", "ports", "services"}
    assert set(counters["services"]) == {"netem", "pep"}
    conns = call(handler, {"v": 1, "cmd": "connections"})["result"]
    assert conns == {"pep": []}, "only services that hold connections are listed"
    assert call(handler, {"v": 1, "cmd": "connections", "args": {"service": "pep"}}
                )["result"] == {"pep": []}


def test_log_level_sets_the_bridge_logger():
    bridge = make_bridge()
    handler = Handler(bridge, time.monotonic())
    r = call(handler, {"v": 1, "cmd": "log-level", "args": {"level": "debug"}})
    assert r["ok"] and r["result"]["level"] == "debug"
    assert bridge.log.getEffectiveLevel() == logging.DEBUG
    call(handler, {"v": 1, "cmd": "log-level", "args": {"level": "ERROR"}})
    assert bridge.log.getEffectiveLevel() == logging.ERROR
    bridge.log.setLevel(logging.NOTSET)


@pytest.mark.parametrize(("request_", "names"), [
    (b"not json", "JSON"),
    (b"[1, 2]", "JSON object"),
    (b"[" * 50000, "JSON"),
    ({"cmd": "status"}, "v:"),
    ({"v": 2, "cmd": "status"}, "v:"),
    ({"v": True, "cmd": "status"}, "v:"),
    ({"v": "1", "cmd": "status"}, "v:"),
    ({"v": 1}, "cmd:"),
    ({"v": 1, "cmd": 7}, "cmd:"),
    ({"v": 1, "cmd": "reboot"}, "cmd: unknown command"),
    ({"v": 1, "cmd": "status", "args": []}, "args:"),
    ({"v": 1, "cmd": "status", "args": {"x": 1}}, "args.x"),
    ({"v": 1, "cmd": "status", "extra": 1}, "extra: unknown key"),
    ({"v": 1, "cmd": "connections", "args": {"service": 5}}, "args.service"),
    ({"v": 1, "cmd": "connections", "args": {"service": "nope"}}, "args.service"),
    ({"v": 1, "cmd": "log-level", "args": {}}, "args.level"),
    ({"v": 1, "cmd": "log-level", "args": {"level": "loud"}}, "args.level"),
    ({"v": 1, "cmd": "log-level", "args": {"level": ["debug"]}}, "args.level"),
])
def test_bad_requests_get_an_error_naming_the_field(request_, names):
    bridge = make_bridge()
    handler = Handler(bridge, time.monotonic())
    line = request_ if isinstance(request_, bytes) else json.dumps(request_).encode()
    r = handler.handle(line)
    assert r["v"] == 1 and r["ok"] is False and names in r["error"], r
    assert bridge.log.level == logging.NOTSET


def hostile_lines(rng: random.Random, broken: str = "/nonexistent/broken.toml"
                  ) -> Iterator[bytes]:
    """Requests a bridge must refuse, forever; ``broken`` is a config file it cannot apply."""
    cmds = ["status", "counters", "connections", "log-level", "set", "reload", "", "\x00"]
    bad_options = [{}, [], "x", None, {"delay_ms": -1}, {"delay_ms": "slow"},
                   {"max_connections": 5}, {"nonsense": 1}, {"x" * 300: 1},
                   {"loss": 0.5, "ge_p": 0.5}, {"match": "not a (filter"}, {"match": 7}]
    bad_configs = [broken, broken, "relative.toml", "/nonexistent/x.toml", 5, "", None, [broken]]
    values = [None, 0, -1, 1.5, True, "", "x" * 300, [], {}, {"level": "debug"}, [1, [2]]]
    while True:
        kind = rng.randrange(6)
        if kind == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))).replace(
                b"\n", b"")
        elif kind == 1:
            yield json.dumps({"v": rng.choice(values + [2, 99]), "cmd": rng.choice(cmds)}).encode()
        elif kind == 2:  # a known command with wrong arguments
            cmd = rng.choice(["status", "counters", "connections", "log-level"])
            args = {rng.choice(["service", "level", "x", ""]): rng.choice(values)}
            if cmd == "log-level" and args.get("level") == {"level": "debug"}:
                args = {"level": 3}
            yield json.dumps({"v": 1, "cmd": cmd, "args": args}).encode()
        elif kind == 3:  # set and reload that cannot be carried out
            if rng.random() < 0.5:
                args = {"service": rng.choice(["netem", "pep", "nope", 5, None]),
                        "options": rng.choice(bad_options)}
                yield json.dumps({"v": 1, "cmd": "set", "args": args}).encode()
            else:
                yield json.dumps({"v": 1, "cmd": "reload",
                                  "args": {"config": rng.choice(bad_configs)}}).encode()
        elif kind == 4:
            yield json.dumps(rng.choice(values)).encode()
        else:
            yield b"{" * rng.randrange(1, 5000)


def test_ten_thousand_hostile_requests_change_nothing(served, tmp_path):
    bridge, server = served
    before = bridge.snapshot()
    config, slots = bridge.config, list(bridge.chain.slots)
    options = [s.service.options for s in slots]
    broken = tmp_path / "broken.toml"
    broken.write_text('[bridge]\nname = "ctltest"\n[ports.guest]\nkind = "tap"\nifname = '
                      '"ctl0"\n[ports.uplink]\nkind = "pcap"\nifname = "ctl1"\n[[services]]\n'
                      'use = "netem"\ndelay_ms = -4\n')
    rng = random.Random(12)
    lines = hostile_lines(rng, str(broken))
    kinds: dict[str, int] = {}  # errors by their first words
    deadline = time.monotonic() + 120
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        f = sock.makefile("rb")
        for i in range(10_000):
            line = next(lines)
            if i % 500 == 0:  # a line over the limit, sent in pieces
                sock.sendall(b"x" * (MAX_LINE + 10))
                sock.sendall(b'{"v": 1, "cmd": "status"}\n')
                line = None
            else:
                sock.sendall(line + b"\n")
            r = json.loads(f.readline())
            assert r["v"] == 1 and r["ok"] is False and r["error"], (line, r)
            assert time.monotonic() < deadline
            kinds[r["error"].split(":")[0][:20]] = kinds.get(r["error"].split(":")[0][:20], 0) + 1
        sock.sendall(b'{"v": 1, "cmd": "status"}\n')
        r = json.loads(f.readline())
        assert r["ok"] and r["result"]["name"] == "ctltest"
    assert kinds["reload refused, noth"] > 100, kinds  # broken configs, refused
    assert kinds["args.config"] > 100 and kinds["args.options"] > 100, kinds
    assert sum(n for k, n in kinds.items() if k.startswith(("netem.", "pep."))) > 100, kinds
    assert bridge.snapshot() == before
    assert bridge.config is config and bridge.chain.slots == slots
    assert [s.service.options for s in slots] == options
    assert bridge.log.level == logging.NOTSET
    assert server._thread is not None and server._thread.is_alive()


def test_set_and_reload_through_the_handler(tmp_path):
    bridge = make_bridge()
    handler = Handler(bridge, time.monotonic())
    r = call(handler, {"v": 1, "cmd": "set", "args": {"service": "netem",
                                                       "options": {"delay_ms": 80}}})
    assert r["ok"] and r["result"] == {"service": "netem", "options": {"delay_ms": 80}}
    assert bridge.chain.slots[0].service.options.delay_ms == 80
    r = call(handler, {"v": 1, "cmd": "set", "args": {"service": "pep",
                                                       "options": {"max_connections": 3}}})
    assert not r["ok"] and "pep.max_connections: cannot change" in r["error"]
    r = call(handler, {"v": 1, "cmd": "reload"})
    assert not r["ok"] and "not started from a file" in r["error"]
    new = tmp_path / "new.toml"
    new.write_text('[bridge]\nname = "ctltest"\n[ports.guest]\nkind = "tap"\nifname = "ctl0"'
                   '\n[ports.uplink]\nkind = "pcap"\nifname = "ctl1"\n[[services]]\n'
                   'use = "netem"\ndelay_ms = 5\n')
    r = call(handler, {"v": 1, "cmd": "reload", "args": {"config": str(new)}})
    assert r["ok"], r
    assert r["result"]["removed"] == ["pep"] and r["result"]["retuned"] == [
        {"name": "netem", "changed": ["delay_ms"]}]
    assert r["result"]["config"] == str(new)
    assert call(handler, {"v": 1, "cmd": "status"})["result"]["services"] == [
        {"name": "netem", "use": "netem"}]
    new.write_text(new.read_text().replace('"ctl1"', '"ctl9"'))
    r = call(handler, {"v": 1, "cmd": "reload", "args": {"config": str(new)}})
    assert not r["ok"] and "reload refused, nothing changed: ports.uplink" in r["error"]


def test_random_bytes_then_a_valid_request(served):
    _, server = served
    rng = random.Random(3)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        junk = bytes(rng.getrandbits(8) for _ in range(200_000))
        sock.sendall(junk + b"\n")
        f = sock.makefile("rb")
        answers = sum(1 for line in junk.split(b"\n") if line.strip())  # blank: no request
        for _ in range(answers):
            r = json.loads(f.readline())
            assert r["ok"] is False
    assert request(server.path, "status")["name"] == "ctltest"


def test_a_failing_bridge_call_is_an_error_answer_not_a_dead_server(served, monkeypatch):
    bridge, server = served

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bridge, "snapshot", broken)
    with pytest.raises(CtlError, match="internal error: RuntimeError: boom"):
        request(server.path, "counters")
    assert request(server.path, "status")["name"] == "ctltest"


def test_pipelined_requests_are_answered_in_order(served):
    _, server = served
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        sock.sendall(b'{"v":1,"cmd":"counters"}\n' * 50 + b'{"v":1,"cmd":"status"}\n')
        f = sock.makefile("rb")
        for _ in range(50):
            assert "services" in json.loads(f.readline())["result"]
        assert json.loads(f.readline())["result"]["name"] == "ctltest"


def test_clients_beyond_the_limit_are_told_and_closed(served):
    _, server = served
    socks = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(str(server.path))
            socks.append(s)
        time.sleep(0.2)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(str(server.path))
        r = json.loads(extra.makefile("rb").readline())
        assert r["ok"] is False and "too many" in r["error"]
        extra.close()
        socks[0].sendall(b'{"v":1,"cmd":"status"}\n')
        assert json.loads(socks[0].makefile("rb").readline())["ok"]
    finally:
        for s in socks:
            s.close()


# -- the socket file ----------------------------------------------------------------------

def test_socket_path_setting():
    assert socket_path(True, "vm1") == Path("/run/vtl/vm1.sock")
    assert socket_path("/tmp/x.sock", "vm1") == Path("/tmp/x.sock")
    assert socket_path(False, "vm1") is None
    assert make_bridge().config.bridge.control is True


def test_control_false_disables_and_an_empty_path_is_refused():
    assert start_control(make_bridge(control=False)) is None
    with pytest.raises(ConfigError, match="bridge.control: give a socket path"):
        make_bridge(control="  ")
    with pytest.raises(ConfigError, match="bridge.control_group"):
        make_bridge(control_group=5)


def test_socket_is_private_and_removed_at_stop(sockdir):
    path = sockdir / "sub" / "b.sock"
    server = ControlServer(make_bridge(), path)
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    finally:
        server.stop()
    assert not path.exists()


def test_a_live_bridge_on_the_path_is_refused_and_a_stale_socket_removed(served, sockdir):
    _, server = served
    with pytest.raises(SetupError, match="another bridge is running"):
        ControlServer(make_bridge(), server.path).start()
    assert request(server.path, "status")["name"] == "ctltest", "the first one still answers"
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    second = ControlServer(make_bridge(), stale)
    second.start()
    try:
        assert request(stale, "status")["name"] == "ctltest"
    finally:
        second.stop()
    (sockdir / "plain.sock").write_text("")
    with pytest.raises(SetupError, match="not a socket"):
        ControlServer(make_bridge(), sockdir / "plain.sock").start()


# -- peers ----------------------------------------------------------------------------------

def as_user(uid: int, gids: list[int], path: Path) -> str:
    """``status`` from ``path`` as ``uid`` (from a forked child): the result, or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups(gids)
            os.setgid(gids[0])
            os.setuid(uid)
            out = json.dumps(request(path, "status")).encode()
        except CtlError as exc:
            out = f"CtlError: {exc}".encode()
        except BaseException as exc:  # anything else: say so, and never return into pytest
            out = f"{type(exc).__name__}: {exc}".encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode()


needs_root = pytest.mark.skipif(not ROOT, reason="needs root (setuid to nobody)")


@needs_root
def test_a_non_root_peer_is_refused(served):
    _, server = served
    nobody = pwd.getpwnam("nobody")
    out = as_user(nobody.pw_uid, [nobody.pw_gid], server.path)
    assert out.startswith(f"CtlError: {server.path}: permission denied"), \
        "mode 0600: the socket is not even reachable"
    server.path.chmod(0o666)  # reachable: SO_PEERCRED still refuses
    out = as_user(nobody.pw_uid, [nobody.pw_gid], server.path)
    assert out.startswith("CtlError: bridge refused: permission denied: uid 65534"), out
    assert request(server.path, "status")["name"] == "ctltest", "root still gets in"


@needs_root
def test_a_member_of_control_group_is_let_in(sockdir):
    nobody = pwd.getpwnam("nobody")
    group = next(g for g in grp.getgrall() if g.gr_gid not in (0, nobody.pw_gid))
    server = ControlServer(make_bridge(), sockdir / "g.sock", group=group.gr_name)
    server.start()
    try:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o660
        assert server.path.stat().st_gid == group.gr_gid
        out = as_user(nobody.pw_uid, [nobody.pw_gid, group.gr_gid], server.path)
        assert json.loads(out)["name"] == "ctltest", out
        server.path.chmod(0o666)
        out = as_user(nobody.pw_uid, [nobody.pw_gid], server.path)
        assert "permission denied" in out, "not in the group: refused"
    finally:
        server.stop()
    with pytest.raises(SetupError, match="control_group"):
        ControlServer(make_bridge(), sockdir / "h.sock", group="no-such-group-xyz").start()


# -- the client -------------------------------------------------------------------------------

def test_parse_command():
    assert parse_command(("vm1", "status"), None, None) == (
        Path("/run/vtl/vm1.sock"), "status", {})
    assert parse_command(("connections",), "/tmp/s", "pep") == (
        Path("/tmp/s"), "connections", {"service": "pep"})
    assert parse_command(("vm1", "log-level", "debug"), None, None)[2] == {"level": "debug"}
    assert parse_command(("vm1", "hold"), None, "keepalive")[1:] == (
        "hold", {"service": "keepalive"}), "a service's action goes to the bridge to judge"
    for words, sock, service in [((), None, None), (("vm1",), None, None),
                                 (("vm1", "log-level"), None, None),
                                 (("vm1", "status", "x"), None, None),
                                 (("vm1", "status"), None, "pep"),
                                 (("vm1", "re boot"), None, None),
                                 (("vm1", "hold", "now"), None, None),
                                 (("vm1", "set", "netem"), None, None),
                                 (("vm1", "set", "netem", "delay_ms"), None, None),
                                 (("vm1", "set", "netem", "a=1", "a=2"), None, None),
                                 (("vm1", "reload", "a", "b"), None, None)]:
        with pytest.raises(CtlError):
            parse_command(words, sock, service)


def test_parse_set_and_reload(monkeypatch, tmp_path):
    words = ("vm1", "set", "capture", "active=false", "snaplen=96", "loss=0.5",
             "path=/tmp/a b.pcap", "match=tcp port 80", "match2=", "ports=[1, 2]", 'q="x"')
    assert parse_command(words, None, None)[2] == {"service": "capture", "options": {
        "active": False, "snaplen": 96, "loss": 0.5, "path": "/tmp/a b.pcap",
        "match": "tcp port 80", "match2": "", "ports": [1, 2], "q": "x"}}
    monkeypatch.chdir(tmp_path)
    assert parse_command(("vm1", "reload", "vm1.toml"), None, None)[2] == {
        "config": str(tmp_path / "vm1.toml")}, "made absolute where the caller is"
    assert parse_command(("vm1", "reload"), None, None)[2] == {}


def test_request_errors_are_plain(sockdir, served):
    with pytest.raises(CtlError, match="no bridge"):
        request(sockdir / "none.sock", "status")
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(CtlError, match="not answering"):
        request(stale, "status")
    _, server = served
    with pytest.raises(CtlError, match="args.service"):
        request(server.path, "connections", {"service": "nope"})


def test_render_and_ls(served, sockdir):
    bridge, server = served
    out = io.StringIO()
    console = Console(file=out, width=200)
    for cmd in ("status", "counters", "connections"):
        render(cmd, request(server.path, cmd), console)
    text = out.getvalue()
    assert "ctltest" in text and "ctl0" in text and "pep: 0 connections" in text
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sockdir / "dead.sock"))
    s.close()
    rows = list_bridges(sockdir)
    assert [r["name"] for r in rows] == ["ctltest", "dead"]
    assert rows[0]["services"] == ["netem", "pep"] and rows[0]["frames_in"] == 0
    assert rows[1]["error"] == "not answering"
    out = io.StringIO()
    render_ls(rows, Console(file=out, width=200))
    assert "not answering" in out.getvalue() and "tap ctl0" in out.getvalue()


# -- what a split-TCP service lists ---------------------------------------------------------

def test_pep_lists_its_connections_with_live_bytes():
    from tests.services.test_pep import UP, handshake, make, seg

    pep, ctx = make()
    assert pep.connections(0.0) == []
    assert pep.process(seg("S"), UP, 0.0) is not None
    [row] = pep.connections(0.5)
    assert row == {"flow": "tcp 10.0.0.1:40000 -> 10.0.0.2:80", "state": "LISTEN",
                   "closing": False, "age_s": 0.5, "bytes_up": 0, "bytes_down": 0,
                   "buffered": 0, "retransmits": 0, "upstream": "tcp 10.0.0.2:80",
                   "upstream_state": "connecting"}
    pep, ctx = make()
    gseq, pseq = handshake(pep, ctx)
    pep.process(seg("PA", gseq, pseq, b"x" * 100), UP, 1.0)
    ctx.streams[0].data(b"y" * 300)
    [row] = pep.connections(2.0)
    assert (row["state"], row["closing"], row["upstream_state"]) == (
        "ESTABLISHED", False, "connected")
    assert (row["bytes_up"], row["bytes_down"], row["age_s"]) == (100, 300, 2.0)
    assert "10.0.0.1:40000" in row["flow"] and row["buffered"] >= 0


def test_service_actions_hold_and_release():
    cfg = parse_config({"bridge": {"name": "ctltest"}, "ports": PORTS,
                        "services": [{"use": "keepalive"}, {"use": "netem"}]})
    bridge = Bridge(cfg, logging.getLogger("vtl.ctltest"))
    handler = Handler(bridge, time.monotonic())
    r = call(handler, {"v": 1, "cmd": "hold"})
    assert r["ok"] and r["result"]["keepalive"]["state"] == "holding", r
    assert bridge.snapshot()["services"]["keepalive"]["state"] == "holding"
    r = call(handler, {"v": 1, "cmd": "release", "args": {"service": "keepalive"}})
    assert r["ok"] and r["result"] == {"keepalive": {
        "state": "live", "held_s": r["result"]["keepalive"]["held_s"], "custody_delivered": 0,
        "replayed": 0, "woken": 0}}
    r = call(handler, {"v": 1, "cmd": "release", "args": {"service": "netem"}})
    assert not r["ok"] and "no service named 'netem' has the action 'release'" in r["error"]
    r = call(handler, {"v": 1, "cmd": "hold", "args": {"nope": 1}})
    assert not r["ok"] and "args.nope" in r["error"]
    r = call(handler, {"v": 1, "cmd": "hold"} | {"cmd": "suspend"})
    assert not r["ok"] and "actions of this bridge's services: hold, release" in r["error"]
    plain = Handler(make_bridge(), time.monotonic())
    assert "unknown command 'hold'" in call(plain, {"v": 1, "cmd": "hold"})["error"]


def test_pinned_macs_are_bounded_and_expire():
    from vtl.bridge.engine import MAX_PINS

    bridge = make_bridge()
    now = time.monotonic()
    bridge._pin_mac(b"\x02" * 6, None)
    bridge._pin_mac(b"\x04" * 6, now - 1.0)  # already over: dropped at the next pin
    for i in range(MAX_PINS - 1):
        bridge._pin_mac(bytes([2, 0, 0, 0, 1, i]), now + 60)
    assert len(bridge._pins) == MAX_PINS and bridge._pins[b"\x02" * 6] == float("inf")
    with pytest.raises(ValueError, match="at most"):
        bridge._pin_mac(b"\x06" * 6, None)
    bridge._pin_mac(b"\x02" * 6, now + 5)  # a pinned one can always be re-pinned
    assert bridge._pins[b"\x02" * 6] == now + 5
