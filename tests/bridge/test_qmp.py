"""The bridge's QMP client (vtl.bridge.qmp) against a fake QEMU monitor speaking QMP on
a unix socket: negotiation, events in order, reconnects, hostile monitors, and a
close() that never waits for a delivery; then through a real Bridge and a service."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qmp_fake import FakeQemu
from vtl.bridge.qmp import QmpWatcher

from vtl.hypervisor import VmEvent

LOG = logging.getLogger("vtl.qmptest")
pytestmark = pytest.mark.timeout(30)


class Heard:
    """A deliver callback that records events and lets the test wait for them."""

    def __init__(self, raises_on: str = "") -> None:
        self.events: list[VmEvent] = []
        self.cond = threading.Condition()
        self.raises_on = raises_on

    def __call__(self, event: VmEvent) -> bool:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()
        if event.kind == self.raises_on:
            raise RuntimeError("the service's handler is broken")
        return True

    def kinds(self) -> list[str]:
        with self.cond:
            return [e.kind for e in self.events]

    def wait(self, count: int, timeout: float = 3.0) -> list[VmEvent]:
        """The first ``count`` events, once that many came (fails after ``timeout``)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.events) >= count, timeout)
            assert ok, f"waited for {count} events, heard {[e.kind for e in self.events]}"
            return list(self.events[:count])


