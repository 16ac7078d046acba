"""The bridge's worker processes for services' computations (``ctx.compute``, see
:mod:`vtl.compute`).

Theory of operation. A bridge has one :class:`ComputePool`: ``[bridge]
compute_workers`` worker processes of a :class:`~concurrent.futures.ProcessPoolExecutor`,
shared by its services and created on the first job. Each service that computes has
a :class:`JobQueue` (in its context's resources, so it closes when the service stops):
it checks the call, keeps the service's unfinished jobs (at most
:data:`~vtl.compute.MAX_PENDING`; ``compute`` returns None beyond that) and hands each
new job to the pool's thread through a queue. ``compute`` is called under the chain
lock and never blocks: it neither pickles nor talks to a process.

The pool's thread (``compute-NAME``, started with the first job) does the rest. It
submits each job to the executor (starting the workers when there are none: that
waits for the fork server, which is why no forwarding thread does it); the executor's
own thread pickles the call for a worker and, when the worker answers, the future's
callback puts the job back on the pool thread's queue. The pool thread then delivers
all the jobs that finished meanwhile in one :func:`~vtl.bridge.datagram.run_locked`:
under the chain lock, each job neither cancelled nor of a closed queue gets
``on_done(result, now)`` (``result`` is what ``fn`` returned, or the exception
``fn`` raised, or the one that kept it from running: a pickling error,
:class:`~concurrent.futures.process.BrokenProcessPool`), what the handlers emitted is
walked and the timers re-armed, and the frames are written after the lock is released,
exactly as for a service's datagrams. A handler that raises counts against the
slot's failure policy (``on_error``).

Cancelling. :meth:`BridgeJob.cancel` and :meth:`JobQueue.close` run under the chain
lock, like the delivery, so ``on_done`` never runs after either returns. A job not
yet handed to a worker is withdrawn (``fn`` never runs); one a worker holds (or the
executor has queued for one: ``max_workers + 1`` at most) runs to its end and its
result is dropped. A cancelled job no longer counts against the service's bound.

Processes. The workers are started by ``multiprocessing``'s fork server, not forked
from the bridge: a fork of a multi-threaded process may copy a lock some other
thread held, and would give the worker the bridge's descriptors (TAP devices,
sockets). The fork server is started once per process with the main module (as
``multiprocessing`` does by default) and the module of the first job's ``fn``
preloaded (:func:`multiprocessing.set_forkserver_preload`), so that the workers
started later (a second worker, or after one died) do not import them again.
Like any use of the ``spawn`` or ``forkserver`` methods, a program that embeds a
bridge must guard its main module (``if __name__ == "__main__":``): a worker imports
it. The workers ignore SIGINT (a ^C of ``vtl run`` in a terminal reaches the whole
process group; the bridge stops them itself).

Measured on this machine kind (2 vCPUs shared, Python 3.11; a script that times
``compute`` to ``on_done`` through this pool and ``run_locked``, fresh process each
run): the first job of a process is answered after about 0.25 s, nearly all of it the
fork server's start, which imports the main module (``vtl run``'s imports the bridge:
about 0.2 s; with a main module that imports little, 0.05 s). A service that cannot
wait that long for its first result can submit a trivial job in ``start``. Later
jobs cost 0.3 to 0.4 ms each from ``compute`` to ``on_done`` one at a time, about
0.2 ms each when many are pending (the executor alone: 0.17 and 0.11 ms). For scale:
a million BLAKE2s hashes of 32 bytes take 0.2 s in one process.

A worker that dies (killed, ``os._exit``, out of memory) breaks the executor: every
job it held or queued, of any service, gets ``BrokenProcessPool``. That is logged
once, counted (``broken``), and the next job starts a new executor; the bridge goes
on. :meth:`ComputePool.close` (at bridge close, after the chain stopped) withdraws
what did not start, gives running jobs about a second to end and then terminates
their workers.

Not done: a job's time limit (a service that needs one cancels the job: its worker
stays busy until ``fn`` returns), per-service shares of the workers (jobs run in
the order they were submitted, whoever submitted them).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from typing import Any

from vtl.bridge.datagram import run_locked

from vtl.compute import MAX_PENDING, DoneHandler
from vtl.errors import LocalProtocolError

ErrorHandler = Callable[[float], None]  # on_done raised (the slot's failure policy)
_GRACE = 1.0  # at close, running jobs get this long before their workers are terminated
_JOIN_TIMEOUT = 1.0
_START_METHOD = "forkserver"


@dataclass(slots=True)
class ComputeCounters:
    """What the pool did (the bridge's snapshot, section ``compute``)."""

    submitted: int = 0  # jobs accepted: compute returned a Job
    done: int = 0  # on_done called with what fn returned
    failed: int = 0  # on_done called with an exception (fn raised, a worker died...)
    cancelled: int = 0  # withdrawn before on_done: Job.cancel, or the service stopped
    refused: int = 0  # compute returned None: the service had MAX_PENDING jobs
    broken: int = 0  # a worker died: its executor's jobs failed, a new one was started


class BridgeJob:
    """A :class:`vtl.compute.Job`: one call of ``fn(*args)`` for a service."""

    __slots__ = ("fn", "args", "on_done", "queue", "future", "finished", "generation")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: DoneHandler,
                 jobs: JobQueue):
        self.fn = fn
        self.args = args
        self.on_done = on_done
        self.queue = jobs
        self.future: Future[Any] | None = None  # once the pool thread submitted it
        self.finished = False  # on_done was called, or the job was withdrawn
        self.generation = -1  # the executor it was submitted to (see ComputePool._broken)

    @property
    def done(self) -> bool:
        return self.finished

    def cancel(self) -> None:
        """Withdraw the job (chain lock held): ``on_done`` is not called for it."""
        if self.finished:
            return
        self.finished = True
        self.queue.withdrawn(self)
        future = self.future
        if future is not None:
            future.cancel()  # False once a worker has it: its result is dropped

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", self.fn)
        return f"<BridgeJob {name}{' done' if self.finished else ''}>"


