"""Computations: how a service runs CPU-heavy work off the forwarding threads.

A service that must burn CPU for a while (``puzzle`` with ``role = "client"``:
scanning a puzzle's range, up to millions of hashes) must not do it in
``process``: the chain lock is held there, and Python holds the GIL for small
hashes, so every frame of the bridge would wait. It calls
``ctx.compute(fn, args, on_done)`` instead:

- ``fn`` is a module-level function and ``args`` a tuple of picklable values:
  the bridge runs ``fn(*args)`` in a worker process of its own (a pool shared by
  the bridge's services, started on first use, ``[bridge] compute_workers``
  processes), so it neither holds the GIL of the forwarding threads nor sees
  the service's state.
- ``on_done(result, now)`` is called under the chain lock, exactly like
  ``process``, when ``fn`` has returned: ``result`` is what it returned, or the
  exception it raised (an instance of :class:`BaseException`: the service
  decides what a failure means). Frames it emits are walked and written after
  it returns. It is never called after chain stop.
- ``compute`` returns a :class:`Job`, or ``None`` when the bridge already runs
  or queues :data:`MAX_PENDING` jobs for this service (a bound: the service
  counts it and decides, e.g. abstains). It never blocks.
- :meth:`Job.cancel` withdraws a job that has not started; one that has runs to
  its end, and its result is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

MAX_PENDING = 64  # jobs per service running or waiting at most

DoneHandler = Callable[[Any, float], None]


class Job(Protocol):
    """The handle of one computation."""

    @property
    def done(self) -> bool:
        """True once ``on_done`` has been called (or the job was cancelled)."""

    def cancel(self) -> None:
        """Withdraw the job: ``on_done`` will not be called for it."""
