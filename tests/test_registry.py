"""The lineage registry on SQLite and on a real PostgreSQL, with a real MLflow store."""

from __future__ import annotations

from registry.errors import StoreDamagedError

import os

import hashlib
import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

from conftest import random_family, save_checkpoint
from merging.checkpoints.digest import checkpoint_digest
from merging.errors import CheckpointError, IncompatibleModelsError
from merging.recipes.recipe import parse_recipe
from flows.merge import merge_and_record
from flows.reproduce import reproduce
from registry.errors import AmbiguousModelError, AppendOnlyError, ModelNotFoundError, SourceError, ValidationFailed
from registry.lineage import ancestry_edges, lineage
from registry.promotion import Gate, audit, promote
from registry.schema import Evaluation, LineageEdge, MergeRun, Model, PromotionEvent


def mlflow_versions(registry, digest):
    client = registry.mirror.client
    return client.search_model_versions(f"tags.`mergeyard.digest` = '{digest}'")


def family(tmp_path, n=2, seed=0):
    base, models = random_family(n, seed=seed)
    bp = save_checkpoint(base, tmp_path / f"src{seed}" / "base.safetensors")
    (tmp_path / f"src{seed}" / "config.json").write_text(json.dumps({"architectures": ["TinyNet"]}))
    return bp, [save_checkpoint(m, tmp_path / f"src{seed}" / f"ft{i}.safetensors") for i, m in enumerate(models)]


