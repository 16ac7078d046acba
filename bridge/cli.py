"""The ``vtl`` command line.

- ``vtl run CONFIG``: one bridge in the foreground until SIGINT/SIGTERM.
- ``vtl check CONFIG...``: validate; exit 0, or 2 with one line per problem.
- ``vtl services``: the services that can be used, with a line each.
- ``vtl demo``: a throw-away topology, a bridge with netem and capture, real traffic.

Exit codes: 0 success, 1 an expected failure (no root, missing interface...)
reported in plain words without a traceback, 2 a config or usage error.
"""

from __future__ import annotations

import logging
import sys

import click
from vtl.bridge import plugins
from vtl.bridge.config import load_config

from vtl.errors import ConfigError, SetupError, VTLError


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
def services(verbose: bool) -> None:
    """List the services that can be used, built-in and installed."""
    for info in plugins.available():
        try:
            cls = plugins.resolve(info.name)
        except ConfigError as exc:
            click.echo(f"{info.name:12} (cannot load: {exc})")
            continue
        origin = "" if info.origin == "built-in" else f"  [{info.origin}]"
        click.echo(f"{info.name:12} {cls.summary}{origin}")
        if verbose:
            for key, field in cls.Options.model_fields.items():
                default = "required" if field.is_required() else f"default {field.default!r}"
                click.echo(f"    {key}: {field.description or ''} ({default})")


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
