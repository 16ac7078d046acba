"""The ``vtl`` command line.

- ``vtl run CONFIG``: one bridge in the foreground until SIGINT/SIGTERM.
- ``vtl check CONFIG...``: validate; exit 0, or 2 with one line per problem.
- ``vtl services``: the services that can be used, with a line each; ``-v`` adds each
  option (type, constraints, default, help line), ``--markdown`` prints the reference page
  ``docs/services.md`` (refresh it with ``vtl services --markdown --built-in >
  docs/services.md``; a test fails when the committed page is out of date).
- ``vtl demo``: a throw-away topology, a bridge with netem and capture, real traffic.

Exit codes: 0 success, 1 an expected failure (no root, missing interface...)
reported in plain words without a traceback, 2 a config or usage error.

Options are shown from their pydantic declarations: a default in TOML's words (``true``,
``"both"``, ``[]``), ``unset`` for None, the words of a help line that states its own
default (``(default: random, ...)``, said once), a factory's docstring (a factory is never
called: it may be random), and never a secret or a URL's password.
"""

from __future__ import annotations

import enum
import inspect
import ipaddress
import json
import logging
import os
import re
import sys
import textwrap
import types
from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import click
from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from vtl.bridge import plugins
from vtl.bridge.config import load_config

from vtl.errors import ConfigError, SetupError, VTLError
from vtl.service import Service

# -- options as the docs show them (``vtl services -v`` and ``--markdown``) --------------

#: a help line that states its own default: "... (default: random, locally administered)"
_STATED_DEFAULT = re.compile(r"\s*\(default:?\s+([^()]*)\)")
_SECRET_KEY = re.compile(r"(password|passwd|passphrase|secret|token|psk)", re.I)
_TOML_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", bytes: "string",
               ipaddress.IPv4Address: "IP address", ipaddress.IPv6Address: "IP address",
               ipaddress.IPv4Network: "IP prefix", ipaddress.IPv6Network: "IP prefix"}
_EMPTY_FACTORIES = (list, dict, set, tuple, frozenset)
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "multiple of",
           "min_length": "length >=", "max_length": "length <=", "pattern": "matches"}


@dataclass(frozen=True)
class OptionDoc:
    """One option of a service, as ``vtl services -v`` and docs/services.md show it."""

    key: str  # "delay_ms", or "peers[].prefix" for a key of the tables in an array
    type: str  # in TOML's words: "integer", "number", "string", '"a" | "b"', "array of tables"
    default: str  # "required", a TOML literal ('"both"', "0.0", "[]"), or words ("unset")
    literal: bool  # ``default`` is a TOML literal (else it is words)
    constraints: str  # ">= 1, <= 86400", or ""
    description: str  # the help line, less a "(default: ...)" it stated itself

    def line(self) -> str:
        what = ", ".join(p for p in (self.type, self.constraints) if p)
        default = self.default if self.default == "required" else f"default: {self.default}"
        return f"{self.key}: {self.description} [{what}; {default}]"


def option_docs(model: type[BaseModel], prefix: str = "") -> list[OptionDoc]:
    """Every option of ``model`` (and of the tables it nests), in declaration order."""
    out = []
    for key, field in model.model_fields.items():
        sized = "bytes" in key or "(bytes)" in (field.description or "")
        description, default, literal = _default_of(key, field, sized)
        out.append(OptionDoc(prefix + key, _type_name(field.annotation), default, literal,
                             _constraints(field, sized), description))
        nested, many = _nested_model(field.annotation)
        if nested is not None:
            out.extend(option_docs(nested, f"{prefix}{key}{'[]' if many else ''}."))
    return out


def _default_of(key: str, field: FieldInfo, sized: bool) -> tuple[str, str, bool]:
    """(description, default, literal) of one field; a default the help line states
    itself ("(default: random, locally administered)") is said once, in the default."""
    description = field.description or ""
    if field.is_required():
        return description, "required", False
    default, literal = _default_value(key, field, sized)
    stated = _STATED_DEFAULT.search(description)
    if stated is not None:
        said = stated.group(1).strip()
        if not literal or said in (default, str(field.default)):
            plain = (description[:stated.start()] + description[stated.end():]).strip()
            return plain, (default if literal else said), literal
    return description, default, literal