def test_ingest_records_everything_once(registry, tmp_path):
    bp, _ = family(tmp_path)
    # the MLflow store is shared by the test session: count what this test adds
    mlflow_before = len(mlflow_versions(registry, checkpoint_digest(bp)))
    model, created = registry.ingest(str(bp), name="tiny-base")
    assert created and model.digest == checkpoint_digest(bp)
    assert model.kind == "ingested" and model.source_uri == f"file://{bp.resolve()}"
    assert model.architecture == "TinyNet" and model.dtype == "F32"
    assert model.num_params == sum(t.numel() for t in random_family(0)[0].values())
    stored = Path(model.store_path)
    for f in model.files:  # per-file sha256 of what the store holds
        assert hashlib.sha256((stored / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert checkpoint_digest(stored) == model.digest
    versions = mlflow_versions(registry, model.digest)
    assert len(versions) == mlflow_before + 1
    mine = [v for v in versions if str(v.version) == model.mlflow_version and v.name == "tiny-base"]
    assert mine[0].tags["mergeyard.source"] == model.source_uri and mine[0].tags["mergeyard.kind"] == "ingested"
    again, created_again = registry.ingest(f"file://{bp}", name="other-name")
    assert not created_again and again.id == model.id
    assert registry.count(Model) == 1 and len(mlflow_versions(registry, model.digest)) == mlflow_before + 1


def bad_checkpoints(tmp_path):
    base, (good,) = random_family(1, seed=3)
    nan = dict(good)
    nan["blk.0.w"] = good["blk.0.w"].clone()
    nan["blk.0.w"][0, 0] = float("nan")
    traversal = {**good, "../../etc/passwd": torch.zeros(1)}
    wrong_shape = {**good, "blk.0.w": torch.zeros(16, 8)}
    truncated = save_checkpoint(good, tmp_path / "bad" / "trunc.safetensors")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    return {
        "nan": (save_checkpoint(nan, tmp_path / "bad" / "nan.safetensors"), ValidationFailed, "NaN"),
        "traversal": (save_checkpoint(traversal, tmp_path / "bad" / "trav.safetensors"), ValidationFailed, "not allowed"),
        "base-mismatch": (save_checkpoint(wrong_shape, tmp_path / "bad" / "shape.safetensors"), IncompatibleModelsError, "shape"),
        "truncated": (truncated, CheckpointError, "truncated"),
    }


@pytest.mark.parametrize("case", ["nan", "traversal", "base-mismatch", "truncated"])
def test_invalid_checkpoints_leave_nothing_behind(registry, tmp_path, case):
    bp, _ = family(tmp_path, seed=3)
    base, _ = registry.ingest(str(bp), name="base")
    path, error, message = bad_checkpoints(tmp_path)[case]
    store_before = sorted(p.name for p in registry.store.root.iterdir())
    names = "name IN ('trav', 'nan', 'shape', 'trunc')"
    mlflow_before = len(registry.mirror.client.search_model_versions(names))
    with pytest.raises(error, match=message):
        registry.ingest(str(path), base="base")
    assert registry.count(Model) == 1
    assert sorted(p.name for p in registry.store.root.iterdir()) == store_before
    assert len(registry.mirror.client.search_model_versions(names)) == mlflow_before == 0


def test_mlflow_failure_rolls_back_database_and_store(registry, tmp_path, monkeypatch):
    bp, _ = family(tmp_path, seed=4)

    def refuse(*args, **kwargs):  # MLflow server down at the worst moment
        raise ConnectionError("MLflow unreachable")

    monkeypatch.setattr(registry.mirror, "register_model", refuse)
    with pytest.raises(ConnectionError):
        registry.ingest(str(bp))
    assert registry.count(Model) == 0
    assert not registry.store.has(checkpoint_digest(bp))


def test_resolve_references(registry, tmp_path):
    bp, (m0, m1) = family(tmp_path, seed=5)
    a, _ = registry.ingest(str(m0), name="shared")
    b, _ = registry.ingest(str(m1), name="shared")
    assert registry.resolve(a.digest).id == a.id
    assert registry.resolve(a.digest[:15]).id == a.id  # "sha256:" + 8 hex
    assert registry.resolve(a.digest[7:20]).id == a.id  # bare hex prefix
    assert registry.resolve("shared").id == b.id  # a name means its newest model
    with pytest.raises(ModelNotFoundError):
        registry.resolve("nobody")
    with pytest.raises(ModelNotFoundError, match="shared@production"):
        registry.resolve("shared@production")
    common = 0
    while a.digest[7 + common] == b.digest[7 + common]:
        common += 1
    if common >= 8:  # astronomically unlikely; only then can a prefix be ambiguous
        with pytest.raises(AmbiguousModelError):
            registry.resolve(a.digest[: 7 + common])


def recorded_merge(registry, tmp_path, method="ties", seed=6, name="product", params=None):
    bp, mps = family(tmp_path, seed=seed)
    recipe = parse_recipe({"method": method, "base": str(bp), "models": [{"model": str(m), "weight": 0.5 + i}
                                                                       for i, m in enumerate(mps)],
                           "parameters": params or {"density": 0.5}})
    return merge_and_record(recipe, registry, name=name), bp, mps


def test_merge_of_merges_lineage_runs_and_mlflow(registry, tmp_path):
    first, bp, mps = recorded_merge(registry, tmp_path)
    run = registry.producing_run(first.model)
    assert run.status == "succeeded" and run.output_model_id == first.model.id
    pinned = json.loads(run.recipe_json)
    assert pinned["base"] == checkpoint_digest(bp) and [m["model"] for m in pinned["models"]] == [checkpoint_digest(p) for p in mps]
    assert run.environment["torch"] == torch.__version__ and run.seconds > 0 and run.mergeyard_version
    # second generation: the first merge is a candidate of another, the base is shared (a diamond)
    extra = save_checkpoint(random_family(1, seed=7)[1][0], tmp_path / "extra.safetensors")
    second = merge_and_record(parse_recipe({"method": "task_arithmetic", "base": str(bp),
                                            "models": [{"model": first.model.digest, "weight": 0.7}, str(extra)],
                                            "parameters": {"lambda": 0.5}}), registry, name="product-v2")
    with registry.Session() as s:
        edges = ancestry_edges(s, second.model.id)
        graph = lineage(s, second.model.id)
    assert len(edges) == 3 + 3 == len(set(edges))  # each edge once, though the base is reached by two paths
    assert {n.name for n in graph.nodes.values()} >= {"product", "product-v2", "base"}
    assert graph.nodes[first.model.id].method == "ties" and graph.nodes[second.model.id].method == "task_arithmetic"
    weights = {(graph.nodes[e.parent].name, graph.nodes[e.child].name): e.weight for e in graph.edges}
    assert weights[("product", "product-v2")] == 0.7 and weights[("ft1", "product")] == 1.5
    assert "-->|candidate 0.7|" in graph.to_mermaid()
    # MLflow: a run with the parents as inputs and the merged model as output, a tagged version
    client = registry.mirror.client
    mlrun = client.get_run(registry.producing_run(second.model).mlflow_run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["method"] == "task_arithmetic"
    assert {i.model_id for i in mlrun.inputs.model_inputs} == {first.model.mlflow_model_id,
                                                                 registry.resolve("extra").mlflow_model_id,
                                                                 registry.resolve(checkpoint_digest(bp)).mlflow_model_id}
    assert [o.model_id for o in mlrun.outputs.model_outputs] == [second.model.mlflow_model_id]
    version = registry.mirror.client.get_model_version("product-v2", second.model.mlflow_version)
    assert version.tags["mergeyard.digest"] == second.model.digest
    assert version.tags["mergeyard.parents"].split(",")[1] == first.model.digest


def test_failed_merge_leaves_a_failed_run_and_nothing_else(registry, tmp_path):
    bp, mps = family(tmp_path, seed=8)
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(bp), "models": [str(m) for m in mps],
                           "parameters": {"lambda": 1e38}, "out_dtype": "float16"})
    with pytest.raises(Exception, match="NaN or infinity"):
        merge_and_record(recipe, registry, out=tmp_path / "out", name="doomed")
    assert not (tmp_path / "out").exists()
    with registry.Session() as s:
        runs = s.query(MergeRun).all()
        assert [r.status for r in runs] == ["failed"] and "NaN or infinity" in runs[0].error
        assert s.query(LineageEdge).count() == 0
        assert s.query(Model).filter(Model.kind == "merged").count() == 0
        assert s.query(Model).filter(Model.kind == "ingested").count() == 3  # inputs are registered first
    assert registry.mirror.client.get_run(runs[0].mlflow_run_id).info.status == "FAILED"


def test_reproduce_rebuilds_and_names_differing_tensors(registry, tmp_path):
    merged, bp, mps = recorded_merge(registry, tmp_path, seed=9)
    outcome = reproduce(registry, "product")
    assert outcome.ok and outcome.rebuilt_digest == merged.model.digest
    # corrupt one input's stored bytes: the rebuild now differs, and says where
    parent = registry.resolve(checkpoint_digest(mps[0]))
    stored = Path(parent.store_path) / "model.safetensors"
    raw = bytearray(stored.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"  # the last float of the last tensor becomes 1.0
    before = stored.stat()
    stored.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError, match="stored copy of input"):  # a changed file is never merged from
        reproduce(registry, "product")
    os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))  # bit rot in place: only the bytes tell
    with pytest.raises(StoreDamagedError, match=f"stored copy of input {parent.name} .* has changed"):
        reproduce(registry, "product")  # the damaged input is named, the merge not blamed
    bad = reproduce(registry, parent.digest)  # an ingested model: its stored bytes are re-hashed, tensors named
    assert not bad.ok and bad.differing == ["scale"]
    assert registry.latest_reproduction(parent.id).ok is False


