"""A real QEMU guest for integration tests: the Linux kernel's own TCP stack on a TAP.

:class:`QemuGuest` starts ``qemu-system-x86_64`` under TCG (KVM does not work
on this machine kind; see docs/testing-vms.md) with the kernel and initramfs
that ``make guest`` (tools/guest/build.py) leaves in ``.cache/guest/``. The
guest's init mounts the host's ``/`` read-only over 9p under a tmpfs overlay
and chroots into it, so the guest runs the host's python3, curl and iperf3,
and starts :mod:`guestagent` on a virtio-serial port: the test runs commands
in the guest through that port (:meth:`QemuGuest.run`, :meth:`spawn`,
:meth:`read_file`), never through the guest's network under test. With
``root9p=False`` the guest is busybox only (no 9p export, so QEMU can migrate
it) and has no agent; ``echo_port`` starts busybox's echo server in it.

Networking: QEMU opens the TAP ``tap`` in the root namespace (it vanishes when
QEMU exits), or attaches to a persistent TAP made first with
:class:`PersistentTap` (``tap_by_qemu=False``), which survives QEMU, as a
restore with ``-incoming`` on the same TAP needs. A VTL bridge attaches to the
TAP with a ``packet`` port (VTL's own ``tap`` port cannot share it with QEMU).
Addresses travel on the kernel command line.

QEMU gets two QMP monitors (one client each): :attr:`QemuGuest.qmp` for the
test (:meth:`pause`, :meth:`resume`, events) and :attr:`QemuGuest.vtl_qmp_path`,
left free for a bridge. :meth:`close` always kills QEMU and removes what the
guest made; every wait is bounded and a guest that does not boot raises
:class:`GuestError` with the tail of its serial console and of QEMU's stderr.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
AGENT = HERE / "guestagent.py"
QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")


class GuestError(AssertionError):
    """The guest or QEMU did not do what the test needed (with the logs' tails)."""


def guest_dir() -> Path:
    """Where ``make guest`` put the kernel and initramfs (``VTL_GUEST_DIR`` overrides)."""
    return Path(os.environ.get("VTL_GUEST_DIR", REPO / ".cache" / "guest"))


def missing_guest() -> str | None:
    """Why a QEMU guest cannot run here, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (apt-get install qemu-system-x86; `make system-deps`)"
    d = guest_dir()
    for f in ("vmlinuz", "initrd.img"):
        if not (d / f).exists():
            return f"no guest image {d / f}: run `make guest`"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise GuestError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def link_exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}")


def _tap_host_side_up(ifname: str) -> None:
    """Bring the TAP's host side up, without IPv6 (the host must not talk on it)."""
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"],
                   capture_output=True)
    _ip("link", "set", ifname, "up")


class PersistentTap:
    """A TAP made before QEMU (``ip tuntap add … vnet_hdr``) that outlives it."""

    def __init__(self, ifname: str):
        self.ifname = ifname
        _ip("tuntap", "add", "dev", ifname, "mode", "tap", "vnet_hdr")
        _tap_host_side_up(ifname)

    def __enter__(self) -> PersistentTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _ip("link", "del", self.ifname, check=False)


