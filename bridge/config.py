"""Loading and validating a bridge config (TOML).

The whole file is validated before anything is opened, and every problem is
reported at once, each as ``FILE: KEY.PATH: what is wrong`` (``vtl check``
prints them and exits 2). Ports are pydantic models (see
:mod:`vtl.bridge.ports`); each ``[[services]]`` entry is split into the keys
the bridge owns (``use``, ``name``, ``match``, ``fail``) and the service's own
options, which its ``Options`` model validates.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.functional_validators import PlainValidator
from pydantic_core import PydanticCustomError
from vtl.bridge import plugins
from vtl.bridge.filter import MatchFilter
from vtl.bridge.hostcheck import host_problems
from vtl.bridge.metrics import parse_address
from vtl.bridge.ports import PortConfig

from vtl.addrclass import Prefix, conflicts, parse_prefix
from vtl.errors import ConfigError
from vtl.service import FailPolicy, Service, ServiceOptions

COMMON_SERVICE_KEYS = ("use", "name", "match", "fail")


def _ip_prefix(value: object) -> Prefix:
    try:
        return parse_prefix(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PydanticCustomError("ip_prefix", str(exc)) from None


IpPrefix = Annotated[Prefix, PlainValidator(_ip_prefix, json_schema_input_type=str)]


class BridgeSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("vtl", description="name of this bridge, used in logs")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="logging threshold")
    batch: int = Field(64, ge=1, le=1024, description="frames read per port per wake-up")
    busy_poll_us: int = Field(
        0, ge=0, le=1_000_000,
        description="after the last frame, one forwarding thread keeps polling both ports "
                    "this long before it sleeps: round trips lose a wake-up (about 50 us on a "
                    "VM) for up to a core of CPU while frames keep coming (0: never)")
    cpus: tuple[int, ...] = Field(
        (), description="CPUs the bridge's threads may run on (sched_setaffinity), e.g. "
                        "[1]; empty: any")
    mac_aging_s: float = Field(300.0, gt=0, description="forget a guest MAC after this idle time")
    max_macs: int = Field(
        4096, ge=1, le=1_000_000,
        description="MAC addresses learnt behind the guest port at most; a frame from a new "
                    "MAC beyond that is forwarded but its MAC is not learnt (counted as "
                    "mac_overflow)")
    stats_interval_s: float = Field(
        0.0, ge=0, description="log per-service counters this often (0: only at stop)")
    compute_workers: int = Field(
        1, ge=1, le=64, description="worker processes for the services' computations "
                                    "(ctx.compute, e.g. puzzle's client), started with the "
                                    "first job")
    deny: tuple[IpPrefix, ...] = Field(
        (), description="destination prefixes a guest may not reach, beyond the default "
                        "classes (loopback, unspecified, link-local, multicast, broadcast, "
                        "the host's own addresses); the longest matching prefix of deny and "
                        "allow decides")
    allow: tuple[IpPrefix, ...] = Field(
        (), description="destination prefixes a guest may reach though a default class or "
                        "a shorter deny prefix covers them (e.g. \"169.254.169.254\")")
    control: str | bool = Field(
        True, description="the control socket's path (true: /run/vtl/NAME.sock; false: no "
                          "control socket); see docs/control.md")
    control_group: str | None = Field(
        None, description="members of this group may use the control socket too (else only "
                          "root)")

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        allowed = os.sched_getaffinity(0)
        bad = sorted(set(value) - allowed)
        if bad:
            raise PydanticCustomError(
                "cpus", "CPU {bad} is not one this process may run on ({allowed})",
                {"bad": ", ".join(map(str, bad)),
                 "allowed": ", ".join(map(str, sorted(allowed)))})
        return tuple(sorted(set(value)))

    @field_validator("control")
    @classmethod
    def _control_path(cls, value: str | bool) -> str | bool:
        if isinstance(value, str) and not value.strip():
            raise PydanticCustomError("control_path",
                                      "give a socket path, true (the default path) or false")
        return value

    metrics: str | None = Field(
        None, description="serve Prometheus metrics on this HOST:PORT (e.g. "
                          "\"127.0.0.1:9477\"); unset: no endpoint")

    @field_validator("metrics")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_address(value)
            except ValueError as exc:
                raise PydanticCustomError("metrics_address", str(exc)) from None
        return value

    @field_validator("deny", "allow", mode="before")
    @classmethod
    def _prefix_list(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise PydanticCustomError("prefix_list",
                                      'give a list of IP prefixes, e.g. ["10.0.0.0/8"]')
        return value

    @field_validator("allow")
    @classmethod
    def _not_denied(cls, allow: tuple[Prefix, ...], info: ValidationInfo) -> tuple[Prefix, ...]:
        both = conflicts(info.data.get("deny", ()), allow)
        if both:
            raise PydanticCustomError(
                "allow_and_deny", "{prefixes} also in bridge.deny: keep one of the two",
                {"prefixes": ", ".join(str(p) for p in both)})
        return allow


class PortsSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    guest: PortConfig = Field(description="the VM side")
    uplink: PortConfig = Field(description="the network side")


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bridge: BridgeSection = Field(default_factory=BridgeSection)  # type: ignore[arg-type]
    ports: PortsSection
    services: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class ServiceSpec:
    """One validated ``[[services]]`` entry."""

    index: int
    use: str
    name: str
    cls: type[Service]
    options: ServiceOptions
    match: MatchFilter | None
    fail: FailPolicy
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the options as written

    @property
    def match_expression(self) -> str | None:
        return self.match.expression if self.match is not None else None


def tuned(spec: ServiceSpec, changes: dict[str, Any]) -> ServiceSpec:
    """``spec`` with some options (and ``match``: a filter, or "" for none) changed,
    validated by the service's own model; ConfigError names each bad key."""
    problems: list[str] = []
    match = spec.match
    if "match" in changes:
        expr = changes["match"]
        if not isinstance(expr, str):
            problems.append(f"{spec.name}.match: must be a libpcap filter expression string "
                            "(\"\" for none)")
        elif not expr.strip():
            match = None
        else:
            try:
                match = MatchFilter(expr)
            except ConfigError as exc:
                problems.append(f"{spec.name}.match: {exc}")
    raw = {**spec.raw, **{k: v for k, v in changes.items() if k != "match"}}
    options = spec.options
    try:
        options = spec.cls.Options.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, spec.name))
    else:
        problems.extend(host_problems(options, spec.name))
    if problems:
        raise ConfigError(problems)
    return replace(spec, options=options, match=match, raw=raw)


