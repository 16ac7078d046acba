"""`vtl services`: how options, their defaults and constraints are shown (``-v``), and the
Markdown reference page (``--markdown``) made from the declarations and module docstrings."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field, SecretStr
from vtl.bridge import cli, plugins

from vtl import ServiceOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _never_called() -> str:
    """A fresh value for each config."""
    raise AssertionError("a default factory must not be called to document it")


class Inner(BaseModel):
    prefix: str = Field(description="where")
    weight: int = Field(1, ge=0, description="how much")


class Kinds(ServiceOptions):
    """One field of every kind the docs must show."""

    plain: int = Field(5, ge=1, le=10, description="a number")
    stated: str = Field(default_factory=_never_called, description="the MAC used "
                        "(default: random, locally administered)")
    documented_factory: str = Field(default_factory=_never_called, description="made fresh")
    bare_factory: str = Field(default_factory=lambda: "x")
    listed: list[int] = Field(default_factory=list, description="numbers")
    required: str = Field(description="must be given")
    unset: int | None = Field(None, description="optional")
    password: str = Field("hunter2", description="the password")
    token: SecretStr = Field(SecretStr("abc"), description="an API token")
    url: str = Field("socks5://user:pw@127.0.0.1:1080", description="the proxy")
    choice: Literal["a", "b"] = Field("a", description="one of two")
    flag: bool = Field(False, description="on or off")
    size_bytes: int = Field(2 * 1024 * 1024, ge=16 * 1024, description="memory")
    name_pattern: str = Field("vm", pattern=r"^[a-z]+$", min_length=1, description="a name")
    same: int = Field(3, description="retries (default 3)")
    differs: int = Field(3, description="retries (default 4 on slow links)")
    nested: list[Inner] = Field(default_factory=list, description="a table per entry")
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        (), description="prefixes")


def docs() -> dict[str, cli.OptionDoc]:
    return {o.key: o for o in cli.option_docs(Kinds)}


def test_every_kind_of_default_is_shown_once_and_in_words_a_user_reads():
    d = docs()
    assert d["plain"].line() == "plain: a number [integer, >= 1, <= 10; default: 5]"
    # the help line states the default: said once, in the default, not "PydanticUndefined"
    assert d["stated"].line() == ("stated: the MAC used [string; default: random, locally "
                                  "administered]")
    assert d["documented_factory"].default == ("a fresh value for each config (made when the "
                                               "config is loaded)")
    assert d["bare_factory"].default.startswith("computed by")
    assert (d["listed"].default, d["listed"].literal) == ("[]", True)
    assert d["listed"].type == "array of integers"
    assert (d["nets"].type, d["nets"].default) == ("array of IP prefixes", "[]")
    assert d["required"].line() == "required: must be given [string; required]"
    assert (d["unset"].type, d["unset"].default) == ("integer", "unset")
    assert (d["choice"].type, d["choice"].default) == ('"a" | "b"', '"a"')
    assert d["flag"].default == "false"
    assert d["size_bytes"].line() == ("size_bytes: memory [integer, >= 16384 (16 KiB); "
                                      "default: 2097152 (2 MiB)]")
    assert d["name_pattern"].constraints == "length >= 1, matches `^[a-z]+$`"
    assert (d["same"].description, d["same"].default) == ("retries", "3")
    assert d["differs"].description == "retries (default 4 on slow links)"
    assert [k for k in d if k.startswith("nested")] == ["nested", "nested[].prefix",
                                                        "nested[].weight"]
    assert d["nested[].prefix"].default == "required"
    for line in (o.line() for o in d.values()):
        assert "PydanticUndefined" not in line and "None" not in line, line


def test_secrets_and_url_credentials_are_not_printed():
    d = docs()
    assert d["password"].default == "set, not shown"
    assert (d["token"].type, d["token"].default) == ("string (secret)", "set, not shown")
    assert d["url"].default == '"socks5://user:***@127.0.0.1:1080"'
    text = "\n".join(o.line() for o in d.values())
    assert "hunter2" not in text and "abc" not in text and ":pw@" not in text


def test_vtl_services_verbose_shows_socks_gateway_mac_default_once():
    result = CliRunner().invoke(cli.main, ["services", "-v"])
    assert result.exit_code == 0, result.output
    assert "PydanticUndefined" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip().startswith("gateway_mac:")]
    (line,) = [x for x in lines if "random, locally administered" in x]  # socks's
    assert all(x.count("default") == 1 for x in lines), lines
    assert "    delay_ms: one-way delay in milliseconds [number, >= 0; default: 0.0] (changes " \
        "at run time)" in result.output.splitlines()
    assert "    max_connections: connections at once; more get RST [integer, >= 1, <= 1000000; " \
        "default: 1024]" in result.output.splitlines(), "pep's options are not tunable"


def test_docstring_blocks_become_markdown_sections():
    doc = '''documented: a test service that
    says what it does.

    Synopsis
        [[services]]
        use = "documented"
        plain = 7

        The same on both sides (``plain``).

    What it does to frames
        Nothing; see :mod:`vtl.service`.

        - a list item
          continued
    '''
    lead, blocks = cli._docstring_blocks(doc, "documented")
    assert lead == "A test service that says what it does."
    assert [h for h, _ in blocks] == ["Synopsis", "What it does to frames"]
    synopsis = cli._body_markdown(*blocks[0])
    assert synopsis == ('```toml\n[[services]]\nuse = "documented"\nplain = 7\n```\n\n'
                        "The same on both sides (`plain`).")
    frames = cli._body_markdown(*blocks[1])
    assert frames == "Nothing; see `vtl.service`.\n\n- a list item\n  continued"


def test_markdown_has_a_section_per_service_with_its_options(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES / "plugins"))
    installed = plugins.ServiceInfo("protocount", "vtl-protocount", "protocount:ProtoCount")
    builtins = plugins.available()
    monkeypatch.setattr(plugins, "available", lambda: [*builtins, installed])
    runner = CliRunner()
    full = runner.invoke(cli.main, ["services", "--markdown"])
    assert full.exit_code == 0, full.output
    for info in builtins:
        assert f"\n## {info.name}\n" in full.output
    assert "\n## protocount\n" in full.output
    assert "installed by the distribution `vtl-protocount`" in full.output
    assert "| `interval_s` | `number` | `10.0` | > 0 | seconds between two log summaries |" \
        in full.output
    assert "### What it does to frames" in full.output
    assert "| `proxy` | `string` | required |" in full.output
    assert "`fail` defaults to `\"closed\"`" in full.output  # socks
    shipped = runner.invoke(cli.main, ["services", "--markdown", "--built-in"])
    assert shipped.exit_code == 0, shipped.output
    assert "protocount" not in shipped.output
    assert "PydanticUndefined" not in full.output
    sys.modules.pop("protocount", None)


@pytest.mark.parametrize("table_row", ['| `use` |', '| `match` |', '| `fail` |', '| `name` |'])
def test_markdown_documents_the_keys_every_service_takes(table_row):
    out = cli.services_markdown([])
    assert table_row in out


def test_a_service_that_cannot_load_is_named_with_the_reason(monkeypatch):
    broken = plugins.ServiceInfo("broken", "vtl-broken", "vtl_no_such_module:Broken")
    monkeypatch.setattr(plugins, "available", lambda: [broken])
    listed = CliRunner().invoke(cli.main, ["services", "-v"])
    assert listed.exit_code == 0 and listed.output.startswith("broken       (cannot load:")
    page = cli.services_markdown([broken])
    assert "- `broken`: cannot be loaded (service 'broken'" in page
    assert "\n## broken" not in page
