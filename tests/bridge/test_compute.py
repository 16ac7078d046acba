"""The bridge's worker processes for services (vtl.bridge.compute, ``ctx.compute``): a
real :class:`ComputePool` (fork server, worker processes) feeding a real
:class:`Chain` with a service, results delivered through ``run_locked`` with a real
lock standing in for the bridge's; then once through a real Bridge (two TAP ports).
The functions the workers run are in ``compute_jobs.py`` beside this file."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compute_jobs
import pytest
from vtl.bridge.chain import Chain
from vtl.bridge.compute import BridgeJob, ComputePool

from vtl import Direction, Frame, Service
from vtl.compute import MAX_PENDING, Job
from vtl.errors import LocalProtocolError

LOG = logging.getLogger("vtl.computetest")
pytestmark = pytest.mark.timeout(60)
ETHERTYPE = 0x88B5  # IEEE local experimental: the kernel leaves these frames alone


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def frame_of(tag: int) -> Frame:
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x07" + ETHERTYPE.to_bytes(2, "big")
    return Frame(bytearray(eth + tag.to_bytes(4, "big") + bytes(42)))


class Computer(Service):
    """Submits what the test asks (:meth:`submit`, chain lock held by the caller); each
    result is recorded with the time, whether ``lock`` was held and the thread, and a
    frame carrying the result's index goes toward the guest. A result ``"raise"``
    makes the handler raise."""

    name = "computer"

    def __init__(self, ctx, lock: threading.Lock):
        super().__init__(None, ctx)
        self.lock = lock
        self.results: list[tuple[Any, float, bool, str]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job | None:
        return self.ctx.compute(fn, args, self.on_done)

    def on_done(self, result: Any, now: float) -> None:
        self.results.append((result, now, self.lock.locked(),
                             threading.current_thread().name))
        if result == "raise":
            raise RuntimeError("the handler is broken")
        self.ctx.emit(frame_of(len(self.results)), Direction.TO_GUEST)


@dataclass
class Rig:
    """A chain with one :class:`Computer`, a pool of ``workers`` and the bridge's part."""

    pool: ComputePool
    lock: threading.Lock
    chain: Chain
    service: Computer
    written: list[Frame] = field(default_factory=list)  # what send_output got
    written_locked: list[bool] = field(default_factory=list)
    started: bool = True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job | None:
        with self.lock:  # as a forwarding thread calls process()
            return self.service.submit(fn, *args)

    @property
    def results(self) -> list[Any]:
        return [r for r, *_ in self.service.results]

    def stop(self) -> None:
        with self.lock:
            self.chain.stop(time.monotonic())


@pytest.fixture
def rig_of() -> Iterator[Callable[[int], Rig]]:
    made: list[Rig] = []

    def make(workers: int = 1) -> Rig:
        lock = threading.Lock()
        pool = ComputePool(workers, LOG, "test")
        chain = Chain.from_services([lambda ctx: Computer(ctx, lock)], LOG)
        rig = Rig(pool, lock, chain, chain.slots[0].service)  # type: ignore[arg-type]

        def after_external(now: float) -> list[Frame]:
            chain.after_external(now)
            out, chain.out_guest = chain.out_guest, []
            return out

        def send_output(out: list[Frame]) -> None:
            rig.written.extend(out)
            rig.written_locked.append(lock.locked())

        chain.compute = pool.opener(lock, lambda: rig.started, after_external, send_output)
        with lock:
            chain.start(time.monotonic())
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.stop()
        rig.pool.close()


def test_a_result_comes_back_under_the_chain_lock_from_another_process(rig_of):
    rig = rig_of()
    job = rig.submit(compute_jobs.pid)
    assert isinstance(job, BridgeJob) and not job.done
    wait_for(lambda: job.done)
    [(worker, now, locked, thread)] = rig.service.results
    assert isinstance(worker, int) and worker != os.getpid(), "ran in a worker process"
    assert locked and thread == "compute-test", "on_done runs under the chain lock"
    assert now <= time.monotonic()
    [frame] = rig.written  # what on_done emitted was walked and written after the lock
    assert frame.data[14:18] == (1).to_bytes(4, "big")
    assert rig.written_locked == [False]
    assert rig.submit(compute_jobs.square, 7) is not None
    wait_for(lambda: len(rig.results) == 2)
    assert rig.results[1] == 49
    snap = rig.pool.snapshot()
    assert snap["submitted"] == 2 and snap["done"] == 2 and snap["pending"] == 0
    assert snap["workers"] == 1