class QmpClient:
    """A QMP client over a unix socket (stdlib JSON), with a reader thread.

    Events are kept in :attr:`events` as ``(monotonic time received, event)``;
    QEMU's own timestamp is in ``event["timestamp"]``.
    """

    def __init__(self, path: str | Path, timeout: float = 10.0):
        self.path = str(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.path)
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to QMP {self.path}: {exc}") from exc
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self._file = self.sock.makefile("rb")
        greeting = json.loads(self._file.readline() or b"{}")
        if "QMP" not in greeting:
            raise GuestError(f"no QMP greeting on {self.path}: {greeting}")
        self.sock.settimeout(None)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def _read(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                with self._cond:
                    if "event" in msg:
                        self.events.append((time.monotonic(), msg))
                    elif "id" in msg:
                        self._replies[msg["id"]] = msg
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Run a QMP command; return its ``return`` or raise with QEMU's error."""
        rid = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise GuestError(f"QMP {command}: {exc}") from exc
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise GuestError(f"QMP {command}: no answer "
                                     f"({'monitor closed' if self._closed else 'timeout'})")
                self._cond.wait(left)
            reply = self._replies.pop(rid)
        if "error" in reply:
            raise GuestError(f"QMP {command} failed: {reply['error']}")
        return reply.get("return")

    def wait_event(self, name: str, timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        """The first event called ``name`` at index ``since`` or later in :attr:`events`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, ev in self.events[since:]:
                    if ev["event"] == name:
                        return ev
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise GuestError(f"no QMP event {name} within {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class RunResult:
    """What a command run in the guest did."""

    rc: int
    stdout: str
    stderr: str
    timed_out: bool


class QemuGuest:
    """One QEMU guest; a context manager (``with QemuGuest(...) as g``) that boots it."""

    def __init__(self, tap: str, workdir: Path, *, mac: str = "02:00:00:c6:00:01",
                 ip: str | None = None, ip6: str | None = None, gw: str | None = None,
                 root9p: bool = True, echo_port: int | None = None,
                 tap_by_qemu: bool = True, memory_mb: int = 512,
                 incoming: str | None = None, extra_args: Sequence[str] = (),
                 vtl_qmp_path: Path | None = None):
        self._settings = dict(mac=mac, ip=ip, ip6=ip6, gw=gw, root9p=root9p,
                              echo_port=echo_port, tap_by_qemu=tap_by_qemu,
                              memory_mb=memory_mb, extra_args=list(extra_args))
        reason = missing_guest()
        if reason:
            raise GuestError(reason)
        self.tap, self.mac, self.workdir = tap, mac, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ip, self.ip6, self.gw = ip, ip6, gw
        self.root9p, self.echo_port = root9p, echo_port
        self.tap_by_qemu, self.memory_mb = tap_by_qemu, memory_mb
        self.incoming, self.extra_args = incoming, list(extra_args)
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.qmp_path = self.workdir / "qmp-test.sock"
        # VTL's monitor: a restored guest keeps its predecessor's, so a bridge configured
        # with that path follows the VM across the restore
        self.vtl_qmp_path = vtl_qmp_path or self.workdir / "qmp-vtl.sock"
        self.agent_path = self.workdir / "agent.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self._agent: socket.socket | None = None
        self._agent_buf = b""
        self._agent_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.started_at = 0.0
        self.boot_s: float | None = None

    # -- life cycle -----------------------------------------------------------------

    def __enter__(self) -> QemuGuest:
        try:
            self.start()
            if self.incoming is None:
                self.wait_booted()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cmdline(self) -> str:
        args = ["console=ttyS0", "panic=-1", "quiet"]
        for key, value in (("ip", self.ip), ("ip6", self.ip6), ("gw", self.gw),
                           ("echo", self.echo_port)):
            if value is not None:
                args.append(f"vm.{key}={value}")
        if self.root9p:
            args.append(f"vm.agent={AGENT}")
        else:
            args.append("vm.root=none")
        return " ".join(args)

    def argv(self) -> list[str]:
        d = guest_dir()
        argv = [QEMU, "-accel", "tcg", "-machine", "pc", "-m", str(self.memory_mb),
                "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initrd.img"),
                "-append", self.cmdline(), "-serial", f"file:{self.serial_log}",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},romfile=",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=agent",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-qmp", f"unix:{self.vtl_qmp_path},server=on,wait=off"]
        if QBOOT.exists():
            argv += ["-bios", str(QBOOT)]
        if self.root9p:
            argv += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                                "readonly=on,multidevs=remap"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        return argv + self.extra_args

    def start(self) -> None:
        """Start QEMU, connect the test's QMP monitor and bring the TAP's host side up."""
        for p in (self.qmp_path, self.vtl_qmp_path, self.agent_path, self.serial_log):
            p.unlink(missing_ok=True)
        if not self.tap_by_qemu and not link_exists(self.tap):
            raise GuestError(f"persistent TAP {self.tap} does not exist")
        self.started_at = time.monotonic()
        with open(self.qemu_log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        self._wait(lambda: self.qmp_path.exists() and link_exists(self.tap), 15,
                   "QEMU made no QMP socket or TAP")
        self.qmp = QmpClient(self.qmp_path)
        if self.tap_by_qemu:
            _tap_host_side_up(self.tap)

    def wait_booted(self, timeout: float = 60.0) -> float:
        """Wait until the guest answers (the agent, or the init's ready line); seconds taken."""
        if self.root9p:
            deadline = time.monotonic() + timeout
            while True:
                self._check_alive()
                try:
                    self.request("ping", timeout=1.0)
                    break
                except GuestError:
                    if time.monotonic() > deadline:
                        raise self._failure(
                            f"the guest agent did not answer in {timeout} s") from None
        else:
            self._wait(lambda: "vtl-guest: ready" in self._serial(), timeout,
                       "the guest did not say ready")
        self.boot_s = time.monotonic() - self.started_at
        return self.boot_s

    def close(self) -> None:
        """Kill QEMU (quit, then SIGKILL) and remove the TAP if QEMU made it; never raises."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self.qmp is not None:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.qmp.execute("quit", timeout=2)
                except GuestError:
                    pass
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.tap_by_qemu and link_exists(self.tap):
            _ip("link", "del", self.tap, check=False)
        for p in (self.qmp_path, self.vtl_qmp_path, self.agent_path):
            p.unlink(missing_ok=True)

    # -- QMP ------------------------------------------------------------------------

    def pause(self) -> float:
        """QMP ``stop``; returns the monotonic time just before it was sent."""
        assert self.qmp is not None
        t = time.monotonic()
        self.qmp.execute("stop")
        return t

    def resume(self) -> float:
        """QMP ``cont``; returns the monotonic time just before it was sent."""
        assert self.qmp is not None
        t = time.monotonic()
        self.qmp.execute("cont")
        return t

    def status(self) -> str:
        assert self.qmp is not None
        return str(self.qmp.execute("query-status")["status"])

    def migrate_to_file(self, path: Path, timeout: float = 60.0) -> None:
        """Stop the guest and save its state to ``path`` (restore: ``incoming="exec:cat PATH"``)."""
        assert self.qmp is not None
        if self.status() == "running":
            self.qmp.execute("stop")
        self.qmp.execute("migrate", uri=f"exec:cat > {path}")
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.execute("query-migrate")
            if info.get("status") == "completed":
                return
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise self._failure(f"migration to {path}: {info}")
            time.sleep(0.05)

    def restored(self, workdir: Path, state: Path) -> QemuGuest:
        """A new guest with the same devices and TAP that will load ``state`` (saved by
        :meth:`migrate_to_file`); enter it with ``with``, then :meth:`wait_incoming` and
        :meth:`resume`. Use a persistent TAP: QEMU's own TAP goes when this QEMU quits."""
        return QemuGuest(self.tap, workdir, incoming=f"exec:cat {state}",
                         vtl_qmp_path=self.vtl_qmp_path, **self._settings)  # type: ignore[arg-type]

    def wait_incoming(self, timeout: float = 60.0) -> None:
        """Wait until a guest started with ``incoming`` has loaded its state (it is then
        paused: :meth:`resume` runs it)."""
        self._wait(lambda: self.status() != "inmigrate", timeout, "the incoming state did "
                   "not load")

    # -- the guest agent ------------------------------------------------------------

    def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one request to the guest agent and return its answer (``ok`` checked)."""
        if not self.root9p:
            raise GuestError("a busybox guest (root9p=False) has no agent")
        rid = next(self._ids)
        with self._agent_lock:
            deadline = time.monotonic() + timeout
            if self._agent is None:
                self._agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self._agent.connect(str(self.agent_path))
                except OSError as exc:
                    self._agent.close()
                    self._agent = None
                    raise GuestError(f"agent socket: {exc}") from exc
                self._agent_buf = b""
            try:
                self._agent.sendall(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
            except OSError as exc:
                self._agent.close()
                self._agent = None
                raise GuestError(f"guest {op}: agent socket: {exc}") from exc
            while True:
                while b"\n" in self._agent_buf:
                    line, self._agent_buf = self._agent_buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if msg.get("id") != rid:
                        continue  # a late answer to an earlier request that timed out
                    if not msg.get("ok"):
                        raise GuestError(f"guest {op}: {msg.get('error')}")
                    return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"guest {op}: no answer within {timeout} s")
                self._agent.settimeout(left)
                try:
                    chunk = self._agent.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    self._agent.close()
                    self._agent = None
                    raise GuestError(f"guest {op}: agent socket closed")
                self._agent_buf += chunk

    def run(self, cmd: Sequence[str] | str, timeout: float = 30.0, check: bool = True,
            input: str = "") -> RunResult:
        """Run a command in the guest (a list, or a string for ``sh -c``) and wait for it."""
        what = {"sh": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
        msg = self.request("run", timeout=timeout + 10, timeout_s=timeout, input=input, **what)
        res = RunResult(msg["rc"], msg["stdout"], msg["stderr"], msg["timed_out"])
        if check and (res.rc != 0 or res.timed_out):
            raise GuestError(f"`{cmd}` in the guest exited {res.rc}"
                             f"{' (timed out)' if res.timed_out else ''}: "
                             f"{res.stderr.strip()[-800:]}")
        return res

    def spawn(self, cmd: Sequence[str] | str, log: str = "/dev/null") -> int:
        """Start a background command in the guest; its pid (stdout and stderr to ``log``)."""
        what = {"sh": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
        return int(self.request("spawn", log=log, **what)["pid"])

    def poll(self, pid: int) -> int | None:
        return self.request("poll", pid=pid)["rc"]

    def kill(self, pid: int, sig: int = signal.SIGTERM) -> None:
        self.request("kill", pid=pid, sig=int(sig))

    def read_file(self, path: str) -> bytes:
        return base64.b64decode(self.request("read", path=path)["data"])

    def write_file(self, path: str, data: bytes) -> None:
        self.request("write", path=path, data=base64.b64encode(data).decode())

    # -- diagnostics ----------------------------------------------------------------

    def _serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def serial_tail(self, lines: int = 30) -> str:
        return "\n".join(self._serial().splitlines()[-lines:])

    def _failure(self, what: str) -> GuestError:
        try:
            qemu = self.qemu_log.read_text(errors="replace").strip()[-1500:]
        except OSError:
            qemu = ""
        return GuestError(f"{what}\n--- serial console (tail) ---\n{self.serial_tail()}\n"
                          f"--- qemu ---\n{qemu}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise self._failure(f"QEMU exited with {self.proc.returncode}")

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._failure(f"{what} within {timeout} s")
            time.sleep(0.05)
