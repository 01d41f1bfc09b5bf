"""Bad input refused in one line before any work, with nothing recorded: out-of-range seeds, non-finite weights
and parameters, shard sizes that are not positive, a special file as a recipe, a pipe to ingest, a companion file
that links out of its checkpoint, a production gate that checks nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import random_family, save_checkpoint


@pytest.fixture
def pair(tmp_path):
    base, (model,) = random_family(1, seed=5)
    return save_checkpoint(base, tmp_path / "base.safetensors"), save_checkpoint(model, tmp_path / "m.safetensors")


def _nothing_recorded(home) -> None:
    from flows.registry_access import open_registry

    if not (home / "lineage.db").exists():
        return
    registry = open_registry()
    from registry.schema import MergeRun, Model
    from sqlalchemy import func, select

    with registry.Session() as s:
        assert s.scalar(select(func.count()).select_from(MergeRun)) == 0
        assert s.scalar(select(func.count()).select_from(Model)) == 0
    registry.close()
    leftovers = [p for p in (home / "store").glob(".*")] if (home / "store").exists() else []
    assert not leftovers


@pytest.mark.parametrize("change,message", [
    ({"seed": 2**70}, "Input should be less than or equal to 9223372036854775807"),
    ({"seed": -1}, "Input should be greater than or equal to 0"),
    ({"parameters": {"lambda": float("inf")}}, "lambda: Input should be a finite number"),
    ({"models_weight": float("nan")}, "Input should be a finite number"),
], ids=["huge-seed", "negative-seed", "infinite-lambda", "nan-weight"])
def test_bad_numbers_in_a_recipe_are_refused_before_any_work(cli, tmp_path, pair, isolated_home, change, message):
    base, model = pair
    data = {"method": "dare_linear", "base": str(base), "models": [{"model": str(model), "weight": 1.0}]}
    if "models_weight" in change:
        data["models"][0]["weight"] = change.pop("models_weight")
    data.update(change)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    refused = cli("merge", recipe, ok=False)
    assert refused.exit_code == 1 and message in refused.stderr and refused.stderr.count("\n") == 1
    _nothing_recorded(isolated_home)


@pytest.mark.parametrize("size", [0, -1])
def test_a_shard_size_that_is_not_positive_is_refused_before_any_work(cli, tmp_path, pair, isolated_home, size):
    base, model = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(model)]}))
    refused = cli("merge", recipe, "--max-shard-bytes", size, ok=False)
    assert refused.exit_code == 1 and "a shard holds a positive number of bytes" in refused.stderr
    _nothing_recorded(isolated_home)


def test_a_special_file_as_a_recipe_and_a_pipe_to_ingest_are_refused_at_once(cli, tmp_path, isolated_home):
    started = time.perf_counter()
    refused = cli("merge", "/dev/zero", ok=False)
    assert refused.exit_code == 1 and "/dev/zero: not a regular file" in refused.stderr
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    refused = cli("ingest", fifo, ok=False)
    assert refused.exit_code == 1 and "not a regular file" in refused.stderr
    assert time.perf_counter() - started < 60  # neither blocks reading
    _nothing_recorded(isolated_home)


def test_a_companion_that_links_out_of_its_checkpoint_is_refused_and_nothing_is_copied(cli, tmp_path, isolated_home):
    base, _ = random_family(0, seed=6)
    model = save_checkpoint(base, tmp_path / "model", "dir")
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot for the store\n")
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").symlink_to(secret)
    refused = cli("ingest", model, ok=False)
    assert refused.exit_code == 1 and "tokenizer.json: a link to" in refused.stderr and "outside" in refused.stderr
    _nothing_recorded(isolated_home)
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in isolated_home.rglob("*") if p.is_file())
    # a link inside the checkpoint's own directory is the checkpoint's file: taken
    (model / "tokenizer.json").unlink()
    (model / "tok.json").write_text("{}")
    (model / "tokenizer.json").symlink_to(model / "tok.json")
    assert json.loads(cli("ingest", model, "--json").stdout)["created"]


def test_a_production_gate_that_checks_nothing_is_refused_and_records_nothing(cli, tmp_path, pair):
    base, _ = pair
    cli("ingest", base, "--name", "product")
    for text in ("", "name: release\n", "min_average: null\n"):
        gate = tmp_path / "gate.yaml"
        gate.write_text(text)
        refused = cli("promote", "product", "--to", "production", "--gate", gate, ok=False)
        assert refused.exit_code == 1 and "checks nothing" in refused.stderr
    assert json.loads(cli("audit", "--json").stdout) == []
    assert cli("promote", "product", "--to", "production", "--no-gate", "--reason", "first release").exit_code == 0


def test_names_map_one_to_one_onto_mlflow_and_are_checked_before_any_work(cli, tmp_path, pair):
    base, model = pair
    for name in ("team/model", "team model", "release.2", "-lead"):
        refused = cli("ingest", base, "--name", name, ok=False)
        assert refused.exit_code == 1 and "is not allowed" in refused.stderr and refused.stderr.count("\n") == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(model)]}))
    refused = cli("merge", recipe, "--name", "team/model", ok=False)
    assert refused.exit_code == 1 and "is not allowed" in refused.stderr
    _nothing_recorded_but_what_was_ingested = json.loads(cli("models", "list", "--json").stdout)
    assert _nothing_recorded_but_what_was_ingested == []
    cli("ingest", base, "--name", "team--model")
    cli("ingest", model, "--name", "team_model")
    from flows.registry_access import open_registry

    registry = open_registry()
    names = {m.name for m in registry.mirror.client.search_registered_models()}
    assert {"team--model", "team_model"} <= names  # two names, two MLflow models


def test_a_name_that_is_not_utf8_ends_in_one_line(tmp_path, pair):
    import subprocess
    import sys

    base, _ = pair
    env = {**os.environ, "MERGEYARD_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(base), "--name", b"caf\xe9".decode(
        "utf-8", "surrogateescape")], capture_output=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    err = done.stderr.decode("utf-8", "replace").strip()
    assert err.count("\n") == 0 and "is not allowed" in err


# ---- bytes that changed in the store: every path out checks them ---------------------------------------------------


def _rot(path, offset_from_end: int = 4) -> None:
    """Flip a bit inside the last tensor's bytes, keeping the file's size and modification time (bit rot)."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x80
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def merged_pair(cli, tmp_path, pair):
    base, model = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(model)],
                                      "parameters": {"lambda": 0.5}}))
    merged = json.loads(cli("merge", recipe, "--name", "product", "--json").stdout)
    from flows.registry_access import open_registry

    registry = open_registry()
    stored = {m.name: m for m in registry.list_models()}
    return recipe, merged, stored, registry