@pytest.fixture
def path() -> Iterator[str]:
    """A short socket path (AF_UNIX paths are at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vqmp", dir="/tmp")
    yield os.path.join(d, "qmp.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[FakeQemu]]:
    made: list[FakeQemu] = []
    yield made
    for s in made:
        if not s.stopped:
            s.stop()


@pytest.fixture
def watch(path: str) -> Iterator[Callable[..., tuple[QmpWatcher, Heard]]]:
    made: list[QmpWatcher] = []

    def start(deliver: Heard | None = None, **kw: object) -> tuple[QmpWatcher, Heard]:
        heard = deliver or Heard()
        w = QmpWatcher(path, heard, LOG, **kw)  # type: ignore[arg-type]
        w.start()
        made.append(w)
        return w, heard

    yield start
    for w in made:
        w.close()
        assert w.join(3.0), "the watcher thread did not end after close()"


def qemu(servers: list[FakeQemu], path: str, **kw: object) -> FakeQemu:
    s = FakeQemu(path, **kw)  # type: ignore[arg-type]
    servers.append(s)
    return s


def test_negotiates_then_says_connected_and_the_vm_status(path, servers, watch):
    server = qemu(servers, path, status="paused")
    w, heard = watch()
    assert heard.wait(2) == [VmEvent("connected"),
                             VmEvent("status", {"running": False, "status": "paused"})]
    assert server.commands == ["qmp_capabilities", "query-status"]
    assert w.connected and w.snapshot()["connects"] == 1


def test_events_arrive_in_order_with_their_data_and_no_timestamp(path, servers, watch):
    server = qemu(servers, path)
    w, heard = watch()
    heard.wait(2)
    server.event("STOP")
    server.event("RESUME")
    server.event("MIGRATION", {"status": "completed"})
    server.event("RESUME")  # out of order: delivered as it came
    server.event("SOME_FUTURE_EVENT", {"x": [1, 2]})
    got = heard.wait(7)[2:]
    assert got == [VmEvent("STOP"), VmEvent("RESUME"),
                   VmEvent("MIGRATION", {"status": "completed"}),
                   VmEvent("RESUME"), VmEvent("SOME_FUTURE_EVENT", {"x": [1, 2]})]
    assert w.snapshot()["events"] == 5 and w.snapshot()["bad_lines"] == 0


def test_events_sent_before_the_status_answer_come_after_status(path, servers, watch):
    qemu(servers, path, status="paused", early_event="STOP")
    _, heard = watch()
    assert [e.kind for e in heard.wait(3)] == ["connected", "status", "STOP"]


def test_a_restarted_qemu_is_followed_again(path, servers, watch, caplog):
    caplog.set_level(logging.INFO, logger=LOG.name)
    first = qemu(servers, path)
    w, heard = watch()
    heard.wait(2)
    first.event("STOP")
    heard.wait(3)
    first.stop()  # QEMU quits (a migration's source)
    assert heard.wait(4)[3] == VmEvent("disconnected")
    assert not w.connected
    t0 = time.monotonic()
    qemu(servers, path, status="inmigrate")  # the destination, on the same path
    got = heard.wait(6)[4:]
    assert got == [VmEvent("connected"), VmEvent("status", {"running": False,
                                                            "status": "inmigrate"})]
    assert time.monotonic() - t0 < 2.5, "reconnect backoff is capped at 2 s"
    assert heard.kinds().count("disconnected") == 1
    text = caplog.text
    assert text.count(f"connected to QMP monitor {path}") == 2
    assert f"lost QMP monitor {path}" in text


def test_a_monitor_absent_at_start_is_waited_for_quietly(path, servers, watch, caplog):
    caplog.set_level(logging.INFO, logger=LOG.name)
    w, heard = watch()
    time.sleep(0.7)  # attempts at 0, 0.2 and 0.6 s
    assert heard.kinds() == []
    assert caplog.text.count(f"no QMP monitor at {path} yet") == 1, "logged once, not per attempt"
    qemu(servers, path)
    assert [e.kind for e in heard.wait(2, timeout=3.0)] == ["connected", "status"]
    assert w.snapshot()["connects"] == 1


def test_garbage_and_non_objects_are_skipped_and_counted(path, servers, watch):
    server = qemu(servers, path, before_greeting=b"\x00\xffjunk\n[1]\n{\"id\": 3}\n")
    w, heard = watch()
    heard.wait(2)
    hostile = [b"\x00\xff\xfe\xc3\x28\n", b"not json at all\n", b"[1, 2, 3]\n", b"42\n",
               b"\"a string\"\n", b"null\n", b"{\"event\": 5}\n", b"{\"event\": \"\"}\n",
               b"{\"event\": \"X\", \"data\": [1]}\n", b"{\"event\": \"" + b"A" * 100 + b"\"}\n",
               b"[" * 200_000 + b"\n", b"1" * 100_000 + b"\n", b"{\"return\": {}}\n",
               b"\n\r\n   \n"]
    for raw in hostile:
        server.send(raw)
    server.event("STOP")
    assert heard.wait(3)[2] == VmEvent("STOP")
    snap = w.snapshot()
    assert snap["bad_lines"] == 3 + len(hostile) - 1, snap  # blank lines are not counted
    assert snap["connects"] == 1 and snap["oversized"] == 0


@pytest.mark.parametrize("where", ["before the greeting", "after negotiation"])
def test_a_huge_line_drops_the_connection_and_it_reconnects(path, servers, watch, where):
    huge = b"{\"event\": \"STOP\", \"data\": {\"x\": \"" + b"A" * (5 << 20)
    server = qemu(servers, path, before_greeting=huge if where[0] == "b" else b"")
    w, heard = watch(backoff=(0.05, 0.2))
    if where[0] == "b":
        deadline = time.monotonic() + 3
        while w.snapshot()["oversized"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.before_greeting = b""
        assert [e.kind for e in heard.wait(2)] == ["connected", "status"]
    else:
        heard.wait(2)
        threading.Thread(target=server.send, args=(huge + b"\"}}\n",), daemon=True).start()
        assert [e.kind for e in heard.wait(5)[2:]] == ["disconnected", "connected", "status"]
    snap = w.snapshot()
    assert snap["oversized"] >= 1 and snap["events"] == 0 and server.accepted >= 2
    if where[0] == "a":
        assert snap["oversized"] == 1


def test_a_missing_greeting_times_out_and_is_retried(path, servers, watch):
    server = qemu(servers, path, greet=False)
    w, heard = watch(timeout=0.3, backoff=(0.05, 0.1))
    deadline = time.monotonic() + 3
    while server.accepted < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.accepted >= 2 and heard.kinds() == [] and w.snapshot()["timeouts"] >= 1
    assert server.commands == []
    server.greet = True
    assert [e.kind for e in heard.wait(2)] == ["connected", "status"]


def test_a_second_client_waits_for_the_first_as_with_qemu(path, servers, watch, caplog):
    caplog.set_level(logging.WARNING, logger=LOG.name)
    qemu(servers, path)
    first, heard1 = watch()
    heard1.wait(2)
    second, heard2 = watch(timeout=0.3, backoff=(0.05, 0.1))
    deadline = time.monotonic() + 3
    while second.snapshot()["timeouts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert heard2.kinds() == [] and "is another one connected?" in caplog.text
    first.close()
    assert [e.kind for e in heard2.wait(2)] == ["connected", "status"]


def test_an_unanswered_or_refused_negotiation_is_retried(path, servers, watch, caplog):
    caplog.set_level(logging.WARNING, logger=LOG.name)
    server = qemu(servers, path, answer=False)
    w, heard = watch(timeout=0.3, backoff=(0.05, 0.1))
    deadline = time.monotonic() + 3
    while server.accepted < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert heard.kinds() == [] and w.snapshot()["timeouts"] >= 2
    assert caplog.text.count("no answer to qmp_capabilities in 0.3 s") == 1, "warned once"
    server.answer, server.refuse = True, True
    accepted = server.accepted
    while server.accepted < accepted + 2 and time.monotonic() < deadline + 2:
        time.sleep(0.02)
    assert heard.kinds() == [] and "qmp_capabilities refused" in caplog.text
    server.refuse = False
    assert [e.kind for e in heard.wait(2)] == ["connected", "status"]


def test_a_deliver_that_raises_is_logged_and_the_watcher_goes_on(path, servers, watch, caplog):
    caplog.set_level(logging.ERROR, logger=LOG.name)
    server = qemu(servers, path)
    w, heard = watch(Heard(raises_on="STOP"))
    heard.wait(2)
    for name in ("STOP", "STOP", "RESUME"):
        server.event(name)
    assert [e.kind for e in heard.wait(5)[2:]] == ["STOP", "STOP", "RESUME"]
    assert w.snapshot()["deliver_errors"] == 2 and w.connected
    assert caplog.text.count("delivering QMP event STOP") == 1, "rate-limited"


def test_close_never_waits_for_a_delivery_in_progress(path, servers, watch):
    server = qemu(servers, path)
    bridge_lock = threading.Lock()
    heard = Heard()
    entered = threading.Event()
    watcher: list[QmpWatcher] = []

    def deliver(event: VmEvent) -> bool:  # what the bridge's deliver does
        entered.set()
        with bridge_lock:
            heard(event)
            return not watcher[0].closed

    w = QmpWatcher(path, deliver, LOG)
    watcher.append(w)
    with bridge_lock:
        w.start()
        assert entered.wait(2), "the watcher never tried to deliver"
        t0 = time.monotonic()
        w.close()  # the chain stops with the bridge's lock held
        assert time.monotonic() - t0 < 0.05
        assert w._thread.is_alive(), "still waiting for the lock"
    assert w.join(1.0), "the thread ends once the delivery returned"
    assert heard.kinds() == ["connected"], "nothing delivered after close"
    assert server.gone.wait(1.0), "the connection was closed"


def test_close_ends_the_thread_promptly_in_every_state(path, servers):
    idle = QmpWatcher(path, Heard(), LOG)
    idle.close()  # never started: nothing to end
    assert idle.join(0.1) and idle._wake_r == -1
    waiting = QmpWatcher(path, Heard(), LOG, backoff=(5.0, 5.0))  # in its backoff sleep
    waiting.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    waiting.close()
    assert waiting.join(1.0) and time.monotonic() - t0 < 0.5
    server = qemu(servers, path)
    heard = Heard()
    reading = QmpWatcher(path, heard, LOG)  # connected, waiting for events
    reading.start()
    heard.wait(2)
    reading.close()
    assert reading.join(1.0) and server.gone.wait(1.0)


def test_a_deliver_saying_false_ends_the_watcher(path, servers):
    qemu(servers, path)
    calls: list[str] = []

    def deliver(event: VmEvent) -> bool:  # the bridge stopped
        calls.append(event.kind)
        return False

    w = QmpWatcher(path, deliver, LOG)
    w.start()
    assert w.join(3.0) and calls == ["connected"]


# -- through a real bridge ------------------------------------------------------------------

@pytest.mark.integration
def test_a_service_follows_its_vm_through_the_bridge(path, servers):
    from vtl.bridge.config import parse_config
    from vtl.bridge.engine import Bridge

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (TAP ports)")
    tag = secrets.token_hex(3)
    plugin = Path(__file__).parent / "qmp_services.py"
    cfg = parse_config({"bridge": {"name": f"q{tag}", "control": False},
                        "ports": {"guest": {"kind": "tap", "ifname": f"vtq{tag}g"},
                                  "uplink": {"kind": "tap", "ifname": f"vtq{tag}u"}},
                        "services": [{"use": f"{plugin}:VmLog", "qmp": path,
                                      "fail_on": "RESUME"}]})
    server = qemu(servers, path, status="paused")
    bridge = Bridge(cfg, LOG)
    with bridge:
        slot = bridge.chain.slots[0]
        svc = slot.service
        server.wait_ready()
        server.event("RESUME")
        server.event("STOP")
        deadline = time.monotonic() + 3
        while len(svc.heard) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        kinds = [(k, d) for k, d, _ in svc.heard]
        assert kinds == [("connected", {}), ("status", {"running": False, "status": "paused"}),
                         ("RESUME", {}), ("STOP", {})]
        assert all(now <= time.monotonic() for _, _, now in svc.heard)
        assert slot.counters.errors == 1, "a handler that raises counts as a service error"
        watcher = svc.watch
        assert isinstance(watcher, QmpWatcher) and watcher.connected
    assert watcher.closed and watcher.join(2.0), "the watch ends with the bridge"
    assert server.gone.wait(2.0)
    assert len(svc.heard) == 4, "no event after stop"
