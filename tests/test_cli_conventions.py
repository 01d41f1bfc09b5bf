"""One set of CLI conventions: every command's --help renders, every command takes --json, the exit codes are
the documented ones, --tasks is repeatable and comma-separated, and tables fold long names instead of cutting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from conftest import random_family, save_checkpoint
from flows.cli import app
from flows.cli_common import EXIT_CODES, split_tasks


def is_group(command) -> bool:
    return hasattr(command, "commands")  # typer carries its own click: no isinstance against the package's


def commands(group, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for name, command in sorted(group.commands.items()):
        out.append((*prefix, name))
        if is_group(command):
            out += commands(command, (*prefix, name))
    return out


ALL = commands(typer.main.get_command(app))


def test_the_command_tree_is_what_the_readme_lists():
    assert {c[0] for c in ALL} == {"merge", "digest", "methods", "export", "version", "ingest", "models", "lineage",
                                   "promote", "audit", "reproduce", "db", "evaluate", "score", "demo", "run", "serve",
                                   "map", "zoo", "measure", "doctor", "gc", "recipe", "extract-lora"}


@pytest.mark.parametrize("command", [(), *ALL], ids=lambda c: " ".join(c) or "mergeyard")
def test_every_help_renders(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "Traceback" not in result.output


def resolve(command: tuple[str, ...]):
    found = typer.main.get_command(app)
    for part in command:
        found = found.commands[part]
    return found


# every command that does something: the leaves, and `map`, whose group runs a sweep itself
ACTIONS = [c for c in ALL if not is_group(resolve(c))] + [("map",)]


@pytest.mark.parametrize("command", ACTIONS, ids=lambda c: " ".join(c))
def test_every_command_takes_json(command):
    assert "--json" in {opt for p in resolve(command).params for opt in getattr(p, "opts", [])}, command


def test_the_exit_codes_are_the_documented_ones(cli, tmp_path):
    """0 ok, 1 a user error, 2 a usage error, 3 a gate refusal, 4 a reproduction mismatch; --help and the
    README say so."""
    assert "3 a gate refused" in EXIT_CODES and "4 a rebuilt model's digest differs" in EXIT_CODES
    assert "Exit codes:" in CliRunner().invoke(app, ["--help"]).output
    base, models = random_family(2, seed=3)
    save_checkpoint(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_checkpoint(m, tmp_path / f"m{i}.safetensors")
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base.safetensors",
                                      "models": ["m0.safetensors", "m1.safetensors"]}))
    assert cli("merge", recipe, "--name", "x", "--json").exit_code == 0
    assert cli("evaluate", "nope", "--suite", "ta8-mini", ok=False).exit_code == 1
    assert cli("merge", ok=False).exit_code == 2  # click: a missing argument
    assert cli("merge", recipe, "--no-such-option", ok=False).exit_code == 2
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"required_suites": ["sha256:" + "0" * 64], "min_average": 0.5}))
    assert cli("promote", "x", "--to", "production", "--gate", gate, ok=False).exit_code == 3
    from flows.registry_access import open_registry

    stored = open_registry().store.path_for(open_registry().resolve("m0").digest) / "model.safetensors"
    raw = bytearray(stored.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"
    stored.write_bytes(bytes(raw))
    assert cli("reproduce", "m0", ok=False).exit_code == 4  # its stored bytes are not the recorded ones
    assert cli("reproduce", "x", ok=False).exit_code == 1  # a merge is not rebuilt from a damaged input


def test_tasks_are_repeatable_and_comma_separated():
    assert split_tasks(["a", "b,c", " d , "]) == ["a", "b", "c", "d"] and split_tasks(None) is None


def test_tables_fold_long_names_and_wide_prints_full_digests(cli, tmp_path):
    long_name = "a-model-name-far-longer-than-any-column-has-room-for-" * 2
    save_checkpoint(random_family(0)[0], tmp_path / "base.safetensors")
    model = json.loads(cli("ingest", tmp_path / "base.safetensors", "--name", long_name, "--json").stdout)
    narrow = cli("models", "list").stdout
    assert "…" not in narrow and long_name not in narrow  # folded over lines, not cut
    assert long_name in "".join(line.split("│")[2].strip() for line in narrow.splitlines() if line.count("│") > 3)
    wide = CliRunner().invoke(app, ["models", "list", "--wide"], env={"COLUMNS": "400"}).stdout
    assert model["digest"] in wide


@pytest.mark.parametrize("command", [["version"], ["--help"], ["methods"], ["digest", "MODEL"]])
def test_quick_commands_start_without_the_heavy_libraries(command, tmp_path):
    """Loaded for real, that is: a command that must start at once may hold a Deferred placeholder for torch
    (flows/deferred_imports.py), which imports it only if something uses it."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(8)}, str(tmp_path / "m.safetensors"))
    args = [str(tmp_path / "m.safetensors") if a == "MODEL" else a for a in command]
    code = (f"import sys; from flows.cli import main; sys.argv=['mergeyard', *{args!r}]\n"
            "try: main()\nexcept SystemExit: pass\n"
            "from flows.deferred_imports import Deferred\n"
            "print(sorted(m for m in ('torch', 'scipy', 'mlflow', 'prefect', 'sqlalchemy') "
            "if m in sys.modules and not isinstance(sys.modules[m], Deferred)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