def _default_value(key: str, field: FieldInfo, sized: bool) -> tuple[str, bool]:
    """(the default as shown, whether it is a TOML literal) of an optional field."""
    factory = field.default_factory
    if factory is not None:
        if factory in _EMPTY_FACTORIES:
            return _toml(factory()), True  # type: ignore[call-arg]
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "the defaults of its keys", False
        # never called here: a factory may be random (socks' gateway_mac) or costly
        doc = (inspect.getdoc(factory) or "").split("\n\n")[0].replace("\n", " ").rstrip(".")
        words = doc[:1].lower() + doc[1:] if doc else f"computed by {factory.__name__}()"
        return f"{words} (made when the config is loaded)", False
    value = field.default
    if value is None:
        return "unset", False
    if _is_secret(key, field.annotation):
        return "set, not shown", False
    return _toml(value) + (_size(value) if sized else ""), True


def _is_secret(key: str, annotation: Any) -> bool:
    kinds = (annotation, *get_args(annotation))
    return bool(_SECRET_KEY.search(key)) or any(k in (SecretStr, SecretBytes) for k in kinds)


def _mask_url(text: str) -> str:
    """A URL with its password hidden (``socks5://user:***@host:port``)."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not password:
        return text
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _toml(value: Any) -> str:
    """``value`` as it is written in a TOML config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml(value.value)
    if isinstance(value, (SecretStr, SecretBytes)):
        return '"***"'
    if isinstance(value, str):
        return json.dumps(_mask_url(value), ensure_ascii=False)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _size(n: Any) -> str:
    """" (2 MiB)" for a byte count that is a whole number of KiB, MiB or GiB."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1024:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f" ({n // scale} {unit})"
    return ""


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(_toml(a) for a in args)
    if origin in (Union, types.UnionType):
        names = dict.fromkeys(_type_name(a) for a in args if a is not type(None))
        return " | ".join(names)
    if origin in (list, tuple, set, frozenset, abc.Sequence):
        inner = args[0] if args else Any
        if _nested_model(inner)[0] is not None:
            return "array of tables"
        return f"array of {_plural(_type_name(inner))}" if args else "array"
    if origin in (dict, abc.Mapping) or (
            isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "table"
    if annotation in (SecretStr, SecretBytes):
        return "string (secret)"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(_toml(m.value) for m in annotation)
    return _TOML_TYPES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(name: str) -> str:
    if "|" in name or '"' in name:
        return f"({name})"
    return name + ("es" if name.endswith(("s", "x")) else "s")


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model of a nested table, whether it is an array of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset, abc.Sequence) and args:
        inner = _nested_model(args[0])[0]
        return inner, inner is not None
    if origin in (Union, types.UnionType):
        for arg in args:
            found = _nested_model(arg)
            if found[0] is not None:
                return found
    return None, False


def _constraints(field: FieldInfo, sized: bool) -> str:
    parts = []
    for meta in field.metadata:
        for attr, word in _BOUNDS.items():
            bound = getattr(meta, attr, None)
            if bound is not None:
                shown = f"`{bound}`" if attr == "pattern" else str(bound)
                parts.append(f"{word} {shown}{_size(bound) if sized else ''}")
    return ", ".join(parts)


# -- docs/services.md ----------------------------------------------------------------------

REFRESH_COMMAND = "vtl services --markdown --built-in > docs/services.md"
_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj):`~?([^`]+)`")
_RST_CODE = re.compile(r"``([^`]+)``")
_TOML_LINE = re.compile(r"^(\[\[?[\w.]+\]\]?|[\w.\"-]+\s*=)")
_GENERIC_KEYS = (
    ("use", "the service: a name listed here, or `\"path/to/file.py:ClassName\"` (relative "
     "to the config file)", "required"),
    ("name", "the instance's name in logs and counters (unique in the chain)",
     "the service's name; a second instance gets `#2`"),
    ("match", "a libpcap filter expression: frames it rejects pass this service untouched",
     "every frame"),
    ("fail", "when the service raises: `\"open\"` passes the frame, `\"closed\"` drops it",
     "per service, below"),
)


def services_markdown(infos: list[plugins.ServiceInfo]) -> str:
    """The services' reference page: each service's options and its module's docstring."""
    out = [
        "# Services", "",
        f"<!-- Generated by `{REFRESH_COMMAND}` from each service's option declarations and "
        "module docstring. Do not edit: tests/docs/test_services_md.py fails when this page "
        "is out of date. -->", "",
        "Each `[[services]]` table in a bridge's config runs one service; frames from the "
        "guest pass them in order, frames from the uplink in reverse order. "
        "`vtl services -v` lists the same options on the command line.", "",
        "Keys every service takes (the bridge reads them; the rest of the table is the "
        "service's own options):", "",
        "| key | what it does | default |", "| --- | --- | --- |",
        *(f"| `{key}` | {what} | {default} |" for key, what, default in _GENERIC_KEYS),
        "",
    ]
    sections = []
    for info, cls, problem in _resolved(infos):
        if cls is None:
            out.append(f"- `{info.name}`: cannot be loaded ({_cell(problem)})")
            continue
        out.append(f"- [`{info.name}`](#{info.name}): {cls.summary}")
        sections.append(_service_section(info, cls))
    return "\n".join(out) + "\n\n" + "\n\n".join(sections) + "\n"


