"""The pipeline's steps as plain functions: what each Prefect task calls, testable without Prefect.

Every step is idempotent against the registry, the source of truth: a
candidate ingested twice is one model, a model already evaluated on a suite
digest is not evaluated again, and a pinned recipe that already succeeded under
this mergeyard version is not merged again. Prefect's caches only save the
round trip; clearing them never causes repeated or duplicated work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.evaluator import SuiteResult, evaluate_checkpoint, load_state
from evaluation.objectives import FewShotCrossEntropy
from evaluation.suite import Suite
from merging.checkpoints.alignment import aligned_inputs
from merging.checkpoints.checkpoint import Checkpoint
from merging.recipes.recipe import Recipe
from merging.algorithms.relevance import gradient_alignment
from merging.version import __version__
from flows.evaluate import evaluation_metrics
from flows.merge import abort_merge, commit_merge, stage_merge
from flows.resolve import refuse_adapter
from flows.suites import bound_to, suite_for  # noqa: F401  (suite_for: what the steps' callers open suites with)
from registry.registry import ModelInfo, Registry, SuiteEvaluation


@dataclass
class Scores:
    """Accuracy summary of one model on one suite, as the pipeline reports it."""

    digest: str
    suite_digest: str
    accuracy: dict[str, float]
    normalized: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    perplexity: dict[str, float] = field(default_factory=dict)  # language-modelling tasks (lower is better)

    @classmethod
    def from_rows(cls, digest: str, suite_digest: str, rows, reused: bool) -> "Scores":
        acc = {t: v for t, m, v in rows if m == "accuracy"}
        norm = {t: v for t, m, v in rows if m == "normalized_accuracy"}
        ppl = {t: v for t, m, v in rows if m == "perplexity"}
        return cls(digest, suite_digest, acc, norm, reused, ppl)


def summary(scores: dict) -> tuple[str, float]:
    """What ranks merges on a suite, from a `Scores`' fields: ("accuracy", the mean) where it has accuracies, else
    ("perplexity", the mean): a suite of language-modelling tasks ranks by perplexity, lower first."""
    if scores["accuracy"]:
        return "accuracy", sum(scores["accuracy"].values()) / len(scores["accuracy"])
    values = list((scores.get("perplexity") or {}).values())
    return "perplexity", sum(values) / len(values) if values else float("inf")


def best_merge(merges: list[dict]) -> dict:
    """The best of a pipeline's merges by `summary`: the highest mean accuracy, or the lowest mean perplexity."""
    return max(merges, key=lambda m: m["average"] if m["metric"] == "accuracy" else -m["average"])


def _log_to_mlflow(registry: Registry, model: ModelInfo, suite: Suite, result: SuiteResult) -> str | None:
    if registry.mirror is None:
        return None
    return registry.mirror.log_evaluation(model.mlflow_model_id, model.digest, suite.name, suite.digest,
                                          evaluation_metrics(result))


def evaluate_or_reuse(registry: Registry, model: ModelInfo, suite: Suite, device: str = "cpu",
                      progress=None) -> Scores:
    """The model's scores on exactly this suite digest: read back if recorded, else measured and recorded."""
    rows = registry.evaluation_rows(model.id, suite.digest)
    if rows:
        return Scores.from_rows(model.digest, suite.digest, rows, reused=True)
    refuse_adapter(model, "evaluated")
    result = evaluate_checkpoint(model.store_path, bound_to(suite, registry, model), device=device, progress=progress,
                                 label=model.name)
    registry.record_evaluations(model, suite.name, suite.digest, result.rows(), run_id=_log_to_mlflow(registry, model, suite, result))
    return Scores.from_rows(model.digest, suite.digest, result.rows(), reused=False)


def score_candidates(registry: Registry, suite: Suite, base: ModelInfo, candidates: list[ModelInfo],
                     samples_per_task: int = 100, device: str = "cpu") -> dict[str, float]:
    """Gradient alignment of each candidate at the base on the suite's few-shot data; recorded as scores."""
    objective = FewShotCrossEntropy(bound_to(suite, registry, base), samples_per_task=samples_per_task, device=device)
    _, gradient = objective.loss_and_grad(load_state(base.store_path))
    reference = Checkpoint(base.store_path)
    views = aligned_inputs(reference, [Checkpoint(c.store_path) for c in candidates],
                           [base.name, *(c.name for c in candidates)])
    scores = gradient_alignment({k: g.cpu() for k, g in gradient.items()}, reference, views).summary
    registry.record_scores(suite.name, suite.digest, "gradient", {c.id: s for c, s in zip(candidates, scores)})
    return {c.digest: s for c, s in zip(candidates, scores)}