class JobQueue:
    """One service's jobs (a resource of its context: :meth:`close` at its stop)."""

    def __init__(self, pool: ComputePool, on_error: ErrorHandler, log: logging.Logger):
        self.pool = pool
        self.on_error = on_error
        self.log = log
        self.pending: dict[BridgeJob, None] = {}  # unfinished jobs, in submission order
        self.closed = False

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: DoneHandler
               ) -> BridgeJob | None:
        """``ctx.compute`` (chain lock held): a job for the pool, or None at the bound or
        once closed. A call that can never be pickled is refused at once."""
        if not callable(fn) or "<" in getattr(fn, "__qualname__", "<"):
            raise LocalProtocolError(f"compute() takes a module-level function, not {fn!r} "
                                     "(a worker process imports it by name)")
        if type(args) is not tuple:
            raise LocalProtocolError(f"compute() takes the arguments as a tuple, not "
                                     f"{type(args).__name__}")
        counters = self.pool.counters
        if self.closed or len(self.pending) >= MAX_PENDING:
            counters.refused += 1
            return None
        job = BridgeJob(fn, args, on_done, self)
        self.pending[job] = None
        counters.submitted += 1
        self.pool.enqueue(job)
        return job

    def withdrawn(self, job: BridgeJob) -> None:
        """``job`` was cancelled (chain lock held)."""
        if job in self.pending:
            del self.pending[job]
            self.pool.counters.cancelled += 1

    def close(self) -> None:
        """Withdraw every unfinished job (chain lock held): no ``on_done`` after this."""
        self.closed = True
        for job in list(self.pending):
            job.cancel()

    def __repr__(self) -> str:
        return f"<JobQueue {len(self.pending)} pending{' closed' if self.closed else ''}>"