def _resolved(infos: list[plugins.ServiceInfo]
              ) -> Iterator[tuple[plugins.ServiceInfo, type[Service] | None, str]]:
    """Each service with its class, or with None and why it cannot be loaded."""
    for info in infos:
        try:
            yield info, plugins.resolve(info.name), ""
        except ConfigError as exc:
            yield info, None, str(exc)


def _service_section(info: plugins.ServiceInfo, cls: type[Service]) -> str:
    module = sys.modules[cls.__module__]
    lead, blocks = _docstring_blocks(module.__doc__ or "", info.name)
    origin = ("built in" if info.origin == "built-in"
              else f"installed by the distribution `{info.origin}`")
    policy = f"`fail` defaults to `\"{cls.default_fail}\"`"
    if cls.airtight:
        policy += "; it must see every frame and fail closed, so `match` and `fail = \"open\"` "\
                  "are config errors"
    out = [f"## {info.name}", "", lead or cls.summary, "",
           f"`use = \"{info.name}\"`, {origin} (`{cls.__module__}.{cls.__qualname__}`); "
           f"{policy}. {_tunable_words(info.name, cls)}", "", "### Options", ""]
    options = option_docs(cls.Options)
    if options:
        out += ["| key | type | default | constraints | description |",
                "| --- | --- | --- | --- | --- |"]
        for o in options:
            default = f"`{o.default}`" if o.literal else o.default
            out.append(f"| `{o.key}` | {_cell(o.type, code=True)} | {_cell(default)} | "
                       f"{_cell(o.constraints)} | {_cell(o.description)} |")
    else:
        out.append("None besides the keys every service takes.")
    for heading, body in blocks:
        out += ["", f"### {heading}", "", _body_markdown(heading, body)]
    return "\n".join(out)


def _tunable_words(name: str, cls: type[Service]) -> str:
    """What of a service changes while the bridge runs (docs/control.md, ``set``)."""
    keys = [k for k in cls.Options.model_fields if k in cls.tunable]
    if "match" in cls.tunable:
        keys.append("match")
    if not keys:
        return ("No option changes at run time: a reload that changes one replaces the "
                "instance, and what it holds.")
    which = ", ".join(f"`{k}`" for k in keys)
    if set(cls.Options.model_fields) <= cls.tunable:
        which = "Every option" + (" and `match`" if "match" in cls.tunable else "")
    return (f"{which} can change at run time (`vtl ctl NAME set {name} KEY=VALUE`, or a "
            "reload), keeping the service's state.")


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def _docstring_blocks(doc: str, name: str) -> tuple[str, list[tuple[str, str]]]:
    """(the first paragraph, [(heading, body)]) of a Click-style docstring block: headings
    start in column 0, their bodies are indented."""
    lines = inspect.cleandoc(doc).splitlines()
    blank = lines.index("") if "" in lines else len(lines)
    lead = " ".join(line.strip() for line in lines[:blank])
    lead = re.sub(rf"^{re.escape(name)}:\s*", "", lead)
    lead = _inline(lead[:1].upper() + lead[1:])
    blocks: list[tuple[str, list[str]]] = []
    for line in lines[blank:]:
        if line and not line[0].isspace():
            blocks.append((line.strip(), []))
        elif blocks:
            blocks[-1][1].append(line)
        elif line.strip():
            blocks.append(("Notes", [line]))
    return lead, [(h, textwrap.dedent("\n".join(body)).strip("\n")) for h, body in blocks]


def _body_markdown(heading: str, body: str) -> str:
    """A docstring section as Markdown: roles become code, config paragraphs a TOML block."""
    out = []
    for para in re.split(r"\n\s*\n", body):
        if heading.lower() == "synopsis" and _TOML_LINE.match(para):
            out.append(f"```toml\n{para}\n```")
        else:
            out.append(_inline(para))
    return "\n\n".join(out)


def _inline(text: str) -> str:
    """reStructuredText's inline code (roles, double backquotes) as Markdown code."""
    return _RST_CODE.sub(r"`\1`", _ROLE.sub(r"`\1`", text))


