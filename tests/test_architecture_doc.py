"""docs/architecture.md matches the code: every module is described, every name it points to
exists, and every subcommand is in its command table."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from gpt2.cli import COMMAND_MODULES

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
PACKAGE = REPO / "src" / "gpt2"


def table_rows() -> list[list[str]]:
    """The cells of every Markdown table row in the document (header rows included)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in DOC.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_every_module_is_described():
    top_level = {
        p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }
    missing = sorted(name for name in top_level if f"`{name}`" not in DOC)
    assert not missing, f"docs/architecture.md does not describe {missing}"
    assert "`serve/`" in DOC and "`commands/`" in DOC


def test_every_command_is_in_the_command_table():
    commands = {row[1].strip("`") for row in table_rows() if row[0].startswith("`gpt2 ")}
    for module in COMMAND_MODULES:
        assert f"commands/{module.rsplit('.', 1)[1]}.py" in commands, module


def test_every_named_name_exists():
    """The last column of each module's row lists `names` that must exist in that module."""
    checked = 0
    for row in table_rows():
        match = re.fullmatch(r"`([a-z_]+)(?:\.py|/)`", row[0])
        if not match or len(row) < 3:
            continue
        module = importlib.import_module(f"gpt2.{match.group(1)}")
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", row[-1]):
            if name.startswith("serve."):
                pytest.importorskip("fastapi")
                owner = importlib.import_module(f"gpt2.{name.rsplit('.', 1)[0]}")
                assert hasattr(owner, name.rsplit(".", 1)[1]), name
                continue
            obj = module
            for part in name.split("."):
                assert hasattr(obj, part), f"gpt2.{match.group(1)} has no {name}"
                obj = getattr(obj, part)
            checked += 1
    assert checked > 50


def test_the_diagram_is_mermaid():
    assert "```mermaid\nflowchart" in DOC