class ComputePool:
    """A bridge's worker processes and the thread that feeds them and delivers results.
    :meth:`opener` gives ``chain.compute``; :meth:`close` at bridge close."""

    def __init__(self, workers: int, log: logging.Logger, name: str = "vtl"):
        self.workers = workers
        self.log = log
        self.name = name
        self.counters = ComputeCounters()
        self.closed = False
        self._inbox: queue.SimpleQueue[tuple[bool, BridgeJob] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0  # bumped each time a broken executor is dropped
        self._lock = threading.Lock()  # the thread's start, the executor's life
        self._run: tuple[Any, ...] | None = None  # run_locked's first four arguments

    def opener(self, lock: threading.Lock, started: Callable[[], bool],
               after_external: Callable[[float], Any], send_output: Callable[[Any], None]
               ) -> Callable[[ErrorHandler, logging.Logger], JobQueue]:
        """``chain.compute`` for a bridge: a service's :class:`JobQueue`, whose results are
        delivered through :func:`~vtl.bridge.datagram.run_locked` with these."""
        self._run = (lock, started, after_external, send_output)
        return lambda on_error, log: JobQueue(self, on_error, log)

    def enqueue(self, job: BridgeJob) -> None:
        """Hand a new job to the pool's thread (chain lock held; never blocks long)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self.closed:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name=f"compute-{self.name}")
                    self._thread.start()
        self._inbox.put((True, job))

    def snapshot(self) -> dict[str, int]:
        """The counters, ``pending`` (jobs accepted and not finished) and ``workers``
        (the processes the executor holds now)."""
        out = asdict(self.counters)
        c = self.counters
        out["pending"] = c.submitted - c.done - c.failed - c.cancelled
        out["workers"] = len(getattr(self._executor, "_processes", None) or ())
        return out

    def close(self) -> None:
        """Stop the thread and the workers (without the chain lock, after the services
        stopped): jobs not started are dropped; running ones get about a second to end,
        then their workers are terminated. Idempotent."""
        self.closed = True
        thread = self._thread
        if thread is not None:
            self._inbox.put(None)
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT)
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            _shutdown(executor, _GRACE)

    # -- the pool's thread -------------------------------------------------------------

    def _loop(self) -> None:
        inbox = self._inbox
        while True:
            items = [inbox.get()]
            try:
                while True:
                    items.append(inbox.get_nowait())
            except queue.Empty:
                pass
            finished = []
            for item in items:
                if item is None:
                    return
                new, job = item
                if new:
                    self._submit(job)
                else:
                    finished.append(job)
            if finished:
                try:
                    self._deliver(finished)
                except Exception:  # noqa: BLE001 - the thread must go on delivering
                    self.log.exception("compute: delivering results failed")

    def _submit(self, job: BridgeJob) -> None:
        if job.finished or self.closed:
            return
        future: Future[Any] | None = None
        error: BaseException | None = None
        with self._lock:
            if self.closed:
                return
            for _ in range(2):  # once more when the executor broke before we heard of it
                try:
                    executor = self._executor_for(job.fn)
                    job.generation = self._generation
                    future = executor.submit(job.fn, *job.args)
                    break
                except BrokenProcessPool as exc:
                    self._broken(job.generation)
                    error = exc
                except Exception as exc:  # noqa: BLE001 - e.g. no worker could be started
                    error = exc
                    break
        if future is None:
            self.log.warning("compute: cannot run %r: %s", job, error)
            future = Future()
            future.set_exception(error or RuntimeError("not submitted"))
        job.future = future
        future.add_done_callback(lambda _f: self._inbox.put((False, job)))
        if job.finished:  # cancelled meanwhile (chain lock not held here)
            future.cancel()

    def _executor_for(self, fn: Callable[..., Any]) -> ProcessPoolExecutor:
        """The executor, made when there is none (pool lock held)."""
        if self._executor is None:
            context = multiprocessing.get_context(_START_METHOD)
            module = getattr(fn, "__module__", None)
            # read when the fork server starts, the first time only (one per process)
            context.set_forkserver_preload(
                ["__main__"] + ([module] if module and module != "__main__" else []))
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=signal.signal,
                initargs=(signal.SIGINT, signal.SIG_IGN))
        return self._executor

    def _broken(self, generation: int) -> None:
        """The executor of ``generation`` lost a worker: drop it (pool lock held)."""
        if generation != self._generation or self._executor is None:
            return  # already dropped
        self.counters.broken += 1
        self.log.warning("compute: a worker process died; the jobs it held or queued failed "
                         "(BrokenProcessPool); new workers start with the next job")
        executor, self._executor = self._executor, None
        self._generation += 1
        executor.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, jobs: list[BridgeJob]) -> None:
        results = []
        for job in jobs:
            future = job.future
            if future is None or future.cancelled():
                continue  # withdrawn: nothing to say
            exc = future.exception()
            if isinstance(exc, BrokenProcessPool):
                with self._lock:
                    self._broken(job.generation)
            results.append((job, exc if exc is not None else future.result()))
        if not results or self._run is None:
            return
        counters = self.counters

        def work(now: float) -> None:
            for job, result in results:
                jobs = job.queue
                if job.finished or jobs.closed:
                    continue  # cancelled, or the service stopped: dropped
                job.finished = True
                del jobs.pending[job]
                if isinstance(result, BaseException):
                    counters.failed += 1
                else:
                    counters.done += 1
                try:
                    job.on_done(result, now)
                except Exception:  # noqa: BLE001 - the slot's failure policy counts it
                    jobs.on_error(now)

        lock, started, after_external, send_output = self._run
        run_locked(lock, started, after_external, send_output,
                   lambda: self.closed or all(j.finished for j, _ in results), work)


def _shutdown(executor: ProcessPoolExecutor, grace: float) -> None:
    """Shut ``executor`` down without waiting: what did not start is cancelled, running
    jobs get ``grace`` seconds, then their workers are terminated (Python 3.14 has
    ``terminate_workers``; before it, the executor's process table is private). The
    workers are watched through their sentinels: the executor's thread joins them."""
    procs = list(dict(getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    left = {p.sentinel: p for p in procs}
    for sig, wait_s in ((None, grace), ("terminate", 0.5), ("kill", 0.5)):
        if sig is not None:
            for p in left.values():
                getattr(p, sig)()
        deadline = time.monotonic() + wait_s
        while left and (remaining := deadline - time.monotonic()) > 0:
            for s in wait(list(left), remaining):
                left.pop(s, None)  # type: ignore[call-overload]
        if not left:
            return