SUITE_A = "sha256:" + "a" * 64  # a suite's digest: what a gate checks evaluations against


def evaluate(registry, model, scores, suite="suite-a"):
    registry.record_evaluations(model, suite, SUITE_A, [(task, "accuracy", v) for task, v in scores.items()])


def test_promotion_gates_events_and_aliases(registry, tmp_path):
    first, _, _ = recorded_merge(registry, tmp_path, seed=10)
    gate = Gate(required_suites=[SUITE_A], min_average=0.6, min_per_task=0.3, max_regression=0.02,
                lineage={"allowed_sources": ["file", "hf"], "require_reproduced": True})
    refused = promote(registry, "product", "production", gate, actor="ci", reason="no evals yet")
    assert not refused.passed and any(f"evaluated on {SUITE_A[:19]}" == c.rule for c in refused.failures)
    evaluate(registry, first.model, {"t1": 0.7, "t2": 0.65})
    assert [c.rule for c in promote(registry, "product", "production", gate, actor="ci").failures] == ["reproduced bit for bit"]
    reproduce(registry, "product")
    passed = promote(registry, "product", "production", gate, actor="alice", reason="nightly")
    assert passed.passed and registry.resolve("product@production").id == first.model.id
    assert registry.mirror.alias_version("product", "production") == first.model.mlflow_version
    # a second model regresses by more than the tolerance: refused with the numbers, holder unchanged
    second, _, _ = recorded_merge(registry, tmp_path, seed=11, method="task_arithmetic", params={"lambda": 0.3})
    evaluate(registry, second.model, {"t1": 0.66, "t2": 0.64})
    reproduce(registry, second.model.digest)
    worse = promote(registry, second.model.digest, "production", gate, actor="bob")
    failed = worse.failures
    assert [c.rule.split(" vs ")[0] for c in failed] == [f"{SUITE_A[:19]} no regression"]
    assert failed[0].observed == pytest.approx(0.65) and failed[0].threshold == pytest.approx(0.655)
    assert registry.resolve("product@production").id == first.model.id
    # lineage rule: ingested from a source the gate does not allow
    strict = Gate(lineage={"allowed_sources": ["hf"]})
    assert not promote(registry, "product", "staging", strict, actor="ci").passed
    log = audit(registry, alias="production")
    assert [r.decision for r in log] == ["refused", "refused", "promoted", "refused"]
    assert log[2].actor == "alice" and log[2].reason == "nightly" and log[3].previous == first.model.digest
    assert any(c["rule"] == f"{SUITE_A[:19]} average accuracy" and c["observed"] == pytest.approx(0.675) for c in log[2].checks)


