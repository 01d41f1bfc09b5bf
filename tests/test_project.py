"""The project's own promises: README's commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    install, test = commands
    assert "pip install -e '.[dev]'" in install and "mergeyard demo" in install
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, f"README test command {test!r} is not a line of .ci/run"
