"""Finding services by the name used in config.

Three sources, in this order: the built-in services shipped in
:mod:`vtl.services`, services installed by other distributions under the
entry-point group ``vtl.services``, and a file given as
``use = "path/to/file.py:ClassName"`` (relative to the config file).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from vtl.errors import ConfigError
from vtl.service import Service

ENTRY_POINT_GROUP = "vtl.services"

#: built-in services: name -> "module:Class"
BUILTINS: dict[str, str] = {
    "netem": "vtl.services.netem:Netem",
    "capture": "vtl.services.capture:Capture",
    "pep": "vtl.services.pep:Pep",
    "socks": "vtl.services.socks:Socks",
    "udt": "vtl.services.udt:Udt",
    "keepalive": "vtl.services.keepalive:Keepalive",
    "tunnel": "vtl.services.tunnel:Tunnel",
    "puzzle": "vtl.services.puzzle:Puzzle",
    "firewall": "vtl.services.firewall:Firewall",
}


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    origin: str  # "built-in", the distribution name, or the file path
    target: str  # "module:Class" or "file.py:Class"


def _load_target(target: str) -> type[Service]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return _check_class(getattr(module, attr), target)


def _check_class(obj: object, target: str) -> type[Service]:
    if not (isinstance(obj, type) and issubclass(obj, Service)):
        raise ConfigError(f"{target} is not a vtl.Service subclass")
    return obj


def available() -> list[ServiceInfo]:
    """Every service that can be used by name: built-ins, then installed plugins."""
    found = {name: ServiceInfo(name, "built-in", t) for name, t in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            dist = ep.dist.name if ep.dist is not None else "?"
            found[ep.name] = ServiceInfo(ep.name, dist, ep.value)
    return sorted(found.values(), key=lambda i: (i.origin != "built-in", i.name))


def load_file(spec: str, base_dir: Path | None = None) -> type[Service]:
    """Load ``path/to/file.py:ClassName`` (the path relative to ``base_dir``)."""
    path_s, _, cls_name = spec.rpartition(":")
    if not path_s or not cls_name:
        raise ConfigError(f"{spec!r}: expected 'path/to/file.py:ClassName'")
    path = Path(path_s)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{spec!r}: no such file {str(path)!r}")
    mod_name = f"vtl_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"{spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise ConfigError(f"{spec!r}: importing {str(path)!r} failed: {exc}") from None
    obj = getattr(module, cls_name, None)
    if obj is None:
        raise ConfigError(f"{spec!r}: {str(path)!r} has no {cls_name!r}")
    return _check_class(obj, spec)


def resolve(use: str, base_dir: Path | None = None) -> type[Service]:
    """The service class for a config's ``use =`` value."""
    if use.endswith(".py") or ".py:" in use:
        return load_file(use, base_dir)
    for info in available():
        if info.name == use:
            try:
                return _load_target(info.target)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"service {use!r} ({info.target}) failed to load: {exc}") from None
    names = ", ".join(i.name for i in available())
    raise ConfigError(f"unknown service {use!r} (available: {names})")
