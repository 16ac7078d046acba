"""The bridge's UDP sockets for services (vtl.bridge.datagram): an endpoint on loopback
(127.0.0.1 and ::1) with a recording deliver, then through a real Bridge (two TAP ports)
with a service that opens a socket in ``start``, handles datagrams under the chain lock,
emits frames toward the guest and sends from ``process``."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from vtl.bridge.chain import Chain
from vtl.bridge.datagram import DatagramEndpoint

from vtl import DROP, Direction, Frame, Service, Verdict
from vtl.datagram import Address, DatagramRequest, DatagramSocket
from vtl.errors import LocalProtocolError, SetupError

LOG = logging.getLogger("vtl.dgramtest")
pytestmark = pytest.mark.timeout(30)
ETHERTYPE = 0x88B5  # IEEE local experimental: the kernel leaves these frames alone
SO_NO_CHECK = 11  # asm-generic/socket.h: send UDP over IPv4 without checksums


def wait_for(pred: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Heard:
    """A deliver callback that records ``(data, source)`` and can say stop."""

    def __init__(self, keep_going: bool = True):
        self.got: list[tuple[bytearray, Address]] = []
        self.batches = 0
        self.keep_going = keep_going
        self.on_batch: Callable[[], None] | None = None

    def __call__(self, batch: list[tuple[bytearray, Address]]) -> bool:
        self.batches += 1
        self.got.extend(batch)
        if self.on_batch is not None:
            self.on_batch()
        return self.keep_going


@pytest.fixture
def endpoints() -> Iterator[list[DatagramEndpoint]]:
    made: list[DatagramEndpoint] = []
    yield made
    for e in made:
        e.close()


def endpoint(made: list[DatagramEndpoint], heard: Heard, host: str = "127.0.0.1",
             **kw: int) -> DatagramEndpoint:
    e = DatagramEndpoint(DatagramRequest(host, 0, **kw), heard, LOG)
    made.append(e)
    e.start()
    return e


@pytest.fixture(params=["127.0.0.1", "::1"])
def host(request: pytest.FixtureRequest) -> str:
    return request.param


def client(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(3.0)
    return s


# -- the endpoint ---------------------------------------------------------------------------

def test_datagrams_arrive_with_their_source_and_replies_go_back(endpoints, host):
    heard = Heard()
    e = endpoint(endpoints, heard, host)
    assert e.local[0] == host and e.local[1] > 0
    as_api: DatagramSocket = e  # the Protocol of vtl.datagram (checked by mypy)
    assert all(callable(getattr(as_api, m)) for m in ("send", "counters", "close"))
    with client(host) as c:
        for i in range(5):
            c.sendto(b"hello %d" % i, e.local)
        wait_for(lambda: len(heard.got) == 5)
        assert [bytes(d) for d, _ in heard.got] == [b"hello %d" % i for i in range(5)]
        mine = c.getsockname()[:2]
        assert all(src == mine for _, src in heard.got)
        assert all(type(d) is bytearray for d, _ in heard.got)
        assert e.send([b"head:", bytearray(b"frame"), memoryview(b"!!")], mine)
        data, src = c.recvfrom(100)
        assert data == b"head:frame!!" and src[:2] == e.local
    c = e.counters()
    assert c["rx"] == 5 and c["rx_bytes"] == 5 * 7 and c["tx"] == 1 and c["tx_bytes"] == 12
    assert c["tx_dropped"] == 0 and c["rx_oversize"] == 0


def test_a_batch_holds_at_most_batch_datagrams(endpoints):
    heard = Heard()
    gate = threading.Event()
    heard.on_batch = lambda: gate.wait(3.0)  # the first batch waits until all were sent
    e = endpoint(endpoints, heard, batch=4)
    with client("127.0.0.1") as c:
        for i in range(10):
            c.sendto(bytes([i]), e.local)
        gate.set()
        wait_for(lambda: len(heard.got) == 10)
    assert heard.batches >= 3
    assert [d[0] for d, _ in heard.got] == list(range(10))


def test_longer_than_max_size_is_dropped_and_counted(endpoints):
    heard = Heard()
    e = endpoint(endpoints, heard, max_size=100)
    with client("127.0.0.1") as c:
        c.sendto(b"x" * 101, e.local)
        c.sendto(b"y" * 100, e.local)
        wait_for(lambda: len(heard.got) == 1)
    assert bytes(heard.got[0][0]) == b"y" * 100
    assert e.counters()["rx_oversize"] == 1 and e.counters()["rx"] == 1


def test_the_kernels_drops_show_in_the_snapshot(endpoints):
    heard = Heard()
    gate = threading.Event()
    heard.on_batch = lambda: gate.wait(3.0)  # a handler that cannot keep up
    e = endpoint(endpoints, heard, rcvbuf=4096, batch=1)
    snap = e.snapshot()
    assert snap["rx_kernel_drops"] == 0 and 0 < snap["rcvbuf"] < 65536
    with client("127.0.0.1") as c:
        for _ in range(100):
            c.sendto(b"x" * 1000, e.local)
        drops = e.snapshot()["rx_kernel_drops"]
        gate.set()
    assert drops > 0 and drops + len(heard.got) <= 100


def test_bind_failures_name_the_address_and_the_reason(endpoints):
    with pytest.raises(SetupError) as exc:
        DatagramEndpoint(DatagramRequest("192.0.2.1", 4789), Heard(), LOG)
    assert str(exc.value) == ("cannot bind UDP 192.0.2.1:4789: Cannot assign requested "
                              "address (is the address on an interface of this host?)")
    e = endpoint(endpoints, Heard())
    with pytest.raises(SetupError, match=rf"cannot bind UDP 127\.0\.0\.1:{e.local[1]}: "
                                         "Address already in use"):
        DatagramEndpoint(DatagramRequest("127.0.0.1", e.local[1]), Heard(), LOG)
    with pytest.raises(SetupError, match=r"cannot bind UDP \[2001:db8::1\]:9: Cannot assign"):
        DatagramEndpoint(DatagramRequest("2001:db8::1", 9), Heard(), LOG)
    with pytest.raises(SetupError, match="not an IPv4 or IPv6 address literal"):
        DatagramEndpoint(DatagramRequest("localhost", 9), Heard(), LOG)


def test_send_failures_return_false_and_are_counted_by_kind(endpoints, caplog):
    caplog.set_level(logging.INFO, logger=LOG.name)
    e = endpoint(endpoints, Heard())
    assert not e.send([b"x" * 70000], ("127.0.0.1", 9))
    assert not e.send([b"x"], ("::1", 9))  # an IPv6 destination from an IPv4 socket
    assert not e.send([b"x"], ("127.0.0.1", 70000))
    c = e.counters()
    assert c["tx_dropped"] == 3 and c["tx_too_big"] == 1 and c["tx_other"] == 2
    assert c["tx"] == 0
    assert "was not sent" in caplog.text
    e.close()
    assert not e.send([b"x"], ("127.0.0.1", 9))
    assert e.counters()["tx_dropped"] == 4


class CountCalls:
    """Wraps an endpoint's real ``sendmsg`` and records how many units each call carried
    (1 without a UDP_SEGMENT control message, else the bytes over the segment size)."""

    def __init__(self, e: DatagramEndpoint):
        self.real = e._sendmsg
        self.calls: list[int] = []
        e._sendmsg = self  # type: ignore[method-assign]

    def __call__(self, parts, cmsgs, flags, dest):  # noqa: ANN001, ANN204
        n = self.real(parts, cmsgs, flags, dest)
        size = int.from_bytes(cmsgs[0][2], sys.byteorder) if cmsgs else 0
        self.calls.append(-(-n // size) if size else 1)
        return n


def receive(s: socket.socket, n: int) -> list[bytes]:
    return [s.recv(70000) for _ in range(n)]


def test_a_train_arrives_as_its_datagrams_in_few_syscalls(endpoints, host):
    e = endpoint(endpoints, Heard(), host)
    assert e.gso, "this kernel has UDP GSO (4.18 and later)"
    calls = CountCalls(e)
    units = [[b"HDR-%03d:" % i, os.urandom(1464)] for i in range(150)]
    units += [[os.urandom(700)], [os.urandom(3000)], [b""], [os.urandom(9)]]
    with client(host) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        assert e.send_train(units, c.getsockname()[:2]) == len(units)
        assert receive(c, len(units)) == [b"".join(u) for u in units]
    # 150 equal units in runs of 44 (64 KB), the 700-byte one ends the fourth run
    assert calls.calls == [44, 44, 44, 19, 1, 1, 1]
    cnt = e.counters()
    assert cnt["tx"] == len(units) and cnt["tx_bytes"] == sum(len(b"".join(u)) for u in units)
    assert e.gso


def test_a_run_is_at_most_one_udp_datagrams_worth(endpoints, host):
    most = 65527 if ":" in host else 65507  # the UDP payload of one IPv6 / IPv4 datagram
    e = endpoint(endpoints, Heard(), host)
    calls = CountCalls(e)
    half = (most + 1) // 2
    units = [[os.urandom(half)], [os.urandom(most - half)],  # exactly the most: one call
             [os.urandom(half)], [os.urandom(most - half + 1)]]  # one byte more: two
    with client(host) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        assert e.send_train(units, c.getsockname()[:2]) == 4
        assert receive(c, 4) == [u[0] for u in units]
    assert calls.calls == [2, 1, 1]


def test_a_kernel_refusing_gso_gets_one_datagram_per_call_from_then_on(endpoints, caplog):
    caplog.set_level(logging.INFO, logger=LOG.name)
    e = endpoint(endpoints, Heard())
    e._sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)  # GSO needs checksums: EINVAL
    calls = CountCalls(e)
    units = [[os.urandom(1000)] for _ in range(5)]
    with client("127.0.0.1") as c:
        assert e.send_train(units, c.getsockname()) == 5
        assert receive(c, 5) == [u[0] for u in units]
        assert not e.gso and "refused UDP GSO" in caplog.text
        assert e.send_train(units, c.getsockname()) == 5
        assert receive(c, 5) == [u[0] for u in units]
    assert calls.calls == [1] * 10  # the refused call raised: not counted
    assert e.counters()["tx"] == 10 and e.counters()["tx_dropped"] == 0


def test_a_train_stops_at_the_first_failure_and_counts_the_rest(endpoints):
    e = endpoint(endpoints, Heard())
    units = [[b"a" * 100], [b"b" * 100], [b"c" * 70000], [b"d" * 100]]
    with client("127.0.0.1") as c:
        assert e.send_train(units, c.getsockname()) == 2
        assert receive(c, 2) == [b"a" * 100, b"b" * 100]
    cnt = e.counters()
    assert cnt["tx"] == 2 and cnt["tx_dropped"] == 2 and cnt["tx_too_big"] == 2
    assert e.send_train(units, ("127.0.0.1", 70000)) == 0  # the whole first run fails
    assert e.counters()["tx_dropped"] == 6 and e.counters()["tx_other"] == 4
    assert e.send_train([], ("127.0.0.1", 9)) == 0
    e.close()
    assert e.send_train(units[:2], ("127.0.0.1", 9)) == 0


def test_close_is_idempotent_stops_the_reader_and_frees_the_port(endpoints):
    heard = Heard()
    e = endpoint(endpoints, heard)
    port = e.local[1]
    e.close()
    e.close()
    assert e.closed and e.join(0.1)
    again = DatagramEndpoint(DatagramRequest("127.0.0.1", port), heard, LOG)  # port is free
    again.close()  # never started
    assert heard.got == []


def test_a_deliver_saying_false_ends_the_reader(endpoints):
    heard = Heard(keep_going=False)
    e = endpoint(endpoints, heard)
    with client("127.0.0.1") as c:
        c.sendto(b"1", e.local)
        assert e.join(3.0)
    assert len(heard.got) == 1


def test_a_deliver_may_close_its_own_endpoint(endpoints):
    heard = Heard()
    e = endpoint(endpoints, heard)
    heard.on_batch = e.close  # from the reader thread: no join of itself
    with client("127.0.0.1") as c:
        c.sendto(b"1", e.local)
        assert e.join(3.0) and e.closed


def test_close_never_waits_long_for_a_reader_blocked_on_the_chain_lock(endpoints):
    lock = threading.Lock()
    entered = threading.Event()
    got: list[bytearray] = []

    def deliver(batch: list[tuple[bytearray, Address]]) -> bool:
        entered.set()
        while not lock.acquire(timeout=0.02):  # as the bridge's deliver does
            if e.closed:
                return False
        try:
            got.extend(d for d, _ in batch)
        finally:
            lock.release()
        return True

    e = DatagramEndpoint(DatagramRequest("127.0.0.1", 0), deliver, LOG)
    endpoints.append(e)
    e.start()
    with lock, client("127.0.0.1") as c:  # the chain lock, held as at chain stop
        c.sendto(b"1", e.local)
        assert entered.wait(3.0)
        t0 = time.monotonic()
        e.close()
        assert time.monotonic() - t0 < 0.5 and e.join(0)
    assert got == [], "nothing delivered after close"


def test_a_chain_without_a_bridge_has_no_datagrams():
    class Opens(Service):
        name = "opens"

        def start(self, now: float) -> None:
            self.ctx.open_datagram(DatagramRequest("127.0.0.1", 0), lambda d, s, n: None)

    chain = Chain.from_services([lambda ctx: Opens(None, ctx)], LOG)
    with pytest.raises(LocalProtocolError, match="open_datagram\\(\\) needs a bridge"):
        chain.start(0.0)


# -- through a real bridge ------------------------------------------------------------------

class Relay(Service):
    """Binds ``host``:0; records datagrams; ``boom`` raises, ``frame:X`` emits a frame
    with payload X toward the guest, ``echo:X`` answers ``re:X``. Frames from the guest
    with :data:`ETHERTYPE` go out as datagrams ``[b"T", frame]`` to :attr:`peer`."""

    name = "relay"

    def __init__(self, ctx, host: str):
        super().__init__(None, ctx)
        self.host = host
        self.heard: list[tuple[bytes, Address, float]] = []
        self.peer: Address | None = None

    def start(self, now: float) -> None:
        self.sock = self.ctx.open_datagram(DatagramRequest(self.host, 0), self.on_datagram)

    def on_datagram(self, data: bytearray, source: Address, now: float) -> None:
        self.heard.append((bytes(data), source, now))
        if data.startswith(b"boom"):
            raise RuntimeError("the handler is broken")
        if data.startswith(b"frame:"):
            eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x07" + ETHERTYPE.to_bytes(2, "big")
            self.ctx.emit(Frame(bytearray(eth + bytes(data[6:]).ljust(46, b"\0"))),
                          Direction.TO_GUEST)
        if data.startswith(b"echo:"):
            self.sock.send([b"re:", memoryview(data)[5:]], source)

    def process(self, frame: Frame, direction: Direction, now: float) -> Verdict:
        data = frame.data
        if len(data) >= 14 and int.from_bytes(data[12:14], "big") == ETHERTYPE \
                and self.peer is not None:
            self.sock.send([b"T", data], self.peer)
            return DROP
        return super().process(frame, direction, now)


def needs_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (TAP ports)")


@pytest.fixture
def bridge_of() -> Iterator[Callable[[str], tuple[object, Relay, str]]]:
    """Makes a bridge with two TAP ports (kernel sides up in the host namespace) and a
    :class:`Relay` on ``host``; returns (bridge, relay, guest ifname); closed at the end."""
    from vtl.bridge.config import parse_config
    from vtl.bridge.engine import Bridge

    made = []

    def make(host: str) -> tuple[object, Relay, str]:
        needs_root()
        tag = secrets.token_hex(3)
        cfg = parse_config({"bridge": {"name": f"d{tag}", "control": False},
                            "ports": {"guest": {"kind": "tap", "ifname": f"vtdg{tag}g"},
                                      "uplink": {"kind": "tap", "ifname": f"vtdg{tag}u"}}})
        chain = Chain.from_services([lambda ctx: Relay(ctx, host)], LOG)
        bridge = Bridge(cfg, LOG, chain=chain)
        made.append(bridge)
        bridge.open()
        bridge.start()
        return bridge, chain.slots[0].service, f"vtdg{tag}g"

    yield make
    for b in made:
        b.close()


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((ifname, ETHERTYPE))
    s.settimeout(3.0)
    return s


@pytest.mark.integration
def test_a_service_gets_datagrams_and_its_frames_reach_the_guest(bridge_of, host):
    bridge, relay, guest_if = bridge_of(host)
    sock = relay.sock
    assert isinstance(sock, DatagramEndpoint) and sock.local[0] == host
    slot = bridge.chain.slots[0]
    with client(host) as c, packet_socket(guest_if) as tap:
        c.sendto(b"frame:hello guest", sock.local)
        data = tap.recv(2048)
        assert data[12:14] == ETHERTYPE.to_bytes(2, "big")
        assert data[14:31] == b"hello guest".ljust(17, b"\0")
        c.sendto(b"boom", sock.local)
        c.sendto(b"echo:still here", sock.local)
        data, src = c.recvfrom(100)
        assert data == b"re:still here" and src[:2] == sock.local
        mine = c.getsockname()[:2]
        assert [(d, s) for d, s, _ in relay.heard] == [
            (b"frame:hello guest", mine), (b"boom", mine), (b"echo:still here", mine)]
        assert all(now <= time.monotonic() for _, _, now in relay.heard)
        assert slot.counters.errors == 1, "a handler that raises counts as a service error"
        assert slot.counters.injected == 1

        # a frame from the guest, sent by the service from process() under the chain lock
        relay.peer = mine
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x09" + ETHERTYPE.to_bytes(2, "big") \
            + b"to the peer".ljust(46, b"\0")
        tap.send(frame)
        data, src = c.recvfrom(2048)
        assert data == b"T" + frame and src[:2] == sock.local

        snap = bridge.snapshot()["datagrams"]
        shown = f"[{host}]" if ":" in host else host
        key = f"relay {shown}:{sock.local[1]}"
        assert snap[key]["rx"] == 3 and snap[key]["tx"] == 2
        assert snap[key]["rx_kernel_drops"] == 0
        assert snap[key]["rcvbuf"] >= 4 << 20, "root asks beyond the system's cap"

        sock.close()  # outside the chain lock: no handler call after it returns
        assert sock.join(0)
        heard = len(relay.heard)
        c.sendto(b"echo:gone", sock.local)
        time.sleep(0.1)
        assert len(relay.heard) == heard
        assert key not in bridge.snapshot()["datagrams"]


@pytest.mark.integration
def test_the_socket_closes_with_the_bridge(bridge_of):
    bridge, relay, _ = bridge_of("127.0.0.1")
    sock = relay.sock
    with client("127.0.0.1") as c:
        c.sendto(b"echo:1", sock.local)
        assert c.recvfrom(100)[0] == b"re:1"
    bridge.close()
    assert sock.closed and sock.join(0)
    again = DatagramEndpoint(DatagramRequest("127.0.0.1", sock.local[1]), Heard(), LOG)
    again.close()  # the port is free again


@pytest.mark.integration
def test_a_bind_failure_stops_the_bridge_from_opening():
    from vtl.bridge.config import parse_config
    from vtl.bridge.engine import Bridge

    needs_root()
    tag = secrets.token_hex(3)
    cfg = parse_config({"bridge": {"name": f"d{tag}", "control": False},
                        "ports": {"guest": {"kind": "tap", "ifname": f"vtdg{tag}g"},
                                  "uplink": {"kind": "tap", "ifname": f"vtdg{tag}u"}}})
    bridge = Bridge(cfg, LOG, chain=Chain.from_services([lambda ctx: Relay(ctx, "192.0.2.1")],
                                                        LOG))
    with pytest.raises(SetupError, match=r"cannot bind UDP 192\.0\.2\.1:0: Cannot assign"):
        bridge.open()
    bridge.close()
    assert not os.path.exists(f"/sys/class/net/vtdg{tag}g"), "the ports were closed"


# -- across a veth pair ---------------------------------------------------------------------

RECEIVER = """
import hashlib, json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 4789))
s.settimeout(5.0)
print("ready", flush=True)
got = []
try:
    for _ in range(int(sys.argv[2])):
        got.append(hashlib.sha256(s.recv(70000)).hexdigest())