def test_promotion_events_are_append_only(registry, tmp_path):
    merged, _, _ = recorded_merge(registry, tmp_path, seed=12)
    promote(registry, "product", "staging", Gate(), actor="ci")
    with registry.Session() as s:
        event = s.query(PromotionEvent).one()
        event.actor = "someone else"
        with pytest.raises(AppendOnlyError):
            s.flush()
        s.rollback()
        s.delete(s.query(PromotionEvent).one())
        with pytest.raises(AppendOnlyError):
            s.flush()
        s.rollback()
        with pytest.raises(AppendOnlyError):
            s.execute(PromotionEvent.__table__.update().values(actor="x"))
    for statement in ("UPDATE promotion_events SET actor = 'x'", "DELETE FROM promotion_events"):
        with pytest.raises(Exception, match="append-only"):
            with registry.engine.begin() as conn:  # bypassing the application: the database refuses
                conn.execute(text(statement))
    assert audit(registry)[0].actor == "ci"


def write_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> str:
    """The layout huggingface_hub reads offline: refs/main → commit, snapshots/<commit>/<files>."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return commit


def test_hf_source_from_a_hand_built_offline_cache(registry, tmp_path):
    base, _ = random_family(0, seed=13)
    src = save_checkpoint(base, tmp_path / "hf-src", "sharded")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    files["config.json"] = json.dumps({"architectures": ["TinyHub"]}).encode()
    files["pytorch_model.bin"] = b"never read"
    commit = write_hub_cache(registry.config.hf_cache, "acme/tiny", files)
    model, created = registry.ingest("hf://acme/tiny")
    assert created and model.digest == checkpoint_digest(src) and model.resolved_revision == commit
    assert model.source_uri == f"hf://acme/tiny@{commit}" and model.architecture == "TinyHub" and model.name == "acme-tiny"  # the repository, as a name MLflow takes
    assert registry.ingest(f"hf://acme/tiny@{commit}")[0].id == model.id
    with pytest.raises(SourceError, match="not in the local hub cache"):
        registry.ingest("hf://acme/missing")
    for bad in ("hf://acme/../etc", "hf://../x", "hf://acme/tiny@../../main", "hf://noslash"):
        with pytest.raises(SourceError):
            registry.ingest(bad)
    assert registry.count(Model) == 1


def test_mlflow_source_round_trip(registry, tmp_path, registry_config):
    bp, _ = family(tmp_path, seed=14)
    model, _ = registry.ingest(str(bp), name="from-mlflow")
    registry.mirror.set_alias("from-mlflow", "champion", model.mlflow_version)
    from registry.registry import Registry, RegistryConfig

    # a second team's registry (its own database and store) reads the model out of the shared MLflow
    other = Registry(RegistryConfig(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "other-store", tmp_path / "scratch2",
                                    registry_config.mlflow_tracking_uri, registry_config.mlflow_artifact_root))
    by_version, _ = other.ingest(f"mlflow://from-mlflow/{model.mlflow_version}", name="copy")
    assert by_version.digest == model.digest and by_version.source_uri == f"mlflow://from-mlflow/{model.mlflow_version}"
    assert other.ingest("mlflow://from-mlflow@champion")[0].id == by_version.id
    with pytest.raises(SourceError, match="not in the MLflow registry"):
        other.ingest("mlflow://from-mlflow/999")
    with pytest.raises(SourceError):
        other.ingest("mlflow://../x/1")
    other.close()


def test_open_clip_source_with_a_tiny_config(registry, tmp_path):
    import open_clip

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "mergeyard-test-tiny.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    model, created = registry.ingest("open_clip://mergeyard-test-tiny")
    again, _ = registry.ingest("open_clip://mergeyard-test-tiny")  # seeded init: the same bytes
    assert created and again.id == model.id
    assert model.architecture == "open_clip/mergeyard-test-tiny" and model.resolved_revision == "random-init-seed-0"
    assert model.num_params == sum(p.numel() for p in open_clip.create_model("mergeyard-test-tiny").state_dict().values())
    with pytest.raises(SourceError, match="no model"):
        registry.ingest("open_clip://no-such-arch")
    with pytest.raises(SourceError):
        registry.ingest("open_clip://../../etc")


def test_relevance_scores_and_evaluations_round_trip(registry, tmp_path):
    bp, mps = family(tmp_path, seed=15)
    a, _ = registry.ingest(str(mps[0]))
    b, _ = registry.ingest(str(mps[1]))
    registry.record_scores("suite-a", "sha256:s", "fw-lmo", {a.id: -0.4, b.id: 0.1})
    registry.record_scores("suite-a", "sha256:s", "fw-lmo", {a.id: -0.5})  # newer score wins
    registry.record_scores("suite-a", "sha256:s", "task-vector-cosine", {a.id: 0.9})
    assert registry.scores("suite-a", "fw-lmo") == {a.digest: -0.5, b.digest: 0.1}
    assert registry.scores("suite-b") == {}
    registry.record_evaluations(a, "suite-a", "sha256:s", [("t1", "accuracy", 0.5), ("t2", "accuracy", 0.7)])
    registry.record_evaluations(a, "suite-a", "sha256:s", [("t1", "accuracy", 0.6)])
    assert registry.latest_evaluations(a.id, "suite-a", "accuracy") == {"t1": 0.6, "t2": 0.7}
    with registry.Session() as s:
        assert s.query(Evaluation).count() == 3  # history is kept; "latest" is a view of it


FROM_FILES = Gate(lineage={"allowed_sources": ["file"]})  # one rule: every root ancestor came from a file


def test_a_failed_alias_move_records_no_promotion(registry, tmp_path, monkeypatch):
    merged, _, _ = recorded_merge(registry, tmp_path, seed=16)

    def refuse(*args, **kwargs):  # MLflow goes away between the gate and the alias move
        raise ConnectionError("MLflow unreachable")

    monkeypatch.setattr(registry.mirror, "set_alias", refuse)
    with pytest.raises(ConnectionError):
        promote(registry, "product", "production", FROM_FILES, actor="ci")
    assert audit(registry) == []
    with pytest.raises(ModelNotFoundError):
        registry.resolve("product@production")
    monkeypatch.undo()
    assert promote(registry, "product", "production", FROM_FILES, actor="ci").passed
    assert registry.mirror.alias_version("product", "production") == merged.model.mlflow_version


def test_differing_tensors_compares_every_block_of_large_tensors(tmp_path):
    from flows.reproduce import differing_tensors

    big = torch.zeros(20_000_000)  # 80 MB: more than one 64 MiB read block
    a = save_checkpoint({"big": big, "small": torch.ones(3)}, tmp_path / "a.safetensors")
    changed = big.clone()
    changed[100] = 1.0  # in the first block only
    b = save_checkpoint({"big": changed, "small": torch.ones(3)}, tmp_path / "b.safetensors")
    assert differing_tensors(a, b) == ["big"]
    assert differing_tensors(a, a) == []