def test_the_caller_goes_on_while_a_job_runs(rig_of, tmp_path):
    rig = rig_of()
    gate = str(tmp_path / "gate")
    t0 = time.monotonic()
    job = rig.submit(compute_jobs.gate, gate)  # the first job: the pool is not there yet
    assert time.monotonic() - t0 < 0.05, "compute() neither starts processes nor waits"
    with rig.lock:  # the job runs while the chain lock is held (a forwarding thread)...
        wait_for(lambda: os.path.exists(gate + ".started"))
        assert not job.done
        Path(gate + ".go").touch()  # ...and ends only because this thread went on
        wait_for(lambda: os.path.exists(gate + ".ended"))
        time.sleep(0.05)
        assert rig.results == [], "no on_done while the lock is held"
    wait_for(lambda: job.done)
    assert rig.results == [int(Path(gate + ".started").read_text())] != [os.getpid()]


def test_an_exception_arrives_as_the_instance_and_a_raising_handler_is_counted(rig_of):
    rig = rig_of()
    rig.submit(compute_jobs.fail, "boom")
    wait_for(lambda: rig.results)
    [exc] = rig.results
    assert isinstance(exc, ValueError) and str(exc) == "boom"
    slot = rig.chain.slots[0]
    assert slot.counters.errors == 0
    rig.submit(compute_jobs.echo, "raise")  # the handler raises
    wait_for(lambda: len(rig.results) == 2)
    assert slot.counters.errors == 1, "an on_done that raises is a service error"
    rig.submit(compute_jobs.square, 3)
    wait_for(lambda: len(rig.results) == 3)
    assert rig.results[2] == 9
    snap = rig.pool.snapshot()
    assert (snap["done"], snap["failed"]) == (2, 1)


def test_calls_that_cannot_go_to_a_worker(rig_of):
    rig = rig_of()
    with pytest.raises(LocalProtocolError, match="module-level function"):
        rig.submit(lambda: 1)
    with pytest.raises(LocalProtocolError, match="as a tuple"), rig.lock:
        rig.service.ctx.compute(compute_jobs.square, [3], rig.service.on_done)
    rig.submit(compute_jobs.square, threading.Lock())  # pickling fails in the bridge
    wait_for(lambda: rig.results)
    assert isinstance(rig.results[0], TypeError) and "pickle" in str(rig.results[0])


def test_a_service_has_at_most_max_pending_jobs(rig_of, tmp_path):
    rig = rig_of()
    gate = str(tmp_path / "gate")
    jobs = [rig.submit(compute_jobs.gate, gate) for _ in range(MAX_PENDING)]
    assert all(jobs)
    assert rig.submit(compute_jobs.square, 2) is None, "the bound"
    assert rig.pool.snapshot()["refused"] == 1
    jobs[-1].cancel()  # a cancelled job no longer counts
    again = rig.submit(compute_jobs.square, 2)
    assert again is not None
    Path(gate + ".go").touch()
    wait_for(lambda: again.done)
    assert len(rig.results) == MAX_PENDING
    assert rig.submit(compute_jobs.square, 3) is not None


def test_a_job_cancelled_before_it_starts_never_runs(rig_of, tmp_path):
    rig = rig_of()
    gate = str(tmp_path / "gate")
    first = rig.submit(compute_jobs.gate, gate)
    marks = [str(tmp_path / f"mark{i}") for i in range(6)]
    jobs = [rig.submit(compute_jobs.touch, m) for m in marks]
    wait_for(lambda: os.path.exists(gate + ".started"))
    with rig.lock:
        jobs[0].cancel()  # the executor may have queued it for the worker already
        jobs[5].cancel()  # not yet given to a worker: withdrawn
        assert jobs[0].done and jobs[5].done
    Path(gate + ".go").touch()
    wait_for(lambda: jobs[4].done)
    time.sleep(0.1)
    assert rig.results == [int(Path(gate + ".started").read_text())] + marks[1:5]
    assert first.done
    assert not os.path.exists(marks[5]), "never ran"
    snap = rig.pool.snapshot()
    assert snap["cancelled"] == 2 and snap["pending"] == 0


def test_no_result_after_the_chain_stops(rig_of, tmp_path):
    rig = rig_of()
    gate = str(tmp_path / "gate")
    running = rig.submit(compute_jobs.gate, gate)
    waiting = rig.submit(compute_jobs.touch, str(tmp_path / "mark"))
    wait_for(lambda: os.path.exists(gate + ".started"))
    rig.stop()
    assert running.done and waiting.done
    Path(gate + ".go").touch()
    wait_for(lambda: os.path.exists(gate + ".ended"))
    time.sleep(0.2)
    assert rig.service.results == []
    assert rig.submit(compute_jobs.square, 2) is None, "a stopped service computes nothing"
    assert rig.pool.snapshot()["cancelled"] == 2