@dataclass(frozen=True)
class BridgeConfig:
    path: Path | None
    bridge: BridgeSection
    ports: PortsSection
    services: tuple[ServiceSpec, ...]


_PORT_KINDS = {"tap", "pcap", "packet"}


def _loc(parts: tuple[Any, ...] | list[Any], prefix: str = "") -> str:
    out = prefix
    prev = None
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif prev in ("guest", "uplink") and part in _PORT_KINDS:
            pass  # the discriminator tag pydantic adds for tagged unions
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out or "(top level)"


def _pydantic_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors():
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "missing (required)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{_loc(err['loc'], prefix)}: {msg}")
    return problems


def _service_spec(
    index: int, raw: dict[str, Any], base_dir: Path | None, seen: dict[str, int]
) -> tuple[ServiceSpec | None, list[str]]:
    key = f"services[{index}]"
    use = raw.get("use")
    if not isinstance(use, str) or not use:
        return None, [f"{key}.use: missing (required): which service to run"]
    problems: list[str] = []
    try:
        cls = plugins.resolve(use, base_dir)
    except ConfigError as exc:
        return None, [f"{key}.use: {p}" for p in exc.problems]
    name = raw.get("name", cls.name or use)
    if not isinstance(name, str):
        problems.append(f"{key}.name: must be a string")
        name = use
    if name in seen:
        seen[name] += 1
        if "name" in raw:
            problems.append(f"{key}.name: {name!r} is already used by another service")
        name = f"{name}#{seen[name]}"
    else:
        seen[name] = 1
    match = None
    if "match" in raw:
        if not isinstance(raw["match"], str):
            problems.append(f"{key}.match: must be a libpcap filter expression string")
        else:
            try:
                match = MatchFilter(raw["match"])
            except ConfigError as exc:
                problems.append(f"{key}.match: {exc}")
    fail = raw.get("fail", cls.default_fail)
    if fail not in ("open", "closed"):
        problems.append(f"{key}.fail: must be \"open\" or \"closed\", not {fail!r}")
    if cls.airtight:
        if "match" in raw:
            problems.append(f"{key}.match: {use} must see every frame (frames a filter skips"
                            " would pass it unchecked); remove match")
        if fail == "open":
            problems.append(f"{key}.fail: {use} fails closed (an error must not let frames"
                            " through); remove fail or set it to \"closed\"")
    opts = {k: v for k, v in raw.items() if k not in COMMON_SERVICE_KEYS}
    options: ServiceOptions | None = None
    try:
        options = cls.Options.model_validate(opts)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, key))
    else:
        problems.extend(host_problems(options, key))
    if problems or options is None:
        return None, problems
    return ServiceSpec(index, use, name, cls, options, match, fail, opts), []


def parse_config(data: dict[str, Any], path: Path | None = None) -> BridgeConfig:
    """Validate an already-parsed TOML document; raises ConfigError with every problem."""
    label = str(path) if path is not None else "<config>"
    problems: list[str] = []
    base: ConfigFile | None = None
    try:
        base = ConfigFile.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc))
    raw_services = data.get("services", [])
    specs: list[ServiceSpec] = []
    if isinstance(raw_services, list):
        seen: dict[str, int] = {}
        base_dir = path.parent if path is not None else None
        for i, raw in enumerate(raw_services):
            if not isinstance(raw, dict):
                problems.append(f"services[{i}]: must be a table ([[services]])")
                continue
            spec, errs = _service_spec(i, raw, base_dir, seen)
            problems.extend(errs)
            if spec is not None:
                specs.append(spec)
    if problems or base is None:
        raise ConfigError([f"{label}: {p}" for p in problems])
    return BridgeConfig(path, base.bridge, base.ports, tuple(specs))


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, p)
