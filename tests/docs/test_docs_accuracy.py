"""The hand-written docs (README.md, docs/*.md) name only things that exist: every `vtl`
command and flag, every Python name under `vtl.`, every file path and relative link; and the
config keys, defaults and counters in docs/operating.md are the ones the code declares, so
adding a key or a counter without documenting it fails here too."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
from vtl.bridge import cli
from vtl.bridge.config import COMMON_SERVICE_KEYS, BridgeSection
from vtl.bridge.engine import BridgeCounters
from vtl.bridge.ports import PacketPortConfig, PcapPortConfig, PortCounters, TapPortConfig

from vtl.service import ServiceCounters

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]
OPERATING = ROOT / "docs" / "operating.md"

_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
_COMMAND = re.compile(r"^\s*(?:sudo +)?(?:\.venv/bin/)?vtl((?: +-{1,2}[a-z][\w-]*| +[a-z][\w-]*)+)",
                      re.M)
_DOTTED = re.compile(r"(?<![\w/.])(vtl(?:\.[A-Za-z_]\w*)+)")
# A repository path; not one inside an absolute path (`/etc/vtl/vm1.toml`, `/run/vtl/...`).
_PATH = re.compile(r"(?<![\w./])((?:vtl|models|services|bridge|examples|tests|benchmarks|docs)"
                   r"/[\w./@-]*)")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def code_of(path: Path) -> str:
    """The code spans and blocks of a Markdown file (where commands and names are)."""
    return "\n".join(m.group(0).strip("`") for m in _CODE.finditer(path.read_text()))


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_every_vtl_command_and_flag_exists(doc):
    for m in _COMMAND.finditer(code_of(doc)):
        words = m.group(1).split()
        command: click.Command = cli.main
        for word in words:
            if word.startswith("-"):
                flags = {o for p in command.params for o in getattr(p, "opts", [])}
                flags |= {"-h", "--help"} | ({"--version"} if command is cli.main else set())
                assert word in flags, f"{doc.name}: `vtl {' '.join(words)}`: no flag {word}"
            elif isinstance(command, click.Group):
                assert word in command.commands, \
                    f"{doc.name}: `vtl {' '.join(words)}`: no command {word!r}"
                command = command.commands[word]
            else:
                break  # an argument (CONFIG, a path)


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_every_python_name_under_vtl_exists(doc):
    for name in sorted(set(_DOTTED.findall(code_of(doc)))):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"{doc.name}: `{name}` does not exist"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{doc.name}: `{name}` does not exist")


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_every_path_and_relative_link_exists(doc):
    text = doc.read_text()
    for path in set(_PATH.findall(code_of(doc))):
        assert (ROOT / path.rstrip(".")).exists(), f"{doc.name}: `{path}` does not exist"
    for link in _LINK.findall(text):
        if "://" not in link:
            assert (doc.parent / link).exists(), f"{doc.name}: link {link} leads nowhere"


def table_after(marker: str) -> dict[str, list[str]]:
    """The first Markdown table after the line that starts with ``marker``: key -> cells."""
    lines = OPERATING.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if cells[0] not in ("key", "counter", "---", "code"):
                rows[cells[0].strip("`")] = cells
        elif rows:
            break
    return rows


@pytest.mark.parametrize(("marker", "model"), [
    ("### `[bridge]`", BridgeSection),
    ('`kind = "tap"`', TapPortConfig),
    ('`kind = "packet"`', PacketPortConfig),
    ('`kind = "pcap"`', PcapPortConfig),
])
def test_operating_config_tables_match_the_declarations(marker, model):
    rows = table_after(marker)
    declared = {o.key: o for o in cli.option_docs(model) if o.key != "kind"}
    assert set(rows) == set(declared), (
        f"docs/operating.md, the table after {marker}: keys {sorted(rows)}, but the code "
        f"declares {sorted(declared)}: document the new keys (or drop the old ones)")
    for key, opt in declared.items():
        documented = rows[key][2].strip("`")
        assert documented == opt.default, f"{marker} {key}: documented default {documented}, " \
                                          f"declared {opt.default}"


def test_operating_names_every_key_a_service_entry_takes():
    section = OPERATING.read_text().split("### `[[services]]`")[1].split("\n## ")[0]
    for key in COMMON_SERVICE_KEYS:
        assert f"`{key}`" in section


@pytest.mark.parametrize(("marker", "counters"), [
    ("`bridge`:", [*BridgeCounters().as_dict(), "macs"]),
    ("`services.NAME`:", list(ServiceCounters().as_dict())),
])
def test_operating_counter_tables_match_the_code(marker, counters):
    documented = {name.strip("` ") for key in table_after(marker) for name in key.split(",")}
    assert documented == set(counters), f"docs/operating.md after {marker}: document " \
                                        f"{sorted(set(counters) - documented)}"


def test_operating_names_every_port_counter():
    text = OPERATING.read_text()
    for name in PortCounters.__dataclass_fields__:
        assert f"`{name}`" in text, f"docs/operating.md: port counter {name} not described"


def test_operating_gives_the_command_that_refreshes_the_services_page():
    assert cli.REFRESH_COMMAND in OPERATING.read_text()
