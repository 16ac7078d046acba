"""docs/services.md is generated from the services' option declarations and module docstrings:
this test regenerates it and fails, with the command that refreshes it, when the committed
page is out of date."""

from __future__ import annotations

import difflib
from pathlib import Path

from click.testing import CliRunner
from vtl.bridge import cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "services.md"


def test_committed_services_page_is_up_to_date():
    result = CliRunner().invoke(cli.main, ["services", "--markdown", "--built-in"])
    assert result.exit_code == 0, result.output
    committed = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if committed != result.output:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(keepends=True), result.output.splitlines(keepends=True),
            "docs/services.md (committed)", "docs/services.md (generated)"))[:60])
        raise AssertionError(
            "docs/services.md is out of date; refresh it from the repository root with\n"
            f"    .venv/bin/{cli.REFRESH_COMMAND}\n"
            f"and commit it. First differences:\n{diff}")


def test_refresh_command_is_the_one_the_page_names():
    assert cli.REFRESH_COMMAND in PAGE.read_text(encoding="utf-8")