def test_a_rotten_input_is_refused_named_and_restored_by_ingesting_the_original(cli, tmp_path, pair, merged_pair):
    base, model = pair
    recipe, merged, stored, registry = merged_pair
    rotten = stored["m"]
    _rot(Path(rotten.store_path) / "model.safetensors")
    cli("models", "list")  # a stat sees nothing
    recipe2 = tmp_path / "r2.yaml"
    recipe2.write_text(recipe.read_text().replace("0.5", "0.6"))
    before = {m.digest for m in registry.list_models()}
    refused = cli("merge", recipe2, "--name", "again", ok=False)
    assert refused.exit_code == 1 and "the stored copy of input m" in refused.stderr and "has changed" in refused.stderr
    assert {m.digest for m in registry.list_models()} == before  # no model, no lineage
    assert not list(Path(registry.config.scratch).glob("merge-run-*"))
    cli("ingest", model)  # the original, again: the damage it found is put back
    again = json.loads(cli("merge", recipe, "--name", "product", "--json").stdout)
    assert again["digest"] == merged["digest"]


def test_bit_rot_is_found_fixed_and_never_exported_or_blamed_on_a_merge(cli, tmp_path, pair, merged_pair):
    recipe, merged, stored, registry = merged_pair
    rotten = stored["m"]
    _rot(Path(rotten.store_path) / "model.safetensors")
    refused = cli("export", "m", "--out", tmp_path / "exported", ok=False)
    assert refused.exit_code == 1 and "has changed" in refused.stderr and not (tmp_path / "exported").exists()
    refused = cli("reproduce", "product", ok=False)  # the input is named; the merge is not blamed (exit 4)
    assert refused.exit_code == 1 and "the stored copy of input m" in refused.stderr
    found = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert [f["kind"] for f in found["findings"]] == ["damaged-entry"]
    cli("doctor", "--fix")
    assert cli("doctor").exit_code == 0
    cli("export", "m", "--out", tmp_path / "exported")
    assert json.loads(cli("reproduce", "product", "--json").stdout)["ok"]


