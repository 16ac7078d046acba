"""The socks end-to-end topology: a VM, a silent network, a real SOCKS5 server, real servers.

::

    guest netns (the VM)  --TAP--  vtl run [socks]  --AF_PACKET-- veth --eth0-- peer netns
    10.198.0.1/24, fd00:198::1/64       |                                   (the "network":
    default via 10.198.0.254 / ::fe     | TCP to 127.0.0.1:PORT              must see nothing)
    resolv.conf: 10.198.0.254           v
                          danted (root netns, a private mount namespace)
                                        | external: veth TAGs 10.195.0.1 / fd00:195::1
                                        v
                          servers netns: httpsha 10.195.0.2:8080 and [fd00:195::2]:8080,
                                         dnsmasq on 10.195.0.2 / fd00:195::2 port 53
                                         (web.vtl.test -> both addresses)

Why the servers are not in the peer namespace: the uplink leads to the peer, so if
VTL leaked a frame onto it, a server there could answer and a test would pass for
the wrong reason. The peer namespace has no route to 10.195.0.0/24 and does not
forward; only the root namespace (where danted runs) reaches the servers, over a
veth of their own. Danted may connect only to the servers' prefixes (every other
destination is blocked by its rules, so a VM connection to an unknown address is
refused by the proxy and nothing leaves the machine through the host's default route).

Danted runs in the root network namespace but in a private mount namespace
(``unshare --mount``), where three files are bind-mounted over the host's:
``/etc/resolv.conf`` (so it resolves names through the servers' dnsmasq: fake-ip
mode CONNECTs by hostname), ``/etc/passwd`` (the host's plus one user,
:data:`SOCKS_USER`) and ``/etc/shadow`` (that user's hash only), for ``socksmethod:
username``, which checks system passwords. So no system user is created (nothing
to remove if a test dies, no race with other users of the machine), the machine's
own files are never touched, and the extra user exists only for that danted.
``socksmethod: username none``: a client that offers username/password must pass
the check, one that offers only "no auth" is let in.

The guest is the Linux kernel with real programs. Its default gateways
(10.198.0.254, fd00:198::fe) exist nowhere: VTL answers ARP/ND for them, and
``/etc/netns/GUEST/resolv.conf`` points the guest's resolver at 10.198.0.254, which
VTL answers too. The guest-side probes (ARP/ND with scapy, DNS with dnspython, UDP,
raw IP, ping) are the ``main`` of this file, run with the venv's Python inside the
guest namespace; each prints one JSON line and bounds every wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vtl.bridge.topology import Topology
from vtlnet import Net, VtlProcess, wait_for

from vtl.errors import SetupError

HERE = Path(__file__).resolve()

SRV_HOST_IP, SRV_IP = "10.195.0.1", "10.195.0.2"
SRV_HOST_IP6, SRV_IP6 = "fd00:195::1", "fd00:195::2"
SRV_NETS = ("10.195.0.0/24", "fd00:195::/64")
GW_IP, GW_IP6 = "10.198.0.254", "fd00:198::fe"
GATEWAY_MAC = "02:5c:0c:5e:00:fe"
WEB_NAME = "web.vtl.test"
NX_NAME = "nx.vtl.test"  # dnsmasq answers NXDOMAIN (local domain vtl.test)
FAKE_POOL, FAKE6_POOL = "198.18.0.0/15", "fd98:18::/64"
HTTP_PORT = 8080
SOCKS_USER, SOCKS_PASSWORD = "vtlsocks", "Corr3ct-h0rse"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ---------------------------------------------------------------- host side

class Dante:
    """danted in the root network namespace, in a private mount namespace.

    Listens on ``127.0.0.1:port`` (a free port chosen at construction, kept across
    :meth:`stop`/:meth:`start`), connects out through ``external_if`` and only to
    the prefixes in ``allow``; resolves names with ``nameserver`` (if given). Its
    log (connections, refusals, auth failures) is :meth:`log`.
    """

    def __init__(self, topo: Topology, tmp: Path, external_if: str,
                 allow: Iterable[str], nameserver: str | None = None,
                 users: dict[str, str] | None = None, port: int = 0,
                 log_connects: bool = True):
        self.topo, self.dir = topo, tmp / "danted"
        self.dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.logfile = self.dir / "danted.log"
        self.proc: subprocess.Popen[bytes] | None = None
        users = {SOCKS_USER: SOCKS_PASSWORD} if users is None else users
        # one keyword a line: "command: connect log: error" would read "log" as a command
        log = "connect error" if log_connects else "error"
        rules = "\n".join(
            f"socks pass {{\n  from: 0/0 to: {net}\n  command: connect\n  log: {log}\n}}"
            for net in allow)
        (self.dir / "danted.conf").write_text(f"""\
