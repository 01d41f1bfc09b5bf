"""The registry commands as a user runs them (in-process: one import of torch and MLflow for all)."""

from __future__ import annotations

import json

import yaml

from conftest import random_family, save_checkpoint
from merging.checkpoints.digest import checkpoint_digest


def test_a_model_s_life_from_ingest_to_production(cli, tmp_path):
    base, models = random_family(2, seed=31)
    bp = save_checkpoint(base, tmp_path / "base.safetensors")
    paths = [save_checkpoint(m, tmp_path / f"task{i}.safetensors") for i, m in enumerate(models)]
    ingested = json.loads(cli("ingest", bp, "--name", "base", "--json").stdout)
    assert ingested["created"] and ingested["digest"] == checkpoint_digest(bp)
    assert json.loads(cli("ingest", bp, "--json").stdout)["created"] is False
    refused = cli("ingest", tmp_path / "nope.safetensors", ok=False)
    assert refused.exit_code == 1 and refused.stderr.startswith("error:") and "no such file" in refused.stderr

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": "base",
                                      "models": [p.name for p in paths], "parameters": {"density": 0.4}}))
    merged = json.loads(cli("merge", recipe, "--name", "product", "--json").stdout)
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["base", "task0", "task1", "product"]

    tree = cli("lineage", "product").stdout
    assert "ties" in tree and "task0" in tree and "base" in tree
    graph = json.loads(cli("lineage", merged["digest"][:15], "--format", "json").stdout)
    assert graph["model"] == merged["digest"] and len(graph["edges"]) == 3
    assert cli("lineage", "product", "--format", "mermaid").stdout.startswith("graph BT")

    assert "reproduced" in cli("reproduce", "product").stdout

    gate = tmp_path / "gate.yaml"
    suite_digest = "sha256:" + "5" * 64
    gate.write_text(yaml.safe_dump({"required_suites": [suite_digest], "min_average": 0.5}))
    refusal = cli("promote", "product", "--to", "production", "--gate", gate, "--actor", "ci", "--json", ok=False)
    refused = json.loads(refusal.stdout)
    assert refusal.exit_code == 3 and refused["decision"] == "refused"  # a gate refusal
    assert refused["checks"][0]["detail"].startswith("no accuracy on suite digest sha256:5555")
    from flows.registry_access import open_registry

    registry = open_registry()
    registry.record_evaluations(registry.resolve("product"), "suite-a", suite_digest, [("t", "accuracy", 0.8)])
    decision = json.loads(cli("promote", "product", "--to", "production", "--gate", gate, "--actor", "ci",
                              "--reason", "nightly", "--json").stdout)
    assert decision["decision"] == "promoted" and decision["checks"][0]["observed"] == 0.8
    log = json.loads(cli("audit", "--alias", "production", "--json").stdout)
    assert [e["decision"] for e in log] == ["refused", "promoted"] and log[1]["reason"] == "nightly"
    assert json.loads(cli("lineage", "product@production", "--format", "json").stdout)["model"] == merged["digest"]

    # someone swaps a parent's stored bytes: the rebuild refuses to read them, and the parent's own
    # reproduce names the tensor
    parent = registry.resolve("task0")
    stored = tmp_path / "mergeyard-home" / "store" / parent.digest.replace(":", "-") / "model.safetensors"
    raw = bytearray(stored.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"
    stored.write_bytes(bytes(raw))
    refused = cli("reproduce", "product", ok=False)
    assert refused.exit_code == 1 and "stored copy of input task0" in refused.stderr
    broken = cli("reproduce", "task0", ok=False)
    named = broken.stderr.split("differing tensors: ")[1].strip().split(", ")
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    assert broken.exit_code == 4 and named == [last]  # the one tensor whose last float was changed


def test_db_commands(cli):
    assert cli("db", "current").stdout.strip() == "empty"
    assert "at schema 0007" in cli("db", "upgrade").stdout
    assert cli("db", "current").stdout.strip() == "0007"
    bad = cli("lineage", "x", "--format", "svg", ok=False)
    assert bad.exit_code == 1 and "tree, json or mermaid" in bad.stderr


def test_database_url_setting_and_shared_database_upgrades(cli, database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEYARD_DATABASE_URL", database_url)
    from flows.settings import get_settings

    get_settings.cache_clear()
    bp = save_checkpoint(random_family(0, seed=33)[0], tmp_path / "m.safetensors")
    if database_url.startswith("postgresql"):
        # a team's database changes schema only when someone says so
        stale = cli("ingest", bp, ok=False)
        assert stale.exit_code == 1 and "run `mergeyard db upgrade`" in stale.stderr
        cli("db", "upgrade")
    assert json.loads(cli("ingest", bp, "--json").stdout)["created"]
    assert cli("db", "current").stdout.strip() == "0007"
    from registry.db import make_engine
    from sqlalchemy import text

    with make_engine(database_url).connect() as conn:  # the rows really are in that database
        assert conn.execute(text("SELECT count(*) FROM models")).scalar() == 1