def setup_logging(level: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s vtl %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("vtl")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return root


def _config_or_exit(path: str):  # noqa: ANN202 - returns BridgeConfig
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vtl")
def main() -> None:
    """VTL: transparent network services between a VM and the network."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def run(config: str, verbose: bool) -> None:
    """Run the bridge described by CONFIG until SIGINT or SIGTERM."""
    from vtl.bridge.runner import run_bridge

    cfg = _config_or_exit(config)
    log = setup_logging("debug" if verbose else cfg.bridge.log_level)
    log = log.getChild(cfg.bridge.name)
    try:
        code = run_bridge(cfg, log)
    except SetupError as exc:
        click.echo(f"vtl: {exc}", err=True)
        sys.exit(1)
    except VTLError as exc:
        click.echo(f"vtl: {exc}", err=True)
        sys.exit(1)
    _exit(code)


def _exit(code: int) -> None:
    """``sys.exit(code)``, except once libudt was loaded: its static destructor races its
    own threads at process exit and glibc aborts the process ("unaligned tcache chunk
    detected", exit -6, about one exit in six here) after the bridge has stopped cleanly
    and logged its counters. Then flush and leave without running C++ destructors."""
    if "udt4py" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check(configs: tuple[str, ...]) -> None:
    """Validate CONFIG files; exit 2 with one line per problem."""
    bad = False
    for path in configs:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            bad = True
            for problem in exc.problems:
                click.echo(problem, err=True)
            continue
        click.echo(f"{path}: ok ({len(cfg.services)} services)")
    sys.exit(2 if bad else 0)


@main.command()
@click.option("-v", "--verbose", is_flag=True, help="also list each service's options")
@click.option("--markdown", is_flag=True,
              help="print the services' reference page (docs/services.md) in Markdown")
@click.option("--built-in", "built_in", is_flag=True,
              help="only the services shipped with VTL (how docs/services.md is made)")
def services(verbose: bool, markdown: bool, built_in: bool) -> None:
    """List the services that can be used, built-in and installed."""
    infos = [i for i in plugins.available() if i.origin == "built-in" or not built_in]
    if markdown:
        click.echo(services_markdown(infos), nl=False)
        return
    for info, cls, problem in _resolved(infos):
        if cls is None:
            click.echo(f"{info.name:12} (cannot load: {problem})")
            continue
        origin = "" if info.origin == "built-in" else f"  [{info.origin}]"
        click.echo(f"{info.name:12} {cls.summary}{origin}")
        if verbose:
            for opt in option_docs(cls.Options):
                live = " (changes at run time)" if opt.key in cls.tunable else ""
                click.echo(f"    {opt.line()}{live}")


@main.command()
@click.argument("words", nargs=-1, metavar="NAME COMMAND [ARGS]...")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="the control socket's path (instead of NAME: /run/vtl/NAME.sock)")
@click.option("--service", default=None, help="connections: only this service's")
@click.option("--json", "as_json", is_flag=True, help="print the raw result as JSON")
def ctl(words: tuple[str, ...], socket_path: str | None, service: str | None,
        as_json: bool) -> None:
    """Ask or steer a running bridge: status, counters, connections, set SERVICE
    KEY=VALUE..., reload [CONFIG], log-level LEVEL (see docs/control.md)."""
    from vtl.bridge.ctl import CtlError, parse_command, render, request

    try:
        path, cmd, args = parse_command(words, socket_path, service)
        result = request(path, cmd, args, timeout=30.0 if cmd == "reload" else 5.0)
    except CtlError as exc:
        click.echo(f"vtl ctl: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        render(cmd, result)


@main.command(name="ls")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="/run/vtl",
              show_default=True, help="where the bridges' control sockets are")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def ls_(directory: str, as_json: bool) -> None:
    """List the bridges running on this host (one control socket each)."""
    from vtl.bridge.ctl import list_bridges, render_ls

    rows = list_bridges(Path(directory))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        render_ls(rows)


@main.command()
@click.option("--keep-capture", type=click.Path(dir_okay=False), default=None,
              help="where to keep the demo's pcap file (default: a temporary file)")
@click.option("--size-mb", type=int, default=20, show_default=True,
              help="size of the file fetched over HTTP")
@click.option("--delay-ms", type=float, default=20.0, show_default=True,
              help="netem delay each way")
def demo(keep_capture: str | None, size_mb: int, delay_ms: float) -> None:
    """Build a throw-away topology, bridge it with netem and capture, drive traffic."""
    from vtl.bridge.demo import run_demo

    try:
        code = run_demo(keep_capture=keep_capture, size_mb=size_mb, delay_ms=delay_ms)
    except SetupError as exc:
        click.echo(f"vtl demo: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