logoutput: {self.logfile}
internal: 127.0.0.1 port = {self.port}
external: {external_if}
external.rotation: route
socksmethod: username none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
timeout.negotiate: 10
timeout.connect: 5
client pass {{
  from: 127.0.0.0/8 to: 0/0
  log: error
}}
{rules}
socks block {{
  from: 0/0 to: 0/0
  log: connect error
}}
""")
        binds = []
        if nameserver:
            (self.dir / "resolv.conf").write_text(f"nameserver {nameserver}\n"
                                                  "options timeout:2 attempts:2\n")
            binds.append(("resolv.conf", "/etc/resolv.conf"))
        if users:
            self._write_passwd(users)
            binds += [("passwd", "/etc/passwd"), ("shadow", "/etc/shadow")]
        mounts = " && ".join(f"mount --bind '{self.dir / src}' {dst}" for src, dst in binds)
        self.argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f"{mounts + ' && ' if mounts else ''}exec danted -f "
                     f"'{self.dir / 'danted.conf'}' -p '{self.dir / 'danted.pid'}'"]

    def _write_passwd(self, users: dict[str, str]) -> None:
        # passwd: the host's (no secrets; danted needs root and nobody) plus ours;
        # shadow: ours only (no copy of the host's password hashes lies around)
        passwd = Path("/etc/passwd").read_text()
        shadow = ""
        for i, (user, password) in enumerate(users.items()):
            crypted = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password,
                                     capture_output=True, text=True, check=True,
                                     timeout=10).stdout.strip()
            passwd += f"{user}:x:{61900 + i}:65534::/nonexistent:/usr/sbin/nologin\n"
            shadow += f"{user}:{crypted}:19000:0:99999:7:::\n"
        (self.dir / "passwd").write_text(passwd)
        fd = os.open(self.dir / "shadow", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(shadow)

    def url(self, user: str | None = None, password: str | None = None) -> str:
        cred = f"{user}:{password}@" if user is not None else ""
        return f"socks5://{cred}127.0.0.1:{self.port}"

    @property
    def where(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "danted already runs"
        log = open(self.dir / "danted.stderr", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = self.topo.spawn(None, self.argv, stdout=log, stderr=log)
        finally:
            log.close()
        if not wait_for(lambda: self.listening() or self.proc.poll() is not None,
                        timeout):
            self.stop()
            raise SetupError(f"danted did not listen on {self.where} in {timeout:g} s:\n"
                             + self.log())
        if not self.listening():
            raise SetupError(f"danted exited {self.proc.returncode}:\n" + self.log())

    def listening(self) -> bool:
        out = subprocess.run(["ss", "-ltnH", "src", "127.0.0.1", "sport", f"= :{self.port}"],
                             capture_output=True, text=True, timeout=10).stdout
        return bool(out.strip())

    def stop(self) -> None:
        if self.proc is not None:
            self.topo.stop_proc(self.proc)
            if self.proc in self.topo.procs:
                self.topo.procs.remove(self.proc)
        wait_for(lambda: not self.listening(), 5)

    def log(self) -> str:
        parts = []
        for name in ("danted.stderr", "danted.log"):
            p = self.dir / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

def free_port() -> int:
    """A TCP port nothing listens on right now on 127.0.0.1 (chosen by the kernel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

class ServersAsPeer:
    """What :mod:`tcptools` needs of a :class:`vtlnet.Net`, with the servers namespace
    in the peer's role (so ``parallel_downloads``/``upload`` find the servers' httpsha)."""

    def __init__(self, snet: SocksNet):
        self.topo, self.guest_ns, self.peer_ns = snet.topo, snet.guest_ns, snet.servers_ns
        self.guest, self.peer = snet.guest, snet.servers

class SocksNet:
    """:class:`vtlnet.Net` (guest, uplink, peer) plus the servers namespace, dnsmasq
    and danted of the module docstring. :meth:`close` removes all of it."""

    def __init__(self, topo: Topology, tag: str, tmp: Path, dante: bool = True):
        self.topo, self.tag, self.tmp = topo, tag, tmp
        self.net = Net(topo, tag, tmp)
        self.guest_ns, self.peer_ns = self.net.guest_ns, self.net.peer_ns
        self.tap, self.uplink = self.net.tap, self.net.uplink
        self.servers_ns = topo.netns(f"{tag}-srv")
        self.srv_if = f"{tag}s"
        topo.veth(self.srv_if, "eth0", self.servers_ns)
        topo.sysctl(f"net.ipv6.conf.{self.srv_if}.disable_ipv6", "0")
        _ip("addr", "add", f"{SRV_HOST_IP}/24", "dev", self.srv_if)
        _ip("-6", "addr", "add", f"{SRV_HOST_IP6}/64", "dev", self.srv_if, "nodad")
        topo.addr(self.servers_ns, "eth0", f"{SRV_IP}/24")
        self.servers(["ip", "-6", "addr", "add", f"{SRV_IP6}/64", "dev", "eth0", "nodad"])
        for host in (SRV_IP, SRV_IP6):
            topo.spawn(self.servers_ns, [sys.executable, str(HERE.parent / "httpsha.py"),
                                         host, str(HTTP_PORT)])
        pidfile = tmp / "dnsmasq.pid"
        topo.spawn(self.servers_ns, [
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={SRV_IP}",
            f"--listen-address={SRV_IP6}", "--except-interface=lo", "--user=root",
            f"--pid-file={pidfile}", "--local=/vtl.test/",
            f"--address=/{WEB_NAME}/{SRV_IP}", f"--address=/{WEB_NAME}/{SRV_IP6}",
            f"--log-facility={tmp / 'dnsmasq.log'}", "--log-queries"])
        for host in (SRV_IP, url_host(SRV_IP6)):
            topo.wait_tcp(self.servers_ns, host, HTTP_PORT)
            topo.wait_tcp(self.servers_ns, host, 53)
        self.dante = Dante(topo, tmp, self.srv_if, SRV_NETS, nameserver=SRV_IP)
        if dante:
            self.dante.start()
        # last, so that a failure above leaves nothing outside what topo.close() removes
        self.etc_netns = Path("/etc/netns") / self.guest_ns
        self._made_etc_netns = not self.etc_netns.parent.exists()
        self.etc_netns.mkdir(parents=True, exist_ok=True)
        (self.etc_netns / "resolv.conf").write_text(
            f"nameserver {GW_IP}\noptions timeout:2 attempts:2\n")
        self.vtl: VtlProcess | None = None

    # -- the bridge

    def socks(self, dns: str = "fake-ip", proxy: str | None = None,
              **options: Any) -> dict[str, Any]:
        """The ``[[services]] use = "socks"`` table for this topology."""
        return {"use": "socks", "proxy": proxy or self.dante.url(), "dns": dns,
                "fake_ip_pool": FAKE_POOL, "fake_ip6_pool": FAKE6_POOL,
                "gateway_mac": GATEWAY_MAC, "connect_timeout_s": 5, **options}

    def start(self, services: list[dict[str, Any]] | dict[str, Any] | None = None,
              **bridge: Any) -> VtlProcess:
        """``vtl run`` with ``services`` (default: one socks, fake-ip), then the guest's
        addresses and default routes via the gateways that only VTL answers for."""
        if isinstance(services, dict):
            services = [services]
        self.vtl = self.net.start([self.socks()] if services is None else services,
                                  **bridge)
        self.guest(["ip", "route", "add", "default", "via", GW_IP])
        self.guest(["ip", "-6", "route", "add", "default", "via", GW_IP6, "dev", self.tap])
        return self.vtl

    def stop(self) -> None:
        self.net.stop_all()

    def close(self) -> None:
        try:
            self.net.stop_all()
        finally:
            shutil.rmtree(self.etc_netns, ignore_errors=True)
            if self._made_etc_netns:
                try:
                    self.etc_netns.parent.rmdir()
                except OSError:
                    pass  # someone else's namespace files are there now

    def dns_log(self) -> str:
        """dnsmasq's query log (``query[A] NAME from ADDRESS`` lines)."""
        p = self.tmp / "dnsmasq.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- running things

    def guest(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.guest_ns, cmd, timeout=timeout, check=check)

    def servers(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.servers_ns, cmd, timeout=timeout, check=check)

    def peer(self, cmd: list[str] | str, timeout: float = 60, check: bool = True):
        return self.topo.run(self.peer_ns, cmd, timeout=timeout, check=check)

    def as_peer(self) -> ServersAsPeer:
        return ServersAsPeer(self)

    def probe(self, *args: Any, timeout: float = 60) -> Any:
        """Run ``socksnet.py ARGS`` (a guest-side probe) in the guest; its JSON result."""
        proc = self.guest([sys.executable, str(HERE), *map(str, args)], timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def curl_sha256(self, url: str, *flags: str, timeout: float = 120) -> str:
        """curl in the guest GETs ``url`` (names resolved by the guest's resolver, i.e.
        VTL); the SHA-256 hex of the body."""
        script = (f"curl -sS --fail --max-time {timeout:g} {' '.join(flags)} '{url}' "
                  "| sha256sum")
        out = self.guest(["bash", "-o", "pipefail", "-c", script], timeout=timeout + 10)
        return out.stdout.split()[0]

    def curl_upload(self, url: str, size: int, seed: int, *flags: str,
                    timeout: float = 120) -> str:
        """curl in the guest PUTs ``size`` seeded bytes to ``url``; the SHA-256 hex the
        server computed over what it received."""
        gen = f"'{sys.executable}' '{HERE.parent / 'tcpprobe.py'}' gen {size} {seed}"
        script = (f"{gen} | curl -sS --fail --max-time {timeout:g} {' '.join(flags)} "
                  f"-H 'Expect:' -T - '{url}'")
        out = self.guest(["bash", "-o", "pipefail", "-c", script], timeout=timeout + 10)
        return out.stdout.strip()

    def capture(self, netns: str, ifname: str, pcap: Path,
                direction: str = "in") -> subprocess.Popen[bytes]:
        """tcpdump on ``ifname`` in ``netns`` (frames received: ``direction="in"``) into
        ``pcap``; returns once it is capturing. Stop it with :meth:`stop_capture`."""
        err = pcap.with_suffix(".stderr")
        with open(err, "wb") as f:
            # --immediate-mode: else frames wait in the capture ring, and are lost on SIGTERM
            proc = self.topo.spawn(netns, ["tcpdump", "-n", "-U", "--immediate-mode", "-Z", "root",
                                           "-i", ifname, "-Q", direction, "-w", str(pcap)],
                                   stderr=f)
        if not wait_for(lambda: "listening on" in err.read_text()
                        or proc.poll() is not None, 10):
            raise SetupError("tcpdump did not start in 10 s")
        if proc.poll() is not None:
            raise SetupError(f"tcpdump exited {proc.returncode}: {err.read_text()}")
        return proc

    def stop_capture(self, proc: subprocess.Popen[bytes]) -> None:
        time.sleep(0.3)  # frames still in flight
        self.topo.stop_proc(proc)

def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise SetupError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

def stats(vtl: VtlProcess) -> dict[str, Any]:
    """The latest ``stats {...}`` (or final ``stopped; {...}``) snapshot the bridge logged."""
    for line in reversed(vtl.lines):
        for marker in ("stats ", "stopped; "):
            if marker in line:
                return json.loads(line.split(marker, 1)[1])
    raise AssertionError("no stats line yet:\n" + vtl.stderr[-2000:])

def socks_counters(vtl: VtlProcess) -> dict[str, Any]:
    return stats(vtl)["services"]["socks"]

def send_marker(ifname: str, payload: bytes = b"vtl-socks-test-marker") -> bytes:
    """Transmit one frame (ethertype 0x88b5, local experimental) on ``ifname`` in the root
    namespace, to prove that a capture on the far end of that link sees frames."""
    frame = b"\xff" * 6 + bytes.fromhex("02000000beef") + b"\x88\xb5" + payload.ljust(46)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(frame)
    return frame

# ---------------------------------------------------------------- guest side

def _timed(fn, *args: Any) -> dict[str, Any]:
    t = time.monotonic()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 (reported, never raised)
        out = {"outcome": f"exception: {type(exc).__name__}: {exc}"}
    out["seconds"] = round(time.monotonic() - t, 4)
    return out


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _errname(e: OSError) -> str:
    import errno
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def probe_tcp(host: str, port: int, timeout: float, request: bool) -> dict[str, Any]:
    """connect() (a name is resolved by the guest's resolver first); with ``request``,
    GET /bytes/1000?seed=3 and hash the body."""
    import hashlib
    s: socket.socket | None = None
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        if not request:
            return {"outcome": "connected"}
        s.sendall(f"GET /bytes/1000?seed=3 HTTP/1.1\r\nHost: {url_host(host)}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        body = data.partition(b"\r\n\r\n")[2]
        return {"outcome": "data", "sha256": hashlib.sha256(body).hexdigest(),
                "bytes": len(body)}
    except ConnectionRefusedError:
        return {"outcome": "refused"}
    except ConnectionResetError:
        return {"outcome": "reset"}
    except TimeoutError:
        return {"outcome": "timeout"}
    except socket.gaierror as e:
        return {"outcome": f"resolve: {e}"}
    except OSError as e:
        return {"outcome": "error:" + _errname(e)}
    finally:
        if s is not None:
            s.close()


def probe_dns(server: str, name: str, rdtype: str, proto: str, timeout: float) -> dict[str, Any]:
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode
    q = dns.message.make_query(name, rdtype)
    try:
        if proto == "tcp":
            r = dns.query.tcp(q, server, timeout=timeout)
        else:
            r = dns.query.udp(q, server, timeout=timeout)
    except dns.exception.Timeout:
        return {"outcome": "timeout"}
    except ConnectionRefusedError:
        return {"outcome": "refused"}
    except OSError as e:
        return {"outcome": "error:" + _errname(e)}
    answers = [rd.to_text() for rrset in r.answer for rd in rrset]
    return {"outcome": "dns", "rcode": dns.rcode.to_text(r.rcode()), "answers": answers,
            "id_matches": r.id == q.id}


def probe_udp(host: str, port: int, timeout: float) -> dict[str, Any]:
    """A connected UDP socket sends a datagram and waits: a reply, an ICMP error, or nothing."""
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.send(b"hello?")
        s.recv(2048)
        return {"outcome": "reply"}
    except TimeoutError:
        return {"outcome": "timeout"}
    except OSError as e:
        # ICMP admin-prohibited: EHOSTUNREACH (IPv4 code 13), EACCES (ICMPv6 code 1)
        return {"outcome": "icmp:" + _errname(e)}
    finally:
        s.close()


def probe_ping(host: str, timeout: float) -> dict[str, Any]:
    cmd = ["ping", "-6" if ":" in host else "-4", "-n", "-c", "1", "-W", f"{timeout:g}", host]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    out = (proc.stdout + proc.stderr).lower()
    if "filtered" in out or "prohibited" in out:
        outcome = "icmp:prohibited"
    elif "unreachable" in out:
        outcome = "icmp:unreachable"
    elif " 0% packet loss" in out:
        outcome = "reply"
    else:
        outcome = "timeout"
    return {"outcome": outcome, "output": proc.stdout.strip().splitlines()[1:2]}


def probe_rawproto(host: str, proto: int, timeout: float) -> dict[str, Any]:
    """One IPv4 datagram of protocol ``proto``; waits for an ICMP error about it."""
    import select
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    try:
        raw.sendto(b"vtl-socks-raw-probe", (host, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([icmp], [], [], left)[0]:
                break
            pkt = icmp.recv(2048)
            ihl = (pkt[0] & 15) * 4
            itype, code = pkt[ihl], pkt[ihl + 1]
            inner = pkt[ihl + 8:]
            if itype == 3 and len(inner) >= 20 and inner[9] == proto and \
                    socket.inet_ntoa(inner[16:20]) == host:
                return {"outcome": f"icmp:3/{code}"}
        return {"outcome": "timeout"}
    finally:
        icmp.close()
        raw.close()


def probe_neigh(ifname: str, targets: list[str], timeout: float) -> list[dict[str, Any]]:
    """ARP who-has / ND neighbour solicitation for each target (scapy); the MAC that
    answered (an ARP reply from the target's address, or an NA for the target, to
    anyone), or ``None`` after ``timeout``. A target ``dad:ADDR`` is a DAD probe
    (source ::) and ``garp:ADDR`` a gratuitous ARP (sender = target): neither should
    get an answer. Source IPv6 address of the other solicitations: ``GUEST_IP6``."""
    import logging
    import threading
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    from scapy.all import (
        ARP,
        AsyncSniffer,
        Ether,
        ICMPv6ND_NA,
        ICMPv6ND_NS,
        ICMPv6NDOptSrcLLAddr,
        IPv6,
        conf,
        get_if_addr,
        get_if_hwaddr,
        in6_getnsma,
        in6_getnsmac,
        sendp,
    )
    from scapy.utils6 import inet_pton
    conf.verb = 0
    mac = get_if_hwaddr(ifname)
    my_ip = get_if_addr(ifname)
    out = []
    for target in targets:
        kind, _, addr = target.partition(":") if target.startswith(("dad:", "garp:")) \
            else ("", "", target)
        if ":" in addr:
            nsma = socket.inet_ntop(socket.AF_INET6, in6_getnsma(inet_pton(socket.AF_INET6, addr)))
            src = "::" if kind == "dad" else "fd00:198::1"
            pkt = Ether(src=mac, dst=in6_getnsmac(inet_pton(socket.AF_INET6, nsma))) / \
                IPv6(src=src, dst=nsma, hlim=255) / ICMPv6ND_NS(tgt=addr)
            if kind != "dad":
                pkt /= ICMPv6NDOptSrcLLAddr(lladdr=mac)

            def match(p: Any, a: str = addr) -> bool:
                return ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == a and p[Ether].src != mac
        else:
            psrc = addr if kind == "garp" else my_ip
            pkt = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=psrc,
                                                                 pdst=addr)

            def match(p: Any, a: str = addr) -> bool:
                return ARP in p and p[ARP].op == 2 and p[ARP].psrc == a and \
                    p[Ether].src != mac
        started = threading.Event()
        sniffer = AsyncSniffer(iface=ifname, lfilter=match, count=1, store=True,
                               started_callback=started.set)
        sniffer.start()
        started.wait(5)
        t = time.monotonic()
        sendp(pkt, iface=ifname)
        sniffer.join(timeout)
        seconds = time.monotonic() - t
        results = sniffer.stop() if sniffer.running else sniffer.results
        answer = None
        if results:
            ans = results[0]
            answer = ans[ARP].hwsrc if ARP in ans else ans[Ether].src
        out.append({"target": target, "answer": answer, "seconds": round(seconds, 4)})
    return out


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    out: Any
    if cmd == "tcp":  # HOST PORT TIMEOUT [get]
        out = _timed(probe_tcp, args[0], int(args[1]), float(args[2]), args[3:] == ["get"])
    elif cmd == "dns":  # SERVER NAME TYPE udp|tcp TIMEOUT
        out = _timed(probe_dns, args[0], args[1], args[2], args[3], float(args[4]))
    elif cmd == "udp":  # HOST PORT TIMEOUT
        out = _timed(probe_udp, args[0], int(args[1]), float(args[2]))
    elif cmd == "ping":  # HOST TIMEOUT
        out = _timed(probe_ping, args[0], float(args[1]))
    elif cmd == "raw":  # HOST PROTO TIMEOUT
        out = _timed(probe_rawproto, args[0], int(args[1]), float(args[2]))
    elif cmd == "neigh":  # IFNAME TIMEOUT TARGET...
        out = probe_neigh(args[0], args[2:], float(args[1]))
    elif cmd == "resolve":  # NAME FAMILY(4|6)
        fam = socket.AF_INET6 if args[1] == "6" else socket.AF_INET
        try:
            infos = socket.getaddrinfo(args[0], 80, fam, socket.SOCK_STREAM)
            out = {"addresses": sorted({i[4][0] for i in infos})}
        except socket.gaierror as e:
            out = {"error": str(e)}
    elif cmd == "many":  # JSON list of [cmd, args...]: run each, in order
        results = []
        for item in json.loads(args[0]):
            fn = {"tcp": lambda h, p, t, *g: probe_tcp(h, int(p), float(t), g == ("get",)),
                  "dns": lambda s, n, r, pr, t: probe_dns(s, n, r, pr, float(t)),
                  "udp": lambda h, p, t: probe_udp(h, int(p), float(t)),
                  "ping": lambda h, t: probe_ping(h, float(t)),
                  "raw": lambda h, p, t: probe_rawproto(h, int(p), float(t))}[item[0]]
            results.append({"attempt": " ".join(map(str, item)), **_timed(fn, *item[1:])})
        out = results
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])


@contextlib.contextmanager
def socks_net(prefix: str, tmp_path: Path) -> Iterator[SocksNet]:
    """A :class:`SocksNet` under a unique tag starting with ``prefix``, always removed; when
    the test failed, pytest shows the tails of vtl's stderr and dante's log printed here."""
    tag = prefix + secrets.token_hex(3)
    topo = Topology(tag)
    s: SocksNet | None = None
    try:
        s = SocksNet(topo, tag, tmp_path)
        yield s
    finally:
        if s is not None:
            s.close()  # stops vtl first, so its last lines are in s.vtl.lines
            if s.vtl is not None:
                print("--- vtl stderr (tail)\n" + "".join(
                    ln for ln in s.vtl.lines[-80:] if "stats {" not in ln))
            print("--- danted log (tail)\n" + s.dante.log()[-3000:])
        topo.close()