except TimeoutError:
    pass
print(json.dumps(got), flush=True)
"""


@pytest.mark.integration
@pytest.mark.parametrize("tx_csum", ["on", "off"])
def test_a_train_crosses_a_veth_into_another_namespace_intact(endpoints, tx_csum):
    """The sender here, a plain UDP socket in a namespace behind a veth (MTU 1500): each
    1472-byte unit (a VXLAN datagram of a 1450-byte packet) arrives whole, in order,
    with a valid checksum (the receiving socket drops bad ones), with the veth's transmit
    checksum offload on or off."""
    import hashlib

    from vtl.bridge.topology import Topology, ip

    needs_root()
    tag = secrets.token_hex(3)
    net = f"198.18.{secrets.randbelow(250)}"
    with Topology(f"vtgso{tag}") as topo:
        ns = topo.netns(f"vtgso{tag}")
        topo.veth(f"vtgso{tag}a", "peer0", ns)
        ip("addr", "add", f"{net}.1/30", "dev", f"vtgso{tag}a")
        topo.addr(ns, "peer0", f"{net}.2/30")
        subprocess.run(["ethtool", "-K", f"vtgso{tag}a", "tx", tx_csum], capture_output=True,
                       check=True)
        units = [[os.urandom(8), os.urandom(1464)] for _ in range(200)] + [[os.urandom(99)]]
        proc = topo.spawn(ns, [sys.executable, "-c", RECEIVER, f"{net}.2", str(len(units))],
                          stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        e = endpoint(endpoints, Heard(), f"{net}.1")
        calls = CountCalls(e)
        assert e.send_train(units, (f"{net}.2", 4789)) == len(units)
        out, _ = proc.communicate(timeout=10)
        got = json.loads(out)
    assert got == [hashlib.sha256(b"".join(u)).hexdigest() for u in units]
    assert calls.calls == [44, 44, 44, 44, 25], "one sendmsg per 64 KB"
    assert e.counters()["tx"] == len(units) and e.gso
