"""Changing a running bridge: ``set`` (retune one service) and ``reload`` (apply a config).

Theory of operation. Both are planned completely before anything changes, and a
plan that cannot be carried out is refused with every reason, each naming its
key (:class:`~vtl.errors.ConfigError`):

- ``set SERVICE KEY=VALUE...``: every key must be in the service's
  :attr:`~vtl.service.Service.tunable` set; the new options are the old ones as
  written plus the changes, validated by the service's own ``Options`` model
  (:func:`~vtl.bridge.config.tuned`), then handed to
  :meth:`~vtl.service.Service.retune`, which keeps the service's state.
- ``reload``: the ports and the bridge keys that need a restart (name, control
  socket, metrics address, batch, MAC table) must be unchanged; ``log_level``,
  ``stats_interval_s``, ``deny`` and ``allow`` apply at once. Each service of the
  new config is matched by name (and kind) with one of the running chain:

  ``keep``     same options and ``match``: the instance, its state and connections stay;
  ``retune``   only tunable options (or a tunable ``match``) changed: :meth:`retune`;
  ``replace``  other options changed: a new instance replaces the old one;
  ``add``      a new name;
  ``remove``   a running service the new config no longer has.

Order of a reload, so that a failure changes nothing: the new instances are
built and started first (their frames wait); then the retunes run (one that
fails undoes those before it); only then are removed and replaced services
drained (:meth:`~vtl.service.Service.drain`: frames they delay still go out)
and stopped, in the old layout, so the resets a TCP-terminating service sends
its guest pass the services between it and the guest; last the new layout is
installed. A replaced service starts before the old instance stops: a service
that holds something exclusive (a listening port) and must be replaced is
removed by one reload and added by the next.

Everything here runs with the bridge's lock held (:meth:`Bridge.reconfigure`),
so no frame is processed while the chain changes and none is lost by it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from vtl.bridge.chain import Chain, Slot
from vtl.bridge.config import BridgeConfig, BridgeSection, ServiceSpec, tuned
from vtl.bridge.egress import EgressPolicy

from vtl.errors import ConfigError

Action = Literal["keep", "retune", "replace", "add"]

#: [bridge] keys a reload applies to a running bridge; the others need a restart
LIVE_BRIDGE_KEYS = ("log_level", "stats_interval_s", "deny", "allow")


@dataclass
class Step:
    """What becomes of one service of the new chain."""

    action: Action
    spec: ServiceSpec
    old: Slot | None = None  # the running slot it keeps, retunes or replaces
    changed: tuple[str, ...] = ()  # the option keys that differ (retune, replace)


@dataclass
class Plan:
    steps: list[Step]
    removed: list[Slot]
    bridge_changes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {a: [] for a in ("kept", "retuned", "replaced", "added")}
        names = {"keep": "kept", "retune": "retuned", "replace": "replaced", "add": "added"}
        for step in self.steps:
            entry: Any = step.spec.name
            if step.changed:
                entry = {"name": step.spec.name, "changed": list(step.changed)}
            out[names[step.action]].append(entry)
        out["removed"] = [slot.ctx.name for slot in self.removed]
        out["order"] = [step.spec.name for step in self.steps]
        out["bridge"] = sorted(self.bridge_changes)
        return out


def changed_options(old: ServiceSpec, new: ServiceSpec) -> tuple[str, ...]:
    """The option keys (and ``match``) that differ between two entries of one service."""
    fields = type(old.options).model_fields
    keys = [k for k in fields if getattr(old.options, k) != getattr(new.options, k)]
    if old.match_expression != new.match_expression:
        keys.append("match")
    return tuple(keys)


def check_set(slot: Slot, changes: dict[str, Any]) -> ServiceSpec:
    """The new entry of ``slot``'s service after ``changes``; ConfigError if a key is not
    tunable at run time or a value is invalid."""
    name = slot.ctx.name
    if slot.spec is None:
        raise ConfigError(f"{name}: built without a config entry; nothing to tune")
    if not changes:
        raise ConfigError(f"{name}: give at least one KEY=VALUE")
    tunable = type(slot.service).tunable
    problems = []
    for key in changes:
        if key not in tunable:
            if key in type(slot.spec.options).model_fields or key == "match":
                hint = ", ".join(sorted(tunable)) or "none"
                problems.append(f"{name}.{key}: cannot change while the bridge runs "
                                f"(tunable: {hint}); change the config and reload")
            else:
                problems.append(f"{name}.{str(key)[:40]}: unknown option")
    if problems:
        raise ConfigError(problems)
    return tuned(slot.spec, changes)


def bridge_changes(old: BridgeSection, new: BridgeSection) -> dict[str, Any]:
    """The live [bridge] keys that change; ConfigError for any other key that does."""
    changes, problems = {}, []
    for key in type(old).model_fields:
        before, after = getattr(old, key), getattr(new, key)
        if before == after:
            continue
        if key in LIVE_BRIDGE_KEYS:
            changes[key] = after
        else:
            problems.append(f"bridge.{key}: cannot change on a running bridge "
                            f"({before!r} -> {after!r}); restart it")
    if problems:
        raise ConfigError(problems)
    return changes


def plan(chain: Chain, old: BridgeConfig, new: BridgeConfig) -> Plan:
    """What applying ``new`` to a bridge running ``old`` with ``chain`` does."""
    problems = []
    for role in ("guest", "uplink"):
        if getattr(old.ports, role) != getattr(new.ports, role):
            problems.append(f"ports.{role}: cannot change on a running bridge; restart it")
    try:
        live = bridge_changes(old.bridge, new.bridge)
    except ConfigError as exc:
        problems.extend(exc.problems)
        live = {}
    if problems:
        raise ConfigError(problems)
    running = {slot.ctx.name: slot for slot in chain.slots}
    steps = []
    for spec in new.services:
        slot = running.pop(spec.name, None)
        if slot is None or slot.spec is None or type(slot.service) is not spec.cls:
            if slot is not None:
                steps.append(Step("replace", spec, slot, ("use",)))
            else:
                steps.append(Step("add", spec))
            continue
        changed = changed_options(slot.spec, spec)
        if not changed:
            steps.append(Step("keep", spec, slot))
        elif set(changed) <= type(slot.service).tunable:
            steps.append(Step("retune", spec, slot, changed))
        else:
            steps.append(Step("replace", spec, slot, changed))
    return Plan(steps, list(running.values()), live)


def _retune(slot: Slot, spec: ServiceSpec, now: float) -> None:
    slot.service.retune(spec.options, now)
    slot.match = spec.match
    slot.fail = spec.fail
    slot.spec = spec


def apply_set(slot: Slot, spec: ServiceSpec, now: float) -> None:
    """Retune ``slot`` to ``spec`` (from :func:`check_set`); ConfigError if it refuses."""
    try:
        _retune(slot, spec, now)
    except Exception as exc:  # noqa: BLE001 - the service refused: it keeps its options
        raise ConfigError(f"{slot.ctx.name}: could not apply: {exc}") from None


def apply(chain: Chain, plan: Plan, now: float, log: logging.Logger) -> dict[str, Any]:
    """Carry out ``plan`` on ``chain`` (lock held); ConfigError and no change on failure."""
    slots: list[Slot] = []
    started: list[Slot] = []

    def undo() -> None:
        for slot in started:
            chain.stop_slot(slot, now)
        chain.pending.clear()

    for i, step in enumerate(plan.steps):
        if step.old is not None and step.action != "replace":
            slots.append(step.old)
            continue
        fresh: Slot | None = None
        try:
            fresh = chain.make_slot(step.spec, i)
            started.append(fresh)
            fresh.service.start(now)
        except Exception as exc:  # noqa: BLE001 - refuse the reload
            undo()
            raise ConfigError(f"services[{step.spec.index}] ({step.spec.name}): could not "
                              f"start: {exc}") from None
        slots.append(fresh)
    early = list(chain.pending)  # frames the new services sent while starting
    chain.pending.clear()
    retuned: list[tuple[Slot, ServiceSpec]] = []
    for step in plan.steps:
        if step.action != "retune":
            continue
        assert step.old is not None and step.old.spec is not None
        before = step.old.spec
        try:
            _retune(step.old, step.spec, now)
        except Exception as exc:  # noqa: BLE001 - undo the retunes before it, refuse
            for slot, spec in reversed(retuned):
                try:
                    _retune(slot, spec, now)
                except Exception:  # noqa: BLE001 - say so; it keeps the new options
                    log.exception("reload: could not undo the retune of %s", slot.ctx.name)
            undo()
            raise ConfigError(f"{step.spec.name}: could not apply "
                              f"{', '.join(step.changed)}: {exc}") from None
        retuned.append((step.old, before))
    # past this point nothing is refused. What the retunes sent walks the old layout
    # (it was emitted from old positions); then the old services go, then the new layout
    chain.drain(now)
    resets: dict[str, int] = {}
    leaving = plan.removed + [s.old for s in plan.steps if s.action == "replace" and s.old]
    for slot in leaving:
        try:
            held = len(slot.service.connections(now))
        except Exception:  # noqa: BLE001 - a report must not stop the reload
            held = 0
        try:
            slot.service.drain(now)
        except Exception:  # noqa: BLE001
            slot.failed("drain", now)
        chain.drain(now)
        chain.stop_slot(slot, now)
        chain.drain(now)
        if held:
            resets[slot.ctx.name] = held
            log.warning("reload: %s taken out of the chain; reset the %d connection%s it "
                        "held", slot.ctx.name, held, "" if held == 1 else "s")
    chain.install(slots)
    chain.pending.extend(early)
    chain.drain(now)
    summary = plan.summary()
    summary["reset_connections"] = resets
    return summary


# -- on a running bridge (its methods of the same names) ----------------------------------

class Bridge(Protocol):
    """What :func:`set_options` and :func:`reload` use of a :class:`vtl.bridge.engine.Bridge`
    (a Protocol: the engine imports this module)."""

    chain: Chain
    config: BridgeConfig
    log: logging.Logger
    egress: EgressPolicy | None
    _lock: threading.Lock

    def _chain_changed(self, now: float) -> None: ...


def set_options(bridge: Bridge, service: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Retune one service of ``bridge`` (``vtl ctl NAME set``); ConfigError, and
    nothing changed, when a key is unknown, not tunable or its value invalid."""
    with bridge._lock:
        slot = next((s for s in bridge.chain.slots if s.ctx.name == service), None)
        if slot is None:
            names = ", ".join(s.ctx.name for s in bridge.chain.slots) or "none"
            raise ConfigError(f"service: no service named {service[:40]!r} (services: "
                              f"{names})")
        spec = check_set(slot, changes)
        now = time.monotonic()
        apply_set(slot, spec, now)
        bridge._chain_changed(now)
    shown = {k: (spec.match_expression if k == "match" else getattr(spec.options, k))
             for k in changes}
    bridge.log.warning("set %s %s (control socket)", service,
                       " ".join(f"{k}={v}" for k, v in shown.items()))
    return {"service": service, "options": shown}


def reload(bridge: Bridge, config: BridgeConfig) -> dict[str, Any]:
    """Apply ``config`` to the running ``bridge`` without closing its ports (see the
    module's docstring); ConfigError, and nothing changed, when it cannot."""
    with bridge._lock:
        the_plan = plan(bridge.chain, bridge.config, config)
        now = time.monotonic()
        summary = apply(bridge.chain, the_plan, now, bridge.log)
        live = the_plan.bridge_changes
        if "log_level" in live:
            bridge.log.setLevel(live["log_level"].upper())
        if ("deny" in live or "allow" in live) and bridge.egress is not None:
            bridge.egress.set_prefixes(config.bridge.deny, config.bridge.allow)
        bridge.config = config
        bridge._chain_changed(now)
    bridge.log.warning("reloaded %s: %s", config.path or "a config", ", ".join(
        f"{k} {', '.join(str(n if isinstance(n, str) else n['name']) for n in v)}"
        for k, v in summary.items()
        if k in ("added", "removed", "replaced", "retuned") and v) or "no change")
    return summary


__all__ = ["LIVE_BRIDGE_KEYS", "Plan", "Step", "apply", "apply_set", "bridge_changes",
           "changed_options", "check_set", "plan", "reload", "set_options"]