def score_data_free(registry: Registry, suite_name: str, base: ModelInfo, reference: ModelInfo,
                    candidates: list[ModelInfo]) -> dict[str, float]:
    """For suites without data: cosine of each task vector with a reference model's (e.g. one tuned on the target)."""
    from merging.algorithms.relevance import task_vector_cosine

    base_ckpt = Checkpoint(base.store_path)
    reference_view, *views = aligned_inputs(base_ckpt, [Checkpoint(reference.store_path)]
                                            + [Checkpoint(c.store_path) for c in candidates])
    scores = task_vector_cosine(base_ckpt, reference_view, views)
    registry.record_scores(suite_name, f"reference:{reference.digest}", "task_vector_cosine",
                           {c.id: s for c, s in zip(candidates, scores)})
    return {c.digest: s for c, s in zip(candidates, scores)}


def select_candidates(scores: dict[str, float], min_relevance: float | None, top_k: int | None) -> list[str]:
    """Digests to merge, most relevant first: above `min_relevance`, at most `top_k` of them."""
    ranked = sorted(scores, key=lambda d: -scores[d])
    if min_relevance is not None:
        ranked = [d for d in ranked if scores[d] >= min_relevance]
    return ranked[:top_k] if top_k else ranked


@dataclass
class MergeOutcome:
    model: ModelInfo
    scores: Scores
    merged: bool  # False when a previous run of the same pinned recipe was reused


def merge_evaluate_commit(registry: Registry, recipe: Recipe, name: str, suite: Suite, *, device: str = "cpu",
                          progress=None, dask: str | None = None) -> MergeOutcome:
    """Merge, evaluate the staged output, then register model + lineage + evaluations in one transaction.

    If evaluating or registering fails, the run is marked failed and nothing
    claims the model exists: no model row, no lineage edge, no MLflow version.
    """
    previous = registry.reusable_merge(recipe.recipe_hash, __version__)
    if previous is not None:
        return MergeOutcome(previous, evaluate_or_reuse(registry, previous, suite, device), merged=False)
    staged = stage_merge(recipe, registry, device=device, progress=progress, dask=dask)
    try:
        result = evaluate_checkpoint(staged.path, bound_to(suite, registry, staged.base), device=device,
                                     progress=progress, label=name)
    except BaseException as exc:
        abort_merge(registry, staged, exc)
        raise
    evaluation = SuiteEvaluation(suite.name, suite.digest, tuple(result.rows()))
    model = commit_merge(registry, staged, name, evaluations=[evaluation])
    return MergeOutcome(model, Scores.from_rows(model.digest, suite.digest, evaluation.rows, reused=False), merged=True)


@dataclass
class PromotionOutcome:
    decision: str  # promoted | refused | unchanged
    model: str
    alias: str
    name: str
    checks: list[dict]
    event_id: int | None
    previous: str | None

    def as_dict(self) -> dict:
        return dict(vars(self))


def promote_if_changed(registry: Registry, digest: str, alias: str, gate, actor: str,
                       reason: str | None = None, no_gate: bool = False) -> PromotionOutcome:
    """Pass the model through the gate unless it already holds NAME@ALIAS (a re-run adds no event then)."""
    from dataclasses import asdict

    from flows.gates import promote_through

    model = registry.resolve(digest)
    with registry.Session() as s:
        holder = registry.alias_holder(s, model.name, alias)
    if holder == model.id:
        return PromotionOutcome("unchanged", model.digest, alias, model.name, [], None, model.digest)
    decision = promote_through(registry, model.digest, alias, gate, actor, reason, no_gate=no_gate)
    return PromotionOutcome("promoted" if decision.passed else "refused", model.digest, alias, model.name,
                            [asdict(c) for c in decision.checks], decision.event_id,
                            decision.previous.digest if decision.previous else None)
