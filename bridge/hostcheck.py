"""Checks of the host for options only the host can judge.

Theory of operation. Services are sans-IO, so a service's options model can check
an option's form but not whether this machine has what it names (a kernel's TCP
congestion control). Such an option carries :class:`~vtl.service.HostCheck`
metadata naming a check; :func:`host_problems` runs the named checks of a
validated options model when the bridge loads a config (``vtl run``, ``vtl
check``, a reload) or changes an option live, and returns each problem under the
option's key, so a name the kernel lacks is refused like any other bad value and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from vtl.bridge.transports.tcp import congestion_problem

from vtl.service import HostCheck

#: check name (``HostCheck.kind``) -> what is wrong with a value, or None
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "tcp_congestion": congestion_problem,
}


def host_problems(options: BaseModel, prefix: str) -> list[str]:
    """Every host check of ``options`` that fails, as ``"PREFIX.KEY: problem"``."""
    problems: list[str] = []
    for key, info in type(options).model_fields.items():
        for meta in info.metadata:
            if not isinstance(meta, HostCheck):
                continue
            value = getattr(options, key)
            if value is None:
                continue
            check = CHECKS.get(meta.kind)
            problem = (check(value) if check is not None
                       else f"the bridge has no host check {meta.kind!r} for this option")
            if problem:
                problems.append(f"{prefix}.{key}: {problem}")
    return problems


__all__ = ["CHECKS", "host_problems"]