def test_a_home_restored_with_coarse_times_merges_and_doctor_restamps_it(cli, tmp_path, merged_pair):
    recipe, merged, stored, registry = merged_pair
    store = Path(registry.config.store_root)
    for path in store.rglob("*.safetensors"):  # a tar archive keeps whole seconds
        st = path.stat()
        os.utime(path, (int(st.st_atime), int(st.st_mtime)))
    found = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert {f["kind"] for f in found["findings"]} == {"stale-stamp"}
    assert json.loads(cli("merge", recipe, "--name", "product", "--json").stdout)["digest"] == merged["digest"]
    assert json.loads(cli("reproduce", "product", "--json").stdout)["ok"]
    cli("doctor", "--fix")
    assert cli("doctor").exit_code == 0


# ---- no output goes over a registered model's bytes; an output a crash cut short is found --------------------------


def test_no_out_goes_over_a_by_reference_model_or_a_store_entry(cli, tmp_path, pair):
    base, model = pair
    ref_dir = save_checkpoint(random_family(0, seed=12)[0], tmp_path / "mine", "dir")
    before = (ref_dir / "model.safetensors").read_bytes()
    cli("ingest", ref_dir, "--name", "mine", "--by-reference")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(model)]}))
    for out in (ref_dir, tmp_path):  # the model's own directory, or one holding it
        refused = cli("merge", recipe, "--out", out, "--overwrite", ok=False)
        assert refused.exit_code == 1 and "registered by reference" in refused.stderr
    assert (ref_dir / "model.safetensors").read_bytes() == before
    from flows.registry_access import open_registry

    cli("ingest", model)
    entry = Path(open_registry().resolve("m").store_path)
    refused = cli("extract-lora", base, "--base", base, "--rank", 2, "--out", entry, "--overwrite", ok=False)
    assert refused.exit_code == 1 and ("MERGEYARD_HOME" in refused.stderr or "model store" in refused.stderr)
    assert (entry / "model.safetensors").is_file()


def test_an_output_cut_short_by_a_kill_is_found_and_removed_by_doctor(cli, tmp_path, pair, isolated_home):
    import signal
    import subprocess
    import sys

    base, model = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(model)]}))
    out = tmp_path / "outputs" / "merged"
    env = {**os.environ, "MERGEYARD_TEST_CRASH_AT": "merge.writing", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(recipe), "--out", str(out)],
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = [p for p in out.parent.iterdir() if p.name.startswith(".merged.tmp-")]
    assert left and not out.exists()
    report = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert any(f["kind"] == "temp-dir" and f["subject"] == str(left[0]) for f in report["findings"])
    cli("doctor", "--fix", ok=False)
    assert not any(p.name.startswith(".merged.tmp-") for p in out.parent.iterdir())
    assert cli("doctor").exit_code == 0


def test_a_full_disk_and_a_lock_that_outlasts_every_wait_end_in_one_line(cli, tmp_path, pair, isolated_home,
                                                                           monkeypatch):
    import errno

    import registry.store as store_module

    base, model = pair

    def full(src, dst):  # the kernel's answer when the device is full (fault injection, the one way to get it here)
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(store_module, "clone_file", full)
    refused = cli("ingest", base, ok=False)
    assert refused.exit_code == 1 and "no space left" in refused.stderr and refused.stderr.count("\n") == 1
    monkeypatch.undo()
    _nothing_recorded(isolated_home)

    from sqlalchemy.exc import OperationalError

    import registry.mlflow_mirror as mirror_module

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO registered_models ...", {}, Exception("database is locked"))

    monkeypatch.setattr(mirror_module.MlflowMirror, "register_model", locked)
    refused = cli("ingest", base, ok=False)
    assert refused.exit_code == 1 and "stayed locked" in refused.stderr and refused.stderr.count("\n") == 1
    monkeypatch.undo()
    _nothing_recorded(isolated_home)
