"""The store protects itself, and a lost MLflow store is rebuilt from SQL: each defect found by trying it as a user.

- `merge --out <a store entry> --overwrite` replaced a registered model's bytes;
- `reproduce` of a damaged ingested model said "none found (metadata only)";
- re-ingesting the bytes of a lost stored copy said "already registered" and left it lost;
- store paths were absolute, so a moved home read the original's store;
- with the MLflow store gone, `promote` failed with a traceback and `ingest` started a partial mirror.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import random_family, save_checkpoint


@pytest.fixture
def registered(tmp_path, cli):
    base, fts = random_family(2, seed=41)
    paths = [save_checkpoint(sd, tmp_path / f"in/{n}.safetensors") for n, sd in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    digests = {p.stem: json.loads(cli("ingest", p, "--name", p.stem, "--json").stdout)["digest"] for p in paths}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "base", "models": ["a", "b"],
                                      "parameters": {"lambda": 0.5}}))
    return {"paths": {p.stem: p for p in paths}, "digests": digests, "recipe": recipe}


def store_entry(home, digest):
    return home / "store" / digest.replace(":", "-")


def test_out_inside_the_home_is_refused(cli, registered, isolated_home):
    target = store_entry(isolated_home, registered["digests"]["a"])
    before = (target / "model.safetensors").read_bytes()
    for args in (["merge", registered["recipe"], "--out", target, "--overwrite"],
                 ["merge", registered["recipe"], "--out", isolated_home / "elsewhere"],
                 ["export", "a", "--out", target, "--overwrite"]):
        result = cli(*args, ok=False)
        assert result.exit_code == 1 and "inside MERGEYARD_HOME" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (target / "model.safetensors").read_bytes() == before
    from flows.registry_access import open_registry
    from registry.schema import MergeRun

    assert open_registry().count(MergeRun) == 0  # refused before anything was recorded


def test_reproduce_names_the_damaged_tensor_of_an_ingested_model(cli, registered, isolated_home):
    from merging.checkpoints.checkpoint import Checkpoint

    stored = store_entry(isolated_home, registered["digests"]["a"]) / "model.safetensors"
    ckpt = Checkpoint(stored)
    victim = ckpt.names[1]
    offset = ckpt.entries[victim].start if hasattr(ckpt.entries[victim], "start") else None
    raw = bytearray(stored.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    begin = 8 + header + json.loads(raw[8:8 + header])[victim]["data_offsets"][0]
    assert offset in (None, begin, begin - 8 - header)
    raw[begin:begin + 4] = bytes(4)  # one float of one tensor, same size, same file
    stored.write_bytes(bytes(raw))
    result = cli("reproduce", "a", ok=False)
    assert result.exit_code == 4
    assert result.stderr.split("differing tensors: ")[1].strip() == victim
    assert "metadata only" not in result.stderr


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_ingesting_the_bytes_again_restores_a_lost_or_damaged_copy(damage, cli, registered, isolated_home):
    from merging.checkpoints.digest import checkpoint_digest

    digest = registered["digests"]["b"]
    entry = store_entry(isolated_home, digest)
    if damage == "missing":
        shutil.rmtree(entry)
    else:
        path = entry / "model.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-4:] = b"\x00\x00\x80\x7f"  # +inf in the last float
        path.write_bytes(bytes(raw))
    found = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert [f["kind"] for f in found["findings"]] == ["damaged-entry"]
    refused = cli("merge", registered["recipe"], "--name", "product", ok=False)  # not merged from bad bytes
    assert refused.exit_code == 1 and "stored copy" in refused.stderr, refused.output
    assert "stored copy missing or changed" in cli("lineage", "b").stdout
    again = json.loads(cli("ingest", registered["paths"]["b"], "--name", "b", "--json").stdout)
    assert again["digest"] == digest and not again["created"]
    assert checkpoint_digest(entry) == digest
    assert cli("reproduce", "b").exit_code == 0
    assert json.loads(cli("doctor", "--json").stdout)["findings"] == []


def test_doctor_restores_a_damaged_copy_from_its_source_and_reproduce_from_a_rebuild(cli, registered, isolated_home):
    from merging.checkpoints.digest import checkpoint_digest

    merged = json.loads(cli("merge", registered["recipe"], "--name", "product", "--json").stdout)["digest"]
    for digest in (registered["digests"]["a"], merged):
        path = next(store_entry(isolated_home, digest).glob("*.safetensors"))
        raw = bytearray(path.read_bytes())
        raw[-8:] = bytes(8)
        path.write_bytes(bytes(raw))
    found = {f["subject"]: f for f in json.loads(cli("doctor", "--json", ok=False).stdout)["findings"]}
    assert set(found) == {registered["digests"]["a"], merged}
    assert found[registered["digests"]["a"]]["action"].startswith("restore from")
    assert found[merged]["action"] == "" and "mergeyard reproduce" in found[merged]["detail"]
    fixed = json.loads(cli("doctor", "--fix", "--json", ok=False).stdout)
    assert fixed["left"] == 1  # the merged one: doctor does not run merges
    outcome = json.loads(cli("reproduce", "product", "--json").stdout)
    assert outcome["ok"] and outcome["store_restored"]
    assert checkpoint_digest(store_entry(isolated_home, merged)) == merged
    assert json.loads(cli("doctor", "--json").stdout)["findings"] == []


def test_a_moved_home_reads_its_own_store(cli, registered, isolated_home, tmp_path, monkeypatch):
    from flows.settings import get_settings

    moved = tmp_path / "moved-home"
    shutil.copytree(isolated_home, moved)
    shutil.rmtree(isolated_home)  # the original is gone: only the copy's store can answer
    monkeypatch.setenv("MERGEYARD_HOME", str(moved))
    get_settings.cache_clear()
    shown = json.loads(cli("models", "list", "--json").stdout)
    assert {m["store_path"] for m in shown} == {str(moved / "store" / d.replace(":", "-"))
                                                for d in registered["digests"].values()}
    assert cli("reproduce", "a").exit_code == 0
    out = tmp_path / "exported"
    cli("export", "a", "--out", out)
    assert (out / "model.safetensors").is_file()


def test_a_lost_mlflow_store_is_refused_then_rebuilt_by_doctor(cli, registered, isolated_home, tmp_path, monkeypatch):
    import mlflow

    cli("merge", registered["recipe"], "--name", "product")
    cli("promote", "product", "--to", "staging")
    # the MLflow store is gone (a volume recreated): its URI now names an empty store. (A new URI rather than a
    # deleted file: this process's MLflow keeps its engine on the old file open.)
    (tmp_path / "mlflow-after").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow-after' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from flows.settings import get_settings

    get_settings.cache_clear()
    new = save_checkpoint(random_family(0, seed=42)[0], tmp_path / "new.safetensors")
    for args in (["promote", "product", "--to", "production", "--no-gate"], ["ingest", new, "--name", "new"]):
        result = cli(*args, ok=False)
        assert result.exit_code == 1 and "doctor --fix" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    from flows.registry_access import open_registry
    from registry.schema import Model, PromotionEvent

    assert open_registry().count(Model) == 4 and open_registry().count(PromotionEvent) == 1  # nothing recorded
    found = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert sorted(f["kind"] for f in found["findings"]) == ["alias", "audit-witness"] + ["missing-version"] * 4
    cli("doctor", "--fix")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for m in json.loads(cli("models", "list", "--json").stdout):
        version = client.get_model_version(m["name"], m["mlflow_version"])
        assert version.tags["mergeyard.digest"] == m["digest"]
    product = json.loads(cli("models", "list", "--json").stdout)[-1]
    assert str(client.get_model_version_by_alias("product", "staging").version) == product["mlflow_version"]
    assert cli("audit", "--verify").exit_code == 0  # the witness published again from the verified chain
    cli("ingest", new, "--name", "new")  # writes work again
