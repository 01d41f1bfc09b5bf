"""The Prefect pipeline on the small zoo: real flow runs (one test server per session), a real registry and MLflow store.

Checked against independent computations: the merged bytes against the
engine run directly on the zoo's files, the recorded accuracies against the
evaluator run on those bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.config import ConfigError, parse_pipeline

TARGETS = ["digits", "letters", "colours"]
OFF_TARGET = "textures"


def pipeline_config(zoo: Path, name: str = "nightly", merges=None, **extra):
    data = {
        "name": name, "suite": "ta8-mini", "tasks": TARGETS, "base": str(zoo / "base"),
        "candidates": [str(zoo / "finetuned" / t) for t in TARGETS + [OFF_TARGET]],
        "score": {"top_k": 3},
        "merges": merges or [{"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
                             {"method": "ties", "parameters": {"density": 0.5, "lambda": 0.8}}],
        "promotion": {"alias": "staging", "gate": {"required_suites": [{"suite": "ta8-mini", "tasks": TARGETS}],
                                                   "min_average": 0.6,
                                                   "lineage": {"allowed_sources": ["file"]}}},
        **extra,
    }
    return parse_pipeline(data)


def counts(registry):
    from registry.schema import Evaluation, LineageEdge, MergeRun, Model, PromotionEvent, RelevanceScore

    return {t.__tablename__: registry.count(t) for t in (Model, MergeRun, LineageEdge, Evaluation, PromotionEvent, RelevanceScore)}


# ---- config: plain pydantic, no Prefect ---------------------------------------------------------


def test_pipeline_config_errors_are_one_line_and_name_the_field(tmp_path):
    base = {"name": "p", "suite": "ta8-mini", "base": "b", "candidates": ["c"], "merges": [{"method": "ties"}]}
    with pytest.raises(ConfigError, match=r"merges\.0\.method: .*unknown merge method 'tie'.*known: "):
        parse_pipeline({**base, "merges": [{"method": "tie"}]})
    with pytest.raises(ConfigError, match="give candidates or candidate_globs"):
        parse_pipeline({**base, "candidates": []})
    with pytest.raises(ConfigError, match=r"schedule: .*Invalid cron string"):
        parse_pipeline({**base, "schedule": {"cron": "0 2 * *"}})
    with pytest.raises(ConfigError, match=r"score\.top_k"):
        parse_pipeline({**base, "score": {"top_k": 0}})
    with pytest.raises(ConfigError, match="merges: List should have at least 1 item"):
        parse_pipeline({**base, "merges": []})
    for exc_match, data in [("Extra inputs are not permitted", {**base, "candiates": []})]:
        with pytest.raises(ConfigError, match=exc_match):
            parse_pipeline(data)


def test_pipeline_yaml_paths_are_relative_to_the_file_and_globs_expand_at_run_time(tmp_path):
    from flows.config import load_pipeline

    (tmp_path / "models").mkdir()
    for n in ("b", "a"):
        (tmp_path / "models" / f"{n}.safetensors").write_bytes(b"")
    (tmp_path / "gate.yaml").write_text("min_average: 0.9\n")
    (tmp_path / "p.yaml").write_text(
        "name: p\nsuite: ta8-mini\nbase: models/a.safetensors\ncandidates: [file://models/b.safetensors, some-model@prod]\n"
        "candidate_globs: ['models/*.safetensors']\nmerges: [{method: average}]\npromotion: {gate: gate.yaml}\n")
    config = load_pipeline(tmp_path / "p.yaml")
    models = (tmp_path / "models").resolve()
    assert config.base == str(models / "a.safetensors")
    assert config.resolved_candidates() == [f"file://{models / 'b.safetensors'}", "some-model@prod",
                                            str(models / "a.safetensors"), str(models / "b.safetensors")]
    assert config.gate().min_average == 0.9
    (tmp_path / "models" / "c.safetensors").write_bytes(b"")  # a candidate that arrived later
    assert config.resolved_candidates()[-1] == str(models / "c.safetensors")
    (tmp_path / "bad.yaml").write_text("name: p\nsuite: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_pipeline(tmp_path / "bad.yaml")


# ---- the pipeline flow --------------------------------------------------------------------------


def test_pipeline_scores_merges_evaluates_promotes_and_a_rerun_does_nothing_again(prefect_api, small_zoo, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from evaluation.evaluator import evaluate_checkpoint
    from flows.pipeline import pinned_settings, pipeline_flow, registry_for
    from flows.report import artifact_key
    from flows.steps import suite_for
    from merging.checkpoints.checkpoint import Checkpoint
    from merging.checkpoints.digest import checkpoint_digest
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    zoo, manifest, _ = small_zoo
    config = pipeline_config(zoo)
    report = pipeline_flow(config)
    registry = registry_for(pinned_settings())

    # relevance: the off-target fine-tune scores lowest and is left out of every merge
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name[OFF_TARGET]["relevance"] == min(c["relevance"] for c in report["candidates"])
    assert [c["selected"] for c in report["candidates"]] == [True, True, True, False]
    assert len(registry.scores("ta8-mini", "gradient")) == 4

    # each merge is exactly what the engine makes from the zoo's files, and scored as the evaluator scores it
    suite = suite_for("ta8-mini", TARGETS, None)
    for merge, spec in zip(report["merges"], config.merges):
        assert merge["merged"] and not merge["cached"]
        recipe = parse_recipe({"method": spec.method, "parameters": spec.parameters, "base": str(zoo / "base"),
                               "models": [str(zoo / "finetuned" / t) for t in TARGETS]})
        direct = run_merge(recipe, tmp_path / spec.method)
        assert merge["digest"] == direct.digest == checkpoint_digest(Checkpoint(registry.resolve(merge["digest"]).store_path))
        measured = evaluate_checkpoint(tmp_path / spec.method, suite)
        assert merge["scores"]["accuracy"] == {t.task: t.accuracy for t in measured.tasks}
        model = registry.resolve(merge["digest"])
        parents = registry.parents_of(model)
        assert [(e.role, p.name) for e, p in parents] == [("base", "base")] + [("candidate", t) for t in TARGETS]
        assert registry.producing_run(model).status == "succeeded"
    for digest, scores in report["parents"].items():  # zero-shot and fine-tuned accuracies next to the merges'
        measured = evaluate_checkpoint(registry.resolve(digest).store_path, suite)
        assert scores["accuracy"] == {t.task: t.accuracy for t in measured.tasks}

    # the best merge went through the gate and holds nightly@staging in the DB and in MLflow
    best = max(report["merges"], key=lambda m: m["average"])
    assert report["best"] == best["digest"]
    promotion = report["promotion"]
    assert promotion["decision"] == "promoted" and promotion["model"] == best["digest"]
    assert registry.resolve("nightly@staging").digest == best["digest"]
    alias = registry.mirror.client.get_model_version_by_alias("nightly", "staging")
    assert alias.tags["mergeyard.digest"] == best["digest"]

    # one markdown artifact per merge: inputs with digests, method, metrics next to the parents', the gate
    async def read_artifact(key):
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found[0].data
    import asyncio

    best_md = asyncio.run(read_artifact(artifact_key("nightly", best["label"])))
    assert best["digest"] in best_md and "PROMOTED" in best_md and "nightly@staging" in best_md
    for c in report["candidates"]:
        assert (c["digest"] in best_md) == c["selected"]
    assert "| **merged** |" in best_md and "| base |" in best_md
    other = next(m for m in report["merges"] if m is not best)
    assert "Not put to the gate" in asyncio.run(read_artifact(artifact_key("nightly", other["label"])))

    # a re-run with unchanged inputs: Prefect's caches answer, no merge, no evaluation, no new event
    before = counts(registry)
    again = pipeline_flow(config)
    assert all(m["cached"] and not m["merged"] for m in again["merges"])
    assert again["promotion"]["decision"] == "unchanged"
    assert counts(registry) == before
    # with Prefect's caches ignored the registry still knows the work is done
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        third = pipeline_flow(config)
    assert all(not m["cached"] and not m["merged"] for m in third["merges"])
    assert [m["digest"] for m in third["merges"]] == [m["digest"] for m in report["merges"]]
    assert counts(registry) == {**before, "relevance_scores": before["relevance_scores"] + 4}


def test_a_merge_whose_evaluation_fails_leaves_no_model_and_a_failed_run(prefect_api, small_zoo, monkeypatch):
    import flows.steps
    from flows.pipeline import pinned_settings, pipeline_flow, registry_for
    from registry.schema import LineageEdge, MergeRun, Model

    zoo, _, _ = small_zoo
    real = flows.steps.evaluate_checkpoint

    def evaluation_breaks_on_merges(path, suite, **kw):
        if "merge-run-" in str(path):
            raise RuntimeError("injected: the evaluator crashed")
        return real(path, suite, **kw)

    monkeypatch.setattr(flows.steps, "evaluate_checkpoint", evaluation_breaks_on_merges)
    config = pipeline_config(zoo, name="breaks", merges=[{"method": "task_arithmetic", "parameters": {"lambda": 0.3}}])
    with pytest.raises(RuntimeError, match="injected"):
        pipeline_flow(config)
    registry = registry_for(pinned_settings())
    with registry.Session() as s:
        assert s.query(Model).filter(Model.kind == "merged").count() == 0
        assert s.query(LineageEdge).count() == 0
        runs = s.query(MergeRun).all()
    assert [(r.status, r.output_model_id) for r in runs] == [("failed", None)] and "injected" in runs[0].error
    assert not list(Path(registry.config.scratch).glob("merge-run-*"))  # the staged files are gone
    assert registry.mirror.client.search_model_versions("name='breaks'") == []
    assert registry.resolve("colours").kind == "ingested"  # what was ingested before the failure stays


def test_a_merge_whose_registration_fails_leaves_no_model_no_evaluation(prefect_api, small_zoo, monkeypatch):
    from flows.pipeline import pinned_settings, pipeline_flow, registry_for
    from registry.mlflow_mirror import MlflowMirror
    from registry.schema import Evaluation, MergeRun, Model

    zoo, _, _ = small_zoo
    real = MlflowMirror.register_model

    def refuse_merged(self, name, model_dir, tags, source_run_id=None, **options):
        if tags["mergeyard.kind"] == "merged":
            raise ConnectionError("injected: MLflow went away")
        return real(self, name, model_dir, tags, source_run_id, **options)

    monkeypatch.setattr(MlflowMirror, "register_model", refuse_merged)
    config = pipeline_config(zoo, name="unregistered", merges=[{"method": "average"}], score={"method": "none"})
    with pytest.raises(ConnectionError, match="injected"):
        pipeline_flow(config)
    registry = registry_for(pinned_settings())
    with registry.Session() as s:
        assert s.query(Model).filter(Model.kind == "merged").count() == 0
        merged_evals = s.query(Evaluation).join(Model, Model.id == Evaluation.model_id).filter(Model.kind == "merged").count()
        assert merged_evals == 0
        # MLflow going away is transient: the merge was retried once, and each attempt failed cleanly
        assert [r.status for r in s.query(MergeRun)] == ["failed", "failed"]
    stored = {p.name for p in Path(registry.config.store_root).iterdir()}
    assert stored == {registry.store.path_for(m.digest).name for m in registry.list_models()}  # no orphaned bytes


def test_dask_local_cluster_makes_the_same_models(prefect_api, small_zoo, tmp_path):
    from flows.pipeline import pipeline_flow
    from flows.runtime import with_runner
    from merging.engine import run_merge
    from merging.recipes.recipe import parse_recipe

    zoo, _, _ = small_zoo
    config = pipeline_config(zoo, name="on-dask", merges=[{"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
                                                          {"method": "average"}])
    report = with_runner(pipeline_flow, "local")(config)  # worker processes, reporting to the test server
    assert report["promotion"]["decision"] == "promoted"
    for merge, spec in zip(report["merges"], config.merges):
        assert merge["merged"]
        recipe = parse_recipe({"method": spec.method, "parameters": spec.parameters, "base": str(zoo / "base"),
                               "models": [str(zoo / "finetuned" / t) for t in TARGETS]})
        assert merge["digest"] == run_merge(recipe, tmp_path / spec.method).digest
    from flows.registry_access import open_registry

    registry = open_registry()
    for merge in report["merges"]:  # each merge's own units ran on the cluster's workers
        details = registry.producing_run(registry.resolve(merge["digest"])).details
        assert details["executor"]["kind"] == "dask" and details["executor"]["workers"]


def test_only_transient_errors_are_retried():
    from sqlalchemy.exc import OperationalError

    from flows.pipeline import is_transient
    from merging.errors import NonFiniteError

    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert is_transient(OperationalError("select 1", {}, Exception("server closed the connection")))
    assert not is_transient(NonFiniteError("NaN in blk.0.w")) and not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("bad"))


def test_standalone_score_merge_and_promote_flows(prefect_api, small_zoo):
    from flows.config import MergeSpec
    from flows.pipeline import merge_flow, promote_flow, score_flow
    from registry.promotion import Gate

    zoo, manifest, _ = small_zoo
    candidates = [str(zoo / "finetuned" / t) for t in ("digits", "colours")]
    scores = score_flow("zoo:digits", str(zoo / "base"), candidates)
    digits, colours = (manifest["finetuned"][t]["digest"] for t in ("digits", "colours"))
    assert scores[digits] > scores[colours]
    merged = merge_flow(MergeSpec(method="task_arithmetic", parameters={"lambda": 0.5}), str(zoo / "base"), candidates,
                        "zoo:digits", name="digits-colours")
    assert merged["merged"] and set(merged["scores"]["accuracy"]) == {"digits"}
    refused = promote_flow(merged["digest"], "production", Gate(required_suites=["zoo:digits"], min_average=0.999))
    assert refused["decision"] == "refused" and [c["passed"] for c in refused["checks"]] == [False]
    promoted = promote_flow(merged["digest"], "production", Gate(required_suites=["zoo:digits"], min_average=0.1))
    assert promoted["decision"] == "promoted" and promoted["event_id"] == refused["event_id"] + 1
    assert promote_flow("digits-colours", "production")["decision"] == "unchanged"


def test_standalone_ingest_and_evaluate_flows(prefect_api, small_zoo):
    from flows.pipeline import evaluate_flow, ingest_flow

    zoo, manifest, _ = small_zoo
    digests = ingest_flow([str(zoo / "finetuned" / "textures")], base=str(zoo / "base"))
    assert digests == [manifest["finetuned"]["textures"]["digest"]]
    first = evaluate_flow([digests[0]], "zoo:textures")
    assert first[0]["accuracy"]["textures"] == pytest.approx(manifest["finetuned"]["textures"]["accuracy"])
    assert not first[0]["reused"]
    assert evaluate_flow([digests[0]], "zoo:textures")[0]["accuracy"] == first[0]["accuracy"]


# ---- the CLI: demo and run ---------------------------------------------------------------------


def test_demo_runs_the_whole_job_and_run_repeats_it_from_cache(prefect_api, small_zoo, isolated_home):
    from flows.cli import app
    from merging.methods import all_methods

    zoo, _, _ = small_zoo
    shutil.copytree(zoo, isolated_home / "zoo")  # a built zoo is reused, as on a second `mergeyard demo`
    runner = CliRunner()
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    shown = {m.name for m in all_methods() if m.example is not None}
    assert {"ties", "fw_hard", "mudsc", "adamerging"} <= shown
    for name in shown:
        assert name in out
    assert "promoted" in out and "demo-ta8@staging" in out and "lineage of demo-ta8" in out
    assert "mlflow ui --backend-store-uri" in out and "prefect server start" in out
    pipeline = isolated_home / "demo" / "pipeline.yaml"
    again = runner.invoke(app, ["run", str(pipeline), "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout[again.stdout.index("{"):])
    assert {m["method"] for m in report["merges"]} == shown
    assert all(m["cached"] for m in report["merges"]) and report["promotion"]["decision"] == "unchanged"
    assert [c["name"] for c in report["candidates"] if not c["selected"]] == [OFF_TARGET]


def test_run_with_a_bad_pipeline_exits_1_with_one_line(tmp_path):
    from flows.cli import app

    (tmp_path / "p.yaml").write_text("name: p\nsuite: ta8-mini\nbase: b\ncandidates: [c]\nmerges: [{method: nope}]\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1
    assert "unknown merge method 'nope'" in result.output and len(result.output.strip().splitlines()) == 1


def test_run_refuses_a_missing_model_before_any_flow_run_starts(tmp_path):
    from flows.cli import app
    from flows.registry_access import open_registry

    (tmp_path / "p.yaml").write_text("name: p\nsuite: ta8-mini\nbase: no-such-base\ncandidates: [c]\n"
                                     "merges: [{method: average}]\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: recipe input 'no-such-base' is neither a path, a source URI nor a registered model"
    assert open_registry().list_models() == []
    (tmp_path / "p.yaml").write_text("name: p\nsuite: ta8-mini\ntasks: [digits, planets]\nbase: b\ncandidates: [c]\n"
                                     "merges: [{method: average}]\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "suite 'ta8-mini' has no task 'planets'" in result.output


def test_prefect_gets_its_home_even_where_mergeyard_home_is_not_on_disk_yet(tmp_path, monkeypatch):
    from flows.runtime import configure_prefect
    from flows.settings import get_settings

    home = tmp_path / "not" / "yet"
    monkeypatch.setenv("MERGEYARD_HOME", str(home))
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    get_settings.cache_clear()
    configure_prefect(get_settings())
    assert Path(os.environ["PREFECT_HOME"]) == (home / "prefect").resolve() and (home / "prefect").is_dir()


def test_serve_refuses_without_a_schedule_or_a_server(tmp_path, monkeypatch):
    import flows.runtime
    from flows.cli import app

    (tmp_path / "p.yaml").write_text("name: p\nsuite: ta8-mini\nbase: b\ncandidates: [c]\nmerges: [{method: average}]\n")
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "has no schedule" in result.output
    (tmp_path / "p.yaml").write_text((tmp_path / "p.yaml").read_text() + "schedule: {cron: '0 2 * * *'}\n")
    monkeypatch.setattr(flows.runtime, "prefect_api_url", lambda: None)  # as with no PREFECT_API_URL
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "needs a Prefect server" in result.output


def test_serve_refuses_a_server_that_does_not_answer(tmp_path, monkeypatch):
    import socket

    import flows.runtime
    from flows.cli import app

    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "p.yaml").write_text("name: p\nsuite: ta8-mini\nbase: b\ncandidates: [c]\nmerges: [{method: average}]\n"
                                     "schedule: {cron: '0 2 * * *'}\n")
    monkeypatch.setattr(flows.runtime, "prefect_api_url", lambda: f"http://127.0.0.1:{port}/api")
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and f"no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:{port}/api" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_refuses_a_missing_model_before_it_deploys_anything(prefect_api, tmp_path, isolated_home):
    from prefect.client.orchestration import get_client

    from flows.cli import app

    (tmp_path / "p.yaml").write_text("name: nightly-missing\nsuite: ta8-mini\nbase: no-such-base\ncandidates: [c]\n"
                                     "merges: [{method: average}]\nschedule: {cron: '0 2 * * *'}\n")
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "no-such-base" in result.output
    with get_client(sync_client=True) as client:  # the live test server got no deployment
        assert all(d.name != "nightly-missing" for d in client.read_deployments())


def test_dask_flag_without_a_value_means_a_local_cluster(monkeypatch):
    import flows.cli

    seen = {}
    monkeypatch.setattr(flows.cli, "app", lambda args, prog_name: seen.setdefault("args", args))
    for argv, expected in [(["run", "--dask", "p.yaml"], ["run", "--dask", "local", "p.yaml"]),
                           (["run", "p.yaml", "--dask"], ["run", "p.yaml", "--dask", "local"]),
                           (["run", "p.yaml", "--dask", "tcp://h:8786"], ["run", "p.yaml", "--dask", "tcp://h:8786"])]:
        seen.clear()
        monkeypatch.setattr("sys.argv", ["mergeyard", *argv])
        flows.cli.main()
        assert seen["args"] == expected
