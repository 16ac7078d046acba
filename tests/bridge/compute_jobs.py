"""Module-level functions for tests/bridge/test_compute.py to run in the bridge's worker
processes (a worker imports them by name: this directory is on the test process's
``sys.path``, which ``multiprocessing`` hands to the fork server and its workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def pid() -> int:
    """The worker's process id."""
    return os.getpid()


def square(x: int) -> int:
    return x * x


def fail(message: str) -> int:
    raise ValueError(message)


def die(code: int) -> None:
    """End the worker at once, as a crash would."""
    os._exit(code)


def touch(path: str) -> str:
    """Leave a file behind: proof that the job ran."""
    Path(path).write_text(str(os.getpid()))
    return path


def gate(path: str, timeout: float = 10.0) -> int:
    """Write ``PATH.started`` (holding the worker's pid), wait until ``PATH.go`` exists,
    write ``PATH.ended`` and return the worker's pid. TimeoutError after ``timeout``."""
    Path(path + ".started").write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not os.path.exists(path + ".go"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}.go never came")
        time.sleep(0.005)
    Path(path + ".ended").write_text(str(os.getpid()))
    return os.getpid()


def echo(value: object) -> object:
    return value