def test_a_worker_that_dies_fails_its_job_and_the_next_one_gets_a_new_worker(rig_of, caplog):
    rig = rig_of()
    rig.submit(compute_jobs.pid)
    wait_for(lambda: rig.results)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        rig.submit(compute_jobs.die, 3)
        wait_for(lambda: len(rig.results) == 2)
        assert isinstance(rig.results[1], BrokenProcessPool)
        rig.submit(compute_jobs.pid)
        wait_for(lambda: len(rig.results) == 3)
    first, _, second = rig.results
    assert isinstance(second, int) and second not in (first, os.getpid())
    died = [r for r in caplog.records if "worker process died" in r.getMessage()]
    assert len(died) == 1
    snap = rig.pool.snapshot()
    assert snap["broken"] == 1 and snap["failed"] == 1 and snap["done"] == 2


def test_close_does_not_wait_for_a_running_job(rig_of, tmp_path):
    rig = rig_of(2)
    gate = str(tmp_path / "gate")
    rig.submit(compute_jobs.gate, gate, 30.0)  # would run 30 s
    wait_for(lambda: os.path.exists(gate + ".started"))
    worker = int(Path(gate + ".started").read_text())
    rig.stop()
    t0 = time.monotonic()
    rig.pool.close()
    took = time.monotonic() - t0
    assert 0.9 < took < 2.5, f"close took {took:.2f} s"

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, 3.0)
    assert rig.service.results == []


def test_a_chain_without_a_bridge_cannot_compute():
    chain = Chain.from_services([lambda ctx: Computer(ctx, threading.Lock())], LOG)
    with pytest.raises(LocalProtocolError, match=r"compute\(\) needs a bridge"):
        chain.slots[0].service.submit(compute_jobs.pid)  # type: ignore[attr-defined]


# -- through a real bridge ------------------------------------------------------------------

class Gated(Service):
    """Starts a :func:`compute_jobs.gate` job at ``path`` in start; on_done emits a frame
    carrying the result (the worker's pid) toward the guest."""

    name = "gated"

    def __init__(self, ctx, path: str):
        super().__init__(None, ctx)
        self.path = path

    def start(self, now: float) -> None:
        self.job = self.ctx.compute(compute_jobs.gate, (self.path,), self.on_done)

    def on_done(self, result: Any, now: float) -> None:
        self.ctx.emit(frame_of(result), Direction.TO_GUEST)


@pytest.mark.integration
def test_a_bridge_delivers_a_result_to_the_guest_and_closes_its_workers(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root, and CI runs as root")
        pytest.skip("needs root (TAP ports)")
    from vtl.bridge.config import parse_config
    from vtl.bridge.engine import Bridge

    tag = secrets.token_hex(3)
    cfg = parse_config({"bridge": {"name": f"c{tag}", "control": False, "compute_workers": 2},
                        "ports": {"guest": {"kind": "tap", "ifname": f"vtcp{tag}g"},
                                  "uplink": {"kind": "tap", "ifname": f"vtcp{tag}u"}}})
    gate = str(tmp_path / "gate")
    bridge = Bridge(cfg, LOG, chain=Chain.from_services([lambda ctx: Gated(ctx, gate)], LOG))
    tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    try:
        bridge.open()
        tap.bind((f"vtcp{tag}g", ETHERTYPE))
        tap.settimeout(3.0)
        bridge.start()
        service = bridge.chain.slots[0].service
        Path(gate + ".go").touch()
        wait_for(lambda: service.job.done)
        worker = int(Path(gate + ".started").read_text())
        data = tap.recv(2048)
        assert int.from_bytes(data[14:18], "big") == worker != os.getpid()
        snap = bridge.snapshot()["compute"]
        assert snap["done"] == 1 and snap["pending"] == 0 and snap["workers"] >= 1
        assert bridge.compute.workers == 2
        slow = str(tmp_path / "slow")
        with bridge._lock:
            job = service.ctx.compute(compute_jobs.gate, (slow, 30.0), service.on_done)
        wait_for(lambda: os.path.exists(slow + ".started"))
        t0 = time.monotonic()
        bridge.close()
        assert time.monotonic() - t0 < 3.0, "close waits about a second for a running job"
        assert job.done and bridge.snapshot()["compute"]["cancelled"] == 1
    finally:
        tap.close()
        bridge.close()
