"""The test kit's computations (vtl.testing: ``FakeContext.compute``, :class:`FakeJob`):
jobs wait until the test runs them, run on pickled copies like a worker's, honour
the bound and cancellation of :mod:`vtl.compute`, and the ServiceContext protocol
and the bridge's context both have ``compute``."""

from __future__ import annotations

import inspect
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest
from vtl.bridge.chain import SlotContext

from vtl.compute import MAX_PENDING
from vtl.errors import LocalProtocolError
from vtl.service import ServiceContext
from vtl.testing import FakeContext, FakeJob


def double(x: int) -> int:
    return 2 * x


def boom(message: str) -> int:
    raise ValueError(message)


def scribble(buf: bytearray) -> bytes:
    buf[0] = 0xFF
    return bytes(buf)


class Heard:
    """An on_done that records (result, now)."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, float]] = []

    def __call__(self, result: Any, now: float) -> None:
        self.got.append((result, now))


def test_jobs_wait_for_the_test_and_deliver_with_its_clock():
    ctx, heard = FakeContext(), Heard()
    job = ctx.compute(double, (21,), heard)
    assert isinstance(job, FakeJob) and ctx.jobs == [job]
    assert (job.fn, job.args, job.on_done, job.done) == (double, (21,), heard, False)
    assert heard.got == [], "nothing runs inside compute()"
    ctx.compute(boom, ("no",), heard)
    assert ctx.run_jobs(now=5.0) == 2 and ctx.now == 5.0
    assert heard.got[0] == (42, 5.0)
    exc, now = heard.got[1]
    assert isinstance(exc, ValueError) and str(exc) == "no" and now == 5.0
    assert all(j.done for j in ctx.jobs)
    assert ctx.run_jobs() == 0


def test_a_job_runs_on_copies_as_in_a_worker():
    ctx, heard = FakeContext(), Heard()
    buf = bytearray(b"\x00abc")
    ctx.compute(scribble, (buf,), heard)
    ctx.compute(double, (threading.Lock(),), heard)  # cannot be sent to a worker
    ctx.run_jobs()
    assert heard.got[0][0] == b"\xffabc" and buf == bytearray(b"\x00abc")
    assert isinstance(heard.got[1][0], TypeError)
    with pytest.raises(LocalProtocolError, match="module-level"):
        ctx.compute(lambda: 1, (), heard)
    with pytest.raises(LocalProtocolError, match="tuple"):
        ctx.compute(double, [1], heard)  # type: ignore[arg-type]


def test_cancel_bound_and_jobs_submitted_by_on_done():
    ctx, heard = FakeContext(), Heard()
    jobs = [ctx.compute(double, (i,), heard) for i in range(MAX_PENDING)]
    assert all(jobs) and ctx.compute(double, (99,), heard) is None, "the bound"
    jobs[0].cancel()
    jobs[1].cancel()
    assert jobs[0].done and jobs[0].cancelled
    assert ctx.compute(double, (99,), heard) is not None, "a cancelled job does not count"

    def again(result: Any, now: float) -> None:
        heard(result, now)
        ctx.compute(double, (result,), heard)

    assert ctx.compute(double, (1,), again) is not None
    assert ctx.run_jobs(1.0) == MAX_PENDING
    assert [r for r, _ in heard.got] == [2 * i for i in range(2, MAX_PENDING)] + [198, 2]
    assert ctx.run_jobs(2.0) == 1, "what on_done submitted waits for the next run"
    assert heard.got[-1] == (4, 2.0)


def test_finish_plays_a_worker_that_died():
    ctx, heard = FakeContext(), Heard()
    job = ctx.compute(double, (1,), heard)
    job.finish(BrokenProcessPool("a worker died"), now=3.0)
    assert isinstance(heard.got[0][0], BrokenProcessPool) and heard.got[0][1] == 3.0
    with pytest.raises(AssertionError):
        job.run()


def test_the_protocol_and_both_contexts_have_compute():
    assert "compute" in ServiceContext.__dict__
    for cls in (FakeContext, SlotContext):
        params = list(inspect.signature(cls.compute).parameters)
        assert params == ["self", "fn", "args", "on_done"], cls
