"""Every `gpt2 ...` command shown in the README parses with the real command line.

The commands themselves run in other tests (prepare, train, sample, eval, export, serve, tokenizer);
this keeps the README's spelling of subcommands and flags from drifting away from the code.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gpt2.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("gpt2 "):
                commands.append(line)
    return commands


def test_readme_shows_every_subcommand() -> None:
    shown = {shlex.split(c)[1] for c in readme_commands()}
    for name in ("prepare", "train", "sample", "eval", "export", "serve", "tokenizer", "presets"):
        assert name in shown, name


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)
